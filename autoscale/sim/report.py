"""What a simulation measured, per queue and in total.

Waits go into a histogram of log-spaced buckets (1% wide, from 1 ms), not a list: a
day of a large fleet is tens of millions of tasks, and a quantile within 1% is all a
report needs. Memory is a few thousand counters per queue, whatever the trace's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Waits below this count as zero (the first bucket); above it, buckets 1% wide.
RESOLUTION = 1e-3
_GROWTH = math.log1p(0.01)


@dataclass
class WaitHistogram:
    """Counts of waits (started - sent) by log bucket; exact count, sum and maximum."""

    buckets: dict[int, int] = field(default_factory=dict)
    count: int = 0
    total: float = 0.0
    maximum: float = 0.0

    def add(self, wait: float) -> None:
        index = 0 if wait < RESOLUTION else 1 + int(math.log(wait / RESOLUTION) / _GROWTH)
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.count += 1
        self.total += wait
        if wait > self.maximum:
            self.maximum = wait

    def merge(self, other: WaitHistogram) -> None:
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count
        self.total += other.total
        self.maximum = max(self.maximum, other.maximum)

    def quantile(self, q: float) -> float:
        """The wait at quantile ``q`` (0..1), to within a bucket (1%); 0 when empty."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                if index == 0:
                    return 0.0
                # The bucket's geometric middle, never past the largest wait seen.
                low = RESOLUTION * math.exp((index - 1) * _GROWTH)
                return min(low * math.exp(_GROWTH / 2), self.maximum)
        return self.maximum


@dataclass
class QueueReport:
    """One queue's figures (or the total's: ``name`` is ``total``)."""

    name: str
    tasks: int = 0
    #: Tasks that started and that finished (all of them unless the run hit its limit).
    started: int = 0
    finished: int = 0
    #: Replica-seconds from the scale call that created each replica to its exit
    #: (start-up and warm shutdown included: what a cloud bills).
    worker_seconds: float = 0.0
    waits: WaitHistogram = field(default_factory=WaitHistogram)
    #: Most messages not yet started at once (waiting in the list, or held by a worker).
    max_backlog: int = 0
    #: Seconds during which the oldest waiting message was older than target_wait.
    slo_violation_seconds: float = 0.0
    #: Replica-count changes the policy made, and those that reversed the previous
    #: change's direction within the queue's scale_down_stabilization (flaps).
    scale_events: int = 0
    flaps: int = 0
    max_replicas: int = 0

    def as_dict(self) -> dict:
        w = self.waits
        return {
            "queue": self.name, "tasks": self.tasks, "started": self.started,
            "finished": self.finished, "worker_seconds": round(self.worker_seconds, 3),
            "wait_mean": round(w.total / w.count, 6) if w.count else 0.0,
            "wait_p50": round(w.quantile(0.50), 6), "wait_p95": round(w.quantile(0.95), 6),
            "wait_p99": round(w.quantile(0.99), 6), "wait_max": round(w.maximum, 6),
            "max_backlog": self.max_backlog,
            "slo_violation_seconds": round(self.slo_violation_seconds, 3),
            "scale_events": self.scale_events, "flaps": self.flaps,
            "max_replicas": self.max_replicas,
        }


@dataclass
class Report:
    queues: dict[str, QueueReport]
    #: Simulated seconds (the trace's duration, or later if work was left) and polls.
    simulated: float
    polls: int
    #: Tasks of the trace without a service time (never finished live): not replayed.
    skipped: int = 0
    #: Most replicas of all queues at once that the backend counts (starting or
    #: ready; not those draining): what the capacity budget bounds.
    max_total_replicas: int = 0
    #: Most messages not yet started in all queues at once.
    max_total_backlog: int = 0

    @property
    def total(self) -> QueueReport:
        t = QueueReport("total")
        for q in self.queues.values():
            t.tasks += q.tasks
            t.started += q.started
            t.finished += q.finished
            t.worker_seconds += q.worker_seconds
            t.waits.merge(q.waits)
            t.slo_violation_seconds += q.slo_violation_seconds
            t.scale_events += q.scale_events
            t.flaps += q.flaps
        t.max_replicas = self.max_total_replicas
        t.max_backlog = self.max_total_backlog
        return t

    def as_dict(self) -> dict:
        return {"simulated": self.simulated, "polls": self.polls, "skipped": self.skipped,
                "queues": [q.as_dict() for q in self.queues.values()],
                "total": self.total.as_dict()}
