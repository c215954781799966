"""Folding Celery events into row updates: a pure function, no I/O.

Events for one task arrive as a handful of messages (received, started, succeeded ...);
the ingester folds a batch of them into one row per task and one per worker, so the
database sees one upsert per task per batch instead of one write per event. The same
precedence rule runs here and in the database's upsert (``state_rank``), because a task's
events can straddle two batches and can arrive out of order (Celery publishes them from
the worker's main process and from pool processes over separate connections).
"""

from __future__ import annotations

import json
from bisect import insort
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Celery's task event types and the state each one means.
TASK_STATES = {
    "task-sent": "PENDING",
    "task-received": "RECEIVED",
    "task-started": "STARTED",
    "task-succeeded": "SUCCESS",
    "task-failed": "FAILURE",
    "task-retried": "RETRY",
    "task-revoked": "REVOKED",
    "task-rejected": "REJECTED",
}
READY = ("SUCCESS", "FAILURE", "REVOKED", "REJECTED")
#: Higher rank wins; RETRY gives way to anything (the next attempt is received again).
RANK = {"PENDING": 0, "RECEIVED": 1, "STARTED": 2, "RETRY": 2.5,
        "SUCCESS": 3, "FAILURE": 3, "REVOKED": 3, "REJECTED": 3}

#: Every column a task update carries, so a batch can go to ``executemany`` as is.
TASK_FIELDS = (
    "uuid", "name", "state", "state_rank", "queue", "worker", "args", "kwargs", "result",
    "exception", "traceback", "retries", "received", "started", "succeeded", "failed",
    "retried", "revoked", "runtime", "eta", "expires", "parent_id", "root_id",
    "memory_kill", "first_seen", "updated",
)
_EVENT_TIME = {"task-received": "received", "task-started": "started",
               "task-succeeded": "succeeded", "task-failed": "failed",
               "task-retried": "retried", "task-revoked": "revoked"}
_COPIED = ("name", "args", "kwargs", "result", "exception", "traceback", "runtime",
           "eta", "expires", "parent_id", "root_id")
#: Heartbeat times kept per worker, as Flower (celery.events.state.Worker.heartbeat_max).
HEARTBEATS_KEPT = 4
#: Event types counted per worker and batch (Flower's per-worker counter); a type longer
#: than EVENT_TYPE_MAX, or new past this many in one batch, is not counted.
EVENT_TYPES_MAX = 32
EVENT_TYPE_MAX = 64
MEMORY_ERROR = "MemoryLimitExceeded"
#: The guard's own event (fleet.guard): rss, limit, child_pid, queue, retry_on.
MEMORY_EVENT = "task-memory-exceeded"


def queue_of(hostname: str | None, queues: frozenset[str],
             known: Mapping[str, str | None] | None = None) -> str | None:
    """The queue a worker serves: from its self-report (fleet.heartbeat) when the sampler
    has seen it, else from fleet's default node name ``QUEUE@host``."""
    if not hostname:
        return None
    if known and known.get(hostname):
        return known[hostname]
    name = hostname.split("@", 1)[0]
    return name if name in queues else None


def wins(new_state: str, old_state: str | None) -> bool:
    """Does ``new_state`` replace ``old_state``? Same rule as the store's upsert."""
    if old_state is None or old_state == "RETRY":
        return True
    return RANK.get(new_state, 0) >= RANK.get(old_state, 0)


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, default=repr)


@dataclass
class WorkerUpdate:
    hostname: str
    status: str = "online"
    seen: float = 0.0
    freq: float | None = None
    sw_ident: str | None = None
    sw_ver: str | None = None
    sw_sys: str | None = None
    pid: int | None = None
    loadavg: str | None = None
    active: int | None = None
    processed: int | None = None
    #: The worker's logical clock (Lamport) in its newest worker event.
    clock: int | None = None
    #: Newest event times heard from the worker in this batch (at most HEARTBEATS_KEPT),
    #: merged with the stored ones: Flower's ``heartbeats``.
    heartbeats: list[float] = field(default_factory=list)
    #: Events in this batch by type (Flower's ``events.counter[hostname]``), added to the
    #: stored counts.
    events: Counter = field(default_factory=Counter)
    #: Counts from task events in this batch, added to the stored totals.
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    memory_kills: int = 0

    def heard(self, kind: str, at: float) -> None:
        """One event from this worker: counted by type, its time kept as a heartbeat
        (Celery's State, which Flower shows, appends task events' times too)."""
        if len(kind) <= EVENT_TYPE_MAX and (kind in self.events
                                            or len(self.events) < EVENT_TYPES_MAX):
            self.events[kind] += 1
        if at:
            insort(self.heartbeats, at)
            del self.heartbeats[:-HEARTBEATS_KEPT]


@dataclass
class Batch:
    """A batch of events folded into one update per task and per worker."""

    queues: frozenset[str] = frozenset()
    #: hostname -> queue, from the workers' self-reports.
    known: Mapping[str, str | None] = field(default_factory=dict)
    tasks: dict[str, dict] = field(default_factory=dict)
    workers: dict[str, WorkerUpdate] = field(default_factory=dict)
    events: int = 0
    #: (event type, uuid, runtime) of every task event, for the Prometheus counters.
    outcomes: list[tuple[str, str, float | None]] = field(default_factory=list)
    #: Ids of the event-stream entries folded in (acknowledged once it is written).
    entry_ids: list[str] = field(default_factory=list)
    #: Gaps found while this batch filled (gaps.Gap rows), written with it.
    gaps: list[dict] = field(default_factory=list)

    @property
    def last_id(self) -> str | None:
        return self.entry_ids[-1] if self.entry_ids else None

    def empty(self) -> bool:
        return not (self.events or self.entry_ids or self.gaps)

    def add(self, event: dict) -> None:
        self.events += 1
        kind = event.get("type", "")
        if kind.startswith("task-"):
            self._task(kind, event)
        elif kind.startswith("worker-"):
            self._worker(kind, event)

    def _worker_row(self, hostname: str) -> WorkerUpdate:
        row = self.workers.get(hostname)
        if row is None:
            row = self.workers[hostname] = WorkerUpdate(hostname)
        return row

    def _worker(self, kind: str, event: dict) -> None:
        hostname = event.get("hostname")
        if not hostname:
            return
        row = self._worker_row(hostname)
        at = float(event.get("timestamp") or 0.0)
        row.heard(kind, at)
        if at < row.seen:
            return
        row.seen = at
        row.status = "offline" if kind == "worker-offline" else "online"
        row.freq = event.get("freq", row.freq)
        row.sw_ident = event.get("sw_ident", row.sw_ident)
        row.sw_ver = event.get("sw_ver", row.sw_ver)
        row.sw_sys = event.get("sw_sys", row.sw_sys)
        row.pid = event.get("pid", row.pid)
        if event.get("loadavg") is not None:
            row.loadavg = json.dumps(event["loadavg"])
        row.active = event.get("active", row.active)
        row.processed = event.get("processed", row.processed)
        row.clock = event.get("clock", row.clock)

    def _new_task(self, uuid: str, at: float) -> dict:
        row = self.tasks[uuid] = dict.fromkeys(TASK_FIELDS)
        row["uuid"] = uuid
        row["first_seen"] = at
        row["updated"] = at
        row["memory_kill"] = False
        row["retries"] = 0
        return row

    def _memory_kill(self, uuid: str, event: dict) -> None:
        """The guard stopped the task: flag it, state unchanged (its task-failed or
        task-retried says how it ended). A kill that failed the task is counted by that
        task-failed; one re-sent to a larger queue only here."""
        at = float(event.get("timestamp") or 0.0)
        row = self.tasks.get(uuid) or self._new_task(uuid, at)
        row["memory_kill"] = True
        row["updated"] = max(row["updated"], at)
        row["first_seen"] = min(row["first_seen"], at)
        hostname = event.get("hostname")
        if hostname:
            self._worker_row(hostname).heard(MEMORY_EVENT, at)
        if event.get("retry_on"):
            self.outcomes.append((MEMORY_EVENT, uuid, None))
            if hostname:
                self._worker_row(hostname).memory_kills += 1

    def _task(self, kind: str, event: dict) -> None:
        uuid = event.get("uuid")
        if not uuid:
            return
        if kind == MEMORY_EVENT:
            self._memory_kill(uuid, event)
            return
        state = TASK_STATES.get(kind, kind[5:].upper())
        at = float(event.get("timestamp") or 0.0)
        row = self.tasks.get(uuid) or self._new_task(uuid, at)
        for name in _COPIED:
            value = event.get(name)
            if value is not None:
                row[name] = _text(value)
        column = _EVENT_TIME.get(kind)
        if column:
            row[column] = at
        retries = event.get("retries")
        if retries is not None and retries > row["retries"]:
            row["retries"] = retries
        if wins(state, row["state"]):
            row["state"] = state
            row["state_rank"] = RANK.get(state, 0)
        self.outcomes.append((kind, uuid, event.get("runtime")))
        row["updated"] = max(row["updated"], at)
        row["first_seen"] = min(row["first_seen"], at)
        hostname = event.get("hostname")
        if hostname and kind != "task-sent":  # task-sent comes from the client, not a worker
            self._worker_row(hostname).heard(kind, at)
        if hostname and (kind in ("task-received", "task-started") or not row["worker"]):
            row["worker"] = hostname
        if hostname and not row["queue"]:
            row["queue"] = queue_of(hostname, self.queues, self.known)
        if kind == "task-sent" and event.get("routing_key"):
            row["queue"] = event.get("queue") or event["routing_key"]
        if hostname and kind in ("task-succeeded", "task-failed", "task-retried"):
            counts = self._worker_row(hostname)
            if kind == "task-succeeded":
                counts.succeeded += 1
            elif kind == "task-retried":
                counts.retried += 1
            else:
                counts.failed += 1
                if MEMORY_ERROR in (event.get("exception") or ""):
                    counts.memory_kills += 1
        if kind == "task-failed" and MEMORY_ERROR in (event.get("exception") or ""):
            row["memory_kill"] = True
