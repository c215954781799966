"""The control loop: poll, decide, apply; log every change with its reason.

It never dies of an outage: an unreachable Redis or API server is logged and retried
with backoff (doubling up to a minute), and a backend error on one queue does not stop
the others. Each poll's decisions are kept in Redis for the dashboard: the latest per
queue (a hash) and the changes (a list capped at ``KEEP_CHANGES``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import redis

from autoscale.backends.base import (
    Backend,
    BackendError,
    BudgetedBackend,
    HoldingBackend,
    NoticingBackend,
    PlanningBackend,
)
from autoscale.passes import Passes
from autoscale.policy import Budget, History, budget_from, decide_poll, replica_cost
from fleet.config import FleetConfig
from fleet.keys import changes_key, latest_decisions_key
from fleet.observe.metrics import RedisMetrics
from fleet.observe.model import ScaleDecision
from fleet.observe.rates import RateTracker
from fleet.supervision import ThreadUnit

logger = logging.getLogger("autoscale")

KEEP_CHANGES = 1000
MAX_BACKOFF = 60.0


@dataclass
class Autoscaler(Passes):
    config: FleetConfig
    metrics: RedisMetrics
    backend: Backend
    dry_run: bool = False
    report: Callable[[str], None] = logger.info
    history: History = field(default_factory=History)

    def __post_init__(self) -> None:
        self.tracker = RateTracker(self.config)
        self._start_passes()
        #: The replicas per queue as last read or set, and why each held queue is held
        #: (so a queue that stays held is reported once, not at every poll).
        self._last_read: dict[str, int] = {}
        self._held_why: dict[str, str] = {}
        self._failed: dict[str, str] = {}

    def run_once(self) -> list[ScaleDecision]:
        obs = self.metrics.poll()
        figures = self.tracker.update(obs)
        current = self.backend.replicas()
        held = self._held_queues()
        if held:
            figures = {q: m for q, m in figures.items() if q not in held}
        previous = self.history
        budget = self._budget()
        if held:
            budget = self._less_held(budget, held, current)
        decisions, self.history = decide_poll(obs, figures, current, self.config,
                                              self.history, budget)
        if held:
            decisions, self.history = self._hold(decisions, held, current, previous)
        self._last_read.update(current)
        decisions = self._with_notices(decisions)
        for d in decisions:
            if not d.changes:
                continue
            verb = "would scale" if self.dry_run else "scaling"
            self.report(f"{verb} {d.queue}: {d.current} -> {d.desired} ({d.reason})")
            if self.dry_run:
                self._report_plan(d, obs.workers_of(d.queue))
                continue
            try:
                self.backend.scale(d.queue, d.desired, obs.workers_of(d.queue))
                self._last_read[d.queue] = d.desired
                self._failed.pop(d.queue, None)
            except BackendError as exc:
                # Said once while it stays the same (a scale-down waiting for a rollout
                # is refused at every poll).
                if self._failed.get(d.queue) != str(exc):
                    self.report(f"could not scale {d.queue}: {exc}")
                self._failed[d.queue] = str(exc)
            except Exception as exc:  # a bug in one backend call: the other queues go on
                logger.exception("scaling %s failed", d.queue)
                self.report(f"could not scale {d.queue}: {type(exc).__name__}: {exc}")
        self._record(obs.at, decisions)
        return decisions

    def _held_queues(self) -> dict[str, str]:
        """Queues the backend will not scale this poll (a HoldingBackend), reported when
        the reason is new."""
        held = self.backend.held() if isinstance(self.backend, HoldingBackend) else {}
        for queue, why in held.items():
            if self._held_why.get(queue) != why:
                self.report(f"{queue}: {why}: held")
        for queue in self._held_why.keys() - held.keys():
            self.report(f"{queue}: scaled by the fleet again")
        self._held_why = dict(held)
        return held

    def _count_of(self, queue: str, current: dict[str, int]) -> int:
        """A held queue's replicas: as read now, else as last read or set."""
        return current.get(queue, self._last_read.get(queue, 0))

    def _less_held(self, budget: Budget, held: dict[str, str],
                   current: dict[str, int]) -> Budget:
        """A held queue's replicas (an HPA's, a manual count, or the last known) still
        take their share of the capacity budget: the other queues get what is left."""
        if budget.cpu is None and budget.memory is None:
            return budget
        cpu, memory = 0.0, 0
        for queue in held:
            if queue in self.config.queues:
                n = self._count_of(queue, current)
                one = replica_cost(self.config.queues[queue])
                cpu, memory = cpu + n * one[0], memory + n * one[1]
        return Budget(None if budget.cpu is None else max(0.0, budget.cpu - cpu),
                      None if budget.memory is None else max(0, budget.memory - memory))

    def _hold(self, decisions: list[ScaleDecision], held: dict[str, str],
              current: dict[str, int], previous: History
              ) -> tuple[list[ScaleDecision], History]:
        """A held queue keeps what it has (the count read, else the last read or set:
        no change is made on a count not read) and its stabilization window (so a
        scale-down is not rushed after it)."""
        kept = []
        for queue, why in held.items():
            if queue in self.config.queues:
                n = self._count_of(queue, current)
                kept.append(ScaleDecision(queue, n, n, f"{why}: held"))
        recs = {q: r for q, r in previous.recommendations.items() if q in held}
        history = replace(self.history,
                          recommendations={**self.history.recommendations, **recs})
        order = {q: i for i, q in enumerate(self.config.queues)}
        return sorted(decisions + kept, key=lambda d: order.get(d.queue, len(order))), \
            history

    def _with_notices(self, decisions: list[ScaleDecision]) -> list[ScaleDecision]:
        """What the backend saw happen to a queue's replicas, reported and added to that
        queue's decision reason (a NoticingBackend: the docker backend's OOM kills)."""
        if not isinstance(self.backend, NoticingBackend):
            return decisions
        notes = self.backend.notices()
        for queue, lines in notes.items():
            for line in lines:
                self.report(f"{queue}: {line}")
        return [replace(d, reason=f"{d.reason}; {'; '.join(notes[d.queue])}")
                if notes.get(d.queue) else d for d in decisions]

    def _budget(self) -> Budget:
        """queues.yaml's capacity; what it leaves out, from the backend if it can tell
        (a BudgetedBackend: the Kubernetes backend sums node allocatable)."""
        budget = budget_from(self.config)
        if not isinstance(self.backend, BudgetedBackend) or (
                budget.cpu is not None and budget.memory is not None):
            return budget
        try:
            return budget_from(self.config, self.backend.budget())
        except BackendError as exc:
            # Scaling on without a budget beats not scaling at all; say so every time.
            self.report(f"no capacity budget from the backend ({exc}); scaling unbounded")
            return budget

    def _report_plan(self, d: ScaleDecision, workers: list) -> None:
        """A dry run shows the backend's steps too, if it is a PlanningBackend."""
        if not isinstance(self.backend, PlanningBackend):
            return
        try:
            for line in self.backend.plan(d.queue, d.desired, workers):
                self.report(f"  {line}")
        except BackendError as exc:
            self.report(f"  (no plan for {d.queue}: {exc})")

    def _record(self, at: float, decisions: list[ScaleDecision]) -> None:
        pipe = self.metrics.client.pipeline(transaction=False)
        latest = {d.queue: json.dumps({**asdict(d), "at": at, "dry_run": self.dry_run})
                  for d in decisions}
        if latest:
            pipe.hset(latest_decisions_key(self.config), mapping=latest)
        changes = [json.dumps({**asdict(d), "at": at, "dry_run": self.dry_run})
                   for d in decisions if d.changes]
        if changes:
            pipe.lpush(changes_key(self.config), *changes)
            pipe.ltrim(changes_key(self.config), 0, KEEP_CHANGES - 1)
        pipe.execute()

    def run(self, stop: threading.Event, interval: float | None = None) -> None:
        """Poll until ``stop``; nothing raised by a poll ends the loop (autoscale.passes)."""
        self.run_passes(stop, interval or self.config.autoscaler.interval, MAX_BACKOFF,
                        self.report, _describe)


def _describe(exc: Exception) -> tuple[str, bool]:
    if isinstance(exc, redis.RedisError):
        return f"Redis unreachable ({exc})", False
    if isinstance(exc, BackendError):
        return f"backend error ({exc})", False
    return f"poll failed ({type(exc).__name__}: {exc})", True


def supervised(scaler: Autoscaler, interval: float | None = None) -> ThreadUnit:
    """The loop as a unit its supervisor watches: alive, and still turning.

    A pass ends within the interval, or the backoff (at most MAX_BACKOFF), plus one poll
    whose Redis calls time out on their own (fleet.keys: 10 s socket timeout); a loop
    that has not passed for much longer is stuck, not slow."""
    interval = interval or scaler.config.autoscaler.interval
    return ThreadUnit("autoscaler", lambda stop: scaler.run(stop, interval),
                      beat=lambda: scaler.last_pass, stall_after=MAX_BACKOFF + 3 * interval + 60,
                      join_timeout=interval + 30)
