"""Probe tasks for the lease tests: each run is counted in Redis before the task sleeps.

A run that a SIGKILL cuts short still counts (the count is written first), so the
tests see every delivery a worker acted on, including the ones that never finished.
Keys live under the test's broker prefix, so the ``prefix`` fixture removes them.
"""

from __future__ import annotations

import json
import os
import time

import redis
from celery import shared_task

from fleet.config import FleetConfig
from fleet.keys import broker_client, key


def runs_key(config: FleetConfig, task_id: str) -> str:
    return key(config, "probe", "runs", task_id)


def events_key(config: FleetConfig) -> str:
    return key(config, "probe", "events")


@shared_task(name="tests.probe.slow", bind=True)
def slow(self, seconds: float = 1.0) -> dict:
    """Count this run, note where and when it started and ended, sleep ``seconds``."""
    config = self.app.config
    client = broker_client(config)
    run = {"task": self.request.id, "host": self.request.hostname, "pid": os.getpid()}
    client.incr(runs_key(config, self.request.id))
    client.rpush(events_key(config), json.dumps({**run, "event": "start", "at": time.time()}))
    time.sleep(seconds)
    client.rpush(events_key(config), json.dumps({**run, "event": "end", "at": time.time()}))
    return {"slept": seconds, "host": self.request.hostname}


def executions(client: redis.Redis, config: FleetConfig, task_id: str) -> int:
    """How many times ``task_id`` started, on any worker."""
    return int(client.get(runs_key(config, task_id)) or 0)


def events(client: redis.Redis, config: FleetConfig) -> list[dict]:
    """Every start and end of every probe run, in the order they happened."""
    return [json.loads(raw) for raw in client.lrange(events_key(config), 0, -1)]
