"""The dashboard's database: SQLAlchemy Core over SQLite (default) or PostgreSQL.

Flower keeps its state in RAM and saves it (shelve) only at shutdown: it grows until the
pod is OOM-killed and forgets everything on a crash. Here every batch of events is
written as it arrives, in one transaction, as one upsert per task; the table is capped by
count and age so disk and memory stay flat; a restart loses nothing written.

SQLAlchemy Core, not the ORM: the hot path is ``executemany`` of one prepared upsert, and
the same statements run on both databases (each dialect's ``ON CONFLICT DO UPDATE``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    case,
    delete,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from fleet.dashboard.events import HEARTBEATS_KEPT, TASK_FIELDS, WorkerUpdate
from fleet.database import DatabaseUrlError, open_engine, safe_url
from fleet.errors import FleetError

metadata = MetaData()

_Id = BigInteger().with_variant(Integer, "sqlite")  # SQLite: the rowid itself

tasks = Table(
    "tasks", metadata,
    Column("seq", _Id, primary_key=True, autoincrement=True),
    Column("uuid", String(64), nullable=False, unique=True),
    Column("name", String(255)),
    Column("state", String(16)),
    Column("state_rank", Float),
    Column("queue", String(63)),
    Column("worker", String(255)),
    Column("args", Text), Column("kwargs", Text), Column("result", Text),
    Column("exception", Text), Column("traceback", Text),
    Column("retries", Integer, default=0),
    Column("received", Float), Column("started", Float), Column("succeeded", Float),
    Column("failed", Float), Column("retried", Float), Column("revoked", Float),
    Column("runtime", Float),
    Column("eta", String(64)), Column("expires", String(64)),
    Column("parent_id", String(64)), Column("root_id", String(64)),
    Column("memory_kill", Boolean, default=False),
    Column("first_seen", Float), Column("updated", Float),
)
# Paging is newest first (seq descending) within a filter: one index per common filter.
Index("tasks_state_seq", tasks.c.state, tasks.c.seq)
Index("tasks_name_seq", tasks.c.name, tasks.c.seq)
Index("tasks_worker_seq", tasks.c.worker, tasks.c.seq)
Index("tasks_queue_seq", tasks.c.queue, tasks.c.seq)

workers = Table(
    "workers", metadata,
    Column("hostname", String(255), primary_key=True),
    Column("status", String(16)),
    Column("first_seen", Float), Column("seen", Float), Column("offline_since", Float),
    Column("freq", Float), Column("sw_ident", String(64)), Column("sw_ver", String(64)),
    Column("sw_sys", String(64)), Column("pid", Integer), Column("loadavg", String(64)),
    Column("active", Integer), Column("processed", Integer),
    Column("succeeded", BigInteger, default=0), Column("failed", BigInteger, default=0),
    Column("retried", BigInteger, default=0), Column("memory_kills", BigInteger, default=0),
    # Flower's Worker fields: the logical clock of the newest worker event, and the newest
    # HEARTBEATS_KEPT event times heard (a JSON list).
    Column("clock", BigInteger), Column("heartbeats", String(255)),
)

#: Events heard from each worker, by type: Flower's per-worker counter (/workers?json=1).
#: Rows go with their worker when it is purged.
worker_events = Table(
    "worker_events", metadata,
    Column("hostname", String(255), primary_key=True),
    Column("type", String(64), primary_key=True),
    Column("count", BigInteger, nullable=False),
)

queue_samples = Table(
    "queue_samples", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False), Column("queue", String(63), nullable=False),
    Column("waiting", Integer), Column("unacked", Integer), Column("running", Integer),
    Column("oldest_age", Float), Column("arrival_rate", Float),
    Column("completion_rate", Float), Column("service_time", Float),
    Column("workers", Integer), Column("desired", Integer), Column("actual", Integer),
)
Index("queue_samples_at", queue_samples.c.at)

worker_samples = Table(
    "worker_samples", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False), Column("hostname", String(255), nullable=False),
    Column("queue", String(63)), Column("cpu_percent", Float), Column("rss", BigInteger),
    Column("active", Integer), Column("concurrency", Integer),
)
Index("worker_samples_at", worker_samples.c.at)

decisions = Table(
    "decisions", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False), Column("queue", String(63), nullable=False),
    Column("current", Integer), Column("desired", Integer), Column("reason", Text),
    Column("dry_run", Boolean, default=False),
)
Index("decisions_at", decisions.c.at)

jobs = Table(
    "jobs", metadata,
    Column("id", String(64), primary_key=True),
    Column("task", String(255)), Column("aggregate", String(255)),
    Column("state", String(16)), Column("total", Integer), Column("done", Integer),
    Column("failed", Integer), Column("created", Float), Column("finished", Float),
    Column("result_url", Text), Column("error", Text),
)

audit = Table(
    "audit", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False), Column("user", String(255)),
    Column("role", String(16)), Column("action", String(64)), Column("target", String(255)),
    Column("params", JSON), Column("outcome", Text), Column("ok", Boolean),
)
Index("audit_at", audit.c.at)


#: Signed-in browser sessions (fleet.dashboard.sessions): the cookie holds only a random
#: token; ``id`` is its keyed hash, so a copy of this table signs no one in.
sessions = Table(
    "sessions", metadata,
    Column("id", String(64), primary_key=True),
    Column("user", String(255), nullable=False), Column("role", String(16), nullable=False),
    Column("via", String(16), nullable=False), Column("fingerprint", String(64)),
    Column("csrf", String(64), nullable=False), Column("address", String(64)),
    Column("created", Float, nullable=False), Column("seen", Float, nullable=False),
)
Index("sessions_user", sessions.c.user)

#: The newest event-stream entry written, per stream and consumer group, kept in the
#: same transaction as the batch holding it: what is stored is exactly what is <= it.
event_cursor = Table(
    "event_cursor", metadata,
    Column("stream", String(255), primary_key=True),
    Column("consumer_group", String(255), primary_key=True),
    Column("last_id", String(64), nullable=False), Column("at", Float),
)

#: Stretches of events that could not be recovered (fleet.dashboard.gaps).
event_gaps = Table(
    "event_gaps", metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False), Column("since", Float), Column("until", Float),
    Column("reason", String(32)), Column("detail", Text),
)
Index("event_gaps_at", event_gaps.c.at)


class StoreError(FleetError):
    exit_code = 2


def engine_for(url: str) -> Engine:
    """An engine for ``url`` (fleet.database: SQLite gets WAL, readers do not block the
    writer; commits survive a crash of the process, which is all the dashboard needs)."""
    try:
        return open_engine(url, "dashboard database")
    except DatabaseUrlError as exc:
        raise StoreError(str(exc)) from None


def _insert(engine: Engine):
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


class Store:
    """Writes batches, prunes to the caps, and answers the views' queries."""

    def __init__(self, url: str):
        self.url = url
        self.engine = engine_for(url)
        try:
            metadata.create_all(self.engine)
            _add_new_columns(self.engine)
        except DBAPIError as exc:  # unreachable, or no right to create or alter tables
            raise StoreError(f"cannot open the dashboard database {_safe(url)}: "
                             f"{exc.orig}") from None
        insert = _insert(self.engine)
        up = insert(tasks)
        x = up.excluded
        newer = or_(tasks.c.state.is_(None), tasks.c.state == "RETRY",
                    x.state_rank >= tasks.c.state_rank)
        keep = {name: func.coalesce(getattr(x, name), getattr(tasks.c, name))
                for name in TASK_FIELDS if name not in (
                    "uuid", "state", "state_rank", "retries", "memory_kill",
                    "first_seen", "updated")}
        self._upsert_tasks = up.on_conflict_do_update(
            index_elements=[tasks.c.uuid],
            set_={**keep,
                  "state": case((newer, x.state), else_=tasks.c.state),
                  "state_rank": case((newer, x.state_rank), else_=tasks.c.state_rank),
                  "retries": case((x.retries > tasks.c.retries, x.retries),
                                  else_=tasks.c.retries),
                  "memory_kill": or_(tasks.c.memory_kill, x.memory_kill),
                  "first_seen": case((x.first_seen < tasks.c.first_seen, x.first_seen),
                                     else_=tasks.c.first_seen),
                  "updated": case((x.updated > tasks.c.updated, x.updated),
                                  else_=tasks.c.updated)})
        wi = insert(workers)
        wx = wi.excluded
        counters = ("succeeded", "failed", "retried", "memory_kills")
        newer_w = or_(workers.c.seen.is_(None), wx.seen >= workers.c.seen)
        fields = ("status", "freq", "sw_ident", "sw_ver", "sw_sys", "pid", "loadavg",
                  "active", "processed", "clock")
        self._upsert_workers = wi.on_conflict_do_update(
            index_elements=[workers.c.hostname],
            set_={**{f: case((and_(newer_w, getattr(wx, f).is_not(None)), getattr(wx, f)),
                             else_=getattr(workers.c, f)) for f in fields},
                  "seen": case((newer_w, wx.seen), else_=workers.c.seen),
                  # a row made by task events alone has none until its first worker event
                  "first_seen": func.coalesce(workers.c.first_seen, wx.first_seen),
                  "offline_since": case(
                      (and_(newer_w, wx.status == "online"), None),
                      (and_(newer_w, wx.status == "offline",
                            workers.c.offline_since.is_(None)), wx.seen),
                      else_=workers.c.offline_since),
                  # merged with the stored ones before the write (_heartbeats)
                  "heartbeats": func.coalesce(wx.heartbeats, workers.c.heartbeats),
                  **{c: getattr(workers.c, c) + getattr(wx, c) for c in counters}})
        ei = insert(worker_events)
        self._upsert_events = ei.on_conflict_do_update(
            index_elements=[worker_events.c.hostname, worker_events.c.type],
            set_={"count": worker_events.c.count + ei.excluded.count})
        ci = insert(event_cursor)
        self._upsert_cursor = ci.on_conflict_do_update(
            index_elements=[event_cursor.c.stream, event_cursor.c.consumer_group],
            set_={"last_id": ci.excluded.last_id, "at": ci.excluded.at})
        self._upsert_jobs = insert(jobs)
        self._job_cols = [c.name for c in jobs.c if c.name != "id"]

    # -- writes ------------------------------------------------------------------

    def write(self, task_rows: Sequence[dict], worker_rows: Iterable[WorkerUpdate],
              gaps: Sequence[dict] = (), cursor: tuple[str, str, str] | None = None
              ) -> None:
        """One transaction for a whole batch of folded events, with the gaps found and
        the newest stream entry (stream, group, id) it holds."""
        wrows, erows, beats = [], [], {}
        for w in worker_rows:
            if not (w.seen or w.succeeded or w.failed or w.retried or w.events):
                continue
            row = {**w.__dict__, "first_seen": w.seen or None,
                   "heartbeats": w.heartbeats or None,
                   "offline_since": w.seen if w.status == "offline" else None}
            del row["events"]
            if not row["seen"]:
                row["seen"] = None
                row["status"] = None
            if w.heartbeats:
                beats[w.hostname] = row
            wrows.append(row)
            erows += [{"hostname": w.hostname, "type": kind, "count": n}
                      for kind, n in w.events.items()]
        with self.engine.begin() as conn:
            if task_rows:
                conn.execute(self._upsert_tasks, list(task_rows))
            if beats:
                _heartbeats(conn, beats)
            if wrows:
                conn.execute(self._upsert_workers, wrows)
            if erows:
                conn.execute(self._upsert_events, erows)
            if gaps:
                conn.execute(event_gaps.insert(), list(gaps))
            if cursor is not None:
                stream, group, last_id = cursor
                conn.execute(self._upsert_cursor, {"stream": stream, "consumer_group": group,
                                                   "last_id": last_id, "at": time.time()})

    def stream_cursor(self, stream: str, group: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(event_cursor.c.last_id).where(
                event_cursor.c.stream == stream,
                event_cursor.c.consumer_group == group)).scalar()

    def mark_offline(self, now: float, silent_for: float) -> list[str]:
        """Workers whose heartbeats stopped (killed, network gone) without worker-offline."""
        cutoff = now - silent_for
        with self.engine.begin() as conn:
            gone = conn.execute(select(workers.c.hostname).where(
                workers.c.status == "online", workers.c.seen < cutoff)).scalars().all()
            if gone:
                conn.execute(update(workers).where(workers.c.hostname.in_(gone))
                             .values(status="offline", offline_since=now))
        return list(gone)

    def purge_offline(self, now: float, after: float) -> int:
        with self.engine.begin() as conn:
            gone = conn.execute(delete(workers).where(
                workers.c.status == "offline", workers.c.offline_since < now - after)).rowcount
            if gone:
                conn.execute(delete(worker_events).where(
                    worker_events.c.hostname.not_in(select(workers.c.hostname))))
            return gone

    def prune_tasks(self, max_count: int, max_age: float, now: float | None = None,
                    chunk: int = 20_000) -> int:
        """Keep the newest ``max_count`` tasks and none older than ``max_age``.

        Bounded work per call: it reads one index entry at offset ``max_count`` and deletes
        below it, then walks the oldest ``chunk`` rows for age (tasks enter in first-seen
        order, so the oldest by seq are the oldest by age).
        """
        now = time.time() if now is None else now
        removed = 0
        with self.engine.begin() as conn:
            edge = conn.execute(select(tasks.c.seq).order_by(tasks.c.seq.desc())
                                .offset(max_count).limit(1)).scalar()
            if edge is not None:
                removed += conn.execute(delete(tasks).where(tasks.c.seq <= edge)).rowcount
            oldest = conn.execute(select(tasks.c.seq, tasks.c.first_seen)
                                  .order_by(tasks.c.seq).limit(chunk)).all()
            old = [seq for seq, seen in oldest if seen is not None and seen < now - max_age]
            if old:
                removed += conn.execute(delete(tasks).where(tasks.c.seq <= max(old))).rowcount
        return removed

    def prune_history(self, now: float, keep: float) -> None:
        cutoff = now - keep
        with self.engine.begin() as conn:
            for table in (queue_samples, worker_samples, decisions, audit, event_gaps):
                conn.execute(delete(table).where(table.c.at < cutoff))

    def add_samples(self, queue_rows: list[dict], worker_rows: list[dict]) -> None:
        with self.engine.begin() as conn:
            if queue_rows:
                conn.execute(queue_samples.insert(), queue_rows)
            if worker_rows:
                conn.execute(worker_samples.insert(), worker_rows)

    def add_decisions(self, rows: list[dict]) -> None:
        if rows:
            with self.engine.begin() as conn:
                conn.execute(decisions.insert(), rows)

    def last_decision_at(self) -> float:
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(decisions.c.at))).scalar() or 0.0

    def put_jobs(self, rows: list[dict]) -> None:
        if not rows:
            return
        stmt = self._upsert_jobs
        stmt = stmt.on_conflict_do_update(
            index_elements=[jobs.c.id],
            set_={c: getattr(stmt.excluded, c) for c in self._job_cols})
        with self.engine.begin() as conn:
            conn.execute(stmt, rows)

    def record_action(self, *, user: str, role: str, action: str, target: str,
                      params: dict[str, Any], outcome: str, ok: bool) -> dict:
        row = {"at": time.time(), "user": user, "role": role, "action": action,
               "target": target, "params": params, "outcome": outcome, "ok": ok}
        with self.engine.begin() as conn:
            row["id"] = conn.execute(audit.insert().values(**row)).inserted_primary_key[0]
        return row

    def close(self) -> None:
        self.engine.dispose()


def _heartbeats(conn, rows: dict[str, dict]) -> None:
    """The newest HEARTBEATS_KEPT times of each worker: the stored ones and this batch's,
    read and written in the batch's transaction."""
    stored = dict(conn.execute(select(workers.c.hostname, workers.c.heartbeats)
                               .where(workers.c.hostname.in_(list(rows)))).all())
    for hostname, row in rows.items():
        old = loads(stored.get(hostname)) or []
        times = sorted({*(t for t in old if isinstance(t, int | float)), *row["heartbeats"]})
        row["heartbeats"] = json.dumps(times[-HEARTBEATS_KEPT:])


def _add_new_columns(engine: Engine) -> None:
    """Columns added to a table since its database was made (create_all makes missing
    tables only): ALTER TABLE ... ADD COLUMN, nullable, so older rows read as NULL."""
    have = inspect(engine)
    quote = engine.dialect.identifier_preparer.quote
    exists = " IF NOT EXISTS" if engine.dialect.name == "postgresql" else ""
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            known = {c["name"] for c in have.get_columns(table.name)}
            for column in table.columns:
                if column.name not in known:
                    conn.execute(text(
                        f"ALTER TABLE {quote(table.name)} ADD COLUMN{exists} "
                        f"{quote(column.name)} {column.type.compile(engine.dialect)}"))


def _safe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return safe_url(url)


def loads(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value

