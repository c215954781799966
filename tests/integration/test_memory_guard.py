"""The memory guard stops a runaway task mid-flight, with real workers and real memory."""

from __future__ import annotations

import time

import pytest

from fleet.guard import Busy, over_limit
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

SMALL = {
    "queues": {
        "heavy": {"memory_limit": "200Mi", "concurrency": 2, "disable_prefetch": False,
                  "prefetch_multiplier": 1,
                  "on_memory_exceeded": {"retry_on": None}},
        "xl": {"memory_limit": "1Gi"},
    }
}


def test_over_limit_is_a_pure_decision():
    a, b = Busy("t1", "x", 10), Busy("t2", "y", 11)
    assert over_limit([(a, 100), (b, 300)], 200) == [(b, 300)]
    assert over_limit([(a, 200)], 200) == []  # at the limit is still allowed


def test_runaway_task_is_stopped_mid_task_and_the_worker_goes_on(fleet):
    fleet.configure(SMALL)
    worker = fleet.start_worker("heavy")
    app = fleet.app()
    neighbour = app.send_task("tasks.heavy.sleep", kwargs={"seconds": 3, "tag": "neighbour"})
    time.sleep(0.5)  # the neighbour is running in the other child
    started = time.monotonic()
    runaway = app.send_task("tasks.heavy.grow", kwargs={"target_mb": 2000, "step_mb": 16})
    with pytest.raises(Exception) as caught:
        runaway.get(timeout=60, propagate=True)
    elapsed = time.monotonic() - started
    exc = caught.value
    assert type(exc).__name__ == "MemoryLimitExceeded", repr(exc)
    message = str(exc)
    assert runaway.id in message
    assert "tasks.heavy.grow" in message
    assert "memory_limit of 200.0Mi" in message
    assert "'heavy' queue" in message
    # It was stopped during the task: 2000 MiB would take far longer at 16 MiB a step.
    assert elapsed < 30
    assert runaway.state == "FAILURE"
    # The neighbour in the other pool process was not affected.
    done = neighbour.get(timeout=30)
    assert (done["slept"], done["tag"]) == (3, "neighbour")
    # The worker goes on serving.
    assert worker.alive()
    assert app.send_task("tasks.heavy.sleep", kwargs={"seconds": 0.1}).get(timeout=30)
    log = fleet.log_of(worker)
    assert f"tasks.heavy.grow[{runaway.id}] stopped mid-task" in log
    assert "killing the process" in log


def test_task_is_resent_to_the_larger_class(fleet):
    fleet.configure({"queues": {
        "heavy": {"memory_limit": "200Mi", "on_memory_exceeded": {"retry_on": "xl",
                                                                  "max_attempts": 2}},
        "xl": {"memory_limit": "1Gi"},
    }})
    heavy = fleet.start_worker("heavy")
    xl = fleet.start_worker("xl")
    app = fleet.app()
    result = app.send_task("tasks.heavy.grow", kwargs={"target_mb": 400, "step_mb": 16})
    value = result.get(timeout=90)
    assert value["allocated_mb"] == 400
    assert result.state == "SUCCESS"
    # It ran to completion on the xl worker, after the heavy worker stopped it.
    assert "re-sent to queue 'xl' (attempt 2)" in fleet.log_of(heavy)
    # The worker logs success after the child stored the result: wait for the line.
    wait_for(lambda: f"tasks.heavy.grow[{result.id}] succeeded" in fleet.log_of(xl), 10,
             what="the xl worker to log the success")


def test_attempts_are_bounded(fleet):
    fleet.configure({"queues": {
        "heavy": {"memory_limit": "150Mi", "on_memory_exceeded": {"retry_on": "xl",
                                                                  "max_attempts": 2}},
        "xl": {"memory_limit": "250Mi"},
    }})
    fleet.start_worker("heavy")
    xl = fleet.start_worker("xl")
    app = fleet.app()
    result = app.send_task("tasks.heavy.grow", kwargs={"target_mb": 1500, "step_mb": 16})
    with pytest.raises(Exception) as caught:
        result.get(timeout=90)
    assert type(caught.value).__name__ == "MemoryLimitExceeded"
    assert "'xl' queue's memory_limit of 250.0Mi" in str(caught.value)
    wait_for(lambda: "task failed" in fleet.log_of(xl), 10, what="the xl worker's log")


def test_memory_of_processes_a_task_started_counts_and_they_are_stopped_too(fleet):
    import psutil

    from fleet.keys import broker_client, key

    fleet.configure({
        "imports": ["tasks.aggregate", "tasks.io", "tasks.heavy", "tests.probe_jobs"],
        "queues": {"heavy": {"tasks": ["tasks.heavy.*", "tests.probe.*"],
                             "memory_limit": "200Mi",
                             "on_memory_exceeded": {"retry_on": None}}}})
    fleet.start_worker("heavy")
    app = fleet.app()
    started = time.monotonic()
    result = app.send_task("tests.probe.shell_hog", args=[400])
    with pytest.raises(Exception) as caught:
        result.get(timeout=60)
    assert type(caught.value).__name__ == "MemoryLimitExceeded"
    # Found by the descendant scan, which starts two seconds into a task.
    assert time.monotonic() - started < 30
    pid = int(broker_client(fleet.config).get(key(fleet.config, "probe", "shell_hog",
                                                     result.id)))
    wait_for(lambda: not psutil.pid_exists(pid)
             or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10,
             what=f"the task's subprocess {pid} to be stopped")
