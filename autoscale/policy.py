"""The scaling policy: a pure function from figures, config and history to replicas.

For each queue it recommends enough replicas to keep up with arrivals and to drain the
backlog within the queue's ``target_wait`` (from the measured service time), never fewer
than its running tasks need, one more when the oldest message has waited past the
target or the workers are saturated, and none at all when there is nothing to do. The
recommendation then goes through HPA-like stabilization: up at once (or the lowest
recommendation of ``scale_up_stabilization``), down only to the highest recommendation
of ``scale_down_stabilization``, by at most ``scale_down_step`` and not within
``cooldown`` of the last change. Last, every queue's replicas together must fit the
capacity budget: growth is granted replica by replica to the most urgent queue first.
Every decision carries the reason, in words.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

from autoscale.recommendations import Recommendations
from fleet.config import FleetConfig, QueueClass
from fleet.observe import overrides
from fleet.observe.model import Observation, QueueMetrics, ScaleDecision
from fleet.units import cpu_cores, format_duration

logger = logging.getLogger("autoscale.policy")

#: A worker this busy (CPU of its requested cores, or memory of its pod limit) is
#: saturated: the policy holds it and, with a backlog, adds one.
SATURATION = 0.9
_EPS = 1e-9


@dataclass(frozen=True)
class History:
    """What the policy remembers between polls (returned anew, never mutated)."""

    #: queue -> (time, recommendation) pairs still inside a stabilization window (a
    #: Recommendations; a tuple of pairs is taken too)
    recommendations: dict[str, Recommendations] = field(default_factory=dict)
    #: queue -> time its replica count last changed
    last_change: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Budget:
    """Capacity for all worker replicas together (requests); None: unbounded."""

    cpu: float | None = None
    memory: int | None = None


def replica_cost(queue: QueueClass) -> tuple[float, int]:
    """CPU cores and memory bytes one replica requests (limits if no requests)."""
    # Kept per (frozen) QueueClass: saturation() asks for every queue at every poll.
    known = _COSTS.get(id(queue))
    if known is not None and known[0] is queue:
        return known[1]
    cpu, memory = queue.kubernetes.resources.per_replica()
    if len(_COSTS) >= 4096:
        _COSTS.clear()
    _COSTS[id(queue)] = (queue, (cpu, memory))
    return cpu, memory


#: id(QueueClass) -> (it, its replica_cost); the class is held so that its id is not
#: reused while it is here.
_COSTS: dict[int, tuple[QueueClass, tuple[float, int]]] = {}


def budget_from(config: FleetConfig, available: Budget | None = None) -> Budget:
    """queues.yaml's capacity; what it leaves out comes from ``available`` (on
    Kubernetes, the nodes' allocatable), else stays unbounded."""
    cap = config.autoscaler.capacity
    cpu, memory = cpu_cores(cap.cpu), cap.memory
    if available is not None:
        cpu = cpu if cpu is not None else available.cpu
        memory = memory if memory is not None else available.memory
    return Budget(cpu, memory)


def recommend(m: QueueMetrics, queue: QueueClass, current: int) -> tuple[int, str]:
    """Replicas this queue needs now, before stabilization and budget, and why."""
    a = queue.autoscaling
    c = queue.concurrency
    # The figures read more than once, as locals (the simulator asks 4.3 million times
    # a simulated day of 100 queues).
    waiting, running, service = m.waiting, m.running, m.service_time
    backlog = m.backlog
    work = backlog + running
    if current == 0 and running == 0 and waiting < max(1, a.activation_threshold):
        floor = f"; min_replicas {a.min_replicas}" if a.min_replicas else ""
        if waiting:
            return a.min_replicas, (f"{waiting} waiting, below the activation threshold "
                                    f"of {a.activation_threshold}{floor}")
        return a.min_replicas, f"idle{floor}"
    if work == 0:
        floor = f"; min_replicas {a.min_replicas}" if a.min_replicas else ""
        return a.min_replicas, f"idle: nothing waiting or running{floor}"
    target = a.target_wait
    if service is not None and service > _EPS:
        # Slots busy with what arrives (Little's law), plus slots to drain the backlog
        # within target_wait; never more than a slot per waiting message, which starts
        # them all at once (sized as a rate, 2 waiting tasks of 27 s with a 10 s target
        # asked for 5.4 slots).
        keep_up = m.arrival_rate * service
        drain = min(backlog * service / max(target, _EPS), backlog)
        n = math.ceil((keep_up + drain) / c - _EPS)
        reason = (f"backlog {backlog}, arrivals {m.arrival_rate:.2f}/s, service "
                  f"{service:.2f}s: {n} to keep up and drain within "
                  f"{_duration(target)}")
    else:
        n = math.ceil(work / c)
        reason = f"{work} to run, service time not known yet: a slot for each"
    # Tasks finishing on a worker that is shutting down need no replica in its place:
    # counted, they started one for every busy worker a scale-down had stopped.
    staying = running - m.draining
    busy = math.ceil(staying / c)
    if busy > n:
        n, reason = busy, f"{staying} running need {busy}"
    if waiting and m.oldest_age is not None and m.oldest_age > target and n <= current:
        n, reason = current + 1, (f"oldest message waited {format_duration(m.oldest_age)},"
                                  f" over the target {_duration(target)}")
    # No CPU and no memory figure (the simulator's default) saturates nothing: the
    # check is skipped, not its answer changed.
    saturated = (saturation(m, queue) if m.cpu_per_slot or m.memory_fraction is not None
                 else None)
    if saturated:
        if backlog and n <= current:
            n, reason = current + 1, f"workers saturated ({saturated}) with a backlog"
        elif n < current:
            n, reason = current, f"workers saturated ({saturated}): hold"
    if m.slots and running >= m.slots and n < current:
        n, reason = current, f"all {m.slots} slots busy: hold"
    if n < 1 and work:
        n = 1
    clamped = min(max(n, a.min_replicas), a.max_replicas)
    if clamped != n:
        bound = "max_replicas" if clamped < n else "min_replicas"
        reason += f"; {bound} {clamped}"
    return clamped, reason


def saturation(m: QueueMetrics, queue: QueueClass) -> str | None:
    """'CPU 95%' or 'memory 93%' when the queue's workers are saturated, else None."""
    if m.workers:
        cores = replica_cost(queue)[0] or 1.0
        cpu = m.cpu_per_slot * m.slots / m.workers / (100 * cores)
        if cpu > SATURATION:
            return f"CPU {cpu:.0%} of requested"
    if m.memory_fraction is not None and m.memory_fraction > SATURATION:
        return f"memory {m.memory_fraction:.0%} of limit"
    return None


def stabilize(queue: QueueClass, name: str, current: int, recommended: int, now: float,
              history: History) -> tuple[int, str | None, Recommendations]:
    """Apply the windows, cooldown and step; return (desired, why held, kept recs)."""
    a = queue.autoscaling
    up, down = a.scale_up_stabilization, a.scale_down_stabilization
    kept = history.recommendations.get(name, ())
    if not isinstance(kept, Recommendations):
        kept = Recommendations(kept)
    # The pairs since now - max(up, down), and the extremes of each window
    # (autoscale/recommendations.py keeps them without filtering every pair each poll).
    recs = kept.add(now, recommended, up, down)
    if recommended > current:
        desired = max(current, recs.lowest())
        note = None if desired == recommended else (
            f"scale-up stabilization {_duration(a.scale_up_stabilization)}")
        return desired, note, recs
    if recommended < current:
        desired = recs.highest()
        if desired >= current:
            return current, (f"scale-down stabilization "
                             f"{_duration(a.scale_down_stabilization)} (highest "
                             f"recommendation {desired})"), recs
        since = now - history.last_change.get(name, -math.inf)
        if since < a.cooldown:
            return current, (f"cooldown: changed {format_duration(since)} ago, "
                             f"{_duration(a.cooldown)} needed"), recs
        stepped = max(desired, current - a.scale_down_step)
        note = None if stepped == desired else f"step of {a.scale_down_step}"
        return stepped, note, recs
    return current, None, recs


def _duration(seconds: float) -> str:
    """``format_duration`` of a setting (target_wait, a window, the cooldown), kept:
    the reasons word the same few for every queue at every poll. Only positive values
    are kept (0.0 and -0.0 are equal keys, and read "0s" and "-0s")."""
    text = _DURATIONS.get(seconds)
    if text is None:
        text = format_duration(seconds)
        if seconds > 0 and len(_DURATIONS) < 4096:
            _DURATIONS[seconds] = text
    return text


_DURATIONS: dict[float, str] = {}


def fit_budget(config: FleetConfig, wanted: dict[str, int], current: dict[str, int],
               urgency: dict[str, float], budget: Budget) -> dict[str, int]:
    """Grant growth replica by replica, most urgent queue first, within the budget.

    Never takes away what runs now (nor below min_replicas): the budget limits growth.
    """
    if budget.cpu is None and budget.memory is None:
        return dict(wanted)
    granted = {q: min(wanted[q], max(current.get(q, 0), config.queues[q].autoscaling.min_replicas))
               for q in wanted}
    cost = {q: replica_cost(config.queues[q]) for q in wanted}

    def used() -> tuple[float, int]:
        return (sum(granted[q] * cost[q][0] for q in granted),
                sum(granted[q] * cost[q][1] for q in granted))

    order = sorted(wanted, key=lambda q: (-urgency.get(q, 0.0), q))
    progress = True
    while progress:
        progress = False
        for q in order:
            if granted[q] >= wanted[q]:
                continue
            cpu, memory = used()
            fits_cpu = budget.cpu is None or cpu + cost[q][0] <= budget.cpu + _EPS
            fits_mem = budget.memory is None or memory + cost[q][1] <= budget.memory
            if fits_cpu and fits_mem:
                granted[q] += 1
                progress = True
    return granted


def _decide_queue(name: str, m: QueueMetrics, queue: QueueClass, now_n: int, now: float,
                  history: History) -> tuple[int, str, Recommendations]:
    """One queue's (wanted replicas, reason, kept recommendations)."""
    recommended, reason = recommend(m, queue, now_n)
    desired, held, recs = stabilize(queue, name, now_n, recommended, now, history)
    # min/max are hard bounds, whatever the windows say (as in HPA): a count set
    # by hand outside them is corrected at once.
    a = queue.autoscaling
    if not a.min_replicas <= desired <= a.max_replicas:
        desired = min(max(desired, a.min_replicas), a.max_replicas)
        held = f"bounds {a.min_replicas}..{a.max_replicas}"
    return desired, (reason + f"; held by {held}") if held else reason, recs


def _urgency(m: QueueMetrics, queue: QueueClass) -> float:
    """Which queue the capacity budget grants growth first: the oldest wait in targets."""
    age = m.oldest_age or 0.0
    return age / max(queue.autoscaling.target_wait, _EPS) + (m.backlog > 0)


def decide(now: float, metrics: dict[str, QueueMetrics], current: dict[str, int],
           config: FleetConfig, history: History, budget: Budget | None = None
           ) -> tuple[list[ScaleDecision], History]:
    """Desired replicas per queue, with reasons, and the history to pass next time."""
    budget = budget if budget is not None else budget_from(config)
    # Without a budget nothing is shared: one pass (the simulator decides 100 queues at
    # each of 43,200 polls a day, and the budget's bookkeeping was a third of it).
    bounded = budget.cpu is not None or budget.memory is not None
    wanted: list[tuple[str, int, int, str]] = []  # (queue, current, wanted, reason)
    recs: dict[str, Recommendations] = {}
    urgency: dict[str, float] = {}
    queues = config.queues
    for name, m in metrics.items():
        now_n = current.get(name, 0)
        try:
            queue = queues[name]
            n, reason, recs[name] = _decide_queue(name, m, queue, now_n, now, history)
            if bounded:
                urgency[name] = _urgency(m, queue)
        except Exception as exc:
            # A figure no rule foresaw must not stop the other queues (nor the loop):
            # this queue keeps what it runs until its figures make sense again.
            logger.exception("policy failed for queue %s", name)
            n, urgency[name] = now_n, 0.0
            recs[name] = history.recommendations.get(name, ())
            reason = f"policy error ({type(exc).__name__}: {exc}): held at {now_n}"
        wanted.append((name, now_n, n, reason))
    granted = fit_budget(config, {w[0]: w[2] for w in wanted}, current, urgency,
                         budget) if bounded else None
    decisions = []
    last_change = dict(history.last_change)
    for name, now_n, n, reason in wanted:
        if granted is not None and granted[name] < n:
            n = granted[name]
            reason += (f"; capped at {n} by the capacity budget "
                       f"(cpu {budget.cpu}, memory {budget.memory})")
        if n != now_n:
            last_change[name] = now
        decisions.append(ScaleDecision(name, now_n, n, reason))
    return decisions, History(recs, last_change)


def decide_poll(obs: Observation, metrics: dict[str, QueueMetrics], current: dict[str, int],
                config: FleetConfig, history: History, budget: Budget
                ) -> tuple[list[ScaleDecision], History]:
    """One poll's decisions as the loop makes them: the operator overrides that the poll
    read replace the bounds, and a paused queue's reason says so. The loop
    (autoscale.loop) and the simulator (autoscale.sim) both call this, so a simulation
    runs the very rules the live fleet runs."""
    held = obs.overrides
    decisions, history = decide(obs.at, metrics, current, overrides.apply(config, held),
                                history, budget)
    if held:
        decisions = [replace(d, reason=d.reason + "; paused from the dashboard")
                     if held.get(d.queue, _NOT_HELD).paused else d
                     for d in decisions]
    return decisions, history


_NOT_HELD = overrides.Override()
