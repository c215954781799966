"""The fleet's Celery consumer (``worker_consumer``): the poison bound on receipt, and
malformed messages kept in the dead-letter list instead of dropped.

Receipt: Celery's strategy builds a request, calls ``task_reserved`` and hands it to
``on_task_request``; that is where a redelivered message is counted (fleet.deliveries)
and, once over its queue's ``max_deliveries``, dead-lettered (fleet.poison) instead of
run. A first delivery is passed straight on (one dict lookup). The check cannot live in
the Request class: ``create_request_cls`` overrides ``execute_using_pool`` in a subclass.

Malformed: Celery's ``on_unknown_message``, ``on_unknown_task``, ``on_invalid_task`` and
``on_decode_error`` log the message and reject it, which on Redis deletes it for good;
here its envelope goes to the dead-letter list first. Some bad task messages (no ``id``
header, a body that is not ``[args, kwargs, embed]``) raise a bare KeyError or ValueError
out of the strategy instead, which stops the consumer and restores every message it holds
(an acks_late task running then runs twice): those are caught and dead-lettered as invalid.
Bytes that are not even a kombu envelope never reach Celery: fleet.transport keeps them.
"""

from __future__ import annotations

import logging

import redis
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed
from vine import promise

from fleet.deadletter import (
    INVALID_TASK,
    MALFORMED,
    UNKNOWN_TASK,
    WORKER_LOST,
    DeadLetterList,
    Reason,
    new_entry,
)
from fleet.deliveries import DeliveryCounter, max_deliveries, refuse_on_receipt
from fleet.errors import DeadLettered
from fleet.fleetapp import fleet_config_of
from fleet.poison import envelope_of, queue_of, retire

logger = logging.getLogger("fleet.deadletter")

#: What a malformed task message raises out of Celery's strategy (never a broker error).
_INVALID = (KeyError, TypeError, ValueError, AttributeError, IndexError)


class FleetConsumer(Consumer):
    def __init__(self, on_task_request, *args, **kwargs):
        super().__init__(on_task_request, *args, **kwargs)
        self.fleet_config = fleet_config_of(self.app)
        self._run_request = self.on_task_request
        if self.fleet_config is not None:
            self._counter = DeliveryCounter.for_config(self.fleet_config)
            self._dead = DeadLetterList.for_config(self.fleet_config)
            # The strategies read this attribute when they are built (at consumer start).
            self.on_task_request = self._on_task_request

    # -- the poison bound ------------------------------------------------------------

    def _on_task_request(self, request) -> None:
        if request.delivery_info.get("redelivered") and self._refused(request):
            return
        self._run_request(request)

    def _refused(self, request) -> bool:
        """Count this redelivery; True if it was one too many and the message is retired."""
        queue = queue_of(request, self.app.fleet_queue)
        try:
            deliveries, reason = self._counter.redelivered(str(request.message.delivery_tag))
        except redis.RedisError as exc:
            # Not counted is better than not run: at least once stays the contract.
            logger.warning("task %s[%s]: delivery not counted (%s); running it",
                           request.name, request.id, exc)
            return False
        limit = max_deliveries(self.fleet_config, queue)
        if not refuse_on_receipt(deliveries, limit):
            return False
        if request._success_was_stored():
            # Redelivered after it succeeded (its ack was lost): done, not poison.
            logger.warning("task %s[%s] already succeeded; acking its redelivery",
                           request.name, request.id)
            worker_state.task_ready(request)
            request.acknowledge()
            return True
        # Nothing recorded: no worker saw it fail, its whole worker was lost each time
        # (killed, or cut off from Redis) and visibility_timeout brought it back.
        reason = reason or Reason(WORKER_LOST, f"delivered {limit} times, its worker lost "
                                               "each time (back after visibility_timeout)")
        try:
            retire(request, reason, deliveries - 1)
        except redis.RedisError as exc:
            logger.error("task %s[%s]: could not dead-letter it (%s); running it again",
                         request.name, request.id, exc)
            return False
        return True

    # -- malformed messages: kept, then Celery's own handling (reject / ack) ----------

    def _keep(self, message, reason: Reason, mark: bool = True) -> None:
        if self.fleet_config is None:
            return
        queue = queue_of(message, self.app.fleet_queue)
        envelope = envelope_of(message)
        entry = new_entry(queue, reason, message=envelope, worker=self.hostname)
        try:
            self._dead.add(entry)
        except redis.RedisError as exc:
            logger.error("could not dead-letter a message of %r (%s): %s; it was %r",
                         queue, reason, exc, envelope)
            return
        logger.error("message on %r dead-lettered as %s: %s", queue, entry.id, reason)
        if mark and entry.task_id:
            # Whoever waits on the result learns why, rather than waiting forever.
            try:
                self.app.backend.mark_as_failure(entry.task_id, DeadLettered(
                    f"task {entry.task or '?'}[{entry.task_id}] dead-lettered: {reason} "
                    f"(see: fleet dead show {entry.id})"))
            except Exception as exc:  # the result is a courtesy; the entry is kept
                logger.warning("could not mark %s failed: %s", entry.task_id, exc)

    def on_unknown_message(self, body, message):
        headers = message.headers if isinstance(message.headers, dict) else {}
        self._keep(message, Reason(MALFORMED, "not a Celery task message: no 'task' header "
                                              f"(headers: {sorted(headers)})"))
        return super().on_unknown_message(body, message)

    def on_unknown_task(self, body, message, exc):
        headers = message.headers if isinstance(message.headers, dict) else {}
        self._keep(message, Reason(UNKNOWN_TASK, f"no task named {headers.get('task')!r} is "
                                                 f"registered on {self.hostname}"), mark=False)
        return super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body, message, exc):
        if isinstance(exc, ContentDisallowed):
            reason = Reason(MALFORMED, f"content Celery refuses: {exc}")
        else:
            reason = Reason(INVALID_TASK, f"{type(exc).__name__}: {exc}")
        self._keep(message, reason)
        return super().on_invalid_task(body, message, exc)

    def on_decode_error(self, message, exc):
        self._keep(message, Reason(MALFORMED, f"its body cannot be decoded as "
                                              f"{message.content_type!r}: {exc}"))
        return super().on_decode_error(message, exc)

    def create_task_handler(self, promise=promise):
        handle = super().create_task_handler(promise)
        # Broker errors go on to Celery's reconnect. kombu counts KeyError among the Redis
        # transport's connection errors: a message without an 'id' header then "loses the
        # connection" and restores every message this worker holds. Not here.
        recoverable = tuple(e for e in self.connection_errors + self.channel_errors
                            if e is not KeyError)

        def on_task_received(message):
            try:
                return handle(message)
            except recoverable:
                raise
            except _INVALID as exc:
                if _taken(message):
                    raise  # it became a request: a real error, not a malformed message
                return self.on_invalid_task(None, message, exc)

        return on_task_received


def _taken(message) -> bool:
    """The strategy got as far as reserving (or scheduling) a request for ``message``."""
    if message.acknowledged:
        return True
    for requests in (worker_state.reserved_requests, worker_state.scheduled_requests):
        if any(getattr(r, "_message", None) is message for r in list(requests)):
            return True
    return False
