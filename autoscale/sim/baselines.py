"""Baselines to compare the fleet's policy with: other controllers (controllers.py).

Pure decision code, no simulator state: each gets the poll's ``Observation`` and the
replicas the backend counts, and returns ``ScaleDecision``s. docs/tuning.md, "Baselines",
gives every number's source.

- ``KedaController``: KEDA's Redis list scaler (``type: redis``) on a ScaledObject with
  KEDA's and the HPA's defaults. Two loops: KEDA's own every ``pollingInterval`` (30 s),
  which alone scales 0 -> 1 (when LLEN > ``activationListLength``) and 1 -> 0 (once no
  poll has been active for ``cooldownPeriod``, 300 s); and the HPA's every 15 s, which
  between 1 and max sets ceil(LLEN / ``listLength``) (an AverageValue target of 5),
  within a tolerance of 0.1, a scale-up of at most max(100%, 4 pods) per 15 s and a
  scale-down to the highest recommendation of the last 300 s. With ``useCachedMetrics``
  false (the default) each HPA query reaches Redis, so the HPA reads LLEN at its own
  15 s. The metric is the length of the queue's list only: not what runs, nor what
  workers hold prefetched (the simulator has one list per queue; Celery's priority
  sub-lists are not modelled).
- ``FixedController``: N replicas per queue from t=0 to the end, never changed.
- ``work_floor``: not a controller but the bound under all of them, the worker-seconds
  of the tasks' own service times on the queues' slots.

Neither knows the fleet's capacity budget (KEDA and the HPA do not): it is not applied.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from fleet.config import FleetConfig
from fleet.observe.model import Observation, ScaleDecision
from fleet.trace.model import Task

#: KEDA, ScaledObject defaults and the redis-lists trigger as documented.
KEDA_POLLING_INTERVAL = 30.0
KEDA_COOLDOWN_PERIOD = 300.0
KEDA_MIN_REPLICA_COUNT = 0
KEDA_LIST_LENGTH = 5.0
KEDA_ACTIVATION_LIST_LENGTH = 0.0
#: The HPA's defaults (kube-controller-manager and autoscaling/v2 behavior).
HPA_SYNC_PERIOD = 15.0
HPA_TOLERANCE = 0.1
HPA_SCALE_UP_PERCENT = 100.0
HPA_SCALE_UP_PODS = 4
HPA_SCALE_UP_PERIOD = 15.0
HPA_SCALE_DOWN_STABILIZATION = 300.0


class _HpaState:
    __slots__ = ("events", "last_active", "recommendations")

    def __init__(self) -> None:
        #: (time, desired) of every HPA computation within the stabilization window.
        self.recommendations: list[tuple[float, int]] = []
        #: (time, replicas added, negative if removed) of the HPA's changes within the
        #: rate-limit period (KEDA's own 0 <-> 1 are not the HPA's).
        self.events: list[tuple[float, int]] = []
        #: When KEDA's poll last found the trigger active.
        self.last_active = -math.inf


class KedaController:
    """KEDA (redis-lists scaler) + the HPA with their defaults, per queue; max replicas
    from the queue's ``autoscaling.max_replicas``."""

    name = "keda"

    def __init__(self, config: FleetConfig, *, list_length: float = KEDA_LIST_LENGTH,
                 activation: float = KEDA_ACTIVATION_LIST_LENGTH,
                 polling_interval: float = KEDA_POLLING_INTERVAL,
                 cooldown: float = KEDA_COOLDOWN_PERIOD,
                 min_replicas: int = KEDA_MIN_REPLICA_COUNT,
                 sync_period: float = HPA_SYNC_PERIOD):
        self.config = config
        self.list_length = list_length
        self.activation = activation
        self.polling_interval = polling_interval
        self.cooldown = cooldown
        self.min_replicas = min_replicas
        #: The engine polls at the HPA's period; KEDA's own poll is every
        #: polling_interval / sync_period of those (both loops start at t=0).
        self.interval = sync_period
        self._every = max(1, round(polling_interval / sync_period))
        self._tick = 0
        self.state = {name: _HpaState() for name in config.queues}

    def decide(self, now: float, obs: Observation, current: dict[str, int]
               ) -> list[ScaleDecision]:
        keda_poll = self._tick % self._every == 0
        self._tick += 1
        out = []
        for name, queue in self.config.queues.items():
            sample = obs.queues.get(name)
            metric = sample.waiting if sample is not None else 0
            n = current.get(name, 0)
            desired, reason = self._queue(name, queue.autoscaling.max_replicas, metric, n,
                                          now, keda_poll)
            out.append(ScaleDecision(name, n, desired, reason))
        return out

    def _queue(self, name: str, maximum: int, metric: int, n: int, now: float,
               keda_poll: bool) -> tuple[int, str]:
        st = self.state[name]
        if keda_poll:
            active = metric > self.activation
            if active:
                st.last_active = now
            if n == 0:
                if active:
                    return max(1, self.min_replicas), (
                        f"KEDA: LLEN {metric} > activation {self.activation:g}: activate")
                return 0, f"KEDA: LLEN {metric}, not active"
            if not active and self.min_replicas == 0 \
                    and now - st.last_active >= self.cooldown:
                return 0, (f"KEDA: not active for the cooldown of {self.cooldown:g}s: "
                           "scale to zero")
        if n == 0:
            return 0, "HPA: scaling disabled at 0 replicas"
        return self._hpa(st, maximum, metric, n, now)

    def _hpa(self, st: _HpaState, maximum: int, metric: int, n: int, now: float
             ) -> tuple[int, str]:
        """One HPA sync (replica_calculator's external AverageValue metric, then
        normalizeDesiredReplicasWithBehaviors with the default behavior)."""
        ratio = metric / (self.list_length * n)
        if abs(1.0 - ratio) <= HPA_TOLERANCE:
            raw, why = n, f"LLEN {metric}: ratio {ratio:.2f} within tolerance"
        else:
            raw = math.ceil(metric / self.list_length)
            why = f"LLEN {metric} / {self.list_length:g} = {raw}"
        # Stabilization: up at once (window 0), down to the highest of the window.
        cutoff = now - HPA_SCALE_DOWN_STABILIZATION
        st.recommendations = [r for r in st.recommendations if r[0] > cutoff]
        down = max([raw, *(r for _, r in st.recommendations)])
        st.recommendations.append((now, raw))
        desired = min(max(n, raw), down)
        if desired != raw:
            why += f"; scale-down stabilization {HPA_SCALE_DOWN_STABILIZATION:g}s: {desired}"
        # Rate limit on the way up (policies Percent 100 and Pods 4 per 15 s, selectPolicy
        # Max), from the replicas at the period's start; bounds min (1) and max.
        period = now - HPA_SCALE_UP_PERIOD
        st.events = [e for e in st.events if e[0] > period]
        start = n - sum(k for _, k in st.events)
        limit = max(n, math.ceil(start * (1 + HPA_SCALE_UP_PERCENT / 100)),
                    start + HPA_SCALE_UP_PODS)
        if desired > n and desired > min(maximum, limit):
            desired = min(maximum, limit)
            why += f"; limited to {desired} (" + (
                "max replicas)" if desired == maximum else "scale-up rate)")
        desired = min(max(desired, 1, self.min_replicas), maximum)
        if desired != n:
            st.events.append((now, desired - n))
        return desired, "HPA: " + why


class FixedController:
    """``replicas[queue]`` replicas from the first poll (t=0) on, never changed."""

    name = "fixed"

    def __init__(self, config: FleetConfig, replicas: Mapping[str, int]):
        self.config = config
        self.interval = config.autoscaler.interval
        self.replicas = {name: int(replicas.get(name, 0)) for name in config.queues}

    def decide(self, now: float, obs: Observation, current: dict[str, int]
               ) -> list[ScaleDecision]:
        return [ScaleDecision(name, current.get(name, 0), n, f"fixed at {n}")
                for name, n in self.replicas.items()]


def work_floor(tasks: Iterable[Task], config: FleetConfig) -> dict[str, float]:
    """Per queue, the fewest worker-seconds that can run its tasks: their service
    times over the queue's concurrency, as if every slot of every replica were busy
    from its first second to its last (no start-up, no idle slot, no drain).

    No autoscaler gets under it, whatever its settings: a "25 % cheaper than KEDA" goal
    is out of reach on a trace where KEDA's own cost is within a quarter of the floor
    (docs/tuning.md, "Figures: tuned vs KEDA"). Tasks without a service time (never
    finished) are left out, as the simulator leaves them out."""
    work: dict[str, float] = {}
    for t in tasks:
        if t.service is not None:
            work[t.queue] = work.get(t.queue, 0.0) + t.service
    return {q: w / config.queues[q].concurrency for q, w in work.items()}


#: The names ``fleet simulate --compare`` takes.
BASELINES = ("keda", "fixed")
