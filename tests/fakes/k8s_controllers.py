"""The ReplicaSet and Deployment controllers' choices, as the emulated API server makes
them: which pods a scale-down deletes, and how a Deployment in mid-rollout shares a
change of replicas among its ReplicaSets.

Written from Kubernetes' own source (v1.31), independently of the fleet's backend, so
that the backend's tests are checked against the real rules, not against its own idea
of them:

- ``pkg/controller/controller_utils.go``, ``ActivePodsWithRanks.Less``: unassigned before
  assigned; Pending < Unknown < Running; not ready before ready; lower
  ``controller.kubernetes.io/pod-deletion-cost`` first; more related pods on the same
  node first ("doubled up"); ready for a shorter time first, then more container
  restarts first, then newer first, times compared in powers of two of their age
  (LogarithmicScaleDown, on by default since 1.22), ties by UID.
- ``pkg/controller/replicaset/replica_set.go``, ``getPodsToDelete``: ranks only the
  ReplicaSet's own active pods (not terminating, not finished), the ranks counting the
  related pods of every ReplicaSet of the Deployment.
- ``pkg/controller/deployment/sync.go``, ``scale``: during a rollout a change of the
  Deployment's replicas is shared in proportion to each ReplicaSet's size, the leftover
  to the largest (the older among equals when scaling down, the newer when up).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
_PHASE = {"Pending": 0, "Unknown": 1, "Running": 2}


@dataclass(frozen=True)
class PodFacts:
    """What the ranking reads of one pod (times in epoch seconds)."""

    name: str
    uid: str
    node: str | None
    phase: str
    ready: bool
    ready_since: float | None
    cost: int
    restarts: int
    created: float


def facts(pod: dict, created: float, ready_since: float | None) -> PodFacts:
    status = pod.get("status", {})
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions", []))
    restarts = max((c.get("restartCount", 0) for c in status.get("containerStatuses", [])),
                   default=0)
    try:
        cost = int(pod["metadata"].get("annotations", {}).get(DELETION_COST, "0"))
    except ValueError:
        cost = 0
    return PodFacts(pod["metadata"]["name"], pod["metadata"]["uid"],
                    pod["spec"].get("nodeName") or None, status.get("phase", "Pending"),
                    ready, ready_since if ready else None, cost, restarts, created)


def _log_rank_diff(t1: float, t2: float, now: float) -> int:
    """controller_utils.go logarithmicRankDiff: the ages' powers of two (nanoseconds)."""
    def rank(t: float) -> int:
        age = (now - t) * 1e9
        return int(math.log2(age)) if age > 0 else -1
    return rank(t1) - rank(t2)


def _less(a: PodFacts, b: PodFacts, rank_a: int, rank_b: int, now: float) -> bool:
    if a.node != b.node and (a.node is None or b.node is None):
        return a.node is None
    if _PHASE.get(a.phase, 0) != _PHASE.get(b.phase, 0):
        return _PHASE.get(a.phase, 0) < _PHASE.get(b.phase, 0)
    if a.ready != b.ready:
        return not a.ready
    if a.cost != b.cost:
        return a.cost < b.cost
    if rank_a != rank_b:
        return rank_a > rank_b
    if a.ready and b.ready and a.ready_since != b.ready_since:
        if a.ready_since is None or b.ready_since is None:
            return a.ready_since is None
        diff = _log_rank_diff(a.ready_since, b.ready_since, now)
        if diff == 0:
            return a.uid < b.uid
        return diff < 0
    if a.restarts != b.restarts:
        return a.restarts > b.restarts
    if a.created != b.created:
        diff = _log_rank_diff(a.created, b.created, now)
        if diff == 0:
            return a.uid < b.uid
        return diff < 0
    return False


def deletion_order(pods: list[PodFacts], related: list[PodFacts], now: float
                   ) -> list[PodFacts]:
    """``pods`` (one ReplicaSet's active pods) in the order its controller deletes them;
    ``related`` are the active pods of all the Deployment's ReplicaSets."""
    on_node = Counter(p.node for p in related)
    ranks = {p.name: on_node[p.node] if p.node is not None else 0 for p in pods}

    def compare(a: PodFacts, b: PodFacts) -> int:
        if _less(a, b, ranks[a.name], ranks[b.name], now):
            return -1
        if _less(b, a, ranks[b.name], ranks[a.name], now):
            return 1
        return 0

    return sorted(pods, key=functools.cmp_to_key(compare))


def share(sizes: list[int], target: int) -> list[int]:
    """New sizes for ReplicaSets of ``sizes`` (oldest first) when their Deployment asks
    for ``target`` replicas in all (sync.go scale, without the surge allowance)."""
    total = sum(sizes)
    if len(sizes) == 1:
        return [target]
    if total == 0:  # nothing to share in proportion: all to the newest
        return [*sizes[:-1], sizes[-1] + target]
    change = target - total
    new = [s + round(s * change / total) for s in sizes]
    new = [max(0, n) for n in new]
    leftover = target - sum(new)
    if leftover:
        # The largest; among equals the older when scaling down, the newer when up.
        order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i if change < 0 else -i))
        for i in order:
            take = max(-new[i], leftover) if leftover < 0 else leftover
            new[i] += take
            leftover -= take
            if not leftover:
                break
    return new
