"""Celery events off Redis: the workers' event stream, or pub/sub where there is none.

The stream (fleet.eventlog: every event a fleet worker sends, XADD to a capped stream)
is read with a consumer group: Redis remembers what the group was given, so after a
reconnect the dashboard resumes exactly where it stopped, whatever was published in
between. Entries are acknowledged (XACK) only once the batch holding them is in the
dashboard's database; the store keeps the newest written id in the same transaction,
so an entry delivered twice (its XACK lost in an outage) is recognised and not counted
again. What cannot be recovered (gaps.py) is recorded as a gap.

On Redis, Celery's event exchange is pub/sub: every event is a PUBLISH to
``<global prefix>/<db>.celeryev/<routing key>`` of a kombu JSON envelope whose body is
base64 JSON. kombu's consumer path (channel polling, Message objects, the Receiver's
clock bookkeeping) costs more per event than the dashboard's own work, so on Redis the
dashboard subscribes with redis-py (hiredis parser) and decodes the envelope itself:
what Celery's ``EventReceiver.event_from_message`` would hand over, minus its clock.
Other brokers go through Celery's Receiver (ingest.py). Pub/sub is used only where
there is no stream (``event_stream.enabled: false``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis

from fleet.config import FleetConfig
from fleet.dashboard.gaps import (
    TRIMMED,
    Gap,
    admit,
    attach_plan,
    id_time,
    later,
    marker_gap,
    parse_id,
    text,
    trim_gap,
)
from fleet.eventlog import EVENT_FIELD, GAP_FIELD
from fleet.keys import events_stream_key

_HERE = -time.timezone / 3600 if not time.daylight else -time.altzone / 3600


def channel_pattern(config: FleetConfig, client: redis.Redis) -> str:
    db = client.connection_pool.connection_kwargs.get("db", 0)
    return f"{config.broker.key_prefix}/{db}.celeryev/*"


def decode(payload: bytes) -> list[dict]:
    """One kombu envelope to its events: one, or several when the worker buffered them
    (Celery workers send task events in groups, routing key ``task.multi``, a JSON list)."""
    try:
        envelope = json.loads(payload)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
    except (ValueError, KeyError, TypeError):
        return []
    return events_of(decoded)


def events_of(decoded) -> list[dict]:
    """An event or a ``task.multi`` group, as Celery's receiver would hand it over."""
    events = decoded if isinstance(decoded, list) else [decoded]
    out = []
    for event in events:
        if not isinstance(event, dict) or "type" not in event:
            continue
        offset = event.get("utcoffset")
        stamp = event.get("timestamp")
        if offset is not None and stamp is not None and offset != _HERE:
            # Celery's adjust_timestamp: a worker in another zone reports local seconds
            event["timestamp"] = stamp - (offset - _HERE) * 3600
        out.append(event)
    return out


def consume(config: FleetConfig, client: redis.Redis, feed: Callable[[dict], None],
            stop: threading.Event, connected: Callable[[bool], None]) -> None:
    """Feed every event until ``stop``; raises redis errors for the caller to retry."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.psubscribe(channel_pattern(config, client))
        connected(True)
        get = pubsub.get_message
        while not stop.is_set():
            message = get(timeout=1.0)
            while message is not None:
                for event in decode(message["data"]):
                    feed(event)
                message = get(timeout=0)
    finally:
        connected(False)
        pubsub.close()


# -- the workers' event stream -----------------------------------------------------------

#: One name per group: a dashboard is one consumer (entries pending for it are re-read
#: by the same name after a restart).
CONSUMER = "ingester"
READ_COUNT = 500
BLOCK_MS = 1000


class StreamSink(Protocol):
    """Where stream entries go (the Ingester)."""

    def stream_written(self) -> str | None: ...
    def stream_fed(self) -> str | None: ...
    def feed_entries(self, entries: list[tuple[str, list[dict], Gap | None]]) -> None: ...
    def add_gap(self, gap: Gap) -> None: ...
    def ack_now(self, entry_ids: list[str]) -> None: ...
    def take_acks(self) -> list[str]: ...
    def rebase(self) -> None: ...


class StreamGone(Exception):
    """The stream or our group vanished while connected (FLUSHALL, a failover)."""


def decode_entry(fields: dict | None) -> tuple[list[dict], Gap | None]:
    if not fields:
        return [], None
    events: list[dict] = []
    raw = fields.get(EVENT_FIELD.encode())
    if raw is not None:
        try:
            events = events_of(json.loads(raw))
        except ValueError:
            events = []
    marker = fields.get(GAP_FIELD.encode())
    return events, marker_gap(marker) if marker is not None else None


class StreamReader:
    """The Redis commands of a consumer group, and nothing else (no decisions)."""

    def __init__(self, client: redis.Redis, key: str, group: str):
        self.client, self.key, self.group = client, key, group

    def stream_info(self) -> dict | None:
        try:
            return self.client.xinfo_stream(self.key)
        except redis.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise

    def group_info(self) -> dict | None:
        try:
            groups = self.client.xinfo_groups(self.key)
        except redis.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        for g in groups:
            if text(g.get("name")) == self.group:
                return g
        return None

    def create_group(self, start: str) -> None:
        try:
            self.client.xgroup_create(self.key, self.group, id=start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def pending(self, after: str, count: int) -> list:
        """Entries delivered to us before and never acked (fields empty if trimmed)."""
        return self._read({self.key: after}, count, None)

    def read_with_info(self, count: int) -> tuple[dict, dict | None, list]:
        """XINFO STREAM, XINFO GROUPS and a non-blocking read, in one MULTI: the trim
        check and the read see the same stream (nothing is trimmed in between)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.xinfo_stream(self.key)
        pipe.xinfo_groups(self.key)
        pipe.xreadgroup(self.group, CONSUMER, {self.key: ">"}, count=count)
        try:
            info, groups, reply = pipe.execute()
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc) or "no such key" in str(exc).lower():
                raise StreamGone(str(exc)) from None
            raise
        group = next((g for g in groups if text(g.get("name")) == self.group), None)
        return info, group, _entries(reply)

    def read_blocking(self, count: int, block_ms: int) -> list:
        """Wait for new entries, sent right after a ``read_with_info`` that found none:
        a trim past our position in between would take more than ``maxlen`` (>= 1,000)
        XADDs within one round trip; while blocked, Redis serves us right after the
        XADD that woke us."""
        return self._read({self.key: ">"}, count, block_ms)

    def _read(self, streams: dict, count: int, block: int | None) -> list:
        try:
            reply = self.client.xreadgroup(self.group, CONSUMER, streams, count=count,
                                           block=block)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                raise StreamGone(str(exc)) from None
            raise
        return _entries(reply)

    def ack(self, ids: list[str]) -> None:
        for start in range(0, len(ids), 1000):
            self.client.xack(self.key, self.group, *ids[start:start + 1000])


def _entries(reply) -> list[tuple[str, dict | None]]:
    if not reply:
        return []
    return [(text(i), fields) for i, fields in reply[0][1]]


def consume_stream(config: FleetConfig, client: redis.Redis, sink: StreamSink,
                   stop: threading.Event, connected: Callable[[bool], None]) -> None:
    """Feed every stream entry until ``stop``; raises redis errors for the caller to
    retry (and returns when the stream vanished, to attach again)."""
    reader = StreamReader(client, events_stream_key(config), config.dashboard.event_group)
    try:
        fresh = _attach(reader, sink)
        connected(True)
        _replay_pending(reader, sink, stop)
        while not stop.is_set():
            acks = sink.take_acks()
            if acks:
                reader.ack(acks)
            info, group, entries = reader.read_with_info(READ_COUNT)
            if not fresh and group is not None:
                gap = trim_gap(group, info)
                if gap is not None:
                    sink.add_gap(gap)
            if not entries:
                entries = reader.read_blocking(READ_COUNT, BLOCK_MS)
            if entries:
                fresh = False
            _lost(sink, _feed(entries, sink))
    except StreamGone:
        return
    finally:
        connected(False)
        if stop.is_set():
            with contextlib.suppress(redis.RedisError):
                reader.ack(sink.take_acks())  # what was written by now


def _attach(reader: StreamReader, sink: StreamSink) -> bool:
    """Find our group, or create it (recording a gap if one was there and is gone).
    True when the group is new and its first reads cannot have missed anything."""
    if reader.group_info() is not None:
        return False
    cursor = later(sink.stream_written(), sink.stream_fed())
    start, gap = attach_plan(cursor, reader.stream_info(), time.time())
    reader.create_group(start)
    if gap is not None:
        sink.rebase()  # a new stream: its ids say nothing about what we stored
        sink.add_gap(gap)
    return start == "0"


def _replay_pending(reader: StreamReader, sink: StreamSink, stop: threading.Event) -> None:
    """Entries the group gave us before that were never acked: read again, from the
    start of our pending list (each comes back without its fields if it was trimmed
    meanwhile: not stored either, so lost)."""
    after, lost = "0", []
    while not stop.is_set():
        entries = reader.pending(after, READ_COUNT)
        if not entries:
            break
        lost += _feed(entries, sink)
        after = entries[-1][0]
    _lost(sink, lost)


def _feed(entries: list, sink: StreamSink) -> list[str]:
    """Hand entries to the sink, except those it has (re-delivered after a lost XACK,
    or after Redis's copy of the group went back in time: an AOF that lost its tail).
    Returns the ids of entries that came without their fields (trimmed)."""
    written, fed = sink.stream_written(), sink.stream_fed()
    written, fed = written and parse_id(written), fed and parse_id(fed)
    trimmed, acks, batch = [], [], []
    for entry_id, fields in entries:
        what = admit(entry_id, written, fed)
        if what == "ack":
            acks.append(entry_id)
        elif what == "skip":
            continue
        elif not fields:
            trimmed.append(entry_id)
        else:
            events, gap = decode_entry(fields)
            batch.append((entry_id, events, gap))
    if acks:
        sink.ack_now(acks)
    if batch:
        sink.feed_entries(batch)
    return trimmed


def _lost(sink: StreamSink, ids: list[str]) -> None:
    """One gap for entries delivered without their fields; then they are acked with
    the batch that records it."""
    if not ids:
        return
    sink.add_gap(Gap(id_time(ids[0]), id_time(ids[-1]), TRIMMED,
                     f"{len(ids)} stream entries delivered before were trimmed before "
                     "they were stored"))
    sink.feed_entries([(entry_id, [], None) for entry_id in ids])
