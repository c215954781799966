"""The records of a trace file, version 1: one JSON object per line, the first a header.

JSON lines rather than Parquet: a trace is read front to back once, streams without a
columnar library in every worker image, and a bad line can be named by its number.
pydantic models (the same as queues.yaml's) give every record a typed shape and every
problem a key path; ``fleet.trace.io`` adds the file and line.

Times are seconds from the trace's start (``header.start`` is that instant, epoch
seconds), so a trace replays the same wherever and whenever it is run.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: The version this code writes and reads; a reader refuses any other, by name.
VERSION = 1

Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Header(Record):
    """The first line: what the trace is and how it was made."""

    kind: Literal["header"] = "header"
    version: int
    #: ``export`` (from a fleet's records) or ``synth:<shape>``.
    source: str
    #: The epoch second that is t=0 of every record below.
    start: float = 0.0
    #: Seconds the trace covers (arrivals may end earlier).
    duration: Seconds
    #: The queues the trace's tasks were routed to, in the order a report lists them.
    queues: list[str]
    #: How it was made: a shape's parameters, an export's window and filters.
    params: dict[str, Any] = {}


class Task(Record):
    """One task: when it was sent, and how long it ran (its service time)."""

    kind: Literal["task"] = "task"
    queue: str
    name: str
    #: Sent by the client (t=0 is header.start).
    sent: Seconds
    #: Seconds it ran on a worker (started to finished); None if it never finished.
    service: Seconds | None
    #: What the live fleet saw, when known (an export; a synthetic trace leaves them out).
    received: Seconds | None = None
    started: Seconds | None = None
    finished: Seconds | None = None
    state: str = "SUCCESS"
    #: The task's input in bytes (arguments, or its chunk), when known.
    input_bytes: Annotated[int, Field(ge=0)] | None = None
    task_id: str | None = None


class Replicas(Record):
    """The autoscaler's decision for a queue at one poll (an export only)."""

    kind: Literal["replicas"] = "replicas"
    at: Seconds
    queue: str
    current: Annotated[int, Field(ge=0)]
    desired: Annotated[int, Field(ge=0)]
    reason: str = ""


Body = Annotated[Task | Replicas, Field(discriminator="kind")]
