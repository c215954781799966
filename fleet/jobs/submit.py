"""Submitting a batch job, and re-sending its failed or lost chunks.

Every check runs before the first message is sent: the task names, the chunk size and
every input record. The job and, batch by batch, its chunk manifest are written to the
ledger before the messages go out (fleet.jobs.ledger); a copy of the input is kept, so
any chunk can be cut again. Chunks go out through ``ChunkPublisher`` (pipelined, see
fleet.jobs.publish); chunk results are tracked by the job, so no Celery result (and no
per-task result subscription) is requested.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import IO

import redis
from celery import Celery

from fleet.config import MAX_CHUNK_SIZE
from fleet.deadletter import DeadLetterList
from fleet.errors import BrokerUnavailableError, FleetError, JobInputError
from fleet.jobs.ids import chunk_task_id, new_job_id
from fleet.jobs.inputs import checked_input, keep_copy
from fleet.jobs.lifecycle import BROKER_ERRORS, result_key, send_collect
from fleet.jobs.publish import send_chunks
from fleet.jobs.resend import lost_chunks, resend
from fleet.jobs.signature import check_arguments, mapping_records
from fleet.jobs.state import AGGREGATING, FAILED, RUNNING, JobStore
from fleet.keys import broker_client
from fleet.payloads import open_store


@dataclass(frozen=True)
class JobSpec:
    task: str
    input: str
    chunk_size: int
    aggregate: str | None = None
    kwargs: dict = field(default_factory=dict)
    aggregate_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Submitted:
    job_id: str
    chunks: int
    records: int
    result_url: str


def registered_task(app: Celery, name: str, what: str = "task"):
    """The task called ``name``, or a JobInputError that suggests near names."""
    from fleet.imports import import_modules

    import_modules(app.config)  # ConfigError, exit 2, for a module that fails
    app.loader.import_default_modules()
    tasks = app.tasks
    if name in tasks:
        return tasks[name]
    ours = sorted(t for t in tasks if not t.startswith("celery."))
    near = get_close_matches(name, ours, n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; known: {', '.join(ours)}"
    raise JobInputError(f"unknown {what} {name!r}{hint}")


def submit(app: Celery, spec: JobSpec, stdin: IO[bytes] | None = None) -> Submitted:
    config = app.config
    if not 1 <= spec.chunk_size <= MAX_CHUNK_SIZE:
        raise JobInputError(f"chunk size must be at least 1 and at most {MAX_CHUNK_SIZE:,} "
                            f"records, got {spec.chunk_size}")
    task = registered_task(app, spec.task)
    check_arguments(task, "task", spec.kwargs)
    if spec.aggregate:
        check_arguments(registered_task(app, spec.aggregate, "aggregate task"),
                        "aggregate task", spec.aggregate_kwargs)
    mappings = mapping_records(task)
    need = f"{spec.task} takes objects ({mappings})" if mappings else None
    store = JobStore(config)
    with checked_input(spec.input, config.payloads, stdin, need) as source:
        _ping(config)  # a broker down now: no job, nothing kept, the input was checked
        job_id = new_job_id()
        total = math.ceil(source.records / spec.chunk_size)
        result_url = open_store(config.payloads).url_for(result_key(job_id))
        store.create(
            job_id, task=spec.task, aggregate=spec.aggregate, total=total,
            records=source.records, input_desc=source.description,
            chunk_size=spec.chunk_size, kwargs=spec.kwargs,
            aggregate_kwargs=spec.aggregate_kwargs, result_url=result_url,
            input_url=keep_copy(config.payloads, job_id, source), input_format=source.fmt,
            fingerprint=source.fingerprint)
        sent = 0

        def note(rows: list[tuple[int, str, int]]) -> None:
            nonlocal sent
            store.add_chunks(job_id, rows)
            sent += len(rows)

        try:
            send_chunks(app, job_id, spec.task, source.chunks(spec.chunk_size),
                        spec.kwargs, note, config.jobs.publish_batch)
        except BROKER_ERRORS as exc:
            _mark_interrupted(store, job_id, sent, total, exc)
            raise BrokerUnavailableError(
                f"job {job_id}: broker unavailable after {sent} of {total} chunks were "
                f"prepared; the job is marked failed and nothing more is sent (fleet jobs "
                f"retry {job_id} sends the rest once Redis answers): {exc}") from None
    store.submitted(job_id)
    return Submitted(job_id, total, source.records, result_url)


def _ping(config) -> None:
    try:
        broker_client(config).ping()
    except (redis.RedisError, OSError) as exc:
        raise BrokerUnavailableError(f"Redis is not answering at {config.broker.url}: "
                                     f"{exc}") from None


def _mark_interrupted(store: JobStore, job_id: str, sent: int, total: int, exc) -> None:
    with contextlib.suppress(Exception):  # the ledger may be down too
        store.set_state(job_id, FAILED, error=f"submission interrupted after {sent} of "
                        f"{total} chunks: {exc}")


@dataclass(frozen=True)
class Retried:
    job_id: str
    chunks: int
    aggregate: bool
    #: Chunks re-sent because they were lost in flight or never sent.
    lost: int = 0
    #: Dead-letter entries of the re-sent failed chunks, removed (requeueing one as
    #: well would run its chunk twice).
    dead_letters: int = 0


def retry_failed(app: Celery, job_id: str) -> Retried:
    """Re-send the failed chunks of ``job_id``; else what an interrupted submission
    never sent and what was lost in flight; else its failed or stuck aggregate step."""
    config = app.config
    store = JobStore(config)
    status = store.status(job_id)
    registered_task(app, status.task)
    _ping(config)
    failed = store.take_failed(job_id)
    if failed:
        # Before the resend: a chunk that fails again meanwhile gets an entry of its own,
        # which stays. A resend that dies leaves the chunks pending for the reconciler.
        cleared = DeadLetterList.for_config(config).discard_tasks(
            {chunk_task_id(job_id, i) for i in failed}, list(config.queues))
        return Retried(job_id, resend(app, status, failed), False,
                       dead_letters=len(cleared))
    if status.done >= status.total:
        stuck = status.state == AGGREGATING and status.collect_started is None
        if status.state == FAILED or stuck:
            store.reopen_aggregate(job_id)
            if not send_collect(app, job_id):
                raise BrokerUnavailableError(f"job {job_id}: Redis is not answering; "
                                             "the collect step will be sent when it does")
            return Retried(job_id, 0, True)
    missing = store.missing(job_id, status.total)
    lost = lost_chunks(config, status) if not status.is_terminal or missing else []
    if missing or lost:
        if status.state == FAILED:
            store.set_state(job_id, RUNNING, error=None, finished=None)
        return Retried(job_id, 0, False, resend(app, status, sorted({*missing, *lost})))
    raise FleetError(f"job {job_id} has no failed or lost chunks to retry "
                     f"(state {status.state})")
