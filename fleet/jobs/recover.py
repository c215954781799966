"""Chunks lost in flight, found and sent again.

kombu's Redis transport takes a message with BRPOP and only then records it as
unacked; if Redis goes down after popping a message and before the worker reads the
reply, that message is gone (seen here when restarting a persistent Redis under a
running job). The job then never completes: the chunk is neither done, failed,
queued nor held. ``fleet jobs retry`` finds such chunks by scanning the queues and the
``unacked`` hash for the job's task ids (an operator's command, so a full scan is
fine) and re-sends them from the job's input, if that input can be read again
unchanged (a file or an S3 object; stdin cannot).
"""

from __future__ import annotations

import re

from celery import Celery

from fleet import codec
from fleet.config import FleetConfig
from fleet.errors import FleetError
from fleet.jobs.ids import chunk_task_id
from fleet.jobs.inputs import checked_input
from fleet.jobs.publish import ChunkPublisher
from fleet.jobs.state import JobStatus, JobStore
from fleet.keys import broker_client, kombu_key, list_keys

PAGE = 1000


def in_flight(config: FleetConfig, job_id: str) -> set[int]:
    """Indices of the job's chunks whose messages wait in a queue or are held."""
    client = broker_client(config)
    found = re.compile(rb'"id":\s*"' + re.escape(job_id.encode()) + rb'\.(\d+)"')
    indices: set[int] = set()
    for queue in config.queues:
        for key in list_keys(config, queue):
            start = 0
            while batch := client.lrange(key, start, start + PAGE - 1):
                indices.update(int(m.group(1)) for raw in batch for m in found.finditer(raw))
                start += PAGE
    for _tag, raw in client.hscan_iter(kombu_key(config, "unacked"), count=PAGE):
        indices.update(int(m.group(1)) for m in found.finditer(raw))
    return indices


def lost_chunks(config: FleetConfig, status: JobStatus) -> list[int]:
    """Chunks of a running job that nobody has, nor will: done, failed, queued, held."""
    store = JobStore(config)
    # In-flight first: a chunk finishing between the two reads is then seen as done.
    flying = in_flight(config, status.id)
    accounted = store.accounted(status.id)
    return sorted(set(range(status.total)) - accounted - flying)


def resend(app: Celery, status: JobStatus, indices: list[int]) -> int:
    """Cut the job's input again and send the chunks ``indices``, same task ids."""
    config = app.fleet_config
    source = status.extra.get("source") or None
    if source is None:
        raise FleetError(f"job {status.id}: {len(indices)} chunks were lost in flight and "
                         "its input (stdin) cannot be read again: submit the job again")
    wanted = set(indices)
    chunk_size = int(status.extra["chunk_size"])
    kwargs = codec.loads(status.extra.get("kwargs") or "{}")
    with checked_input(source, config.payloads) as again:
        if again.fingerprint != (status.extra.get("fingerprint") or None):
            raise FleetError(f"job {status.id}: its input {source} changed since it was "
                             "submitted; lost chunks cannot be cut again: submit the job again")
        publisher = ChunkPublisher(app, status.task, config.jobs.publish_batch)
        return publisher.publish(
            (chunk_task_id(status.id, c.index), [c.records], kwargs, c.size)
            for c in again.chunks(chunk_size) if c.index in wanted)
