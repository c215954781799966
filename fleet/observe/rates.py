"""Rates from successive observations: arrivals, completions, service time.

No publisher counts its messages (that would be a Redis round trip per message), so
rates are derived from what the polls see. Completions are the workers' own counters
(per worker, so one that restarts or vanishes does not make a negative rate);
arrivals are completions plus the growth of the queue's messages. Both rates are
smoothed (EWMA) with a time constant, ``RATE_TIME_CONSTANT`` seconds, not a weight per
poll: a poll of 2 s sees 0, 1 or 2 arrivals of a 0.2/s stream, and a weight of one half
per poll (what this was) let the policy size for four times the mean rate; a time
constant also keeps the smoothing the same whatever ``autoscaler.interval`` is. A burst
does not wait for the smoothing: the policy drains the backlog itself.

The averages start from nothing, bias-corrected (divided by the weight the span seen
so far holds, ``1 - exp(-span / RATE_TIME_CONSTANT)``): so the first polls give the
mean rate over what they saw. Primed with the first interval's rate instead (what this
was), one task in the first 0.5 s poll read 2/s, and that decayed over a minute: a
queue that had seen two tasks in 6 s was sized for 1.5 arrivals a second.

The mean service time follows from Little's law over a window, not from the two
smoothed rates: busy slot-seconds (tasks running, integrated over the polls) divided
by the tasks completed in the same span. A ratio of EWMAs explodes when completions
are sparse (a 20 s task on one slot completes once per ten 2 s polls; the smoothed
completion rate halves at every poll in between, and the estimate reached 3,535 s,
sending the queue to max_replicas). The window is sized in completions (the shortest
recent span with ``WINDOW_COMPLETIONS`` of them), so it is short for short tasks and
long for long ones, and a change of workload shows within that many tasks.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field

from fleet.config import FleetConfig
from fleet.observe.model import Observation, QueueMetrics, QueueSample, WorkerSample

logger = logging.getLogger("fleet.observe.rates")

#: Seconds over which the arrival and completion rates are smoothed (an interval of dt
#: weighs 1 - exp(-dt / RATE_TIME_CONSTANT) in the moving average).
RATE_TIME_CONSTANT = 20.0
_EPS = 1e-9
#: Completions the service-time window spans when it can (fewer until there are).
WINDOW_COMPLETIONS = 10
#: Marks the window keeps at most: it needs WINDOW_COMPLETIONS + 1 (one per interval
#: that completed something); the bound is a guard on memory, not a tuning knob.
WINDOW_POLLS = 64


@dataclass
class _Smoothed:
    #: The moving averages from zero, and the weight they hold (see the module's
    #: docstring): the rates are ``arrival / weight`` and ``completion / weight``.
    arrival: float = 0.0
    completion: float = 0.0
    weight: float = 0.0
    #: The last positive Little's-law estimate: a window whose polls caught no task
    #: running (short tasks finish between samples) says nothing about how long one takes.
    service_time: float | None = None
    last_running: int = 0
    window: ServiceWindow = field(default_factory=lambda: ServiceWindow())


@dataclass
class RateTracker:
    """Keeps the previous observation and the moving averages; ``update`` is the step."""

    config: FleetConfig
    previous: Observation | None = None
    smoothed: dict[str, _Smoothed] = field(default_factory=dict)
    #: (the config they are of, queue -> memory limit), for the memory fractions.
    _limits: tuple[FleetConfig, dict] | None = field(default=None, init=False, repr=False,
                                                      compare=False)

    def update(self, obs: Observation) -> dict[str, QueueMetrics]:
        prev = self.previous
        out = {}
        # What every queue's step shares: the interval and its smoothing weight.
        step = None
        if prev is not None and obs.at > prev.at:
            dt = obs.at - prev.at
            step = (dt, -math.expm1(-dt / RATE_TIME_CONSTANT), bool(prev.workers))
        limits = self._limits_of_config()
        for name, sample in obs.queues.items():
            try:
                out[name] = self._update_queue(prev, obs, name, sample, step, limits)
            except Exception:
                # One queue's odd figures must not stop the others: it sits this poll out.
                logger.exception("rates failed for queue %s", name)
        self.previous = obs
        return out

    def _update_queue(self, prev: Observation | None, obs: Observation, name: str,
                      sample: QueueSample, step: tuple[float, float, bool] | None,
                      limits: dict[str, int | None]) -> QueueMetrics:
        workers = obs.workers_of(name)
        # One pass over the workers for the three sums (the simulator calls this for
        # every queue at every poll); added in the same order, so the same floats.
        running = slots = draining = 0
        cpu = 0
        for w in workers:
            running += w.active
            slots += w.concurrency
            cpu += w.cpu_percent
            draining += w.draining
        s = self.smoothed.get(name)
        if s is None:
            s = self.smoothed[name] = _Smoothed()
        before = None if step is None else prev.queues.get(name)
        if before is not None:
            dt, alpha, seen_any = step
            earlier = prev.workers_of(name)
            if len(earlier) == 1 and len(workers) == 1:
                # The simulator's case (one sample per queue) and a one-worker queue's,
                # without two calls per queue per poll: _completed's answer.
                done = _grown(earlier[0] if earlier[0].hostname == workers[0].hostname
                              else None, workers[0], seen_any)
            else:
                done = _completed(earlier, workers, seen_any)
            grown = (sample.waiting + sample.unacked) - (before.waiting + before.unacked)
            completion = done / dt
            arrival = max(0.0, (done + grown) / dt)
            s.weight += alpha * (1.0 - s.weight)
            s.completion += alpha * (completion - s.completion)
            s.arrival += alpha * (arrival - s.arrival)
            # Busy slot-seconds of the interval: the running counts at its two ends,
            # averaged (what the polls can see of it).
            estimate = s.window.add((s.last_running + running) / 2 * dt, done)
            if estimate is not None:
                s.service_time = estimate
        s.last_running = running
        weight = s.weight
        arrival, completion = ((s.arrival / weight, s.completion / weight) if weight
                               else (0.0, 0.0))
        # The fullest worker's memory as a fraction of its pod's memory limit (None
        # without a limit); each queue's limit looked up once per config.
        limit = limits.get(name, _UNKNOWN)
        if limit is _UNKNOWN:
            limit = limits[name] = _memory_limit(self.config, name)
        memory = (max((w.rss_main + w.rss_children) / limit for w in workers)
                  if limit and workers else None)
        # Positional, in QueueMetrics' field order: keywords cost a microsecond more per
        # queue per poll, a simulated day of 100 queues makes 4.3 million of them.
        return QueueMetrics(
            name, sample.waiting, sample.unacked, running,  # name .. running
            sample.oldest_age, arrival, completion,  # oldest_age .. completion_rate
            s.service_time, len(workers), slots,  # service_time, workers, slots
            (cpu / slots) if slots else 0.0,  # cpu_per_slot
            memory, draining,
        )

    def _limits_of_config(self) -> dict[str, int | None]:
        """queue -> memory limit of the current config, each looked up when first asked."""
        limits = self._limits
        if limits is None or limits[0] is not self.config:
            limits = self._limits = (self.config, {})
        return limits[1]


class ServiceWindow:
    """Little's law over the shortest recent span holding ``WINDOW_COMPLETIONS``
    completions (fewer until there are): busy slot-seconds / tasks completed.

    Only an interval that completed something gives an estimate, and the window starts
    at such an interval too: between completions the busy time grows while the count
    does not, so a window ending (or starting) there reads long (or short), by up to
    one whole task on every slot. Amortised O(1) per poll: the window holds cumulative
    sums, one per interval that completed something, trimmed from the front.
    """

    __slots__ = ("busy", "done", "marks")

    def __init__(self) -> None:
        self.busy = 0.0
        self.done = 0
        #: (cumulative busy, cumulative completions) after each interval that completed
        #: something, oldest first; the first is where counting began.
        self.marks: deque = deque([(0.0, 0)], maxlen=WINDOW_POLLS)

    def add(self, busy: float, done: int) -> float | None:
        self.busy += busy
        self.done += done
        if done <= 0:
            return None
        marks = self.marks
        marks.append((self.busy, self.done))
        while len(marks) > 2 and self.done - marks[1][1] >= WINDOW_COMPLETIONS:
            marks.popleft()
        first_busy, first_done = marks[0]
        worked = self.busy - first_busy
        return worked / (self.done - first_done) if worked > _EPS else None


def _memory_limit(config: FleetConfig, queue: str) -> int | None:
    return config.queues[queue].kubernetes.resources.limits.memory


_UNKNOWN = object()


def completed_between(prev: Observation, obs: Observation, queue: str) -> int:
    """Tasks the queue's workers finished between two polls, worker by worker."""
    return _completed(prev.workers_of(queue), obs.workers_of(queue), bool(prev.workers))


def _completed(earlier: list[WorkerSample], workers: list[WorkerSample], seen_any: bool
               ) -> int:
    """completed_between of one queue's workers then (``earlier``) and now; ``seen_any``:
    the earlier poll saw workers of any queue."""
    before = {w.hostname: w for w in earlier}
    return sum(_grown(before.get(w.hostname), w, seen_any) for w in workers)


def _grown(old: WorkerSample | None, worker: WorkerSample, seen_any: bool) -> int:
    """What one worker finished since its earlier sample ``old`` (None: unseen)."""
    if old is None or old.pid != worker.pid or worker.processed < old.processed:
        # New (or restarted) since the last poll: all it did is new. A worker the
        # poller first sees after a long life would overcount once; it is only
        # possible on the autoscaler's first polls after a restart of its own.
        return worker.processed if seen_any else 0
    return worker.processed - old.processed

