"""Probe tasks for the poison and dead-letter tests: each run is counted in Redis first.

A poison task kills its own pool process (SIGKILL, ``os._exit``, SystemExit), rejects its
message with requeue, or raises; the count is written before it dies, so a test sees
every delivery a worker acted on. Setting the
``cured`` flag makes them succeed, as a fixed deployment would, so a requeue or a job
retry can be shown to run them again to completion.
"""

from __future__ import annotations

import os
import signal
import time

import redis
from celery import shared_task
from celery.exceptions import Reject

from fleet.config import FleetConfig
from fleet.keys import broker_client, key


def runs_key(config: FleetConfig, task_id: str) -> str:
    return key(config, "probe", "poison", task_id)


def cured_key(config: FleetConfig) -> str:
    return key(config, "probe", "cured")


def runs(client: redis.Redis, config: FleetConfig, task_id: str) -> int:
    return int(client.get(runs_key(config, task_id)) or 0)


def _die(how: str) -> None:
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "exit":
        os._exit(3)
    elif how == "systemexit":
        raise SystemExit(3)
    elif how == "raise":
        raise ValueError("poison: this task always raises")
    elif how == "reject":
        raise Reject("poison: not now", requeue=True)
    raise AssertionError(f"unknown way to die: {how}")


def _count_and_maybe_die(task, how: str) -> bool:
    """Count this run; die ``how`` unless cured. True when cured (the task succeeds)."""
    config = task.app.config
    client = broker_client(config)
    client.incr(runs_key(config, task.request.id))
    if client.exists(cured_key(config)):
        return True
    _die(how)
    return False


@shared_task(name="tests.probe.poison", bind=True)
def poison(self, how: str = "sigkill") -> str:
    _count_and_maybe_die(self, how)
    return "cured"


@shared_task(name="tests.probe.poison_chunk", bind=True)
def poison_chunk(self, records: list[dict], how: str = "sigkill") -> int:
    """A job's chunk task: the chunk with a record marked ``poison`` kills its process."""
    if any(r.get("poison") for r in records):
        _count_and_maybe_die(self, how)
    return sum(r["n"] for r in records)


@shared_task(name="tests.probe.poison_total")
def poison_total(results: list[int]) -> int:
    return sum(results)


@shared_task(name="tests.probe.pair", bind=True)
def pair(self, a: int, b: int) -> int:
    """Takes exactly two arguments: sent with others, it cannot bind them."""
    config = self.app.config
    broker_client(config).incr(runs_key(config, self.request.id))
    return a + b


@shared_task(name="tests.probe.buggy", bind=True)
def buggy(self, a: int) -> int:
    """Binds its arguments, then raises a TypeError of its own: not a wrong-arguments case."""
    return a + "one"


@shared_task(name="tests.probe.hold", bind=True)
def hold(self, seconds: float = 1.0) -> float:
    """Count the run, sleep: the in-flight acks_late task of the malformed-message case."""
    config = self.app.config
    broker_client(config).incr(runs_key(config, self.request.id))
    time.sleep(seconds)
    return seconds
