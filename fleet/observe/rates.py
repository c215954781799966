"""Rates from successive observations: arrivals, completions, service time.

No publisher counts its messages (that would be a Redis round trip per message), so
rates are derived from what the polls see. Completions are the workers' own counters
(per worker, so one that restarts or vanishes does not make a negative rate);
arrivals are completions plus the growth of the queue's messages; the mean service
time follows from Little's law, tasks running / completion rate. All three are
smoothed (EWMA) over polls, so one noisy interval does not swing the policy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from fleet.config import FleetConfig
from fleet.observe.model import Observation, QueueMetrics, QueueSample

logger = logging.getLogger("fleet.observe.rates")

ALPHA = 0.5  # weight of the newest interval in the moving averages
_EPS = 1e-9


@dataclass
class _Smoothed:
    arrival: float = 0.0
    completion: float = 0.0
    running: float = 0.0
    #: The last positive Little's-law estimate: a poll that catches no task running
    #: (short tasks finish between samples) says nothing about how long one takes.
    service_time: float | None = None
    primed: bool = False


@dataclass
class RateTracker:
    """Keeps the previous observation and the moving averages; ``update`` is the step."""

    config: FleetConfig
    previous: Observation | None = None
    smoothed: dict[str, _Smoothed] = field(default_factory=dict)

    def update(self, obs: Observation) -> dict[str, QueueMetrics]:
        prev = self.previous
        out = {}
        for name, sample in obs.queues.items():
            try:
                out[name] = self._update_queue(prev, obs, name, sample)
            except Exception:
                # One queue's odd figures must not stop the others: it sits this poll out.
                logger.exception("rates failed for queue %s", name)
        self.previous = obs
        return out

    def _update_queue(self, prev: Observation | None, obs: Observation, name: str,
                      sample: QueueSample) -> QueueMetrics:
        workers = obs.workers_of(name)
        running = sum(w.active for w in workers)
        slots = sum(w.concurrency for w in workers)
        s = self.smoothed.setdefault(name, _Smoothed())
        if prev is not None and name in prev.queues and obs.at > prev.at:
            dt = obs.at - prev.at
            done = completed_between(prev, obs, name)
            before = prev.queues[name]
            grown = (sample.waiting + sample.unacked) - (before.waiting + before.unacked)
            completion = done / dt
            arrival = max(0.0, (done + grown) / dt)
            if s.primed:
                s.completion += ALPHA * (completion - s.completion)
                s.arrival += ALPHA * (arrival - s.arrival)
                s.running += ALPHA * (running - s.running)
            else:
                s.completion, s.arrival, s.running, s.primed = (
                    completion, arrival, float(running), True)
            if s.completion > _EPS and s.running > _EPS:
                s.service_time = s.running / s.completion
        return QueueMetrics(
            name=name, waiting=sample.waiting, unacked=sample.unacked, running=running,
            oldest_age=sample.oldest_age, arrival_rate=s.arrival,
            completion_rate=s.completion,
            service_time=s.service_time,
            workers=len(workers), slots=slots,
            cpu_per_slot=(sum(w.cpu_percent for w in workers) / slots) if slots else 0.0,
            memory_fraction=memory_fraction(self.config, name, workers),
        )


def completed_between(prev: Observation, obs: Observation, queue: str) -> int:
    """Tasks the queue's workers finished between two polls, worker by worker."""
    before = {w.hostname: w for w in prev.workers_of(queue)}
    total = 0
    for worker in obs.workers_of(queue):
        old = before.get(worker.hostname)
        if old is None or old.pid != worker.pid or worker.processed < old.processed:
            # New (or restarted) since the last poll: all it did is new. A worker the
            # poller first sees after a long life would overcount once; it is only
            # possible on the autoscaler's first polls after a restart of its own.
            total += worker.processed if prev.workers else 0
        else:
            total += worker.processed - old.processed
    return total


def memory_fraction(config: FleetConfig, queue: str, workers) -> float | None:
    """The fullest worker's memory as a fraction of its pod's memory limit."""
    limit = config.queues[queue].kubernetes.resources.limits.memory
    if not limit or not workers:
        return None
    return max((w.rss_main + w.rss_children) / limit for w in workers)
