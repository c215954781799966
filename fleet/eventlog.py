"""Every Celery event a worker sends, also appended to a capped Redis Stream.

Celery's events on Redis are PUBLISH to a fanout channel: fire and forget, no buffer in
Redis. A monitor that is not subscribed at that moment never sees them, and after a
Redis restart workers reconnect in about a second while a monitor may take several
(measured: 48 of 290 tasks never reached the dashboard after a 10 s restart). So each
event also goes to ``<prefix>fleet:events`` (XADD MAXLEN ~ N), which the dashboard reads
with a consumer group and resumes from after any reconnect. The PUBLISH stays as it was
(Flower and ``celery events`` keep working).

The hook is Celery's own: ``app.events`` names its dispatcher class
(``Events.dispatcher_cls``), and every event a worker sends, single or a ``task.multi``
group (Celery buffers task events in the worker's event loop and sends them as one list),
goes through ``EventDispatcher._publish``. There kombu builds and routes the PUBLISH as
always, but hands its Redis command to us (kombu 5.7's publish-batch hook, see
``Collected``), and it goes in one pipeline with the XADD: one round trip for both.

While Redis is unreachable, Celery keeps events that failed to send in the dispatcher's
outbound buffer (``buffer_while_offline``) and sends them after the reconnect: that
buffer is unbounded in Celery; here it holds ``event_stream.offline_buffer`` entries, the
oldest dropped beyond that and counted, and the first append after the outage carries a
gap marker saying how many events from when were dropped, so the dashboard can show it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher
from celery.utils.time import utcoffset
from kombu.utils.json import dumps

from fleet.config import FleetConfig
from fleet.fleetapp import fleet_config_of
from fleet.keys import events_stream_key

logger = logging.getLogger("fleet.eventlog")

#: Stream entry fields: ``e`` holds one event or a group (JSON), ``gap`` a marker.
EVENT_FIELD = "e"
GAP_FIELD = "gap"


def stream_enabled(config: FleetConfig | None) -> bool:
    """The stream exists only on Redis (other brokers have no XADD)."""
    return bool(config is not None and config.event_stream.enabled
                and config.broker.url.split("://", 1)[0] in ("redis", "rediss", "unix"))


def events_in(item) -> list[dict]:
    """One event, or the events of a ``task.multi`` group."""
    return [e for e in (item if isinstance(item, list) else [item]) if isinstance(e, dict)]


@dataclass
class Dropped:
    """Events an outage's buffer could not hold: how many, from when to when."""

    events: int = 0
    since: float | None = None
    until: float | None = None

    def add(self, item) -> None:
        for event in events_in(item):
            self.events += 1
            at = event.get("timestamp")
            if isinstance(at, int | float):
                self.since = at if self.since is None else min(self.since, at)
                self.until = at if self.until is None else max(self.until, at)

    def merge(self, other: Dropped) -> None:
        self.events += other.events
        for at in (other.since, other.until):
            if at is not None:
                self.since = at if self.since is None else min(self.since, at)
                self.until = at if self.until is None else max(self.until, at)

    def marker(self, hostname: str) -> dict | None:
        if not self.events:
            return None
        return {GAP_FIELD: dumps({"hostname": hostname, "dropped": self.events,
                                  "since": self.since, "until": self.until})}

    def clear(self) -> None:
        self.events, self.since, self.until = 0, None, None


class OfflineBuffer(deque):
    """Celery's outbound buffer (events that failed to send), bounded: the oldest entry
    goes first and is counted, so memory stays flat however long Redis is away."""

    def __init__(self, limit: int, items: Iterable = ()):
        super().__init__(maxlen=limit)
        self.dropped = Dropped()
        self.extend(items)

    def append(self, item) -> None:
        if len(self) == self.maxlen:
            self.dropped.add(self[0][0])
        super().append(item)

    def extend(self, items: Iterable) -> None:
        for item in items:
            self.append(item)


class EventLog:
    """The stream's side of a publish: which key, how long, what an entry holds."""

    def __init__(self, key: str, maxlen: int):
        self.key = key
        self.maxlen = maxlen

    @classmethod
    def for_config(cls, config: FleetConfig | None) -> EventLog | None:
        if not stream_enabled(config):
            return None
        return cls(events_stream_key(config), config.event_stream.maxlen)

    @staticmethod
    def entry(event) -> dict[str, str]:
        return {EVENT_FIELD: dumps(event)}

    def add(self, pipe, fields: dict[str, str]) -> None:
        # kombu's key-prefixing client does not know XADD: the key carries the prefix.
        pipe.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)


class Collected:
    """Stands in for kombu 5.7's publish batch during one ``Producer.publish``.

    kombu's Redis transport hands a batch the final commands of a publish instead of
    running them (``_put_fanout(..., _publish_batch=b)`` calls ``b.add("publish",
    topic, payload)``), and ``Producer._publish`` routes through the batch set in its
    ``_batch_local.current``. So the PUBLISH, built and routed by kombu as always, joins
    our pipeline. kombu's own ``Producer.batch()`` would do the same through four
    objects and a new Redis client per publish: a third of a PUBLISH's CPU here.
    """

    def __init__(self):
        self.channel = None
        self.commands: list[tuple[str, tuple]] = []

    def publish(self, channel, message, **kwargs):
        self.channel = channel
        return channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, name: str, *args) -> None:
        self.commands.append((name, args))


def collect_publish(producer, body, **options) -> Collected:
    """Run ``producer.publish`` with its Redis commands collected, not sent."""
    collected = Collected()
    local = producer._batch_local
    outer = getattr(local, "current", None)
    local.current = collected
    try:
        producer.publish(body, **options)
    finally:
        if outer is None:
            del local.current
        else:
            local.current = outer
    return collected


class StreamDispatcher(EventDispatcher):
    """Celery's event dispatcher, also appending each event to the fleet's stream."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = fleet_config_of(self.app)
        self.log = EventLog.for_config(config)
        limit = config.event_stream.offline_buffer if config is not None else 10_000
        self._outbound_buffer = OfflineBuffer(limit, self._outbound_buffer)
        self._channel_client = None
        self._refused = False

    def _client(self, channel):
        """One Redis client per channel (kombu makes one per publish: the response
        callbacks it builds cost more than the PUBLISH itself). The channel's own pool
        and key prefix; a channel a reconnect replaced gets a new one."""
        if self._channel_client is None or self._channel_client[0] is not channel:
            self._channel_client = (channel, channel._create_client())
        return self._channel_client[1]

    @property
    def dropped(self) -> Dropped:
        return self._outbound_buffer.dropped

    def _publish(self, event, producer, routing_key, retry=False, retry_policy=None,
                 utcoffset=utcoffset):
        if producer is None:
            return
        try:
            self._send(event, producer, routing_key, retry, retry_policy)
        except Exception:
            if not self.buffer_while_offline:
                raise
            self._outbound_buffer.append((event, routing_key))

    def _send(self, event, producer, routing_key, retry=False, retry_policy=None) -> None:
        """PUBLISH as Celery does, and the XADD in the same round trip; raises on failure."""
        options = {"routing_key": routing_key, "exchange": self.exchange.name,
                   "declare": [self.exchange], "serializer": self.serializer,
                   "headers": self.headers, "delivery_mode": self.delivery_mode}
        if self.log is None:
            producer.publish(event, retry=retry, retry_policy=retry_policy, **options)
            return
        entries = [self.log.entry(event)]
        marker = self.dropped.marker(self.hostname)
        if marker is not None:
            entries.insert(0, marker)
        if retry:
            # kombu retries a failed PUBLISH by re-running it, which a collected one
            # would not be. Rare (events sent from inside a task): the XADD goes alone.
            producer.publish(event, retry=True, retry_policy=retry_policy, **options)
            collected = Collected()
        else:
            collected = collect_publish(producer, event, **options)
        # No commands collected: the transport published at once (not kombu's Redis
        # transport as we know it); the XADD then takes a round trip of its own.
        pipe = self._client(collected.channel or producer.channel).pipeline(
            transaction=False)
        for name, args in collected.commands:
            getattr(pipe, name)(*args)
        for fields in entries:
            self.log.add(pipe, fields)
        # A connection error raises (the event is kept and sent again); a command Redis
        # refused (the key holds something else) would be refused again: said, not kept.
        refused = [r for r in pipe.execute(raise_on_error=False) if isinstance(r, Exception)]
        if refused and not self._refused:
            self._refused = True
            logger.error("events: Redis refused an event's append to %s: %s (events "
                         "still go to pub/sub; the dashboard will miss them)", self.log.key,
                         refused[0])
        if marker is not None:
            logger.warning("events: %d events sent while Redis was unreachable were "
                           "dropped (event_stream.offline_buffer is full)",
                           self.dropped.events)
            self.dropped.clear()

    def flush(self, errors=True, groups=True):
        """Celery's flush re-sends every held event even when the first one fails (each a
        failed connect while Redis is away, on every buffered task event); here it stops
        at the first failure and keeps the rest, in order."""
        if errors:
            with self.mutex:
                if self._closed:
                    return
                held = self._outbound_buffer
                while held:
                    event, routing_key = held.popleft()
                    try:
                        self._send(event, self.producer, routing_key)
                    except Exception:
                        held.appendleft((event, routing_key))
                        break
        if groups:
            super().flush(errors=False, groups=True)

    def extend_buffer(self, other):
        """After a reconnect Celery's consumer makes a new dispatcher and copies the old
        one's outbound buffer only: task events still grouped in the old one (not yet
        flushed as ``task.multi``) would be lost. Both come over here."""
        self._outbound_buffer.extend(other._outbound_buffer)
        if isinstance(other._outbound_buffer, OfflineBuffer):
            self.dropped.merge(other._outbound_buffer.dropped)
        for group, events in list(other._group_buffer.items()):
            if events:
                taken = list(events)
                del events[:len(taken)]
                self._group_buffer[group].extend(taken)


class StreamEvents(Events):
    """``app.events`` whose Dispatcher is the StreamDispatcher (the plain Celery CLI's
    workers and every pool process get it too: they all build ``app.events.Dispatcher``)."""

    dispatcher_cls = "fleet.eventlog:StreamDispatcher"
