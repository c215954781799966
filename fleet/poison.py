"""What a worker does with a task message that must not be delivered again.

Two places decide it: fleet.consumer, on receipt of a message redelivered once too often,
and fleet.guard, when a pool process died on the last delivery the queue allows. Both end
the same way, so that the task is never left PENDING forever and its job never hangs:

1. the message goes to its queue's dead-letter list first (a crash after this step leaves
   a duplicate entry there, never a lost message);
2. it is acked (deleted from kombu's ``unacked``), so Redis will not deliver it again;
   its delivery count stays (until it expires): should the worker die before the ack
   reaches Redis, the restored message is refused again on its next receipt;
3. the task's result is marked failed with ``DeadLettered`` (task id, deliveries, reason);
4. Celery's ``task_failure`` signal fires, which fleet.jobs.hooks turns into a failed job
   chunk (``fleet jobs retry`` re-runs it); and a ``task-failed`` event tells the dashboard.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from celery import signals
from celery.utils.serialization import get_pickled_exception
from celery.worker import state as worker_state

from fleet.deadletter import DeadLetterList, Reason, new_entry
from fleet.errors import DeadLettered

logger = logging.getLogger("fleet.deadletter")


def envelope_of(message: Any) -> Any:
    """The message as kombu's Redis transport delivered it (the JSON it popped)."""
    raw = getattr(message, "_raw", None)
    if raw is not None:
        return raw
    return {"body": getattr(message, "body", None), "headers": dict(message.headers or {}),
            "content-type": message.content_type,
            "content-encoding": message.content_encoding,
            "properties": dict(message.properties or {})}


def queue_of(message: Any, default: str | None = None) -> str:
    info = getattr(message, "delivery_info", None) or {}
    return info.get("routing_key") or default or "unknown"


def retire(request, reason: Reason, deliveries: int) -> None:
    """Dead-letter ``request``'s message and fail its task (steps 1-4 above).

    Raises only if step 1 fails (Redis away): then nothing was done and the caller lets
    Celery go on as usual. The request leaves Celery's reserved/active state here, as
    Celery's own on_failure would have it (``task_ready``).
    """
    config = request.task.app.config
    queue = queue_of(request, request.task.app.fleet_queue)
    entry = new_entry(queue, reason, message=envelope_of(request.message),
                      deliveries=deliveries, worker=request.hostname or socket.gethostname())
    DeadLetterList.for_config(config).add(entry)
    worker_state.task_ready(request)
    request.acknowledge()
    error = DeadLettered(
        f"task {request.name}[{request.id}] dead-lettered after {deliveries} "
        f"deliver{'y' if deliveries == 1 else 'ies'}: {reason} "
        f"(see: fleet dead show {entry.id})")
    logger.error("%s", error)
    try:
        _fail(request, error)
    except Exception:
        # The message is kept and acked whatever happens here: a caller that went on to
        # run it again would run a dead-lettered task.
        logger.exception("task %s[%s] dead-lettered, but its failure was not recorded",
                         request.name, request.id)


def _fail(request, error: DeadLettered) -> None:
    request.task.backend.mark_as_failure(request.id, error, request=request._context,
                                         store_result=request.store_errors)
    request.task.request_stack.push(request._context)
    try:
        signals.task_failure.send(sender=request.task, task_id=request.id, exception=error,
                                  args=request.args, kwargs=request.kwargs,
                                  traceback=None, einfo=None)
    finally:
        request.task.request_stack.pop()
    request.send_event("task-failed", exception=repr(get_pickled_exception(error)),
                       traceback="")


def keep(request, reason: Reason, deliveries: int = 1) -> None:
    """A dead-letter entry only, for a task whose failure is already recorded (the final
    memory kill, wrong arguments): the message stays re-sendable from the list."""
    config = request.task.app.config
    queue = queue_of(request, request.task.app.fleet_queue)
    entry = new_entry(queue, reason, message=envelope_of(request.message),
                      deliveries=deliveries, worker=request.hostname or socket.gethostname())
    DeadLetterList.for_config(config).add(entry)
    logger.error("task %s[%s]: message kept in the dead-letter list of %r as %s (%s)",
                 request.name, request.id, queue, entry.id, reason)
