"""Queries shaped for pages and the API: rows in, plain dicts out.

Every list is paged by keyset (``seq`` below a cursor) or by a bounded offset on an
index, so a page costs the same at 1M stored tasks as at 1k. Flower's own shapes
(``flower_task``, ``flower_worker``) are built here too, so its API paths answer exactly
as Flower does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select

from fleet.dashboard import series
from fleet.dashboard.downsample import TOP, Window
from fleet.dashboard.gaps import REASONS
from fleet.dashboard.store import (
    Store,
    audit,
    decisions,
    event_gaps,
    jobs,
    loads,
    tasks,
    worker_events,
    workers,
)

MAX_PAGE = 500


@dataclass(frozen=True)
class TaskFilter:
    states: tuple[str, ...] = ()
    name: str | None = None
    worker: str | None = None
    queue: str | None = None
    received_from: float | None = None
    received_to: float | None = None
    #: Text searched in args, kwargs and result (a substring, case-sensitive).
    search: str | None = None
    memory_kill: bool | None = None

    def clauses(self) -> list:
        c = []
        if self.states:
            c.append(tasks.c.state.in_(self.states))
        if self.name:
            c.append(tasks.c.name.like(self.name.replace("*", "%"))
                     if "*" in self.name else tasks.c.name == self.name)
        if self.worker:
            c.append(tasks.c.worker == self.worker)
        if self.queue:
            c.append(tasks.c.queue == self.queue)
        if self.received_from is not None:
            c.append(tasks.c.first_seen >= self.received_from)
        if self.received_to is not None:
            c.append(tasks.c.first_seen <= self.received_to)
        if self.search:
            pattern = f"%{self.search}%"
            c.append(or_(tasks.c.args.like(pattern), tasks.c.kwargs.like(pattern),
                         tasks.c.result.like(pattern)))
        if self.memory_kill is not None:
            c.append(tasks.c.memory_kill.is_(self.memory_kill))
        return c


def task_dict(row) -> dict[str, Any]:
    """Our task shape: Flower's fields plus queue, timeline and memory-limit flag."""
    m = row._mapping
    return {
        "uuid": m["uuid"], "name": m["name"], "state": m["state"], "queue": m["queue"],
        "worker": m["worker"], "args": m["args"], "kwargs": m["kwargs"],
        "result": m["result"], "exception": m["exception"], "traceback": m["traceback"],
        "retries": m["retries"], "received": m["received"], "started": m["started"],
        "succeeded": m["succeeded"], "failed": m["failed"], "retried": m["retried"],
        "revoked": m["revoked"], "runtime": m["runtime"], "eta": m["eta"],
        "expires": m["expires"], "parent_id": m["parent_id"], "root_id": m["root_id"],
        "memory_kill": bool(m["memory_kill"]), "timestamp": m["updated"],
        "seq": m["seq"],
    }


def flower_task(t: dict[str, Any]) -> dict[str, Any]:
    """The shape of Flower's /api/tasks and /api/task/info (celery.events.state.Task)."""
    return {
        "uuid": t["uuid"], "name": t["name"], "state": t["state"],
        "received": t["received"], "sent": None, "started": t["started"],
        "rejected": None, "succeeded": t["succeeded"], "failed": t["failed"],
        "retried": t["retried"], "revoked": t["revoked"], "args": t["args"],
        "kwargs": t["kwargs"], "eta": t["eta"], "expires": t["expires"],
        "retries": t["retries"], "worker": t["worker"], "result": t["result"],
        "exception": t["exception"], "timestamp": t["timestamp"], "runtime": t["runtime"],
        "traceback": t["traceback"], "exchange": None, "routing_key": t["queue"],
        "clock": None, "client": None, "root": t["root_id"], "root_id": t["root_id"],
        "parent": t["parent_id"], "parent_id": t["parent_id"], "children": [],
    }


#: celery.events.state.Worker._fields: what Flower's /workers?json=1 shows of a worker.
WORKER_FIELDS = ("hostname", "pid", "freq", "heartbeats", "clock", "active", "processed",
                 "loadavg", "sw_ident", "sw_ver", "sw_sys")


def worker_dict(row) -> dict[str, Any]:
    m = row._mapping
    return {**m, "loadavg": loads(m["loadavg"]), "heartbeats": loads(m["heartbeats"]) or []}


def flower_worker(w: dict[str, Any], counts: dict[str, int]) -> dict[str, Any]:
    """One item of Flower's /workers?json=1: its counter of events by type, the Worker's
    fields (Celery's defaults where no event said: freq 60, clock 0) and ``status``."""
    return {**counts, **{f: w[f] for f in WORKER_FIELDS},
            "freq": 60 if w["freq"] is None else w["freq"], "clock": w["clock"] or 0,
            "status": w["status"] == "online"}


class Views:
    def __init__(self, store: Store):
        self.store = store
        self.engine = store.engine

    def tasks(self, f: TaskFilter, limit: int = 50, before: int | None = None,
              offset: int = 0, oldest_first: bool = False) -> list[dict]:
        """Newest first; ``before`` (a seq) pages without OFFSET's cost."""
        limit = max(1, min(limit, MAX_PAGE))
        q = select(tasks)
        clauses = f.clauses()
        if before is not None:
            clauses.append(tasks.c.seq < before)
        if clauses:
            q = q.where(and_(*clauses))
        q = q.order_by(tasks.c.seq if oldest_first else tasks.c.seq.desc())
        q = q.offset(max(0, offset)).limit(limit)
        with self.engine.connect() as conn:
            return [task_dict(r) for r in conn.execute(q)]

    def task(self, uuid: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(tasks).where(tasks.c.uuid == uuid)).first()
        return task_dict(row) if row else None

    def task_names(self) -> list[str]:
        with self.engine.connect() as conn:
            return [n for (n,) in conn.execute(
                select(tasks.c.name).where(tasks.c.name.is_not(None)).distinct()
                .order_by(tasks.c.name).limit(1000))]

    def task_count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(tasks)).scalar() or 0

    def counts(self) -> list[dict]:
        """Tasks stored by state, queue and name (for /metrics and the overview)."""
        q = (select(tasks.c.state, tasks.c.queue, tasks.c.name, func.count())
             .group_by(tasks.c.state, tasks.c.queue, tasks.c.name))
        with self.engine.connect() as conn:
            return [{"state": s, "queue": qn, "name": n, "count": c}
                    for s, qn, n, c in conn.execute(q)]

    def failures(self, limit: int = 50) -> list[dict]:
        """Failures grouped by exception type (the text before the first parenthesis)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(tasks.c.exception, tasks.c.name, func.count(), func.max(tasks.c.seq))
                .where(tasks.c.state == "FAILURE")
                .group_by(tasks.c.exception, tasks.c.name)).all()
        groups: dict[str, dict] = {}
        for exception, name, count, newest in rows:
            kind = (exception or "unknown").split("(", 1)[0].strip() or "unknown"
            g = groups.setdefault(kind, {"exception": kind, "count": 0, "tasks": {},
                                         "newest_seq": 0, "example": exception})
            g["count"] += count
            name = "unknown" if name is None else name  # a failure heard before its name
            g["tasks"][name] = g["tasks"].get(name, 0) + count
            if newest > g["newest_seq"]:
                g["newest_seq"], g["example"] = newest, exception
        return sorted(groups.values(), key=lambda g: -g["count"])[:limit]

    def workers(self, include_offline: bool = True) -> list[dict]:
        q = select(workers).order_by(workers.c.hostname)
        if not include_offline:
            q = q.where(workers.c.status == "online")
        with self.engine.connect() as conn:
            return [worker_dict(r) for r in conn.execute(q)]

    def worker(self, hostname: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(workers).where(workers.c.hostname == hostname)).first()
        return worker_dict(row) if row else None

    def flower_workers(self) -> list[dict]:
        """Flower's /workers?json=1 ``data``: every stored worker, with its event counts."""
        counts: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for hostname, kind, n in conn.execute(select(worker_events).order_by(
                    worker_events.c.hostname, worker_events.c.type)):
                counts.setdefault(hostname, {})[kind] = n
        return [flower_worker(w, counts.get(w["hostname"], {})) for w in self.workers()]

    def decisions(self, limit: int = 100, queue: str | None = None) -> list[dict]:
        q = select(decisions).order_by(decisions.c.at.desc()).limit(min(limit, 1000))
        if queue:
            q = q.where(decisions.c.queue == queue)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def jobs(self, limit: int = 100) -> list[dict]:
        q = select(jobs).order_by(jobs.c.created.desc()).limit(min(limit, 1000))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def job_tasks(self, job_id: str, limit: int = 50, states: tuple[str, ...] = ()) -> list[dict]:
        """A job's stored chunk tasks: their ids are ``JOB.N`` (fleet.jobs.ids), a range
        scan on the unique uuid index."""
        q = select(tasks).where(tasks.c.uuid > f"{job_id}.", tasks.c.uuid < f"{job_id}/")
        if states:
            q = q.where(tasks.c.state.in_(states))
        with self.engine.connect() as conn:
            return [task_dict(r) for r in conn.execute(q.limit(min(limit, MAX_PAGE)))]

    def gaps(self, limit: int = 100, since: float | None = None) -> list[dict]:
        """Stretches of events the dashboard could not recover, newest first."""
        q = select(event_gaps).order_by(event_gaps.c.id.desc()).limit(min(limit, 1000))
        if since is not None:
            q = q.where(event_gaps.c.at >= since)
        with self.engine.connect() as conn:
            return [{**r._mapping, "meaning": REASONS.get(r.reason, "")}
                    for r in conn.execute(q)]

    def audit(self, limit: int = 200) -> list[dict]:
        q = select(audit).order_by(audit.c.id.desc()).limit(min(limit, 1000))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def series(self, window: Window, queue: str | None = None,
               what: tuple[str, ...] = ("queues", "workers"), top: int = TOP) -> dict:
        """Plots over time, downsampled (fleet.dashboard.series): per figure its ``top``
        series, one value per bucket of ``window``, on the shared bucket starts ``t``."""
        out: dict[str, Any] = {"since": window.since, "until": window.until,
                               "step": window.step, "t": window.starts()}
        with self.engine.connect() as conn:
            for kind in ("queues", "workers"):
                out[kind] = series.read(conn, kind, window, top, queue) if kind in what else {}
        return out
