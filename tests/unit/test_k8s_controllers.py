"""The emulated ReplicaSet/Deployment controllers' choices (tests/fakes/k8s_controllers.py)
against cases worked out from Kubernetes' source: the oracle the backend's scale-down
tests rely on must itself be right."""

from __future__ import annotations

from tests.fakes.k8s_controllers import PodFacts, deletion_order, share

NOW = 1_000_000.0


def pod(name: str, **kw) -> PodFacts:
    base = dict(uid=name, node="n1", phase="Running", ready=True, ready_since=NOW - 3600,
                cost=0, restarts=0, created=NOW - 3600)
    return PodFacts(name, **{**base, **kw})


def order(*pods: PodFacts, related: list[PodFacts] | None = None) -> list[str]:
    return [p.name for p in deletion_order(list(pods), related or list(pods), NOW)]


def test_not_ready_goes_before_any_deletion_cost():
    """Why a busy pod that is not ready is not protected by its cost."""
    busy_unready = pod("busy", ready=False, ready_since=None, cost=1000)
    idle = pod("idle", cost=0)
    assert order(idle, busy_unready) == ["busy", "idle"]


def test_unassigned_then_pending_then_unknown_then_running():
    assert order(pod("run"), pod("unknown", phase="Unknown"),
                 pod("pending", phase="Pending"), pod("nowhere", node=None)) == \
        ["nowhere", "pending", "unknown", "run"]


def test_among_ready_running_pods_the_lowest_cost_goes_first():
    assert order(pod("b", cost=2000), pod("a", cost=1000), pod("idle")) == \
        ["idle", "a", "b"]


def test_doubled_up_goes_before_alone_at_equal_cost():
    mine = [pod("alone", node="n2"), pod("paired", node="n1")]
    related = [*mine, pod("other-set", node="n1")]  # another ReplicaSet's pod on n1
    assert order(*mine, related=related) == ["paired", "alone"]


def test_ready_for_less_time_goes_first_in_powers_of_two_of_age():
    young = pod("young", ready_since=NOW - 10)
    old = pod("old", ready_since=NOW - 10_000)
    assert order(old, young) == ["young", "old"]
    # Ages in the same power of two (2^43 ns is about 2.4 h to 4.9 h): the UID decides.
    a = pod("a", uid="1", ready_since=NOW - 3 * 3600)
    b = pod("b", uid="2", ready_since=NOW - 4 * 3600)
    assert order(b, a) == ["a", "b"]
    assert order(pod("a", uid="2", ready_since=NOW - 3 * 3600),
                 pod("b", uid="1", ready_since=NOW - 4 * 3600)) == ["b", "a"]


def test_more_restarts_go_first_then_newer():
    assert order(pod("steady"), pod("crashy", restarts=3)) == ["crashy", "steady"]
    assert order(pod("old", ready_since=NOW - 5, created=NOW - 10_000),
                 pod("new", ready_since=NOW - 5, created=NOW - 5)) == ["new", "old"]


def test_a_rollouts_change_is_shared_in_proportion_leftover_to_the_largest():
    assert share([4], 2) == [2]
    assert share([3, 1], 2) == [1, 1]  # 3 * -2/4 = -1.5 -> -2; 1 * -0.5 -> 0
    assert share([2, 2], 3) == [1, 2]  # equal sizes, scaling down: the older gives
    assert share([2, 2], 5) == [2, 3]  # scaling up: the newer takes
    assert share([0, 0], 3) == [0, 3]
    assert sum(share([5, 3, 1], 4)) == 4
