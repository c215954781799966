"""Submitting a batch job, and re-sending its failed chunks.

Every check runs before the first message is sent: the task names, the chunk size and
every input record. Chunks go out through ``ChunkPublisher`` (pipelined, see
fleet.jobs.publish); chunk results are tracked by the job, so no Celery result (and no
per-task result subscription) is requested.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import IO, Any

from celery import Celery
from kombu.exceptions import OperationalError

from fleet import codec
from fleet.claimcheck import CLAIM_KEY, is_claim
from fleet.errors import BrokerUnavailableError, FleetError, JobInputError
from fleet.jobs.ids import chunk_task_id, new_job_id
from fleet.jobs.inputs import checked_input
from fleet.jobs.lifecycle import COLLECT_TASK, result_key
from fleet.jobs.publish import ChunkPublisher
from fleet.jobs.recover import lost_chunks, resend
from fleet.jobs.state import AGGREGATING, FAILED, RUNNING, JobStore
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
    app.loader.import_default_modules()
    tasks = app.tasks
    if name in tasks:
        return tasks[name]
    ours = sorted(t for t in tasks if not t.startswith("celery."))
    near = get_close_matches(name, ours, n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; known: {', '.join(ours)}"
    raise JobInputError(f"unknown {what} {name!r}{hint}")


def submit(app: Celery, spec: JobSpec, stdin: IO[bytes] | None = None) -> Submitted:
    config = app.fleet_config
    if spec.chunk_size < 1:
        raise JobInputError(f"chunk size must be at least 1, got {spec.chunk_size}")
    registered_task(app, spec.task)
    if spec.aggregate:
        registered_task(app, spec.aggregate, "aggregate task")
    store = JobStore(config)
    with checked_input(spec.input, config.payloads, stdin) as source:
        job_id = new_job_id()
        total = math.ceil(source.records / spec.chunk_size)
        result_url = open_store(config.payloads).url_for(result_key(job_id))
        _guard_broker(lambda: store.create(
            job_id, task=spec.task, aggregate=spec.aggregate, total=total,
            records=source.records, input_desc=source.description,
            chunk_size=spec.chunk_size, kwargs=spec.kwargs,
            aggregate_kwargs=spec.aggregate_kwargs, result_url=result_url,
            source=source.source, fingerprint=source.fingerprint))
        publisher = ChunkPublisher(app, spec.task, config.jobs.publish_batch)
        try:
            publisher.publish(
                (chunk_task_id(job_id, chunk.index), [chunk.records], spec.kwargs, chunk.size)
                for chunk in source.chunks(spec.chunk_size))
        except (OperationalError, ConnectionError, OSError) as exc:
            sent = publisher.sent
            _mark_interrupted(store, job_id, sent, total, exc)
            raise BrokerUnavailableError(
                f"job {job_id}: broker unavailable after {sent} of {total} chunks were "
                f"prepared; the job is marked failed and nothing more is sent: {exc}"
            ) from None
    return Submitted(job_id, total, source.records, result_url)


def _guard_broker(call) -> Any:
    try:
        return call()
    except (ConnectionError, OSError) as exc:
        raise BrokerUnavailableError(f"Redis is not answering: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith("redis"):
            raise BrokerUnavailableError(f"Redis is not answering: {exc}") from None
        raise


def _mark_interrupted(store: JobStore, job_id: str, sent: int, total: int, exc) -> None:
    # The broker is down: the job record may be unreachable too.
    with contextlib.suppress(Exception):
        store.set_state(job_id, FAILED, error=f"submission interrupted after {sent} of "
                        f"{total} chunks: {exc}")


def _size_of(chunk) -> int:
    """The input size a failed chunk was routed by (a claim knows it; else re-measure)."""
    if is_claim(chunk.kwargs):
        return chunk.kwargs[CLAIM_KEY]["size"]
    return len(codec.dumps(chunk.args))


@dataclass(frozen=True)
class Retried:
    job_id: str
    chunks: int
    aggregate: bool
    #: Chunks re-sent because they were lost in flight (see fleet.jobs.recover).
    lost: int = 0


def retry_failed(app: Celery, job_id: str) -> Retried:
    """Re-send only the failed chunks of ``job_id`` (or its failed aggregate step)."""
    config = app.fleet_config
    store = JobStore(config)
    status = _guard_broker(lambda: store.status(job_id))
    registered_task(app, status.task)
    chunks = store.take_failed(job_id)
    if not chunks:
        stuck = status.state == AGGREGATING and "collect_started" not in status.extra
        if status.done >= status.total and (status.state == FAILED or stuck):
            store.reopen_aggregate(job_id)
            store.set_state(job_id, AGGREGATING, collecting=1)
            app.send_task(COLLECT_TASK, args=[job_id], ignore_result=True)
            return Retried(job_id, 0, True)
        lost = lost_chunks(config, status) if status.state == RUNNING else []
        if lost:
            return Retried(job_id, 0, False, resend(app, status, lost))
        raise FleetError(f"job {job_id} has no failed or lost chunks to retry "
                         f"(state {status.state})")
    ChunkPublisher(app, status.task, config.jobs.publish_batch).publish(
        (chunk_task_id(job_id, c.index), c.args, c.kwargs, _size_of(c)) for c in chunks)
    store.retried(job_id, chunks)
    return Retried(job_id, len(chunks), False)
