"""Job and chunk identifiers.

A chunk's Celery task id names its job and index (``job-1a2b3c4d5e6f.17``), so every
hook that sees a task id (success, failure, memory kill, timeout, in the pool child or
the worker's main process) knows which chunk it is without extra headers.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

_TASK_ID = re.compile(r"^(job-[0-9a-f]{12})\.(\d+|agg|collect)$")
_JOB_ID = re.compile(r"^job-[0-9a-f]{12}$")
AGGREGATE = -1
COLLECT = -2


def new_job_id() -> str:
    return f"job-{secrets.token_hex(6)}"


def is_job_id(text: str) -> bool:
    return bool(_JOB_ID.match(text))


def chunk_task_id(job_id: str, index: int) -> str:
    return f"{job_id}.{index}"


def aggregate_task_id(job_id: str) -> str:
    return f"{job_id}.agg"


def collect_task_id(job_id: str) -> str:
    """The collect step's id is fixed too, so the reconciler can tell whether it is
    queued or running (and a re-sent one is the same task)."""
    return f"{job_id}.collect"


@dataclass(frozen=True)
class ChunkRef:
    job_id: str
    #: The chunk's index, or AGGREGATE / COLLECT for the job's own two steps.
    index: int

    @property
    def is_aggregate(self) -> bool:
        return self.index == AGGREGATE

    @property
    def is_collect(self) -> bool:
        return self.index == COLLECT


def parse_task_id(task_id: str | None) -> ChunkRef | None:
    match = _TASK_ID.match(task_id or "")
    if not match:
        return None
    tail = match.group(2)
    index = AGGREGATE if tail == "agg" else COLLECT if tail == "collect" else int(tail)
    return ChunkRef(match.group(1), index)
