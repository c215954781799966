"""Which signal starts which Celery shutdown, on a real ``fleet worker`` sent each signal
to its main process only (as the kubelet signals a container's PID 1): what the grace
formula (fleet.shutdown) rests on.

- one SIGTERM: a warm shutdown; the running task finishes even though it runs past the
  queue's ``soft_shutdown_timeout``, so the grace budgets the task, not that timeout;
- SIGQUIT: a cold shutdown, soft first: the task gets ``soft_shutdown_timeout`` and is
  then stopped; its acks_late message comes back and another worker runs it.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import shipped_config, wait_for
from tests.probe_tasks import events, executions

pytestmark = pytest.mark.slow

SOFT = 2.0  # soft_shutdown_timeout
TASK = 7.0  # longer than SOFT by far


def configure(fleet):
    return fleet.configure({
        "imports": [*shipped_config()["imports"], "tests.probe_tasks"],
        "broker": {"visibility_timeout": "10s", "lease": {"interval": "2s"}},
        "autoscaler": {"worker_metrics_interval": "1s"},
        "queues": {"heavy": {"tasks": ["tasks.heavy.*", "tests.probe.*"], "concurrency": 1,
                             "time_limit": {"soft": "50s", "hard": "60s"},
                             "soft_shutdown_timeout": f"{SOFT:g}s"}},
    })


def signalled(fleet, redis_client, sig: int):
    """A heavy worker running a TASK-second task is sent ``sig`` on its main process
    only, as the kubelet signals PID 1: (the worker, the task's result, exit code,
    seconds from the signal to the exit)."""
    configure(fleet)
    worker = fleet.start_worker("heavy")
    result = fleet.app().send_task("tests.probe.slow", kwargs={"seconds": TASK})
    wait_for(lambda: any(e["task"] == result.id and e["event"] == "start"
                         for e in events(redis_client, fleet.config)), 30,
             what="the task to start")
    sent = time.monotonic()
    os.kill(worker.pid, sig)
    code = worker.proc.wait(timeout=TASK + 30)
    return worker, result, code, time.monotonic() - sent


def test_one_sigterm_is_a_warm_shutdown_that_outlasts_the_soft_timeout(fleet, redis_client):
    worker, result, code, took = signalled(fleet, redis_client, signal.SIGTERM)
    assert code == 0, fleet.log_of(worker)[-3000:]
    assert result.get(timeout=10)["slept"] == TASK  # finished, in the stopping worker
    assert took > TASK - 1.5 > SOFT, took  # waited for the task, not for SOFT
    assert executions(redis_client, fleet.config, result.id) == 1


def test_sigquit_is_a_soft_then_cold_shutdown_and_the_task_comes_back(fleet, redis_client):
    worker, result, _code, took = signalled(fleet, redis_client, signal.SIGQUIT)
    assert took < TASK - 1.5, (took, fleet.log_of(worker)[-3000:])  # cut short
    assert took >= SOFT - 0.5, took  # after the soft shutdown's timeout, not at once
    assert not any(e["task"] == result.id and e["event"] == "end"
                   for e in events(redis_client, fleet.config))
    # Not lost: a second worker runs it (the message was never acknowledged).
    fleet.start_worker("heavy")
    assert result.get(timeout=60)["slept"] == TASK
    assert executions(redis_client, fleet.config, result.id) == 2
