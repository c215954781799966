"""The one small interface every backend implements (one module per backend)."""

from __future__ import annotations

from typing import Protocol

from fleet.errors import FleetError
from fleet.observe.model import WorkerSample


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
