"""The task signal that moves job state when a chunk (or the aggregate) fails.

Connected by ``connect()``, which ``create_app`` calls: an explicit call, not an import
side effect, so the wiring shows where the app is built (and connecting twice is a no-op,
by ``dispatch_uid``). Celery sends task_failure in
the pool child (an exception) or in the worker's main process (worker lost, hard time
limit, memory limit); the task id says which job and chunk. Success is recorded by
FleetTask itself, inside the task, so that a Redis error there fails (and retries) the
task instead of being swallowed by the signal dispatcher.
"""

from __future__ import annotations

import logging

from celery import signals

from fleet.fleetapp import fleet_config_of
from fleet.jobs.ids import parse_task_id

logger = logging.getLogger("fleet.jobs")


def connect() -> None:
    """Connect the job-state signal handlers (idempotent)."""
    signals.task_failure.connect(_on_failure, weak=False, dispatch_uid="fleet.jobs.on_failure")


def _on_failure(sender=None, task_id=None, exception=None, args=None, kwargs=None,
                **_kw) -> None:
    ref = parse_task_id(task_id)
    config = fleet_config_of(getattr(sender, "app", None))
    if ref is None or config is None:
        return
    from fleet.jobs import lifecycle

    lifecycle.on_task_failure(config, ref, exception, args, kwargs)
