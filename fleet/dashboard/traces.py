"""A trace of what a fleet did, from what it already records: the dashboard's task rows,
the job ledger's chunk rows (when each chunk was sent, and its size), and the
autoscaler's decisions (kept in Redis, and copied into the dashboard's database by its
sampler).

Here rather than in fleet/trace/ because it reads the dashboard's tables, which only the
CLI and ``fleet up`` may import (pyproject.toml, import-linter); the format stays in
fleet/trace/.

What the records cannot tell, and what stands in for it (docs/tuning.md, "Traces"):

- **sent**: fleet turns Celery's ``task-sent`` event off (``task_send_sent_event``: one
  more event per task, on the client), so a task's send time is known only for a job's
  chunks (the ledger's ``sent_at``, if sent once). For any other task ``sent`` is its
  ``received``: when a worker took it off the queue, after whatever wait it had there.
- **input_bytes**: the ledger's chunk size (what routed it); unknown for other tasks (the
  events' ``args`` are a truncated repr, not the input).
- Tasks whose queue the dashboard never learned (a worker not named ``QUEUE@host``
  that never reported) are left out, and counted.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis
from sqlalchemy import func, inspect, select, tuple_
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from fleet.config import FleetConfig
from fleet.dashboard.store import StoreError, decisions, engine_for, tasks
from fleet.database import safe_url
from fleet.errors import FleetError
from fleet.jobs import ledger
from fleet.jobs.ids import parse_task_id
from fleet.keys import broker_client, changes_key, latest_decisions_key
from fleet.trace.model import VERSION, Header, Replicas, Task
from fleet.units import parse_duration

#: Rows fetched per round trip (a server-side cursor on PostgreSQL).
BATCH = 1000
_NUMBER = re.compile(r"^\d+(\.\d+)?$")


class ExportError(FleetError):
    exit_code = 2


def instant(text: str, now: float) -> float:
    """Epoch seconds from a duration ago (``1h``, ``30m``, ``90s``: that long before
    ``now``) or an ISO 8601 time (``2026-12-02T14:00``; without an offset it is UTC)."""
    value = text.strip()
    try:
        return now - parse_duration(float(value) if _NUMBER.match(value) else value)
    except ValueError:
        pass  # not a duration: an ISO time, or neither
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"expected a duration ago (1h, 30m, 2d) or an ISO time "
                         f"(2026-12-02T14:00:00, UTC unless it has an offset), got "
                         f"{text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


@dataclass
class Export:
    """A trace's header and its records (streamed; read ``skipped`` after them)."""

    header: Header
    records: Iterator[Task | Replicas]
    #: Why rows were left out, and how many: filled while ``records`` is read.
    skipped: dict[str, int] = field(default_factory=dict)


def export(config: FleetConfig, database: str | None = None, *, since: float | None = None,
           until: float | None = None, queues: Iterable[str] = (),
           now: float | None = None, warn: Callable[[str], None] = lambda _: None) -> Export:
    """The fleet's tasks sent in [since, until) (default: from the first one stored to
    now) on ``queues`` (default: all), then the autoscaler's decisions in that window.
    t=0 is ``since``, or the first task's time without it."""
    now = time.time() if now is None else now
    until = now if until is None else until
    url = database or config.dashboard.database
    if since is not None and since >= until:
        raise _empty(since, until)
    engine = _open(url)
    chosen = list(dict.fromkeys(queues))
    chunks = _Chunks(config, warn)
    try:
        with engine.connect() as conn:
            stored = [q for q in conn.execute(select(tasks.c.queue).distinct()).scalars()
                      if q]
            start = since
            if start is None:
                start = _first(conn, chunks, until)
    except DBAPIError as exc:
        raise _unreachable(url, exc) from None
    if start is None:
        engine.dispose()
        raise ExportError(f"{safe_url(url)} holds no tasks: nothing to export (has the "
                          "dashboard run with this database?)")
    if start >= until:
        engine.dispose()
        raise _empty(start, until)
    if unknown := [q for q in chosen if q not in config.queues and q not in stored]:
        engine.dispose()
        raise ExportError(f"no queue {', '.join(map(repr, unknown))} in {config.source} or "
                          f"the dashboard's tasks (queues: {', '.join(config.queues)})")
    names = chosen or list(dict.fromkeys([*config.queues, *sorted(stored)]))
    header = Header(version=VERSION, source="export", start=start, duration=until - start,
                    queues=names, params={
                        "since": _iso(start), "until": _iso(until),
                        "queues": chosen or "all", "database": safe_url(url)})
    out = Export(header, iter(()))
    replicas = _decisions(config, engine, start, until, set(names), warn)
    # Without --since, t=0 is the first receipt, and a chunk the ledger says was sent
    # before it keeps its receipt as sent rather than fall out of its own trace.
    out.records = _chain(_tasks(engine, url, start, until, chosen, out.skipped, chunks,
                                strict=since is not None), replicas, engine)
    return out


def _first(conn, chunks: _Chunks, until: float) -> float | None:
    """t=0 without --since: the first receipt stored, or the send of a chunk among the
    first rows stored (the oldest kept), which the ledger says came before it."""
    c = tasks.c
    seen_at = func.coalesce(c.received, c.first_seen)
    first = conn.execute(select(func.min(seen_at))).scalar()
    if first is None:
        return None
    start = min(float(first), until)
    oldest = conn.execute(select(c.uuid, seen_at.label("seen")).order_by(c.seq)
                          .limit(BATCH)).all()
    known = chunks.lookup(row.uuid for row in oldest)
    for row in oldest:
        if row.uuid in known:
            sent_at, _, sends = known[row.uuid]
            if sent_at is not None and sends == 1 and sent_at <= row.seen:
                start = min(start, sent_at)
    return start


def _chain(first: Iterator[Task], then: list[Replicas], engine: Engine
           ) -> Iterator[Task | Replicas]:
    try:
        yield from first
        yield from then
    finally:
        engine.dispose()


def _tasks(engine: Engine, url: str, start: float, until: float, queues: list[str],
           skipped: dict[str, int], chunks: _Chunks, strict: bool = True
           ) -> Iterator[Task]:
    """Task rows in insertion order (the primary key: no sort of a million rows), those
    whose sent falls in the window. A chunk's sent (the ledger's) comes before its
    received, so rows are picked by received >= start and checked again once sent is
    known; there is no upper bound in SQL, since a task sent before ``until`` may have
    been received after it."""
    c = tasks.c
    seen_at = func.coalesce(c.received, c.first_seen)
    query = (select(c.uuid, c.name, c.queue, c.state, c.received, c.started, c.succeeded,
                    c.failed, c.runtime, c.first_seen)
             .where(seen_at >= start).order_by(c.seq))
    if queues:
        query = query.where(c.queue.in_(queues))
    try:
        with engine.connect() as conn:
            result = conn.execution_options(yield_per=BATCH).execute(query)
            for rows in result.partitions():
                known = chunks.lookup(row.uuid for row in rows)
                for row in rows:
                    task = task_from_row(row, known.get(row.uuid), start, until, skipped,
                                         strict)
                    if task is not None:
                        yield task
    except DBAPIError as exc:
        raise _unreachable(url, exc) from None


def task_from_row(row, chunk: tuple[float | None, int | None, int] | None, start: float,
                  until: float, skipped: dict[str, int], strict: bool = True) -> Task | None:
    """A stored task row (and its chunk's ledger ``(sent_at, size, sends)``, if any) as
    a trace task with times from ``start``, or None if it was not sent in the window (or
    has no queue: counted in ``skipped``). ``strict`` False: a chunk sent before ``start``
    keeps its receipt as sent instead of falling out."""
    if not row.queue:
        skipped["queue unknown"] = skipped.get("queue unknown", 0) + 1
        return None
    seen = row.received if row.received is not None else row.first_seen
    sent, size = seen, None
    if chunk is not None:
        sent_at, size, sends = chunk
        # Sent again (by the reconciler, or a retry): sent_at is the last send, not the
        # one whose receipt the dashboard has. A clock far off shows as sent after seen.
        if sent_at is not None and sends == 1 and sent_at <= seen \
                and (strict or sent_at >= start):
            sent = sent_at
    if not start <= sent < until:
        return None
    finished = row.succeeded if row.succeeded is not None else row.failed
    service = row.runtime
    if service is None and finished is not None and row.started is not None:
        service = max(0.0, finished - row.started)

    def rel(t: float | None) -> float | None:
        return None if t is None else round(max(0.0, t - start), 6)

    return Task(queue=row.queue, name=row.name or "", sent=rel(sent),
                service=None if service is None else round(max(0.0, service), 6),
                received=rel(row.received), started=rel(row.started),
                finished=rel(finished), state=row.state or "PENDING",
                input_bytes=size, task_id=row.uuid)


class _Chunks:
    """The ledger's (sent_at, size, sends) of the chunk tasks of one batch of rows; an
    unreachable ledger costs the send times (said once), not the export."""

    def __init__(self, config: FleetConfig, warn: Callable[[str], None]):
        self.config = config
        self.warn = warn
        self.engine: Engine | None = None
        self.broken = False

    def lookup(self, uuids: Iterable[str]) -> dict[str, tuple[float | None, int | None, int]]:
        refs = {}
        for uuid in uuids:
            ref = parse_task_id(uuid)
            if ref is not None and ref.index >= 0:
                refs[(ref.job_id, ref.index)] = uuid
        if not refs or self.broken:
            return {}
        c = ledger.chunks.c
        try:
            if self.engine is None:
                if not _exists(self.config.jobs.ledger):  # an export creates no ledger
                    self.broken = True
                    self.warn(f"no job ledger at {safe_url(self.config.jobs.ledger)}; "
                              "chunks' sent is their received")
                    return {}
                self.engine = ledger.engine(self.config)
            with self.engine.connect() as conn:
                rows = conn.execute(select(c.job_id, c.idx, c.sent_at, c.size, c.sends)
                                    .where(tuple_(c.job_id, c.idx).in_(list(refs))))
                return {refs[(r.job_id, r.idx)]: (r.sent_at, r.size, r.sends)
                        for r in rows}
        except (SQLAlchemyError, FleetError) as exc:
            self.broken = True
            self.warn(f"job ledger unreadable ({exc}); chunks' sent is their received")
            return {}


def _decisions(config: FleetConfig, engine: Engine, start: float, until: float,
               queues: set[str], warn: Callable[[str], None]) -> list[Replicas]:
    """The decisions in the window, oldest first: Redis's change list (the newest
    thousand) and latest-per-queue hash, and the dashboard's copy of the changes (kept
    longer). A dry run's are left out: it changed nothing."""
    found: dict[tuple[str, float], dict] = {}
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(decisions).where(
                decisions.c.at >= start, decisions.c.at < until))
            for row in rows:
                found[(row.queue, round(row.at, 6))] = dict(row._mapping)
    except DBAPIError as exc:
        warn(f"no decisions from the dashboard database ({exc.orig})")
    try:
        client = broker_client(config)
        raw = [*client.lrange(changes_key(config), 0, -1),
               *client.hgetall(latest_decisions_key(config)).values()]
    except redis.RedisError as exc:
        warn(f"Redis unreachable ({exc}): decisions from the dashboard database only")
        raw = []
    for item in raw:
        try:
            d = json.loads(item)
            found.setdefault((d["queue"], round(float(d["at"]), 6)), d)
        except (ValueError, KeyError, TypeError):
            continue
    out = []
    for d in found.values():
        if d.get("dry_run") or d.get("queue") not in queues:
            continue
        try:
            at = float(d["at"])
            if not start <= at < until:
                continue
            out.append(Replicas(at=round(at - start, 6), queue=d["queue"],
                                current=int(d["current"]), desired=int(d["desired"]),
                                reason=str(d.get("reason") or "")))
        except (KeyError, TypeError, ValueError):
            continue
    out.sort(key=lambda r: (r.at, r.queue))
    return out


def _open(url: str) -> Engine:
    """An engine for an existing dashboard database: an export never creates one (a
    mistyped SQLite path would otherwise export an empty trace, silently)."""
    try:
        make_url(url)
    except ArgumentError:
        raise ExportError(f"dashboard database URL {url!r} is not a SQLAlchemy URL") from None
    if not _exists(url):
        raise ExportError(f"no dashboard database at {safe_url(url)} (no such file)")
    try:
        engine = engine_for(url)
    except StoreError as exc:
        raise ExportError(str(exc)) from None
    try:
        if not inspect(engine).has_table(tasks.name):
            raise ExportError(f"{safe_url(url)} has no dashboard tables (is it the "
                              "dashboard's database?)")
    except DBAPIError as exc:
        raise _unreachable(url, exc) from None
    return engine


def _exists(url: str) -> bool:
    """False for a SQLite URL whose file is missing (opening it would create it)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return True  # the engine says what is wrong with it
    return (parsed.get_backend_name() != "sqlite"
            or parsed.database in (None, "", ":memory:") or Path(parsed.database).is_file())


def _unreachable(url: str, exc: DBAPIError) -> ExportError:
    reason = " ".join(str(exc.orig).split())
    return ExportError(f"cannot read the dashboard database {safe_url(url)}: {reason}")


def _empty(since: float, until: float) -> ExportError:
    return ExportError(f"the window is empty: since ({_iso(since)}) is not before until "
                       f"({_iso(until)})")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
