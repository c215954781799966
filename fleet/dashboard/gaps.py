"""What the dashboard cannot recover, decided from stream metadata: pure functions.

The workers' event stream (fleet.eventlog) lets the dashboard resume after a reconnect,
but three things still lose events, and each is shown as a gap (from, to, reason)
rather than hidden:

- Redis restarted empty (or was flushed, or failed over to a replica without the
  stream): the stream and the dashboard's consumer group are gone, and with them
  whatever the dashboard had not read yet.
- The stream was trimmed (XADD MAXLEN ~) past the group's last-delivered id: the
  dashboard was away, or behind, for more than ``event_stream.maxlen`` entries.
- A worker's offline buffer overflowed during a long outage (its gap marker says so).

Stream ids are ``<ms>-<seq>`` of Redis's clock; trimming only ever removes the oldest
entries, so "is anything lost" is a comparison of ids and counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

RESET = "redis-reset"
TRIMMED = "trimmed"
WORKER_BUFFER = "worker-buffer"

#: What each reason means, for the page and the API.
REASONS = {
    RESET: "the event stream's consumer group was gone (Redis restarted empty, was "
           "flushed, or failed over without it): events the dashboard had not read yet "
           "were lost with it",
    TRIMMED: "the event stream was trimmed past the dashboard's position: it was away or "
             "behind for more than event_stream.maxlen entries",
    WORKER_BUFFER: "a worker dropped events it could not send while Redis was "
                   "unreachable (event_stream.offline_buffer was full)",
}

StreamId = tuple[int, int]


def parse_id(value: str | bytes) -> StreamId:
    if isinstance(value, bytes):
        value = value.decode()
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def id_time(value: str | bytes) -> float:
    """Seconds since the epoch at which Redis assigned the id."""
    return parse_id(value)[0] / 1000.0


def text(value: str | bytes | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def later(a: str | None, b: str | None) -> str | None:
    """The later of two ids (None is earliest)."""
    if a is None or b is None:
        return a or b
    return a if parse_id(a) >= parse_id(b) else b


@dataclass(frozen=True)
class Gap:
    since: float
    until: float
    reason: str
    detail: str = ""

    def row(self, at: float) -> dict:
        return {"at": at, "since": self.since, "until": max(self.since, self.until),
                "reason": self.reason, "detail": self.detail}


Admit = Literal["feed", "ack", "skip"]


def admit(entry_id: str, written: str | StreamId | None, fed: str | StreamId | None
          ) -> Admit:
    """What to do with an entry the group delivered (again, after a reconnect).

    ``written``: the newest id whose batch is in the store (kept in the same
    transaction); ``fed``: the newest id handed to the ingester by this process
    (either parsed already, for a loop over many entries).
    """
    at = parse_id(entry_id)
    if written is not None and at <= _parsed(written):
        return "ack"  # stored already; only its XACK was lost
    if fed is not None and at <= _parsed(fed):
        return "skip"  # in a batch not yet written, which acks it once it is
    return "feed"


def _parsed(value: str | bytes | StreamId) -> StreamId:
    return value if isinstance(value, tuple) else parse_id(value)


def attach_plan(cursor: str | None, info: dict | None, now: float
                ) -> tuple[str, Gap | None]:
    """Our consumer group is missing: where to create it, and what was lost.

    ``cursor``: the newest id this dashboard has (stored or in memory), None on its
    first start; ``info``: XINFO STREAM, None when the stream does not exist.
    """
    if cursor is None:
        return "0", None  # a first start: read what the stream holds, nothing is lost
    first = (info or {}).get("first-entry")
    if first is not None and parse_id(first[0]) <= parse_id(cursor):
        return cursor, None  # the same stream, still holding our position
    until = id_time(first[0]) if first is not None else now
    return "0", Gap(id_time(cursor), until, RESET,
                    "the stream or its consumer group was gone when the dashboard "
                    "reconnected")


def trim_gap(group: dict, info: dict) -> Gap | None:
    """Before a read: has the stream been trimmed past the group's last-delivered id?

    Trimming removes the oldest entries only, so when the first entry left is newer
    than the group's position, everything between them is gone. Redis 7 counts it
    exactly (the group's lag counts every entry added after its position, the stream's
    length those that remain); Redis 6 cannot tell whether anything was between them.
    """
    first = info.get("first-entry")
    position = group.get("last-delivered-id")
    if first is None or position is None or parse_id(first[0]) <= parse_id(position):
        return None
    lag, length = group.get("lag"), info.get("length")
    if lag is not None and length is not None:
        lost = int(lag) - int(length)
        if lost <= 0:
            return None
        detail = f"{lost} stream entries trimmed unread"
    else:
        detail = "stream entries may have been trimmed unread (Redis < 7 cannot count them)"
    return Gap(id_time(position), id_time(first[0]), TRIMMED, detail)


def marker_gap(raw: str | bytes) -> Gap | None:
    """A worker's gap marker (fleet.eventlog.Dropped.marker), or None if malformed."""
    try:
        m = json.loads(raw)
        since, until = float(m["since"]), float(m["until"])
        detail = f"{m['hostname']} dropped {int(m['dropped'])} events"
    except (ValueError, KeyError, TypeError):
        return None
    return Gap(since, until, WORKER_BUFFER, detail)
