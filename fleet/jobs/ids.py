"""Job and chunk identifiers.

A chunk's Celery task id names its job and index (``job-1a2b3c4d5e6f.17``), so every
hook that sees a task id (success, failure, memory kill, timeout, in the pool child or
the worker's main process) knows which chunk it is without extra headers.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

_TASK_ID = re.compile(r"^(job-[0-9a-f]{12})\.(\d+|agg)$")
_JOB_ID = re.compile(r"^job-[0-9a-f]{12}$")
AGGREGATE = -1


def new_job_id() -> str:
    return f"job-{secrets.token_hex(6)}"


def is_job_id(text: str) -> bool:
    return bool(_JOB_ID.match(text))


def chunk_task_id(job_id: str, index: int) -> str:
    return f"{job_id}.{index}"


def aggregate_task_id(job_id: str) -> str:
    return f"{job_id}.agg"


@dataclass(frozen=True)
class ChunkRef:
    job_id: str
    #: The chunk's index, or AGGREGATE for the job's aggregate task.
    index: int

    @property
    def is_aggregate(self) -> bool:
        return self.index == AGGREGATE


def parse_task_id(task_id: str | None) -> ChunkRef | None:
    match = _TASK_ID.match(task_id or "")
    if not match:
        return None
    index = AGGREGATE if match.group(2) == "agg" else int(match.group(2))
    return ChunkRef(match.group(1), index)
