"""The one small interface every backend implements (one module per backend)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from fleet.config_models import FleetConfig
from fleet.errors import FleetError
from fleet.observe.model import WorkerSample

if TYPE_CHECKING:
    from autoscale.policy import Budget
    from fleet.registry import Registry
    from fleet.supervision import SupervisorRef


class BackendError(FleetError):
    """The backend could not read or change replicas; the loop logs it and goes on."""


class Backend(Protocol):
    name: str

    def replicas(self) -> dict[str, int]:
        """Current replicas per queue (what the backend runs or was asked to run)."""

    def scale(self, queue: str, replicas: int, workers: list[WorkerSample]) -> None:
        """Make ``queue`` run ``replicas`` workers. ``workers`` are its live workers'
        self-reports, so a scale-down can spare the busy ones."""

    def close(self) -> None:
        """Release what the backend holds (processes, connections)."""


@runtime_checkable
class BudgetedBackend(Protocol):
    """An optional ability: a backend that can say what capacity it has (the Kubernetes
    backend sums node allocatable). Named as a protocol so the loop asks ``isinstance``
    rather than guessing with ``getattr``."""

    def budget(self) -> Budget:
        """The CPU and memory available to workers; raises BackendError if unknown."""


@runtime_checkable
class PlanningBackend(Protocol):
    """An optional ability: a backend that can describe, for a dry run, what ``scale``
    would do, without changing anything."""

    def plan(self, queue: str, replicas: int, workers: list[WorkerSample]) -> list[str]:
        """The steps ``scale(queue, replicas, workers)`` would take, in words."""


@runtime_checkable
class CheckingBackend(Protocol):
    """An optional ability: a backend that can tell before the first poll that it cannot
    work at all (no engine, no image), so ``fleet up`` stops with that message instead
    of a fleet that never starts a worker."""

    def check(self) -> None:
        """Raise BackendError, saying what to do, if no replica could be started."""


@runtime_checkable
class HoldingBackend(Protocol):
    """An optional ability: a backend that can say a queue is not its to scale this poll:
    its replicas could not be read (its Deployment missing, or forbidden: ``replicas()``
    leaves it out), or someone else owns the count (an HPA, a manual hand-over, a write
    the fleet did not make). One such queue does not stop the others; the loop holds it
    and puts the reason in its decision."""

    def held(self) -> dict[str, str]:
        """The queues the last ``replicas()`` found not the fleet's to scale, and why."""


@runtime_checkable
class NoticingBackend(Protocol):
    """An optional ability: a backend that sees things happen to replicas (a container
    OOM-killed, one that exited at once) and says so, per queue, for the loop's report
    and the queue's decision reason (the dashboard shows both)."""

    def notices(self) -> dict[str, list[str]]:
        """What happened since the last call, per queue; each notice is returned once."""


@dataclass
class BackendContext:
    """What a backend may need from whoever runs the autoscaler (``fleet autoscale`` or
    ``fleet up``): one object, so a new backend's needs do not widen every call site."""

    config: FleetConfig
    #: The environment the backend's workers start with.
    env: Mapping[str, str]
    #: Where a backend keeps files of its own (the local backend: ``logs/``).
    workdir: Path
    dry_run: bool = False
    #: Who supervises the workers (``fleet up`` hands its own record down).
    supervisor: SupervisorRef | None = None
    #: The workdir's record of started processes, once claimed (``fleet up`` has).
    registry: Registry | None = None
    #: Claims the workdir (stopping what a killed predecessor left) on first need.
    claim: Callable[[], Registry] | None = field(default=None, repr=False)

    def claimed_registry(self) -> Registry | None:
        """The workdir's registry, claimed now if nobody has and this is no dry run: only
        a backend that starts processes here asks, so a Kubernetes run claims nothing."""
        if self.registry is None and self.claim is not None and not self.dry_run:
            self.registry = self.claim()
        return self.registry


@dataclass(frozen=True)
class BackendPlugin:
    """What an entry point in the ``fleet.autoscaler_backends`` group names (see
    ``fleet.plugins``): how to build the backend, and the facts about it that the runner
    needs before it builds one."""

    create: Callable[[BackendContext], Backend]
    #: Its workers are processes of this machine that stop when the autoscaler exits, so
    #: ``fleet autoscale --once`` decides without acting (it would start them only to
    #: stop them a moment later).
    workers_live_here: bool = False
