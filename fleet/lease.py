"""Lease renewal: a live worker keeps the messages it holds from being redelivered.

Redis has no consumer leases. kombu records each delivered message in the ``unacked``
hash with its delivery time as its score in ``unacked_index`` (one sorted set for all
queues of the DB), and any worker's poll moves entries older than ``visibility_timeout``
back to their queue. With the default timeout (1 h) a killed worker's tasks stay
stranded for an hour; with a short one, long tasks of live workers run twice.
Refreshing the scores of this worker's own messages every ``interval`` turns the
timeout into a lease: short enough to recover a dead worker's tasks promptly, never
lapsing while the worker lives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import redis

from fleet.periodic import Periodic

logger = logging.getLogger("fleet.lease")


def renew(client: redis.Redis, index_key: str, tags: Iterable[str], now: float) -> int:
    """Move the scores of ``tags`` to ``now``; only existing entries (XX), one round trip.

    XX matters: a tag acked between our read and this write must not come back.
    """
    mapping = {tag: now for tag in tags}
    if not mapping:
        return 0
    client.zadd(index_key, mapping, xx=True, ch=True)
    return len(mapping)


class LeaseRenewer:
    """A daemon thread renewing the leases of the tags that ``held()`` returns."""

    def __init__(self, client: redis.Redis, index_key: str, interval: float,
                 held: Callable[[], list[str]]):
        self.client = client
        self.index_key = index_key
        self.interval = interval
        self.held = held
        self._thread = Periodic("fleet-lease", self.tick, interval,
                                what="lease renewal", logger=logger)
        self.renewals = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop()

    def tick(self) -> None:
        try:
            tags = self.held()
            if tags:
                renew(self.client, self.index_key, tags, time.time())
                self.renewals += 1
        except redis.RedisError as exc:
            # The broker is away; the consumer reconnects on its own. Keep trying: a
            # lease lapses only after visibility_timeout, several intervals from now.
            logger.warning("lease renewal failed (will retry in %.0fs): %s", self.interval, exc)


def held_by_consumer(worker: object) -> Callable[[], list[str]]:
    """The delivery tags a Celery worker holds: its channel's unacked deliveries."""

    def held() -> list[str]:
        consumer = getattr(worker, "consumer", None)
        task_consumer = getattr(consumer, "task_consumer", None)
        channel = getattr(task_consumer, "channel", None)
        qos = getattr(channel, "qos", None)
        delivered = getattr(qos, "_delivered", None)
        if not delivered:
            return []
        acked = getattr(qos, "_dirty", ())  # acked, not yet flushed from _delivered
        for _ in range(3):
            try:
                return [tag for tag in list(delivered) if tag not in acked]
            except RuntimeError:  # changed size while the event loop acked a message
                continue
        return []

    return held
