"""What happens to a job when one of its tasks ends, and the collect step.

The chunk tasks are the user's own tasks; the job machinery rides on their task ids
(fleet.jobs.ids). The last chunk to finish sends ``fleet.jobs.collect``, which gathers
the chunk results in order and either sends the aggregate task (routed like any other
task, by name and input size) or writes the list of results as the job's output.

Every step is recorded in the job ledger before its message is acked, and every send
of the next step may fail (the broker is down) without losing the job: the ledger says
what should exist, and the reconciler (autoscale.reconcile) sends what does not.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import shared_task
from kombu.exceptions import OperationalError

from fleet import claimcheck, codec
from fleet.config import FleetConfig
from fleet.jobs.ids import ChunkRef, aggregate_task_id, collect_task_id
from fleet.jobs.state import COLLECT, JobStore
from fleet.payloads import open_store
from fleet.routing import SIZE_HEADER

logger = logging.getLogger("fleet.jobs")

COLLECT_TASK = "fleet.jobs.collect"

#: What a failed send of the next step raises when the broker is away.
BROKER_ERRORS = (OperationalError, redis.RedisError, ConnectionError, OSError)


def result_key(job_id: str) -> str:
    return f"jobs/{job_id}/result.json"


def send_collect(app, job_id: str) -> bool:
    """Send the collect step; False (logged) when the broker is away: the reconciler
    sends it once the broker is back."""
    try:
        app.send_task(COLLECT_TASK, args=[job_id], task_id=collect_task_id(job_id),
                      ignore_result=True)
        return True
    except BROKER_ERRORS as exc:
        logger.warning("job %s: could not send its collect step (%s); the reconciler "
                       "will send it", job_id, exc)
        return False


def already_handled(config: FleetConfig, ref: ChunkRef, hostname: str | None) -> str | None:
    """Why a *redelivered* job task need not run (None: it must).

    Redelivery is at-least-once: a chunk whose ack was lost in a broker outage comes
    back although it is done, and one whose holder was cut off from Redis long enough
    for its lease to lapse comes back while that worker still runs it. The ledger knows
    the first, the holder's own report (fleet.heartbeat) the second; asked only for
    redelivered messages, so a first delivery pays nothing. If the holder then dies
    before it finishes, the reconciler finds the chunk nowhere and sends it again.
    """
    from fleet.jobs.ids import chunk_task_id
    from fleet.jobs.inflight import held_by_live_workers
    from fleet.jobs.state import DONE, TERMINAL
    from fleet.keys import broker_client

    store = JobStore(config)
    if ref.is_aggregate or ref.is_collect:
        if store.status(ref.job_id).state in TERMINAL:
            return "its job has ended"
        return None
    if store.chunk_state(ref.job_id, ref.index) == DONE:
        return "the ledger has it done"
    try:
        held = held_by_live_workers(config, broker_client(config), other_than=hostname)
    except Exception:  # no reports to go by: run it (at least once)
        return None
    if chunk_task_id(ref.job_id, ref.index) in held:
        return "a live worker is running it"
    return None


def on_task_success(app, config: FleetConfig, ref: ChunkRef, result: Any) -> None:
    if ref.is_collect:
        return  # the collect step records its own outcome
    store = JobStore(config)
    if ref.is_aggregate:
        url = open_store(config.payloads).put(result_key(ref.job_id), codec.dumpb(result))
        succeeded(config, store, ref.job_id, url)
        return
    value = claimcheck.offload_value(
        config.payloads, f"jobs/{ref.job_id}/chunks/{ref.index}.json", result)
    if store.record_success(ref.job_id, ref.index, value) == COLLECT:
        send_collect(app, ref.job_id)


def on_task_failure(config: FleetConfig, ref: ChunkRef, exception: BaseException | None,
                    args: Any, kwargs: Any) -> None:
    store = JobStore(config)
    error = f"{type(exception).__name__}: {exception}" if exception else "unknown error"
    if ref.is_aggregate or ref.is_collect:
        step = "aggregate" if ref.is_aggregate else "collect step"
        store.finish(ref.job_id, error=f"{step} failed: {error}")
        return
    store.record_failure(ref.job_id, ref.index, error,
                         type(exception).__name__ if exception else None)


def succeeded(config: FleetConfig, store: JobStore, job_id: str, result_url: str) -> None:
    """The job is done: say so, and drop the copy of its input kept for re-sends."""
    status = store.status(job_id)
    store.finish(job_id, result_url=result_url)
    logger.info("job %s succeeded; result at %s", job_id, result_url)
    if status.input_url:
        try:
            open_store(config.payloads).delete(status.input_url)
        except Exception as exc:  # best effort: pruning removes it later
            logger.warning("job %s: could not delete its input copy: %s", job_id, exc)


@shared_task(name=COLLECT_TASK, bind=True, acks_late=True)
def collect(self, job_id: str) -> None:
    """Gather chunk results in order; aggregate them or write them out."""
    config = self.app.config
    store = JobStore(config)
    store.collect_started(job_id)
    status = store.status(job_id)
    values = [None] * status.total
    for index, value in store.results(job_id):
        values[index] = claimcheck.resolve_value(config.payloads, value)
    if status.aggregate:
        size = len(codec.dumpb(values))
        try:
            self.app.send_task(status.aggregate, args=[values],
                               kwargs=status.aggregate_kwargs,
                               task_id=aggregate_task_id(job_id),
                               headers={SIZE_HEADER: size})
        except BROKER_ERRORS as exc:
            # Not the job's failure: the reconciler sees neither step in flight and
            # sends the collect step again once the broker is back.
            logger.warning("job %s: could not send its aggregate step (%s)", job_id, exc)
        return
    url = open_store(config.payloads).put(result_key(job_id), codec.dumpb(values))
    succeeded(config, store, job_id, url)
    logger.info("job %s: %d chunk results at %s", job_id, status.total, url)
