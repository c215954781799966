"""The stub backend: replicas are numbers in memory, and every call is written down.

Dramatiq ships a StubBroker beside its real ones for the same reason: a test of the loop,
the registry or a runner wants a backend that behaves like one (it remembers what it was
asked, it can fail on cue, it can plan and budget) without processes or an API server.
Selectable as ``autoscaler.backend: stub``: a run against it decides and records its
decisions like any other, and scales nothing real.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autoscale.backends.base import BackendContext, BackendError, BackendPlugin
from autoscale.policy import Budget
from fleet.observe.model import WorkerSample


@dataclass
class ScaleCall:
    queue: str
    replicas: int
    #: The hostnames of the live workers the loop passed along.
    workers: list[str]


@dataclass
class StubBackend:
    """Starts at ``start`` replicas per queue (0 where not given); ``fail`` names queues
    whose ``scale`` raises BackendError; ``capacity`` makes it a BudgetedBackend."""

    queues: list[str]
    start: dict[str, int] = field(default_factory=dict)
    fail: set[str] = field(default_factory=set)
    capacity: Budget | None = None
    name: str = "stub"
    calls: list[ScaleCall] = field(default_factory=list)
    closed: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.start) - set(self.queues)
        if unknown:
            raise ValueError(f"start names queues not in {self.queues}: {sorted(unknown)}")
        self.current = {q: self.start.get(q, 0) for q in self.queues}

    def replicas(self) -> dict[str, int]:
        if self.closed:
            raise BackendError("the stub backend is closed")
        return dict(self.current)

    def scale(self, queue: str, replicas: int, workers: list[WorkerSample]) -> None:
        if self.closed:
            raise BackendError("the stub backend is closed")
        if queue not in self.current:
            raise BackendError(f"the stub backend has no queue {queue!r}")
        self.calls.append(ScaleCall(queue, replicas, [w.hostname for w in workers]))
        if queue in self.fail:
            raise BackendError(f"stub: scaling {queue} fails on purpose")
        self.current[queue] = replicas

    def plan(self, queue: str, replicas: int, workers: list[WorkerSample]) -> list[str]:
        return [f"set {queue} from {self.current.get(queue, 0)} to {replicas}"]

    def budget(self) -> Budget:
        if self.capacity is None:
            raise BackendError("the stub backend was given no capacity")
        return self.capacity

    def close(self) -> None:
        self.closed = True


def create(ctx: BackendContext) -> StubBackend:
    """The ``stub`` entry point: every queue of the config, at its ``min_replicas``."""
    return StubBackend(list(ctx.config.queues),
                       {q: c.autoscaling.min_replicas for q, c in ctx.config.queues.items()})


PLUGIN = BackendPlugin(create)
