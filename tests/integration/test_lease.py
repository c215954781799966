"""Lease renewal: a dead worker's tasks come back within a short visibility timeout,
and a live worker's long task is never delivered twice.

Everything runs against the real Redis under the test's own key prefix (kombu's
``global_keyprefix`` covers ``unacked`` and ``unacked_index`` too) and real workers
started by ``fleet worker``. Runs are counted by tests/probe_tasks.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from fleet.factory import broker_transport_options
from fleet.lease import LeaseRenewer, renew
from fleet.processes import WorkerProcess
from fleet.units import format_duration
from tests.conftest import REDIS_URL, ROOT, free_port, shipped_config, wait_for
from tests.probe_tasks import events, executions

PROBE = "tests.probe.slow"
IMPORTS = [*shipped_config()["imports"], "tests.probe_tasks"]


@pytest.fixture
def probe_fleet(fleet, monkeypatch):
    """The fleet fixture, with workers able to import ``tests.probe_tasks``.

    Workers inherit the test's working directory and ``python -m fleet.cli`` puts it
    first on sys.path; from the repository root ``tests`` is a package they can import.
    """
    monkeypatch.chdir(ROOT)
    return fleet


def lease_overrides(vt: float, interval: float, *, enabled: bool = True,
                    queues: dict | None = None) -> dict:
    return {
        "broker": {"visibility_timeout": format_duration(vt),
                   "lease": {"enabled": enabled, "interval": format_duration(interval)}},
        "imports": IMPORTS,
        "queues": queues or {},
    }


def runs_by_task(client: redis.Redis, config) -> dict[str, list[dict]]:
    """Each task's runs in start order: host, start time and end time (None: cut short)."""
    runs: dict[str, list[dict]] = {}
    for e in events(client, config):
        task_runs = runs.setdefault(e["task"], [])
        if e["event"] == "start":
            task_runs.append({"host": e["host"], "pid": e["pid"], "start": e["at"], "end": None})
        else:
            run = next(r for r in task_runs if r["pid"] == e["pid"] and r["end"] is None)
            run["end"] = e["at"]
    return runs


def sweep_settings(app) -> tuple[float, float, float]:
    """What kombu's Redis channel of ``app`` really uses: visibility timeout, restore
    sweep interval, and how long a sweep's lock outlives a sweeper that died."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        return (channel.visibility_timeout, channel.unacked_restore_interval,
                channel.unacked_mutex_expire)


def wait_for_tag(client: redis.Redis, index: str, timeout: float) -> bytes:
    return wait_for(lambda: (client.zrange(index, 0, -1) or [None])[0], timeout,
                    what=f"a message in {index}")


def held_task_ids(client: redis.Redis, prefix: str) -> set[str]:
    """Ids of the tasks whose messages wait in ``unacked`` (kombu: [message, ex, rk])."""
    held = client.hvals(prefix + "unacked")
    return {json.loads(raw)[0]["headers"]["id"] for raw in held}


# -- renew() and LeaseRenewer against the real Redis ------------------------------------

def test_renew_refreshes_only_entries_that_are_still_there(redis_client, prefix):
    index = prefix + "unacked_index"
    # One index for every queue of the DB: "someone-else" is another worker's message,
    # whose lease is not ours to renew.
    redis_client.zadd(index, {"held-1": 100.0, "held-2": 100.0, "someone-else": 100.0})
    # The worker read its held tags, then acked "held-3" (kombu: ZREM + HDEL) before the
    # renewal went out: the late renewal must not bring the acked message back.
    redis_client.zadd(index, {"held-3": 100.0})
    redis_client.zrem(index, "held-3")

    renew(redis_client, index, ["held-1", "held-2", "held-3"], now=5000.0)

    assert dict(redis_client.zrange(index, 0, -1, withscores=True)) == {
        b"held-1": 5000.0, b"held-2": 5000.0, b"someone-else": 100.0}
    assert redis_client.zscore(index, "held-3") is None


def test_renew_is_one_round_trip_for_many_tags(prefix):
    """Counted at the socket: a real connection that tallies what it writes."""
    sent = []

    class CountingConnection(redis.Connection):
        def send_packed_command(self, command, check_health=True):
            sent.append(command)
            return super().send_packed_command(command, check_health)

    pool = redis.ConnectionPool.from_url(REDIS_URL, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    index = prefix + "unacked_index"
    tags = [f"tag-{i}" for i in range(2000)]
    try:
        client.zadd(index, {tag: 1.0 for tag in tags})  # also opens the connection
        sent.clear()
        renew(client, index, tags, now=2.0)
        assert len(sent) == 1
        assert client.zcount(index, 2.0, 2.0) == len(tags)
        sent.clear()
        assert renew(client, index, [], now=3.0) == 0
        assert sent == []  # nothing held, nothing sent
    finally:
        client.close()
        pool.disconnect()


def test_renewer_survives_redis_errors_and_renews_once_redis_answers(
        redis_client, prefix, caplog):
    index = prefix + "unacked_index"
    redis_client.zadd(index, {"held": 100.0})
    # Nothing listens there. No client-side retries: redis-py's default backoff would
    # only make each failing tick take ~5 s.
    closed = redis.Redis(port=free_port(), socket_connect_timeout=1, socket_timeout=1,
                         retry=Retry(NoBackoff(), 0))
    renewer = LeaseRenewer(closed, index, 0.05, held=lambda: ["held"])

    with caplog.at_level(logging.WARNING, logger="fleet.lease"):
        renewer.tick()  # must not raise
        assert renewer.renewals == 0
        assert any(r.levelno == logging.WARNING and "lease renewal failed" in r.getMessage()
                   for r in caplog.records)

        # The thread keeps going through failures, and renews once Redis answers again.
        renewer.start()
        try:
            wait_for(lambda: sum("lease renewal failed" in r.getMessage()
                                 for r in caplog.records) >= 3, 10,
                     what="the renewer to keep retrying")
            assert redis_client.zscore(index, "held") == 100.0
            renewer.client = redis_client
            wait_for(lambda: redis_client.zscore(index, "held") > 100.0, 10,
                     what="a renewal after Redis came back")
        finally:
            renewer.stop()
    assert renewer.renewals >= 1
    assert not renewer._thread.is_alive()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_transport_options_make_a_dead_sweeper_cheap():
    """A worker killed mid-sweep leaves kombu's restore mutex behind; it must expire well
    within one visibility timeout, or no worker restores anything until it does."""
    from fleet.config import parse_config

    for vt in (10.0, 60.0, 3600.0):
        broker = {"visibility_timeout": vt, "lease": {"interval": vt / 4}}
        config = parse_config({**shipped_config(), "broker": broker}, "test")
        options = broker_transport_options(config)
        assert options["visibility_timeout"] == vt
        assert options["unacked_restore_interval"] <= vt / 4
        assert options["unacked_restore_throttle"] == 1
        assert options["unacked_mutex_expire"] <= vt / 2


# -- a worker killed mid-task --------------------------------------------------------------

VT, INTERVAL = 10.0, 2.0          # broker.visibility_timeout, broker.lease.interval
TASKS, CONCURRENCY, TASK_SECONDS = 8, 2, 5.0
KILL_AFTER = 3.0
#: A fresh worker forks its pool, imports the tasks and connects: ~2-4 s here, far more
#: on a 2-core machine shared with other test runs.
STARTUP = 15.0


@pytest.mark.slow
def test_a_killed_workers_tasks_all_complete_within_one_lease(probe_fleet, redis_client):
    """8 tasks of 5 s on a pool of 2; worker and pool SIGKILLed 3 s in, a new worker
    started at once: every task succeeds within the bound, and the only second runs are
    of the two tasks the kill cut short, started after the kill."""
    fleet = probe_fleet
    config = fleet.configure(lease_overrides(VT, INTERVAL, queues={"heavy": {
        "tasks": ["tasks.heavy.*", PROBE], "concurrency": CONCURRENCY,
        "memory_limit": "512Mi"}}))
    app = fleet.app()
    vt, restore, mutex = sweep_settings(app)
    assert vt == VT and restore <= VT / 4
    # A worker SIGKILLed inside a restore sweep leaves kombu's sweep lock behind, and no
    # worker restores anything until it expires (300 s by kombu's default): it must
    # expire before the dead worker's leases do.
    assert mutex <= VT / 2
    # After the kill: the dead worker's last renewal is no later than the kill, so its
    # messages are overdue VT later, and the rescuer's next restore sweep (every
    # `restore` s) puts them back. The rescuer is up after at most STARTUP. From then on
    # all 8 tasks are available to 2 slots: 4 rounds of TASK_SECONDS. So the last task
    # ends within STARTUP + VT + restore + ceil(8 / 2) * TASK_SECONDS
    #   = 15 + 10 + 2.5 + 4 * 5 = 47.5 s of the kill.
    # Without the lease (kombu's 1 h default) or with kombu's restore sweep (every 100 s
    # by default) the two tasks cut short would miss it by far.
    bound = STARTUP + VT + restore + math.ceil(TASKS / CONCURRENCY) * TASK_SECONDS

    doomed = fleet.start_worker("heavy", name="doomed")
    results = [app.send_task(PROBE, kwargs={"seconds": TASK_SECONDS}) for _ in range(TASKS)]
    sent = time.monotonic()

    def running_on_doomed():
        runs = runs_by_task(redis_client, config)
        return [t for t, rs in runs.items() if rs and rs[0]["host"] == doomed.hostname]

    wait_for(lambda: len(running_on_doomed()) == CONCURRENCY, 20,
             what="the doomed worker to start two tasks")
    # With disable_prefetch the doomed worker holds exactly its running tasks, and each
    # sits in unacked_index under its lease.
    assert held_task_ids(redis_client, fleet.prefix) == set(running_on_doomed())
    assert redis_client.zcard(fleet.prefix + "unacked_index") == CONCURRENCY
    time.sleep(max(0.0, sent + KILL_AFTER - time.monotonic()))
    doomed.kill()
    killed_at, killed_wall = time.monotonic(), time.time()
    # The worst moment to die: inside a restore sweep, holding kombu's sweep lock. Leave
    # the lock behind as kombu takes it (SET NX PX unacked_mutex_expire), so the bound
    # covers that case too rather than hoping the SIGKILL missed the sweep.
    redis_client.set(fleet.prefix + "unacked_mutex", "doomed-sweeper", nx=True,
                     px=int(mutex * 1000))
    rescuer = fleet.start_worker("heavy", name="rescuer", wait=False)

    wait_for(lambda: all(r.state == "SUCCESS" for r in results), bound, interval=0.5,
             what=f"all {TASKS} tasks to succeed within {bound:g}s of the kill "
                  f"(states: {[r.state for r in results]})")
    took = time.monotonic() - killed_at
    print(f"\nall {TASKS} tasks done {took:.1f}s after the kill (bound {bound:g}s)")

    runs = runs_by_task(redis_client, config)
    assert sorted(runs) == sorted(r.id for r in results)
    cut_short = {t for t, rs in runs.items()
                 if rs[0]["host"] == doomed.hostname and rs[0]["end"] is None}
    assert len(cut_short) == CONCURRENCY  # the two running at the kill
    for task_id, task_runs in runs.items():
        assert executions(redis_client, config, task_id) == len(task_runs)
        if task_id in cut_short:
            # Once on the doomed worker, cut short; once more, only after it died.
            assert len(task_runs) == 2, f"{task_id} ran {len(task_runs)} times"
            again = task_runs[1]
            assert again["host"] == rescuer.hostname and again["end"] is not None
            assert again["start"] > killed_wall
        else:
            assert len(task_runs) == 1, f"{task_id} ran {len(task_runs)} times"
            assert task_runs[0]["end"] is not None
    assert sum(len(rs) for rs in runs.values()) == TASKS + CONCURRENCY


# -- a live worker's long task is never delivered twice ------------------------------------

SHORT_VT, SHORT_INTERVAL, LONG_TASK = 6.0, 2.0, 15.0
HEAVY = {"heavy": {"tasks": ["tasks.heavy.*", PROBE]}}


def start_two_workers(fleet, queue: str):
    one = fleet.start_worker(queue, name="one", wait=False)
    two = fleet.start_worker(queue, name="two", wait=False)
    fleet.wait_ready(one)
    fleet.wait_ready(two)
    return one, two


def first_run(client: redis.Redis, config, task_id: str) -> dict:
    return wait_for(lambda: runs_by_task(client, config).get(task_id), 15,
                    what=f"task {task_id} to start")[0]


@pytest.mark.slow
def test_a_long_task_of_a_live_worker_runs_once(probe_fleet, redis_client):
    """15 s task, 6 s visibility timeout, an idle second worker on the same queue."""
    fleet = probe_fleet
    config = fleet.configure(lease_overrides(SHORT_VT, SHORT_INTERVAL, queues=HEAVY))
    restore = broker_transport_options(config)["unacked_restore_interval"]
    start_two_workers(fleet, "heavy")
    app = fleet.app()
    registered = app.control.inspect(timeout=5).registered() or {}
    assert len(registered) == 2 and all(PROBE in tasks for tasks in registered.values())

    result = app.send_task(PROBE, kwargs={"seconds": LONG_TASK})
    index = fleet.prefix + "unacked_index"
    tag = wait_for_tag(redis_client, index, 10)
    started = first_run(redis_client, config, result.id)["start"]
    # Past the point where an unrenewed lease is overdue and swept back to the queue:
    time.sleep(max(0.0, started + SHORT_VT + 2 * restore - time.time()))
    score = redis_client.zscore(index, tag)
    assert score is not None and time.time() - score < SHORT_VT, "the lease lapsed"

    assert result.get(timeout=LONG_TASK + 30)["slept"] == LONG_TASK
    runs = runs_by_task(redis_client, config)[result.id]
    assert executions(redis_client, config, result.id) == 1
    assert len(runs) == 1 and runs[0]["end"] - runs[0]["start"] >= LONG_TASK


@pytest.mark.slow
def test_control_a_stalled_renewer_lets_the_same_long_task_run_twice(
        probe_fleet, redis_client):
    """The test above, with the renewal stopped: proof that it can fail.

    broker.lease.enabled: false cannot express this case: validation then demands a hard
    time limit below visibility_timeout on every acks_late queue, so the task would be
    killed before it could be delivered twice. Instead the worker's main process (the
    renewer's home) is frozen with SIGSTOP while its pool child keeps running the task:
    same config, same worker, the renewals alone are missing.
    """
    fleet = probe_fleet
    config = fleet.configure(lease_overrides(SHORT_VT, SHORT_INTERVAL, queues=HEAVY))
    restore = broker_transport_options(config)["unacked_restore_interval"]
    one, two = start_two_workers(fleet, "heavy")
    result = fleet.app().send_task(PROBE, kwargs={"seconds": LONG_TASK})
    first = first_run(redis_client, config, result.id)
    busy = one if first["host"] == one.hostname else two
    os.kill(busy.pid, signal.SIGSTOP)  # the main process only, not its pool child
    try:
        wait_for(lambda: executions(redis_client, config, result.id) >= 2,
                 SHORT_VT + 2 * restore + 10, what="the task to be delivered a second time")
        first, second = runs_by_task(redis_client, config)[result.id][:2]
        assert first["end"] is None, "the first run must still be going"
        assert second["host"] != first["host"]
        assert second["start"] - first["start"] >= SHORT_VT - SHORT_INTERVAL
    finally:
        for worker in (one, two):  # neither run needs to finish
            worker.kill()


#: Early ack, one message prefetched: the waiting one sits in unacked while the worker
#: runs a long task, and needs the lease as much as a running acks_late task does.
PREFETCHING = {"tasks": [PROBE], "pool": "prefork", "concurrency": 1,
               "prefetch_multiplier": 1, "acks_late": False}


def without_lease() -> dict:
    """Queues that pass validation with broker.lease off (see hard_limit_below_visibility)."""
    limits = {"time_limit": {"soft": format_duration(SHORT_VT - 2),
                             "hard": format_duration(SHORT_VT - 1)}}
    return {"default": limits, "heavy": limits, "xl": limits,
            "io": {"acks_late": False},  # threads: no time limits to offer
            "waiting": PREFETCHING}


def start_plain_celery_worker(fleet, queues: str, name: str) -> WorkerProcess:
    """``celery -A fleet.app worker -Q a,b``: a fleet app without one fleet queue."""
    node = f"{name}@{fleet.prefix.rstrip(':')}"
    log = fleet.tmp_path / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**fleet.env, "FLEET_CONFIG": str(fleet.config_path)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "fleet.app", "worker", "-Q", queues,
             "-n", node, "-c", "1", "--prefetch-multiplier", "1", "--loglevel", "INFO"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    worker = WorkerProcess.__new__(WorkerProcess)
    worker.proc, worker.hostname, worker.log, worker.queue = proc, node, log, queues
    fleet.workers.append(worker)
    fleet.wait_ready(worker)
    return worker


@pytest.mark.slow
@pytest.mark.parametrize(("holder", "lease", "expected_runs"), [
    ("fleet", True, 1),
    # A worker on several queues gets no queue settings, but the app's short timeout
    # all the same: it needs the lease too.
    ("multi-queue", True, 1),
    # Control: broker.lease off, same scenario; the waiting task runs twice.
    ("fleet", False, 2),
], ids=["lease", "multi-queue-worker-lease", "control-lease-off"])
def test_a_task_prefetched_behind_a_long_one_runs_once(
        probe_fleet, redis_client, holder, lease, expected_runs):
    fleet = probe_fleet
    queues = {"waiting": PREFETCHING} if lease else without_lease()
    config = fleet.configure(lease_overrides(SHORT_VT, SHORT_INTERVAL, enabled=lease,
                                             queues=queues))
    if holder == "fleet":
        holding = fleet.start_worker("waiting", name="holder")
    else:
        holding = start_plain_celery_worker(fleet, "waiting,default", "holder")
    app = fleet.app()
    long = app.send_task(PROBE, kwargs={"seconds": LONG_TASK})
    assert first_run(redis_client, config, long.id)["host"] == holding.hostname
    waiting = app.send_task(PROBE, kwargs={"seconds": 2})
    # Acked early, the long task left unacked; the waiting one is held there now.
    wait_for(lambda: held_task_ids(redis_client, fleet.prefix) == {waiting.id}, 10,
             what="the holder to prefetch the waiting task")
    idle = fleet.start_worker("waiting", name="idle")

    if expected_runs == 1:
        assert waiting.get(timeout=LONG_TASK + 30)["host"] == holding.hostname
    else:
        wait_for(lambda: executions(redis_client, config, waiting.id) >= 2, LONG_TASK + 30,
                 what="the waiting task to run a second time")
    assert long.get(timeout=30)["host"] == holding.hostname
    runs = runs_by_task(redis_client, config)[waiting.id]
    assert executions(redis_client, config, waiting.id) == expected_runs == len(runs)
    if expected_runs == 2:
        # Redelivered to the idle worker while the holder lived and still held it.
        assert {r["host"] for r in runs} == {idle.hostname, holding.hostname}
