"""Sending a job's chunks again: cut from the job's kept input, same task ids.

Used by ``fleet jobs retry`` (failed chunks, chunks an interrupted submission never
sent, chunks lost in flight) and by the reconciler. A chunk's message is rebuilt from
the copy of the input the job keeps in the payload store (fleet.jobs.inputs), so it
does not matter what became of the user's file, stdin or S3 object since.
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery

from fleet.config import FleetConfig
from fleet.errors import FleetError
from fleet.jobs.ids import chunk_task_id
from fleet.jobs.inflight import InFlight, held_by_live_workers
from fleet.jobs.inputs import reopened
from fleet.jobs.publish import send_chunks
from fleet.jobs.state import JobStatus, JobStore
from fleet.keys import broker_client


def resend(app: Celery, status: JobStatus, indices: Iterable[int], *,
           reconciled: bool = False) -> int:
    """Cut the job's input again and send the chunks ``indices``; returns how many."""
    config = app.config
    wanted = set(indices)
    if not wanted:
        return 0
    if not status.input_url or not status.input_format:
        raise FleetError(f"job {status.id}: no copy of its input was kept (submitted by "
                         "an older fleet): submit the job again")
    store = JobStore(config)
    last = max(wanted)
    with reopened(config.payloads, status.input_url, status.input_format,
                  status.input) as source:
        chunks = (c for c in _until(source.chunks(status.chunk_size), last)
                  if c.index in wanted)
        return send_chunks(app, status.id, status.task, chunks, status.kwargs,
                           lambda rows: store.resent(status.id, rows, reconciled=reconciled),
                           config.jobs.publish_batch)


def _until(chunks, last: int):
    for chunk in chunks:
        yield chunk
        if chunk.index >= last:
            return


def lost_chunks(config: FleetConfig, status: JobStatus, sent_before: float | None = None
                ) -> list[int]:
    """Pending chunks of the job that nobody has: not queued, held, nor running.

    Redis is read first and the ledger after: a chunk that completes in between is
    then seen done, not lost.
    """
    client = broker_client(config)
    prefix = f"{status.id}."
    flying = InFlight(config, client).all_ids(prefix) | held_by_live_workers(config, client)
    pending = JobStore(config).pending_chunks(status.id)
    return sorted(idx for idx, sent_at, _ in pending
                  if chunk_task_id(status.id, idx) not in flying
                  and (sent_before is None or (sent_at or 0.0) < sent_before))
