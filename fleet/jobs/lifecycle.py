"""What happens to a job when one of its tasks ends, and the collect step.

The chunk tasks are the user's own tasks; the job machinery rides on their task ids
(fleet.jobs.ids). The last chunk to finish sends ``fleet.jobs.collect``, which gathers
the chunk results in order and either sends the aggregate task (routed like any other
task, by name and input size) or writes the list of results as the job's output.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from fleet import claimcheck, codec
from fleet.config import FleetConfig
from fleet.jobs.ids import ChunkRef, aggregate_task_id
from fleet.jobs.state import JobStore
from fleet.payloads import open_store
from fleet.routing import SIZE_HEADER

logger = logging.getLogger("fleet.jobs")

COLLECT_TASK = "fleet.jobs.collect"


def result_key(job_id: str) -> str:
    return f"jobs/{job_id}/result.json"


def on_task_success(app, config: FleetConfig, ref: ChunkRef, result: Any) -> None:
    store = JobStore(config)
    if ref.is_aggregate:
        url = open_store(config.payloads).put(result_key(ref.job_id), codec.dumpb(result))
        store.finish(ref.job_id, result_url=url)
        logger.info("job %s succeeded; result at %s", ref.job_id, url)
        return
    value = claimcheck.offload_value(
        config.payloads, f"jobs/{ref.job_id}/chunks/{ref.index}.json", result)
    state = store.record_success(ref.job_id, ref.index, value)
    if state == "collect":
        app.send_task(COLLECT_TASK, args=[ref.job_id], ignore_result=True)


def on_task_failure(config: FleetConfig, ref: ChunkRef, exception: BaseException | None,
                    args: Any, kwargs: Any) -> None:
    store = JobStore(config)
    error = f"{type(exception).__name__}: {exception}" if exception else "unknown error"
    if ref.is_aggregate:
        store.finish(ref.job_id, error=f"aggregate failed: {error}")
        return
    store.record_failure(ref.job_id, ref.index, error, args, kwargs)


@shared_task(name=COLLECT_TASK, bind=True, acks_late=True)
def collect(self, job_id: str) -> None:
    """Gather chunk results in order; aggregate them or write them out."""
    config = self.app.fleet_config
    store = JobStore(config)
    store.collect_started(job_id)
    status = store.status(job_id)
    values = [None] * status.total
    for index, value in store.results(job_id):
        values[index] = claimcheck.resolve_value(config.payloads, value)
    if status.aggregate:
        kwargs = codec.loads(status.extra.get("aggregate_kwargs") or "{}")
        size = len(codec.dumpb(values))
        self.app.send_task(status.aggregate, args=[values], kwargs=kwargs,
                           task_id=aggregate_task_id(job_id),
                           headers={SIZE_HEADER: size})
        return
    url = open_store(config.payloads).put(result_key(job_id), codec.dumpb(values))
    store.finish(job_id, result_url=url)
    logger.info("job %s succeeded; %d chunk results at %s", job_id, status.total, url)
