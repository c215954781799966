"""The task signal that moves job state when a chunk (or the aggregate) fails.

Connected once per process when a fleet app is created. Celery sends task_failure in
the pool child (an exception) or in the worker's main process (worker lost, hard time
limit, memory limit); the task id says which job and chunk. Success is recorded by
FleetTask itself, inside the task, so that a Redis error there fails (and retries) the
task instead of being swallowed by the signal dispatcher.
"""

from __future__ import annotations

import logging

from celery import signals

from fleet.jobs.ids import parse_task_id

logger = logging.getLogger("fleet.jobs")


def _config_of(task):
    return getattr(getattr(task, "app", None), "fleet_config", None)


@signals.task_failure.connect
def _on_failure(sender=None, task_id=None, exception=None, args=None, kwargs=None,
                **_kw) -> None:
    ref = parse_task_id(task_id)
    config = _config_of(sender)
    if ref is None or config is None:
        return
    from fleet.jobs import lifecycle

    lifecycle.on_task_failure(config, ref, exception, args, kwargs)
