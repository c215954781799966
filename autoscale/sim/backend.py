"""The simulated backend: replicas as objects on the simulator's clock.

It implements ``Backend`` (and ``PlanningBackend``) the way the local backend behaves
(autoscale/backends/local.py), so the simulator drives it exactly as the loop drives a
real one: a scale-up counts its new replicas at once and they take messages after the
start-up delay; a scale-down picks idle replicas first (among equals the youngest),
and stops them warm: they take no new message, finish what runs, and what they had
prefetched goes back to the head of the queue (kombu's Redis transport restores a
channel's unacked messages when it closes; RPUSH puts them where BRPOP takes next).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from fleet.observe.model import WorkerSample

if TYPE_CHECKING:
    from autoscale.sim.engine import Simulation


class Replica:
    """One worker: slots running tasks and a prefetch buffer of held messages."""

    __slots__ = (
        "created",
        "draining",
        "gone",
        "id",
        "in_turn",
        "processed",
        "queue",
        "ready",
        "reserved",
        "running",
        "snap",
        "snap_epoch",
    )

    def __init__(self, rid: int, queue: str, created: float, epoch: int):
        self.id = rid
        self.queue = queue
        self.created = created
        self.ready = False
        self.draining = False
        self.gone = False
        self.running = 0
        #: Held messages not yet running, next to run first: (sent, service).
        self.reserved: deque = deque()
        #: Tasks finished (the worker's own counter, as in its self-report).
        self.processed = 0
        #: ``processed`` as the last poll saw it (see Simulation._worker_samples).
        self.snap = 0
        self.snap_epoch = epoch
        #: Whether it is in its queue's turn order of replicas with room.
        self.in_turn = False

    @property
    def held(self) -> int:
        return self.running + len(self.reserved)


class SimBackend:
    """Replicas per queue in a Simulation; ``scale`` changes them at the sim's clock."""

    name = "sim"

    def __init__(self, sim: Simulation):
        self.sim = sim
        self.closed = False

    def replicas(self) -> dict[str, int]:
        return {name: len(q.replicas) for name, q in self.sim.queues.items()}

    def scale(self, queue: str, replicas: int, workers: list[WorkerSample]) -> None:
        # ``workers`` are the poll's self-reports; this backend reads its own replicas,
        # which are what those reports were made from, at the same instant.
        self.sim.scale(queue, replicas)

    def plan(self, queue: str, replicas: int, workers: list[WorkerSample]) -> list[str]:
        have = len(self.sim.queues[queue].replicas)
        if replicas >= have:
            return [f"start {replicas - have} {queue} replicas"]
        return [f"stop {have - replicas} {queue} replicas (idle first, warm)"]

    def close(self) -> None:
        self.closed = True
