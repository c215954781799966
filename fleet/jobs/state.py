"""Job state in the ledger (fleet.jobs.ledger): one row per job, one per chunk.

Chunk completion is idempotent: a chunk is one row, so a message redelivered after its
worker died (at-least-once delivery) finds it done and is not counted twice. The job
keeps its own done/failed counters, updated in the same transaction as the chunk's row
while the job's row is held, so the last chunk (and only it) moves the job to
aggregating, even when two workers finish the last two chunks at the same moment.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, TypeVar

from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from fleet import codec
from fleet.config import FleetConfig
from fleet.database import safe_url, transaction
from fleet.errors import UnknownJobError
from fleet.jobs import ledger
from fleet.jobs.ledger import chunks, jobs

# States a job goes through.
SUBMITTING = "submitting"
RUNNING = "running"
AGGREGATING = "aggregating"
SUCCEEDED = "succeeded"
FAILED = "failed"
TERMINAL = (SUCCEEDED, FAILED)
#: Jobs whose chunks may still be in flight.
ACTIVE = (SUBMITTING, RUNNING)

# States a chunk goes through.
PENDING, DONE = "pending", "done"

#: The exception name a dead-lettered chunk fails with (fleet.errors.DeadLettered).
DEAD_LETTERED = "DeadLettered"

#: What ``record_success`` returns when this write completed the job's last chunk (or
#: the job is complete and its collect step never started): the caller sends it.
COLLECT = "collect"

T = TypeVar("T")


@dataclass(frozen=True)
class JobStatus:
    id: str
    task: str
    aggregate: str | None
    state: str
    total: int
    done: int
    failed: int
    records: int
    created: float
    finished: float | None
    input: str
    #: The result's URL once the job succeeded; None before, and for a failed job.
    result_url: str | None
    error: str | None
    chunk_size: int = 0
    kwargs: dict = field(default_factory=dict)
    aggregate_kwargs: dict = field(default_factory=dict)
    input_url: str | None = None
    input_format: str | None = None
    fingerprint: str | None = None
    updated: float | None = None
    collect_sent: float | None = None
    collect_started: float | None = None
    #: Chunks (and collect steps) the reconciler sent again after they were lost.
    reconciled: int = 0
    #: Failed chunks that were dead-lettered (poison: their worker kept dying).
    dead: int = 0

    @property
    def pending(self) -> int:
        return max(0, self.total - self.done - self.failed)

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class FailedChunk:
    index: int
    error: str
    #: The exception's class name (``DeadLettered``, ``MemoryLimitExceeded``, ...).
    kind: str | None = None


def _guarded(method: Callable[..., T]) -> Callable[..., T]:
    """A database error becomes one clear LedgerUnavailableError (exit 3)."""

    @wraps(method)
    def call(self: JobStore, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except SQLAlchemyError as exc:
            raise ledger.unavailable(self.config, exc) from None

    return call


class JobStore:
    """Reads and writes job state; every method is one transaction."""

    def __init__(self, config: FleetConfig):
        self.config = config
        self.namespace = config.broker.key_prefix

    @property
    def engine(self) -> Engine:
        """Opened on first use (one per process): a store made while the database is
        down (a dashboard starting) works once it answers."""
        return ledger.engine(self.config)

    # -- submitting ------------------------------------------------------------------

    @_guarded
    def create(self, job_id: str, *, task: str, aggregate: str | None, total: int,
               records: int, input_desc: str, chunk_size: int, kwargs: dict,
               aggregate_kwargs: dict, result_url: str, input_url: str | None = None,
               input_format: str | None = None, fingerprint: str | None = None) -> None:
        now = time.time()
        with transaction(self.engine, write=True) as conn:
            conn.execute(insert(jobs).values(
                id=job_id, namespace=self.namespace, task=task, aggregate=aggregate,
                state=SUBMITTING, total=total, done=0, failed=0, records=records,
                chunk_size=chunk_size, kwargs=codec.dumps(kwargs),
                aggregate_kwargs=codec.dumps(aggregate_kwargs), input=input_desc,
                input_url=input_url, input_format=input_format, fingerprint=fingerprint,
                result_url=result_url, created=now, updated=now, collecting=False,
                reconciled=0))

    @_guarded
    def add_chunks(self, job_id: str, sent: list[tuple[int, str, int]]) -> None:
        """Manifest rows for chunks about to be published: (index, queue, size).

        Written before the messages go out, so that no message exists that the ledger
        does not know; a row whose message never made it is found by the reconciler.
        """
        if not sent:
            return
        now = time.time()
        with transaction(self.engine, write=True) as conn:
            conn.execute(insert(chunks), [
                {"job_id": job_id, "idx": idx, "state": PENDING, "queue": queue,
                 "size": size, "sent_at": now, "sends": 1, "reconciled": 0, "updated": now}
                for idx, queue, size in sent])
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(updated=now))

    @_guarded
    def submitted(self, job_id: str) -> None:
        with transaction(self.engine, write=True) as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state == SUBMITTING)
                         .values(state=RUNNING, updated=time.time()))

    @_guarded
    def resent(self, job_id: str, sent: list[tuple[int, str, int]], *,
               reconciled: bool = False) -> None:
        """Chunks sent again (a retry, or the reconciler): pending, with a new send time.
        Rows an interrupted submission never wrote are created."""
        if not sent:
            return
        now = time.time()
        bump = 1 if reconciled else 0
        with transaction(self.engine, write=True) as conn:
            self._lock(conn, job_id, now)
            known = {row.idx for row in conn.execute(
                select(chunks.c.idx).where(chunks.c.job_id == job_id,
                                           chunks.c.idx.in_([i for i, _, _ in sent])))}
            for idx, queue, size in sent:
                if idx in known:
                    conn.execute(update(chunks).where(
                        chunks.c.job_id == job_id, chunks.c.idx == idx).values(
                        queue=queue, size=size, sent_at=now, sends=chunks.c.sends + 1,
                        reconciled=chunks.c.reconciled + bump, updated=now))
                else:
                    conn.execute(insert(chunks).values(
                        job_id=job_id, idx=idx, state=PENDING, queue=queue, size=size,
                        sent_at=now, sends=1, reconciled=bump, updated=now))
            if bump:
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                    reconciled=jobs.c.reconciled + len(sent)))

    # -- what tasks report -----------------------------------------------------------

    def _lock(self, conn: Connection, job_id: str, now: float) -> bool:
        """Hold the job's row for the rest of the transaction; False if it is unknown."""
        return conn.execute(update(jobs).where(jobs.c.id == job_id)
                            .values(updated=now)).rowcount > 0

    @_guarded
    def record_success(self, job_id: str, index: int, value: Any) -> str:
        """The job's state after this chunk is done; COLLECT when the caller must send
        the collect step; "" for a job the ledger does not know."""
        now = time.time()
        with transaction(self.engine, write=True) as conn:
            if not self._lock(conn, job_id, now):
                return ""
            before = conn.execute(select(chunks.c.state).where(
                chunks.c.job_id == job_id, chunks.c.idx == index)).scalar()
            if before != DONE:
                values = {"state": DONE, "value": codec.dumps(value), "error": None,
                          "error_kind": None, "updated": now}
                if before is None:
                    conn.execute(insert(chunks).values(job_id=job_id, idx=index, sends=1,
                                                       reconciled=0, **values))
                else:
                    conn.execute(update(chunks).where(
                        chunks.c.job_id == job_id, chunks.c.idx == index).values(**values))
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                    done=jobs.c.done + 1,
                    failed=jobs.c.failed - (1 if before == FAILED else 0)))
            job = conn.execute(select(jobs.c.state, jobs.c.done, jobs.c.failed, jobs.c.total,
                                      jobs.c.collecting, jobs.c.collect_started)
                               .where(jobs.c.id == job_id)).one()
            if job.done >= job.total:
                if not job.collecting:
                    conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                        collecting=True, state=AGGREGATING, collect_sent=now, error=None,
                        finished=None))
                    return COLLECT
                if job.state == AGGREGATING and job.collect_started is None:
                    return COLLECT  # complete, but its collect step never started
                return job.state
            if job.done + job.failed >= job.total and job.state != FAILED:
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                    state=FAILED, finished=now))
                return FAILED
            return job.state

    @_guarded
    def record_failure(self, job_id: str, index: int, error: str,
                       kind: str | None = None) -> str:
        now = time.time()
        with transaction(self.engine, write=True) as conn:
            if not self._lock(conn, job_id, now):
                return ""
            before = conn.execute(select(chunks.c.state).where(
                chunks.c.job_id == job_id, chunks.c.idx == index)).scalar()
            if before == DONE:  # a late failure of a redelivered copy: done wins
                return conn.execute(select(jobs.c.state).where(jobs.c.id == job_id)).scalar()
            values = {"state": FAILED, "error": error, "error_kind": kind, "updated": now}
            if before is None:
                conn.execute(insert(chunks).values(job_id=job_id, idx=index, sends=1,
                                                   reconciled=0, **values))
            else:
                conn.execute(update(chunks).where(
                    chunks.c.job_id == job_id, chunks.c.idx == index).values(**values))
            if before != FAILED:
                conn.execute(update(jobs).where(jobs.c.id == job_id)
                             .values(failed=jobs.c.failed + 1))
            job = conn.execute(select(jobs.c.state, jobs.c.done, jobs.c.failed, jobs.c.total)
                               .where(jobs.c.id == job_id)).one()
            if job.done + job.failed >= job.total and job.state not in TERMINAL:
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                    state=FAILED, finished=now))
                return FAILED
            return job.state

    @_guarded
    def finish(self, job_id: str, *, result_url: str | None = None,
               error: str | None = None) -> None:
        now = time.time()
        values: dict[str, Any] = {"state": FAILED if error else SUCCEEDED, "finished": now,
                                  "updated": now, "error": error}
        if result_url:
            values["result_url"] = result_url
        with transaction(self.engine, write=True) as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))

    @_guarded
    def collect_started(self, job_id: str) -> None:
        self._set(job_id, collect_started=time.time())

    @_guarded
    def collect_sent(self, job_id: str, *, reconciled: bool = False) -> None:
        extra = {"reconciled": jobs.c.reconciled + 1} if reconciled else {}
        self._set(job_id, collect_sent=time.time(), **extra)

    @_guarded
    def reopen_aggregate(self, job_id: str) -> None:
        """Let the collect and aggregate steps run again (after they failed or stuck)."""
        self._set(job_id, state=AGGREGATING, collecting=True, collect_started=None,
                  collect_sent=time.time(), error=None, finished=None)

    @_guarded
    def set_state(self, job_id: str, state: str, **fields: Any) -> None:
        if state in TERMINAL:
            fields.setdefault("finished", time.time())
        self._set(job_id, state=state, **fields)

    def _set(self, job_id: str, **values: Any) -> None:
        with transaction(self.engine, write=True) as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id)
                         .values(updated=time.time(), **values))

    # -- retries ---------------------------------------------------------------------

    @_guarded
    def take_failed(self, job_id: str) -> list[int]:
        """Set the failed chunks pending again (and reopen the job) for a retry to send
        them; if that retry dies before sending, the reconciler finds them."""
        now = time.time()
        with transaction(self.engine, write=True) as conn:
            self._lock(conn, job_id, now)
            taken = [row.idx for row in conn.execute(
                select(chunks.c.idx).where(chunks.c.job_id == job_id,
                                           chunks.c.state == FAILED).order_by(chunks.c.idx))]
            if taken:
                conn.execute(update(chunks).where(
                    chunks.c.job_id == job_id, chunks.c.state == FAILED).values(
                    state=PENDING, error=None, error_kind=None, sent_at=now, updated=now))
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                    failed=0, state=RUNNING, finished=None, error=None))
            return taken

    @_guarded
    def missing(self, job_id: str, total: int) -> list[int]:
        """Chunks the manifest lacks: an interrupted submission never sent them."""
        with transaction(self.engine) as conn:
            known = {row.idx for row in conn.execute(
                select(chunks.c.idx).where(chunks.c.job_id == job_id))}
        return [i for i in range(total) if i not in known]

    # -- reading ---------------------------------------------------------------------

    def status(self, job_id: str) -> JobStatus:
        return self.statuses([job_id])[0]

    @_guarded
    def statuses(self, job_ids: list[str]) -> list[JobStatus]:
        """Status of many jobs in one query; UnknownJobError for any missing one."""
        if not job_ids:
            return []
        with transaction(self.engine) as conn:
            rows = {row.id: row for row in conn.execute(
                select(jobs).where(jobs.c.id.in_(job_ids)))}
            dead = self._dead_counts(conn, [i for i, r in rows.items() if r.failed])
        out = []
        for job_id in job_ids:
            row = rows.get(job_id)
            if row is None:
                where = safe_url(self.config.jobs.ledger)
                raise UnknownJobError(
                    f"no job {job_id!r} in the job ledger at {where} (mistyped, pruned "
                    f"{self.config.jobs.ttl / 86400:g} days after its last change, or "
                    "another ledger)")
            out.append(_status(row, dead.get(job_id, 0)))
        return out

    def _dead_counts(self, conn: Connection, job_ids: list[str]) -> dict[str, int]:
        if not job_ids:
            return {}
        return dict(conn.execute(
            select(chunks.c.job_id, func.count()).where(
                chunks.c.job_id.in_(job_ids), chunks.c.state == FAILED,
                chunks.c.error_kind == DEAD_LETTERED).group_by(chunks.c.job_id)).all())

    @_guarded
    def recent_ids(self, limit: int = 20) -> list[str]:
        with transaction(self.engine) as conn:
            return list(conn.execute(
                select(jobs.c.id).where(jobs.c.namespace == self.namespace)
                .order_by(jobs.c.created.desc()).limit(limit)).scalars())

    def recent(self, limit: int = 20) -> list[JobStatus]:
        return self.statuses(self.recent_ids(limit))

    def results(self, job_id: str) -> Iterator[tuple[int, Any]]:
        """(index, value) of every finished chunk, in order, streamed: memory is bounded
        by one batch of rows, however many chunks the job has."""
        try:
            with self.engine.connect() as conn:
                rows = conn.execution_options(yield_per=1000).execute(
                    select(chunks.c.idx, chunks.c.value).where(
                        chunks.c.job_id == job_id, chunks.c.state == DONE)
                    .order_by(chunks.c.idx))
                for row in rows:
                    yield row.idx, codec.loads(row.value)
        except SQLAlchemyError as exc:
            raise ledger.unavailable(self.config, exc) from None

    @_guarded
    def chunk_state(self, job_id: str, index: int) -> str | None:
        with transaction(self.engine) as conn:
            return conn.execute(select(chunks.c.state).where(
                chunks.c.job_id == job_id, chunks.c.idx == index)).scalar()

    @_guarded
    def failed_chunks(self, job_id: str, limit: int | None = None) -> list[FailedChunk]:
        query = (select(chunks.c.idx, chunks.c.error, chunks.c.error_kind)
                 .where(chunks.c.job_id == job_id, chunks.c.state == FAILED)
                 .order_by(chunks.c.idx))
        if limit is not None:
            query = query.limit(limit)
        with transaction(self.engine) as conn:
            return [FailedChunk(r.idx, r.error or "unknown error", r.error_kind)
                    for r in conn.execute(query)]

    @_guarded
    def pending_chunks(self, job_id: str) -> list[tuple[int, float | None, int]]:
        """(index, last sent, times reconciled) of the job's pending chunks."""
        with transaction(self.engine) as conn:
            return [(r.idx, r.sent_at, r.reconciled) for r in conn.execute(
                select(chunks.c.idx, chunks.c.sent_at, chunks.c.reconciled).where(
                    chunks.c.job_id == job_id, chunks.c.state == PENDING)
                .order_by(chunks.c.idx))]

    # -- what the reconciler asks ------------------------------------------------------

    def _active(self):
        return and_(jobs.c.namespace == self.namespace, jobs.c.state.in_(ACTIVE))

    @_guarded
    def suspects_by_queue(self, sent_before: float) -> dict[str, int]:
        """Pending chunks of active jobs sent before ``sent_before``, per queue."""
        with transaction(self.engine) as conn:
            return {q or "": n for q, n in conn.execute(
                select(chunks.c.queue, func.count())
                .select_from(chunks.join(jobs, jobs.c.id == chunks.c.job_id))
                .where(self._active(), chunks.c.state == PENDING,
                       chunks.c.sent_at < sent_before)
                .group_by(chunks.c.queue))}

    @_guarded
    def suspects(self, sent_before: float) -> list[tuple[str, int]]:
        """(job id, index) of those chunks."""
        with transaction(self.engine) as conn:
            return [(r.job_id, r.idx) for r in conn.execute(
                select(chunks.c.job_id, chunks.c.idx)
                .select_from(chunks.join(jobs, jobs.c.id == chunks.c.job_id))
                .where(self._active(), chunks.c.state == PENDING,
                       chunks.c.sent_at < sent_before))]

    @_guarded
    def stalled_collects(self, sent_before: float) -> list[str]:
        """Aggregating jobs whose collect step was last sent before ``sent_before``."""
        with transaction(self.engine) as conn:
            return list(conn.execute(
                select(jobs.c.id).where(
                    jobs.c.namespace == self.namespace, jobs.c.state == AGGREGATING,
                    func.coalesce(jobs.c.collect_sent, jobs.c.updated) < sent_before))
                .scalars())

    @_guarded
    def stalled_submissions(self, updated_before: float) -> list[str]:
        """Jobs still submitting whose submitter made no progress since then."""
        with transaction(self.engine) as conn:
            return list(conn.execute(
                select(jobs.c.id).where(
                    jobs.c.namespace == self.namespace, jobs.c.state == SUBMITTING,
                    jobs.c.updated < updated_before)).scalars())

    @_guarded
    def prune(self, updated_before: float) -> list[str]:
        """Forget jobs unchanged since ``updated_before``; returns their input copies."""
        with transaction(self.engine, write=True) as conn:
            old = conn.execute(select(jobs.c.id, jobs.c.input_url).where(
                jobs.c.namespace == self.namespace,
                jobs.c.updated < updated_before)).all()
            ids = [r.id for r in old]
            for start in range(0, len(ids), 500):
                batch = ids[start:start + 500]
                conn.execute(delete(chunks).where(chunks.c.job_id.in_(batch)))
                conn.execute(delete(jobs).where(jobs.c.id.in_(batch)))
        return [r.input_url for r in old if r.input_url]


def _status(row: Any, dead: int) -> JobStatus:
    return JobStatus(
        id=row.id, task=row.task, aggregate=row.aggregate or None, state=row.state,
        total=row.total, done=row.done, failed=row.failed, records=row.records,
        created=row.created, finished=row.finished, input=row.input,
        # Where the result *is*: a job that has not succeeded (yet) has none to point at.
        result_url=row.result_url if row.state == SUCCEEDED else None,
        error=row.error, chunk_size=row.chunk_size,
        kwargs=codec.loads(row.kwargs or "{}"),
        aggregate_kwargs=codec.loads(row.aggregate_kwargs or "{}"),
        input_url=row.input_url, input_format=row.input_format,
        fingerprint=row.fingerprint, updated=row.updated, collect_sent=row.collect_sent,
        collect_started=row.collect_started, reconciled=row.reconciled or 0, dead=dead)
