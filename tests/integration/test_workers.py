"""Real workers start with their queue's settings, and tasks land where rules send them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fleet.processes import WorkerProcess
from fleet.routing import SIZE_HEADER
from tests.conftest import ROOT, wait_for

pytestmark = pytest.mark.slow


def stats_and_conf(app, node):
    inspect = app.control.inspect(destination=[node], timeout=5)
    stats = inspect.stats()[node]
    conf = inspect.conf()[node]
    return stats, conf


def test_fleet_worker_runs_with_exactly_its_queue_settings(fleet):
    worker = fleet.start_worker("heavy")
    stats, conf = stats_and_conf(fleet.app(), worker.hostname)
    assert stats["pool"]["max-concurrency"] == 1
    assert stats["pool"]["implementation"].endswith("prefork:TaskPool")
    assert stats["prefetch_count"] == 1
    assert stats["pool"]["max-tasks-per-child"] == 20
    assert stats["pool"]["timeouts"] == [600.0, 660.0]
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["worker_disable_prefetch"] is True
    assert conf["worker_max_memory_per_child"] == 1024 * 1024  # KiB
    assert conf["worker_soft_shutdown_timeout"] == 60.0
    assert conf["task_serializer"] == "json" and conf["accept_content"] == ["json"]
    active = fleet.app().control.inspect(destination=[worker.hostname]).active_queues()
    assert [q["name"] for q in active[worker.hostname]] == ["heavy"]


def test_io_worker_uses_threads_and_high_concurrency(fleet):
    worker = fleet.start_worker("io")
    stats, _conf = stats_and_conf(fleet.app(), worker.hostname)
    assert stats["pool"]["implementation"].endswith("thread:TaskPool")
    assert stats["pool"]["max-concurrency"] == 32
    assert stats["prefetch_count"] == 64  # 32 x prefetch_multiplier 2


def test_concurrency_and_celery_options_can_be_given_on_the_command_line(fleet):
    worker = fleet.start_worker("heavy", extra=("--concurrency", "3", "--",
                                                "--max-tasks-per-child", "7"))
    stats, _conf = stats_and_conf(fleet.app(), worker.hostname)
    assert stats["pool"]["max-concurrency"] == 3  # queues.yaml says 1
    assert stats["pool"]["max-tasks-per-child"] == 7  # queues.yaml says 20
    shown = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "worker", "--queue", "heavy", "-c", "3",
         "--print-config", "--config", str(fleet.config_path), "--",
         "--max-tasks-per-child", "7"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "concurrency               3  (--concurrency; queues.yaml: 1)" in shown.stdout
    assert "passed through            --max-tasks-per-child 7" in shown.stdout
    assert shown.stdout.rstrip().endswith("--max-tasks-per-child 7")


@pytest.mark.parametrize(("args", "reason"), [
    (["--", "-Q", "io"], "-Q cannot be passed through: the queue is --queue's"),
    (["--", "--pool=solo"], "--pool cannot be passed through: the pool is the queue's"),
    (["--", "-c", "9"], "-c cannot be passed through: use fleet worker --concurrency"),
    (["-c", "0"], "Invalid value for '--concurrency' / '-c': 0 is not in the range x>=1"),
])
def test_what_queues_yaml_decides_cannot_be_overridden_behind_its_back(fleet, args, reason):
    done = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "worker", "--queue", "heavy", "--config",
         str(fleet.config_path), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and reason in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_print_config_shows_the_settings_and_the_celery_command(fleet):
    result = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "worker", "--queue", "heavy", "--print-config",
         "--config", str(fleet.config_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = dict(line.split(None, 1) for line in result.stdout.splitlines()
                if line and not line.startswith("#"))
    assert rows["prefetch_multiplier"] == "1"
    assert rows["memory_limit"] == "1.0Gi"
    assert rows["time_limit"] == "11m"
    assert "celery -A fleet.app worker --queues heavy" in result.stdout
    assert "--disable-prefetch" in result.stdout


def test_unknown_queue_is_a_clear_error(fleet):
    result = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "worker", "--queue", "huge",
         "--config", str(fleet.config_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "queues.huge: no such queue (known: default, heavy, io, xl)" in result.stderr
    assert "Traceback" not in result.stderr


def test_plain_celery_cli_worker_takes_the_queue_settings(fleet):
    node = f"plain@{fleet.prefix.rstrip(':')}"
    env = {**fleet.env, "FLEET_CONFIG": str(fleet.config_path)}
    log = fleet.tmp_path / "plain.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "fleet.app", "worker", "-Q", "heavy",
             "-n", node, "--loglevel", "INFO"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    worker = WorkerProcess.__new__(WorkerProcess)
    worker.proc, worker.hostname, worker.log, worker.queue = proc, node, log, "heavy"
    fleet.workers.append(worker)
    fleet.wait_ready(worker)
    stats, conf = stats_and_conf(fleet.app(), node)
    assert stats["prefetch_count"] == 1
    assert stats["pool"]["max-concurrency"] == 1
    assert stats["pool"]["timeouts"] == [600.0, 660.0]
    assert conf["task_acks_late"] is True
    assert "memory guard on, lease renewal on" in log.read_text()
    # celery inspect from the command line, against the same broker and prefix.
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "fleet.app", "inspect", "ping", "-d", node],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pong" in result.stdout


def test_tasks_land_on_the_queue_their_rule_names(fleet, redis_client):
    """No worker runs: the messages stay in Redis where the router put them."""
    app = fleet.app()
    app.send_task("tasks.heavy.crunch", kwargs={"mb": 1})
    app.send_task("tasks.io.fetch")
    app.send_task("tasks.aggregate.sum_by", args=[[]])
    app.send_task("tasks.heavy.crunch", headers={SIZE_HEADER: 300 * 2**20})
    app.send_task("tasks.io.fetch", priority=9)
    p = fleet.prefix

    def depth(queue):
        keys = [queue] + [f"{queue}\x06\x16{n}" for n in (3, 6, 9)]
        return sum(redis_client.llen(p + k) for k in keys)

    assert wait_for(lambda: depth("io") == 2, 5)
    assert depth("heavy") == 1
    assert depth("default") == 1
    assert depth("xl") == 1
    assert redis_client.llen(p + "io\x06\x169") == 1  # priority 9 in its sub-list


def test_a_task_runs_on_a_real_worker_and_its_result_comes_back(fleet):
    fleet.start_worker("default")
    app = fleet.app()
    result = app.send_task("tasks.aggregate.sum_by", args=[[{"key": "a", "value": 2},
                                                            {"key": "a", "value": 3}]])
    assert result.get(timeout=30) == {"a": {"count": 2, "value": 5.0}}
    assert os.environ.get("FLEET_KEY_PREFIX") is None  # the test process is not polluted


RETRYING = {
    "imports": ["tasks.aggregate", "tasks.io", "tasks.heavy", "tests.probe_jobs"],
    "queues": {"default": {
        "tasks": ["tasks.aggregate.*", "fleet.*", "tests.probe.*"],
        "retry": {"max_retries": 2, "exceptions": ["ConnectionError"], "backoff": "1s",
                  "backoff_max": "2s", "jitter": False}}},
}


def test_queue_retry_policy_retries_its_exceptions_then_gives_up(fleet):
    fleet.configure(RETRYING)
    fleet.start_worker("default")
    app = fleet.app()
    recovered = app.send_task("tests.probe.unsteady", args=[2])
    assert recovered.get(timeout=60) == 3  # failed twice, retried, third run succeeded
    exhausted = app.send_task("tests.probe.unsteady", args=[5])
    with pytest.raises(ConnectionError, match="simulated outage, run 3"):
        exhausted.get(timeout=60)


def test_priority_of_the_queue_is_applied_unless_the_caller_says(fleet, redis_client):
    app = fleet.app()
    # heavy's priority 5 lands in the \x06\x163 sub-list (kombu rounds down to its steps
    # 0, 3, 6, 9); an explicit priority=0 in the plain list, read first.
    app.send_task("tasks.heavy.crunch")
    app.send_task("tasks.heavy.crunch", priority=0)
    p = fleet.prefix
    assert wait_for(lambda: redis_client.llen(p + "heavy\x06\x163") == 1, 5)
    assert redis_client.llen(p + "heavy") == 1


def test_task_events_follow_the_config(fleet):
    from fleet.factory import celery_settings
    from fleet.worker import celery_argv, worker_settings

    assert "--task-events" in celery_argv(worker_settings(fleet.config, "default"))
    quiet = fleet.configure({"events": False})
    assert "--task-events" not in celery_argv(worker_settings(quiet, "default"))
    assert celery_settings(quiet)["worker_send_task_events"] is False


SCRIPT = """
import os, warnings
import fleet, fleet.app
first = fleet.app.app
os.environ["FLEET_KEY_PREFIX"] = os.environ["FLEET_KEY_PREFIX"] + "other:"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first.send_task("tests.nothing.here")  # still on the prefix of import time
    first.send_task("tests.nothing.here")
print("warnings", len(caught))
print("message", caught[0].message if caught else "")
print("old", first.config.broker.key_prefix)
print("new", fleet.app_for().config.broker.key_prefix)
"""


def test_fleet_app_says_when_the_environment_changed_and_app_for_follows_it(fleet):
    env = {**fleet.env, "FLEET_CONFIG": str(fleet.config_path)}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    out = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert out["warnings"] == "1"  # once, not per task
    assert out["message"].startswith("fleet.app.app was made when fleet.app was first "
                                     "imported; FLEET_KEY_PREFIX changed since")
    assert "call fleet.app_for()" in out["message"]
    assert out["old"] == fleet.prefix and out["new"] == fleet.prefix + "other:"
