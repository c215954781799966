"""Delivery counts: how many times Redis handed one message to a worker that ran it.

On ``heavy`` (acks_late + reject_on_worker_lost) a task that kills its own pool process
is rejected with requeue=True and delivered again, forever, its result PENDING. Each
message therefore has a count in Redis, and after ``max_deliveries`` (queues.yaml, per
queue) it goes to the dead-letter list (fleet.deadletter) instead.

Counting costs nothing on the hot path: kombu's Redis transport marks every message it
restores (``reject(requeue=True)`` after a lost pool process, the visibility-timeout sweep
after a lost worker) with ``headers.redelivered`` and ``delivery_info.redelivered``, and a
first delivery has neither, so only redelivered messages are counted (one pipelined round
trip, on receipt: fleet.consumer). The messages a worker gives back when its channel
closes (a warm shutdown's prefetched, never started ones) are restored without the mark
(fleet.transport.QoS): they ran nowhere and do not count.

The count is keyed by delivery tag, which kombu keeps across restores; a retry or a
requeue from the dead-letter list is a new message with a tag and a count of its own.
Keys expire with the task results (``results.expires``).

Where a worker sees a pool process die (fleet.guard), it records why (billiard's
"signal 9 (SIGKILL)", "exitcode 3") so the entry says so even when the message is refused
only on its next receipt, and dead-letters right there once the count is reached, rather
than paying one more delivery.
"""

from __future__ import annotations

import re

import redis

from fleet import keys
from fleet.config import DEFAULT_MAX_DELIVERIES, FleetConfig
from fleet.deadletter import EXIT_CODE, SIGNAL, WORKER_LOST, Reason


def max_deliveries(config: FleetConfig | None, queue: str | None) -> int:
    if config is None or queue not in config.queues:
        return DEFAULT_MAX_DELIVERIES
    return config.queues[queue].max_deliveries


def refuse_on_receipt(deliveries: int, limit: int) -> bool:
    """This delivery would be one more than the queue allows."""
    return deliveries > limit


def retire_on_loss(deliveries: int, limit: int) -> bool:
    """The delivery just lost was the last one the queue allows."""
    return deliveries >= limit


_SIGNAL = re.compile(r"signal (\d+)(?: \((\w+)\))?")
_EXIT = re.compile(r"exitcode (-?\d+)")


def killed_by_sigkill(text: str) -> bool:
    """billiard's text says the pool process died of SIGKILL (the kernel's OOM killer,
    the memory guard, or someone's ``kill -9``)."""
    found = _SIGNAL.search(text)
    return found is not None and found.group(1) == "9"


def reason_of_worker_lost(text: str) -> Reason:
    """billiard's WorkerLostError text ("Worker exited prematurely: signal 9 (SIGKILL)
    Job: 0.", "... exitcode 3 Job: 0.") as a reason."""
    found = _SIGNAL.search(text)
    if found:
        name = f" ({found.group(2)})" if found.group(2) else ""
        return Reason(SIGNAL, f"its pool process was killed by signal {found.group(1)}{name}")
    found = _EXIT.search(text)
    if found:
        return Reason(EXIT_CODE, f"its pool process exited with code {found.group(1)}")
    return Reason(WORKER_LOST, text or "its pool process was lost")


class DeliveryCounter:
    """The per-message delivery counts: a Redis hash per delivery tag (n, reason)."""

    def __init__(self, client: redis.Redis, config: FleetConfig):
        self.client = client
        self.config = config
        self.ttl = max(3600, int(config.results.expires))

    @classmethod
    def for_config(cls, config: FleetConfig) -> DeliveryCounter:
        return cls(keys.broker_client(config), config)

    def redelivered(self, tag: str) -> tuple[int, Reason | None]:
        """Count a redelivery on receipt: (deliveries with this one, last reason recorded)."""
        key = keys.delivery_counter_key(self.config, tag)
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(key, "n", 1)
        pipe.hget(key, "reason")
        pipe.expire(key, self.ttl)
        n, reason, _ = pipe.execute()
        return int(n) + 1, Reason.from_json(reason)

    def lost(self, tag: str, reason: Reason) -> int:
        """Note why a delivery was lost; returns the deliveries so far, the lost one
        included (the first delivery is never counted in Redis: it is 1 + n)."""
        key = keys.delivery_counter_key(self.config, tag)
        pipe = self.client.pipeline(transaction=True)
        pipe.hget(key, "n")
        pipe.hset(key, "reason", reason.to_json())
        pipe.expire(key, self.ttl)
        n, _, _ = pipe.execute()
        return int(n or 0) + 1

    def forget(self, tag: str) -> None:
        self.client.delete(keys.delivery_counter_key(self.config, tag))
