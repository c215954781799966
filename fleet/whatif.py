"""The "what if" seam: a window of what the fleet did, replayed under the current
settings and under a candidate's (the tuner's), as figures and plots.

The dashboard asks (fleet/dashboard/whatif.py: the window, the cache, one run at a
time); the simulator answers (autoscale/sim/whatif.py). The types live here, in the
core, because the import contract (pyproject.toml) lets neither side import the other:
fleet/ never imports autoscale/, and nothing but the two composition roots (fleet/cli.py,
fleet/up.py) imports fleet.dashboard. The roots hand the dashboard an implementation,
as they hand the autoscaler its backend. Plain frozen dataclasses, no HTTP and no
simulator: the dashboard turns them into its JSON (schemas.py), a test can build them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from fleet.config import FleetConfig
from fleet.errors import FleetError
from fleet.trace.model import Header, Task

#: What the tuner's side is: settings proposed for a window's tasks, from the current ones.
Proposer = Callable[[Header, list[Task], FleetConfig], FleetConfig]


class WhatIfUnavailable(FleetError):
    """A what-if that cannot run here: the simulator's extra (matplotlib, for the plots)
    or the tuner is not installed, or none was wired in. The message names what to do."""

    exit_code = 2


@dataclass(frozen=True)
class Figures:
    """One queue's figures in one replay (or the total's: ``queue`` is ``total``), the
    simulator's (docs/tuning.md, "The figures")."""

    queue: str
    tasks: int
    #: Replica-seconds from each scale call to the replica's exit: what a cloud bills.
    worker_seconds: float
    wait_p50: float
    wait_p95: float
    wait_p99: float
    #: Seconds the oldest waiting message was older than the queue's target_wait.
    slo_violation_seconds: float
    scale_events: int
    max_replicas: int
    max_backlog: int


@dataclass(frozen=True)
class Side:
    """One replay: the settings it ran under, its figures, and its plot."""

    #: ``current`` or ``candidate``; ``source`` says where the candidate came from.
    label: str
    source: str
    config: FleetConfig
    total: Figures
    queues: tuple[Figures, ...]
    #: The replay's plot (backlog, replicas, wait per queue), an SVG document; None
    #: when the implementation draws none.
    svg: str | None = None


@dataclass(frozen=True)
class Outcome:
    current: Side
    candidate: Side
    #: Simulated seconds (the window, or more while work was left) of the current run.
    simulated: float
    #: Tasks of the window without a service time (never finished): not replayed.
    skipped: int = 0
    #: Anything the caller should know (the tuner's budget, a fallback).
    notes: tuple[str, ...] = field(default_factory=tuple)


@runtime_checkable
class WhatIf(Protocol):
    """Replays ``tasks`` (a window's, any order) under ``config`` and under a candidate:
    ``candidate`` when given (settings a user pasted), else the implementation's own
    proposal (the tuner's). Blocking, and seconds long: callers run it off their event
    loop. Raises WhatIfUnavailable when it cannot run here."""

    def replay(self, header: Header, tasks: Sequence[Task], config: FleetConfig, *,
               candidate: FleetConfig | None = None) -> Outcome: ...


#: The figures a what-if compares, in the order the page lists them.
COMPARED = ("worker_seconds", "wait_p50", "wait_p95", "wait_p99", "slo_violation_seconds",
            "scale_events", "max_replicas", "max_backlog")


def ratios(candidate: Figures, current: Figures) -> dict[str, float | None]:
    """candidate / current of each figure: 1 when both are 0, None (no ratio) when only
    the current one is 0, as ``fleet simulate --compare`` has it."""
    out: dict[str, float | None] = {}
    for name in COMPARED:
        new, old = getattr(candidate, name), getattr(current, name)
        out[name] = round(new / old, 4) if old else (1.0 if not new else None)
    return out


class UnavailableWhatIf:
    """The stub beside the real one: every replay says why it cannot run (the tune
    extra missing), so the dashboard's view shows that instead of an empty page."""

    def __init__(self, reason: str):
        self.reason = reason

    def replay(self, header: Header, tasks: Sequence[Task], config: FleetConfig, *,
               candidate: FleetConfig | None = None) -> Outcome:
        raise WhatIfUnavailable(self.reason)
