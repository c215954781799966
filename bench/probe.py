"""Counts task executions per task id, in any app's workers (fleet or plain Celery).

Imported by both the baseline app and the fleet config of a benchmark, so "tasks run
twice" is measured the same way on both sides. The counter lives in the Redis named by
$BENCH_PROBE_URL under $BENCH_PROBE_KEY.
"""

from __future__ import annotations

import os

import redis
from celery import shared_task, signals

_client = None


def _redis():
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["BENCH_PROBE_URL"])
    return _client


@signals.task_prerun.connect
def _count(task_id=None, **_kw):
    if "BENCH_PROBE_KEY" in os.environ:
        _redis().hincrby(os.environ["BENCH_PROBE_KEY"], task_id, 1)


@shared_task(name="bench.noop")
def noop() -> None:
    """The no-op of the throughput benchmark."""
