"""Probe tasks for the rate-limit tests: each run records when it started, and where.

Workers import this module (the test adds it to ``imports``). Every run pushes one JSON
record onto a Redis list under the fleet's own key prefix, so the test reads exactly
the runs of its own fleet. ``time.time()`` is taken first thing in the task body: after
the fleet-wide rate limit let the task through, before anything else.
"""

from __future__ import annotations

import json
import time

from celery import shared_task

from fleet import keys


def starts_key(config) -> str:
    return keys.key(config, "test", "starts")


def _record(task, label: str) -> None:
    started = time.time()
    config = task.app.config
    keys.broker_client(config).rpush(starts_key(config), json.dumps({
        "t": started,
        "label": label,
        "task": task.name,
        "id": task.request.id,
        "worker": task.request.hostname,
        "retries": task.request.retries,
        "max_retries": task.max_retries,
    }))


# max_retries=0: a rate-limit re-queue that went through Task.retry() would fail it.
@shared_task(bind=True, name="tests.probe_rate.record", max_retries=0)
def record(self, label: str = "") -> str:
    _record(self, label)
    return label


@shared_task(bind=True, name="tests.probe_rate.limited", max_retries=0)
def limited(self, label: str = "") -> str:
    """The same as ``record``; the tests give this name a task-level fleet-wide limit."""
    _record(self, label)
    return label


# Celery's own rate limit: enforced by each worker's consumer, for that worker only.
@shared_task(bind=True, name="tests.probe_rate.celery_limited", rate_limit="120/m")
def celery_limited(self, label: str = "") -> str:
    _record(self, label)
    return label
