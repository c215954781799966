"""The one small interface every backend implements (one module per backend)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from fleet.errors import FleetError
from fleet.observe.model import WorkerSample

if TYPE_CHECKING:
    from autoscale.policy import Budget


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
