"""The Kubernetes backend, with the official client, against an emulated API server over
real HTTP (tests/fakes/k8s_api.py), and the whole loop against it and the real Redis.

The fake is not a cluster: what it does not emulate (watches, server-side apply, RBAC
beyond the denials a test sets, the real controllers' timing) is listed in its docstring.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, replace

import pytest
import redis
import yaml

from autoscale.backends.base import BackendError
from autoscale.backends.kubernetes import (
    DELETION_COST,
    KubernetesBackend,
    RetryPolicy,
    deletion_costs,
)
from autoscale.loop import Autoscaler
from autoscale.policy import Budget
from fleet.config import Capacity, FleetConfig, load_config
from fleet.keys import workers_key
from fleet.observe.metrics import RedisMetrics
from fleet.observe.model import WorkerSample
from fleet.render.k8s import worker_labels
from tests.conftest import ROOT, free_port, wait_for
from tests.fakes.k8s_api import FakeKubernetes
from tests.fakes.k8s_rbac import grants_of, kustomized

NS = "fleet"
#: Quick retries for tests: the same code paths, a shorter clock.
FAST = RetryPolicy(attempts=4, first=0.05, cap=0.2, total=2.0)
TOKEN = "fake-serviceaccount-token"


@pytest.fixture
def k8s_api() -> Iterator[FakeKubernetes]:
    """The emulated API server granting exactly what k8s/base binds to the autoscaler's
    ServiceAccount: a call the shipped Role does not grant fails here as on a cluster."""
    fake = None
    for _attempt in range(3):  # another process may take the free port first
        try:
            fake = FakeKubernetes(free_port()).start()
            break
        except OSError:
            continue
    if fake is None:
        pytest.fail("the emulated API server could not bind a port")
    fake.grants = grants_of(kustomized("base"))
    yield fake
    fake.stop()


@pytest.fixture
def shipped() -> FleetConfig:
    """queues.yaml as shipped (namespace fleet, fleet-worker-{queue}); no Redis needed."""
    return load_config(ROOT / "queues.yaml")


def deployment(queue: str) -> str:
    return f"fleet-worker-{queue}"


#: The one LIST of worker Deployments a poll makes.
LIST_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments"
#: Listed at start and every minute: an HPA targeting a worker Deployment owns it.
HPA_PATH = f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers"


def deployment_path(queue: str) -> str:
    return f"{LIST_PATH}/{deployment(queue)}"


def scale_path(queue: str) -> str:
    return f"{deployment_path(queue)}/scale"


def add_deployments(fake: FakeKubernetes, config: FleetConfig, **replicas: int) -> None:
    """Every queue's worker Deployment, labelled as k8s/base renders them."""
    for queue in config.queues:
        fake.add_deployment(NS, deployment(queue), replicas=replicas.get(queue, 0),
                            labels=worker_labels(queue))


def backend(config: FleetConfig, fake: FakeKubernetes, **kw) -> KubernetesBackend:
    return KubernetesBackend(config, fake.api_client(), retry=kw.pop("retry", FAST), **kw)


def sample(queue: str, pod: str, active: int = 0, reserved: int = 0) -> WorkerSample:
    return WorkerSample(hostname=f"{queue}@{pod}", queue=queue, pod=pod, pid=7,
                        concurrency=1, active=active, reserved=reserved, processed=0,
                        cpu_percent=0.0, rss_main=80 << 20, rss_children=0,
                        memory_available=4 << 30, at=time.time(), loop_at=time.time())


def publish_samples(client: redis.Redis, config: FleetConfig,
                    samples: list[WorkerSample]) -> None:
    """What each worker's heartbeat thread writes (fleet.heartbeat)."""
    client.hset(workers_key(config), mapping={s.hostname: json.dumps(asdict(s))
                                              for s in samples})


# -- the backend alone -------------------------------------------------------------------


def test_replicas_come_from_one_list_of_the_worker_deployments(shipped, k8s_api):
    add_deployments(k8s_api, shipped, default=1, heavy=2)
    k8s_api.add_deployment(NS, "someone-elses", replicas=7)  # not selected, not read
    k8s = backend(shipped, k8s_api)
    assert k8s.replicas() == {"default": 1, "io": 0, "heavy": 2, "xl": 0}
    listed, hpas = k8s_api.requests
    assert (listed.method, listed.path) == ("GET", LIST_PATH)
    assert listed.query["labelSelector"] == \
        "app.kubernetes.io/component=worker,app.kubernetes.io/name=fleet"
    assert (hpas.method, hpas.path) == ("GET", HPA_PATH)  # the first poll, then a minute
    assert k8s.held() == {}
    mark = len(k8s_api.requests)
    assert k8s.replicas()["heavy"] == 2
    assert [r.path for r in k8s_api.requests[mark:]] == [LIST_PATH]  # a quiet poll: 1
    listed = k8s_api.requests[mark]
    # A scale-up in the same poll needs no read: one PATCH, against the listed version.
    k8s.scale("heavy", 3, [])
    [patch] = k8s_api.requests[mark + 1:]
    assert (patch.method, patch.path) == ("PATCH", scale_path("heavy"))
    listed_heavy = next(d for d in listed.response["items"]
                        if d["metadata"]["name"] == deployment("heavy"))
    assert patch.body["metadata"]["resourceVersion"] == \
        listed_heavy["metadata"]["resourceVersion"]
    assert k8s_api.replicas(NS, deployment("heavy")) == 3


def test_in_cluster_the_namespace_it_runs_in_wins_over_queues_yaml(shipped, k8s_api,
                                                                   monkeypatch):
    """The autoscaler's pod sets FLEET_K8S_NAMESPACE from the downward API: an overlay that
    moves the fleet moves what it scales, though queues.yaml still says fleet."""
    for queue in shipped.queues:
        k8s_api.add_deployment("team-a", deployment(queue), replicas=1,
                               labels=worker_labels(queue))
    base = k8s_api.grants  # the overlay that moved the fleet moved its Role too
    k8s_api.grants = replace(base, namespaced=frozenset(
        ("team-a", *grant[1:]) for grant in base.namespaced))
    monkeypatch.setenv("FLEET_K8S_NAMESPACE", "team-a")
    k8s = backend(shipped, k8s_api)
    assert k8s.replicas() == {q: 1 for q in shipped.queues}
    k8s.scale("heavy", 2, [])
    assert k8s_api.replicas("team-a", deployment("heavy")) == 2
    assert {r.path.split("/")[5] for r in k8s_api.requests
            if "/namespaces/" in r.path} == {"team-a"}


@pytest.mark.parametrize("overlay", ["base", "overlays/external-redis"])
def test_every_call_of_a_full_cycle_is_granted_by_the_overlays_own_rbac(shipped, k8s_api,
                                                                       overlay):
    """The grants come from the overlay's rendered Role and ClusterRole: reads, a scale
    up, a scale-down with its pod annotations, the node budget and the HPA list all pass
    with them, and nothing else is asked for."""
    k8s_api.grants = grants_of(kustomized(overlay))
    add_deployments(k8s_api, shipped, heavy=2)
    k8s_api.add_node("n1", cpu="4", memory="16Gi")
    a, b = k8s_api.pod_names(NS, deployment("heavy"))
    k8s = backend(shipped, k8s_api)
    assert k8s.replicas()["heavy"] == 2
    k8s.scale("io", 1, [])
    k8s.replicas()
    k8s.scale("heavy", 1, [sample("heavy", a, active=1), sample("heavy", b)])
    assert k8s.budget().cpu == 4.0
    assert k8s_api.pod_names(NS, deployment("heavy")) == [a]
    assert [r for r in k8s_api.requests if r.status == 403] == []
    assert {(r.method, r.path.split("/")[-1] if "/pods/" in r.path else r.path)
            for r in k8s_api.requests} >= {("GET", LIST_PATH), ("GET", HPA_PATH),
                                           ("PATCH", scale_path("io")), ("PATCH", a)}


def test_a_call_the_role_does_not_grant_is_forbidden_as_on_a_cluster(shipped, k8s_api):
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    add_deployments(k8s_api, shipped, heavy=1)
    apps = client.AppsV1Api(k8s_api.api_client())
    with pytest.raises(ApiException) as err:  # update (PUT) of the scale: only patch is
        apps.replace_namespaced_deployment_scale(
            deployment("heavy"), NS, {"metadata": {"name": deployment("heavy")},
                                      "spec": {"replicas": 3}})
    assert err.value.status == 403
    assert 'cannot update resource "deployments/scale" in API group "apps"' in \
        json.loads(err.value.body)["message"]
    core = client.CoreV1Api(k8s_api.api_client())
    with pytest.raises(ApiException) as err:  # a Role grants in its own namespace only
        core.list_namespaced_pod("kube-system")
    assert err.value.status == 403
    assert len(core.list_namespaced_pod(NS).items) == 1  # in the Role's namespace: granted
    assert k8s_api.replicas(NS, deployment("heavy")) == 1


def test_every_write_is_checked_against_the_kubernetes_openapi_schema(shipped, k8s_api):
    """A misspelt or mistyped field in a body the backend sends would fail here, not be
    dropped unseen by a real API server (its default field validation only warns)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    add_deployments(k8s_api, shipped, heavy=1)
    apps = client.AppsV1Api(k8s_api.api_client())
    core = client.CoreV1Api(k8s_api.api_client())
    [pod] = k8s_api.pod_names(NS, deployment("heavy"))
    for call, field in [
        (lambda: apps.patch_namespaced_deployment_scale(
            deployment("heavy"), NS, {"spec": {"replicaz": 3}}), "replicaz"),
        (lambda: apps.patch_namespaced_deployment_scale(
            deployment("heavy"), NS, {"spec": {"replicas": "3"}}), "spec.replicas"),
        (lambda: core.patch_namespaced_pod(pod, NS, {"metadata": {"anotations": {
            DELETION_COST: "5"}}}), "anotations"),
    ]:
        with pytest.raises(ApiException) as err:
            call()
        assert err.value.status == 400
        assert field in json.loads(err.value.body)["message"], err.value.body
    assert k8s_api.replicas(NS, deployment("heavy")) == 1
    # What the backend sends passes: a scale-down with its annotation, checked the same.
    k8s_api.set_replicas(NS, deployment("heavy"), 2)
    _, b = k8s_api.pod_names(NS, deployment("heavy"))
    backend(shipped, k8s_api).scale("heavy", 1, [sample("heavy", b, active=1)])
    assert k8s_api.pod_names(NS, deployment("heavy")) == [b]


def test_one_missing_deployment_holds_that_queue_only(shipped, k8s_api):
    for queue in ("default", "heavy", "xl"):
        k8s_api.add_deployment(NS, deployment(queue), replicas=1,
                               labels=worker_labels(queue))
    k8s = backend(shipped, k8s_api)
    assert k8s.replicas() == {"default": 1, "heavy": 1, "xl": 1}
    [why] = k8s.held().values()
    assert list(k8s.held()) == ["io"]
    assert why.startswith("replicas not read (Deployment fleet-worker-io not found in "
                          "namespace fleet")
    # Looked for with a GET of its own (it may be there, unlabelled); a 404 is final.
    assert [r.status for r in k8s_api.calls("GET", deployment_path("io"))] == [404]
    # An unlabelled Deployment is found that way, and read so at every poll.
    k8s_api.add_deployment(NS, deployment("io"), replicas=2, labels={"app": "io"})
    assert k8s.replicas()["io"] == 2 and k8s.held() == {}


def test_listing_forbidden_falls_back_to_a_get_per_queue(shipped, k8s_api):
    """An older Role without ``list deployments``: slower, but every queue still read,
    and a queue whose GET is refused is the only one held."""
    add_deployments(k8s_api, shipped, heavy=2)
    k8s_api.forbid("list", "deployments")
    k8s = backend(shipped, k8s_api)
    assert k8s.replicas() == {"default": 0, "io": 0, "heavy": 2, "xl": 0}
    assert [r.status for r in k8s_api.calls("GET", LIST_PATH)] == [403]
    mark = len(k8s_api.requests)
    assert k8s.replicas()["heavy"] == 2
    # It does not ask to list again: a GET per queue from then on.
    assert [r.path for r in k8s_api.requests[mark:] if r.path != HPA_PATH] == [
        deployment_path(q) for q in ("default", "io", "heavy", "xl")]


def test_no_queue_readable_fails_the_poll_with_the_first_reason(shipped, k8s_api):
    with pytest.raises(BackendError) as err:
        backend(shipped, k8s_api).replicas()
    assert str(err.value).startswith("Deployment fleet-worker-default not found in "
                                     "namespace fleet")
    assert str(err.value).endswith("(and 3 other queues unread)")


def test_scale_up_patches_only_the_scale_subresource(shipped, k8s_api):
    add_deployments(k8s_api, shipped)
    backend(shipped, k8s_api).scale("heavy", 3, [])
    assert k8s_api.replicas(NS, deployment("heavy")) == 3
    assert len(k8s_api.pod_names(NS, deployment("heavy"))) == 3
    [patch] = k8s_api.calls("PATCH")
    assert patch.path == scale_path("heavy")
    assert patch.content_type == "application/merge-patch+json"
    assert patch.body["spec"] == {"replicas": 3}
    # made against the version it read: a concurrent change would be a 409, not lost
    # (outside a poll, the Deployment is read first)
    [read] = k8s_api.calls("GET", deployment_path("heavy"))
    assert patch.body["metadata"]["resourceVersion"] == \
        read.response["metadata"]["resourceVersion"]
    assert not k8s_api.calls(path=f"/api/v1/namespaces/{NS}/pods")


def test_scale_down_marks_busy_pods_and_the_controller_spares_them(shipped, k8s_api):
    add_deployments(k8s_api, shipped, heavy=4)
    old1, old2, new1, new2 = k8s_api.pod_names(NS, deployment("heavy"))
    # The newest pods are the busy ones: left to itself the ReplicaSet controller
    # would remove exactly those (newest first among equals).
    workers = [sample("heavy", old1), sample("heavy", old2),
               sample("heavy", new1, active=1), sample("heavy", new2, active=1, reserved=1)]
    backend(shipped, k8s_api).scale("heavy", 2, workers)

    assert k8s_api.pod_names(NS, deployment("heavy")) == [new1, new2]
    assert sorted(k8s_api.deleted_pods) == sorted([old1, old2])
    assert k8s_api.annotation(NS, new1) == "1000"
    assert k8s_api.annotation(NS, new2) == "2000"
    # The pods were found by the Deployment's own selector, marked before the scale
    # PATCH, and idle pods without an annotation were left alone (cost 0 already).
    [listed] = k8s_api.calls("GET", f"/api/v1/namespaces/{NS}/pods")
    assert listed.query["labelSelector"] == (
        "app.kubernetes.io/component=worker,app.kubernetes.io/name=fleet,"
        "fleet.io/queue=heavy")
    patches = [(r.path.rsplit("/", 1)[1], r.body) for r in k8s_api.calls("PATCH")]
    assert patches[:2] == [
        (new1, {"metadata": {"annotations": {DELETION_COST: "1000"}}}),
        (new2, {"metadata": {"annotations": {DELETION_COST: "2000"}}})]
    assert patches[2][0] == "scale" and len(patches) == 3


def test_a_worker_that_went_idle_loses_its_protection(shipped, k8s_api):
    add_deployments(k8s_api, shipped, heavy=3)
    a, b, c = k8s_api.pod_names(NS, deployment("heavy"))
    k8s = backend(shipped, k8s_api)
    k8s.scale("heavy", 2, [sample("heavy", a, active=1), sample("heavy", b),
                           sample("heavy", c)])
    survivors = k8s_api.pod_names(NS, deployment("heavy"))
    assert a in survivors and len(survivors) == 2  # one of the idle two went
    b = next(p for p in survivors if p != a)
    mark = len(k8s_api.requests)
    # Now a is idle and b busy: a's old cost must go, or a busy b would be removed.
    k8s.scale("heavy", 1, [sample("heavy", a), sample("heavy", b, active=1)])
    assert k8s_api.pod_names(NS, deployment("heavy")) == [b]
    pod_patches = [r for r in k8s_api.calls("PATCH", since=mark) if "/pods/" in r.path]
    assert {r.path.rsplit("/", 1)[1]: r.body["metadata"]["annotations"][DELETION_COST]
            for r in pod_patches} == {a: "0", b: "1000"}


def test_a_busy_pod_that_is_not_ready_is_not_left_to_its_deletion_cost(shipped, k8s_api):
    """The real ReplicaSet controller removes not-ready pods before it looks at the cost:
    a busy, not-ready pod would go first. The backend scales down only as far as idle
    pods rank before it, and says so."""
    add_deployments(k8s_api, shipped, heavy=4)
    pods = k8s_api.pod_names(NS, deployment("heavy"))
    busy, idle_unready = pods[0], pods[1]
    k8s_api.set_pod(NS, busy, ready=False)  # say, its loop too slow for the probe
    workers = [sample("heavy", busy, active=1)] + [sample("heavy", p) for p in pods[1:]]
    k8s = backend(shipped, k8s_api)
    with pytest.raises(BackendError) as err:
        k8s.scale("heavy", 2, workers)
    assert str(err.value).startswith(f"not scaling heavy down: busy pod {busy} is not "
                                     "ready (or not running): the ReplicaSet controller "
                                     "removes such pods before it looks at the deletion "
                                     "cost, so only 0 of the 2 fewer")
    assert k8s_api.replicas(NS, deployment("heavy")) == 4 and not k8s_api.deleted_pods
    # One idle pod that is not ready either ranks before it (same readiness, lower cost):
    # that one may go, and only that one.
    k8s_api.set_pod(NS, idle_unready, ready=False)
    k8s.scale("heavy", 2, workers)
    assert k8s_api.replicas(NS, deployment("heavy")) == 3
    assert k8s_api.deleted_pods == [idle_unready]
    assert busy in k8s_api.pod_names(NS, deployment("heavy"))
    [said] = k8s.notices()["heavy"]
    assert said.startswith(f"scaled down to 3 only: busy pod {busy} is not ready")
    # What the guard prevents: the controller left to itself takes the busy pod first.
    k8s_api.set_replicas(NS, deployment("heavy"), 2)
    assert busy in k8s_api.deleted_pods


def test_no_scale_down_with_busy_pods_during_a_rollout_until_it_ends(shipped, k8s_api):
    """A queues.yaml edit rolls every worker: two ReplicaSets at once, the decrease shared
    between them by the Deployment controller and each ranking its own pods, so the cost
    cannot protect a busy pod. The scale-down waits for the rollout."""
    add_deployments(k8s_api, shipped, heavy=3)
    old = k8s_api.pod_names(NS, deployment("heavy"))
    k8s_api.begin_rollout(NS, deployment("heavy"), surge=1)
    [new] = [p for p in k8s_api.pod_names(NS, deployment("heavy")) if p not in old]
    workers = [sample("heavy", new, active=1)] + [sample("heavy", p) for p in old]
    k8s = backend(shipped, k8s_api)
    assert k8s.replicas()["heavy"] == 3  # spec.replicas; four pods while it surges
    with pytest.raises(BackendError) as err:
        k8s.scale("heavy", 1, workers)
    assert str(err.value).startswith("not scaling heavy down: a rollout is under way (pods "
                                     "of 2 ReplicaSets, 1 busy)")
    assert str(err.value).endswith("the scale-down waits for the rollout")
    assert len(k8s_api.pod_names(NS, deployment("heavy"))) == 4
    # A scale-up is not held back by it.
    k8s.scale("heavy", 4, workers)
    assert k8s_api.replicas(NS, deployment("heavy")) == 4
    # Once the rollout is over, one ReplicaSet again: the cost keeps the busy pod.
    k8s_api.finish_rollout(NS, deployment("heavy"))
    assert set(old) <= set(k8s_api.pod_names(NS, deployment("heavy"), terminating=True))
    now = k8s_api.pod_names(NS, deployment("heavy"))
    workers = [sample("heavy", p, active=int(p == new)) for p in now]
    k8s.replicas()
    k8s.scale("heavy", 1, workers)
    assert k8s_api.pod_names(NS, deployment("heavy")) == [new]


def test_terminating_pods_hold_their_grace_and_are_not_annotated(shipped, k8s_api):
    add_deployments(k8s_api, shipped, heavy=2)
    a, b = k8s_api.pod_names(NS, deployment("heavy"))
    k8s = backend(shipped, k8s_api)
    k8s.scale("heavy", 1, [sample("heavy", a, active=1), sample("heavy", b)])
    assert k8s_api.pod_names(NS, deployment("heavy")) == [a]
    assert k8s_api.pod_names(NS, deployment("heavy"), terminating=True) == [b]
    # Still listed, with its deletionTimestamp; the backend leaves it alone.
    listed = k8s_api.calls("GET", f"/api/v1/namespaces/{NS}/pods")[-1].response["items"]
    assert {p["metadata"]["name"] for p in listed} == {a, b}
    mark = len(k8s_api.requests)
    k8s.scale("heavy", 0, [sample("heavy", a)])  # a went idle
    patched = {r.path.rsplit("/", 1)[1] for r in k8s_api.calls("PATCH", since=mark)
               if "/pods/" in r.path}
    assert b not in patched
    k8s_api.finish_terminating(NS)
    assert k8s_api.pod_names(NS, deployment("heavy"), terminating=True) == []


def test_deletion_costs_are_proportional_to_held_tasks():
    workers = [sample("heavy", "p1", active=1), sample("heavy", "p2", active=2, reserved=3),
               sample("heavy", "elsewhere", active=5)]
    assert deletion_costs(["p0", "p1", "p2"], workers) == {"p0": 0, "p1": 1000, "p2": 5000}
    huge = [sample("heavy", "p", active=10**9)]
    assert deletion_costs(["p"], huge) == {"p": 2**31 - 1}  # int32, as the API requires


def test_a_missing_deployment_names_it_and_its_namespace(shipped, k8s_api):
    k8s_api.add_deployment(NS, deployment("default"), labels=worker_labels("default"))
    k8s = backend(shipped, k8s_api)
    k8s.replicas()
    message = k8s.held()["io"]
    assert "Deployment fleet-worker-io not found in namespace fleet" in message
    assert "kubectl apply -k k8s/base" in message
    assert len(k8s_api.calls("GET", deployment_path("io"))) == 1  # a 404 is not retried
    with pytest.raises(BackendError) as err:
        k8s.scale("io", 1, [])
    assert "Deployment fleet-worker-io not found" in str(err.value)


@pytest.mark.parametrize(("verb", "resource", "action", "where"), [
    ("get", "deployments", "scale up", "in namespace fleet"),
    ("patch", "deployments/scale", "scale up", "in namespace fleet"),
    ("list", "pods", "scale down", "in namespace fleet"),
    ("patch", "pods", "scale down", "in namespace fleet"),
    ("list", "nodes", "budget", "cluster-wide"),
])
def test_forbidden_names_the_missing_permission(shipped, k8s_api, verb, resource, action,
                                                where):
    add_deployments(k8s_api, shipped, heavy=2)
    busy = k8s_api.pod_names(NS, deployment("heavy"))[1]
    k8s_api.forbid(verb, resource)
    k8s = backend(shipped, k8s_api)
    with pytest.raises(BackendError) as err:
        if action == "scale up":
            k8s.scale("heavy", 3, [])
        elif action == "scale down":
            k8s.scale("heavy", 1, [sample("heavy", busy, active=1)])
        else:
            k8s.budget()
    message = str(err.value)
    assert f"ServiceAccount may not {verb} {resource} {where}" in message
    # the API server's own words, and where the grant lives
    assert f'cannot {verb} resource "{resource}"' in message
    assert "apply k8s/base" in message
    if action == "budget":
        assert "or set autoscaler.capacity" in message
    assert sum(r.status == 403 for r in k8s_api.requests) == 1  # not retried
    # Nothing changed: no scale request went through after a failed step.
    assert k8s_api.replicas(NS, deployment("heavy")) == 2


def test_a_status_write_between_read_and_patch_is_reread_and_reapplied(shipped, k8s_api):
    """A real 409 with the count unchanged: the Deployment controller wrote its status
    between the list and the patch (it does after every change), so the patch's
    resourceVersion precondition fails; the count is still the fleet's to set."""
    add_deployments(k8s_api, shipped, heavy=1)
    k8s_api.on("GET", LIST_PATH, lambda: k8s_api.touch(NS, deployment("heavy")))
    k8s = backend(shipped, k8s_api)
    assert k8s.replicas()["heavy"] == 1
    k8s.scale("heavy", 3, [])
    calls = [(r.method, r.status) for r in k8s_api.calls(path=scale_path("heavy"))]
    assert calls == [("PATCH", 409), ("GET", 200), ("PATCH", 200)]
    first, second = k8s_api.calls("PATCH")
    assert first.body["metadata"]["resourceVersion"] != \
        second.body["metadata"]["resourceVersion"]
    assert k8s_api.replicas(NS, deployment("heavy")) == 3


def test_a_count_changed_between_read_and_patch_is_left_to_its_writer(shipped, k8s_api):
    """The old behaviour re-applied the fleet's count over a ``kubectl scale`` made
    meanwhile (last writer wins, blindly). Now the 409's re-read sees another count,
    and the fleet leaves it, for the hold, and says so."""
    add_deployments(k8s_api, shipped, heavy=1)
    k8s_api.on("GET", LIST_PATH, lambda: k8s_api.set_replicas(NS, deployment("heavy"), 5))
    k8s = backend(shipped, k8s_api)
    assert k8s.replicas()["heavy"] == 1
    with pytest.raises(BackendError) as err:
        k8s.scale("heavy", 3, [])
    assert str(err.value) == ("deployments/fleet-worker-heavy set to 5 by another writer "
                              "while the fleet scaled it from 1 to 3: left to them")
    calls = [(r.method, r.status) for r in k8s_api.calls(path=scale_path("heavy"))]
    assert calls == [("PATCH", 409), ("GET", 200)]
    assert k8s_api.replicas(NS, deployment("heavy")) == 5
    assert k8s.replicas()["heavy"] == 5
    why = k8s.held()["heavy"]
    assert why.startswith("deployments/fleet-worker-heavy set to 5 by another writer "
                          "while the fleet scaled it from 1 to 3: left alone until ")
    assert why.endswith("(annotate deployments/fleet-worker-heavy "
                        "fleet.io/autoscaling=manual to keep it so)")
    with pytest.raises(BackendError, match="not scaling heavy: deployments/"):
        k8s.scale("heavy", 3, [])
    assert k8s_api.replicas(NS, deployment("heavy")) == 5


def test_a_foreign_write_between_polls_is_noticed_and_held_for_a_while(shipped, k8s_api):
    add_deployments(k8s_api, shipped, heavy=1)
    k8s = backend(shipped, k8s_api)
    k8s.foreign_hold = 1.0
    k8s.replicas()
    k8s.scale("heavy", 2, [])
    assert k8s.replicas()["heavy"] == 2 and k8s.held() == {}  # its own write: no alarm
    k8s_api.set_replicas(NS, deployment("heavy"), 6)  # kubectl scale --replicas 6
    assert k8s.replicas()["heavy"] == 6
    assert k8s.held()["heavy"].startswith("deployments/fleet-worker-heavy set to 6 by "
                                          "another writer (the fleet set 2): left alone "
                                          "until ")
    assert set(k8s.held()) == {"heavy"}  # the others are still the fleet's
    wait_for(lambda: (k8s.replicas(), "heavy" not in k8s.held())[1], 5,
             what="the hold to end")
    k8s.scale("heavy", 4, [])
    assert k8s_api.replicas(NS, deployment("heavy")) == 4


def test_the_manual_control_annotation_hands_a_queue_over_and_back(shipped, k8s_api):
    add_deployments(k8s_api, shipped, io=2)
    k8s_api.annotate(NS, deployment("io"), "fleet.io/autoscaling", "manual")
    k8s = backend(shipped, k8s_api)
    assert k8s.replicas()["io"] == 2
    assert k8s.held() == {"io": "under manual control (annotation fleet.io/autoscaling="
                                "manual on deployments/fleet-worker-io; remove it to hand "
                                "the queue back)"}
    k8s_api.set_replicas(NS, deployment("io"), 7)  # the team's own kubectl scale
    assert k8s.replicas()["io"] == 7 and "manual control" in k8s.held()["io"]
    k8s_api.annotate(NS, deployment("io"), "fleet.io/autoscaling", None)
    assert k8s.replicas()["io"] == 7 and k8s.held() == {}  # the fleet's again, at once
    k8s.scale("io", 1, [])
    assert k8s_api.replicas(NS, deployment("io")) == 1


def test_an_hpa_or_keda_scaledobject_on_a_worker_deployment_owns_it(shipped, k8s_api):
    add_deployments(k8s_api, shipped, heavy=3)
    k8s_api.add_hpa(NS, "keda-hpa-fleet-worker-heavy", deployment("heavy"),
                    labels={"scaledobject.keda.sh/name": "fleet-worker-heavy"})
    k8s_api.add_hpa(NS, "unrelated", "some-other-app")
    k8s = backend(shipped, k8s_api)
    assert k8s.replicas()["heavy"] == 3
    assert k8s.held() == {"heavy": "scaled by HorizontalPodAutoscaler "
                                   "keda-hpa-fleet-worker-heavy (KEDA ScaledObject "
                                   "fleet-worker-heavy), not by the fleet"}
    # Listed once a minute, not at every poll.
    k8s.replicas()
    assert len(k8s_api.calls("GET", HPA_PATH)) == 1


def test_hpas_not_listable_leave_the_fleet_in_charge(shipped, k8s_api, caplog):
    add_deployments(k8s_api, shipped, heavy=1)
    k8s_api.add_hpa(NS, "hpa", deployment("heavy"))
    k8s_api.forbid("list", "horizontalpodautoscalers")
    k8s = backend(shipped, k8s_api)
    with caplog.at_level("WARNING", logger="autoscale.kubernetes"):
        assert k8s.replicas()["heavy"] == 1
        k8s.replicas()
    assert k8s.held() == {}
    assert len(k8s_api.calls("GET", HPA_PATH)) == 1  # asked once, not at every poll
    [warning] = [r.getMessage() for r in caplog.records if "HPA" in r.getMessage()]
    assert "may not list horizontalpodautoscalers" in warning
    assert "will not be noticed" in warning


@pytest.mark.parametrize("status", [409, 500, 503])
def test_injected_errors_are_retried_and_succeed(shipped, k8s_api, status):
    add_deployments(k8s_api, shipped)
    k8s_api.fail(status, path=scale_path("heavy"), method="PATCH", times=2)
    k8s_api.fail(status, path=LIST_PATH, method="GET", times=2)
    k8s = backend(shipped, k8s_api)
    k8s.scale("heavy", 2, [])
    assert k8s_api.replicas(NS, deployment("heavy")) == 2
    assert [r.status for r in k8s_api.calls("PATCH")] == [status, status, 200]
    assert k8s.replicas()["heavy"] == 2
    assert [r.status for r in k8s_api.calls("GET", LIST_PATH)] == [status, status, 200]


def test_too_many_requests_waits_as_told(shipped, k8s_api):
    add_deployments(k8s_api, shipped)
    k8s_api.fail(429, path=LIST_PATH, retry_after=1)
    k8s = backend(shipped, k8s_api, retry=RetryPolicy(attempts=3, first=0.05, cap=1.5,
                                                       total=5))
    started = time.monotonic()
    assert k8s.replicas()["default"] == 0
    # Retry-After (1 s), not the first backoff step (0.05 s)
    assert time.monotonic() - started >= 0.95


def test_retries_stop_within_the_time_budget(shipped, k8s_api):
    add_deployments(k8s_api, shipped)
    k8s_api.fail(500, path=LIST_PATH, times=100, message="etcdserver: timeout")
    started = time.monotonic()
    with pytest.raises(BackendError) as err:
        backend(shipped, k8s_api).replicas()
    assert time.monotonic() - started < FAST.total + 1.0
    assert "after 4 attempts: 500 Internal Server Error: etcdserver: timeout" in \
        str(err.value)
    assert len(k8s_api.calls("GET", LIST_PATH)) == 4


def test_an_unreachable_api_server_is_a_clear_error(shipped, k8s_api):
    add_deployments(k8s_api, shipped)
    k8s = backend(shipped, k8s_api)
    k8s_api.stop()
    started = time.monotonic()
    with pytest.raises(BackendError) as err:
        k8s.replicas()
    assert time.monotonic() - started < FAST.total + 1.0
    message = str(err.value)
    assert f"API server {k8s_api.url} unreachable" in message
    assert "Connection refused" in message and "after 4 attempts" in message
    assert "object at 0x" not in message
    k8s_api.start()
    assert k8s.replicas()["default"] == 0


def test_budget_is_the_allocatable_of_nodes_workers_can_use(shipped, k8s_api):
    k8s_api.add_node("n1", cpu="3800m", memory="16Gi")
    k8s_api.add_node("n2", cpu="4", memory="16386732Ki")
    k8s_api.add_node("n3", cpu="8", memory="32Gi", taints=[
        {"key": "example.com/spot", "effect": "PreferNoSchedule"}])  # a preference only
    k8s_api.add_node("cordoned", cpu="8", memory="32Gi", unschedulable=True)
    k8s_api.add_node("control-plane", cpu="2", memory="8Gi", taints=[
        {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}])
    k8s = backend(shipped, k8s_api)
    assert k8s.budget() == Budget(cpu=15.8, memory=(16 + 32) * 2**30 + 16386732 * 1024)
    k8s.budget()
    assert len(k8s_api.calls("GET", "/api/v1/nodes")) == 1  # cached


def test_under_a_node_autoscaler_todays_nodes_are_no_budget(shipped, k8s_api):
    """Cluster Autoscaler or Karpenter add nodes for pending pods: with budget_from_nodes
    off the nodes are not even listed, and the budget is what queues.yaml says."""
    k8s_api.add_node("n1", cpu="2", memory="8Gi")
    config = shipped.model_copy(update={"autoscaler": shipped.autoscaler.model_copy(update={
        "kubernetes": shipped.autoscaler.kubernetes.model_copy(update={
            "budget_from_nodes": False})})})
    assert backend(config, k8s_api).budget() == Budget(None, None)
    assert not k8s_api.calls("GET", "/api/v1/nodes")
    assert backend(shipped, k8s_api).budget() == Budget(cpu=2.0, memory=8 * 2**30)


def test_kubeconfig_credentials_are_used(shipped, k8s_api, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    add_deployments(k8s_api, shipped, heavy=1)
    k8s_api.token = TOKEN
    good = write_kubeconfig(tmp_path / "good", k8s_api.url, TOKEN)
    bad = write_kubeconfig(tmp_path / "bad", k8s_api.url, "stolen")
    assert KubernetesBackend(shipped, kubeconfig_path=str(good)).replicas()["heavy"] == 1
    with pytest.raises(BackendError, match="rejected the credentials"):
        KubernetesBackend(shipped, kubeconfig_path=str(bad), retry=FAST).replicas()


def serviceaccount(directory, ca, token: str):
    """What the kubelet mounts in a pod: the token and the cluster's CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    (directory / "token").write_text(token)
    return directory


def test_in_cluster_over_https_with_the_pods_token_rotated(shipped, tmp_path, monkeypatch):
    """load_incluster_config's path for real: HTTPS to an API server whose certificate a
    throwaway CA signed, the ServiceAccount's CA and token from their files, the address
    from KUBERNETES_SERVICE_HOST/PORT; then the kubelet rotates the token and the old one
    is refused: the backend reads the new one at once instead of failing for a minute."""
    import ssl

    import trustme

    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    fake = FakeKubernetes(free_port(), token="token-one", tls=server).start()
    try:
        fake.grants = grants_of(kustomized("base"))
        add_deployments(fake, shipped, heavy=2)
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(fake.port))
        mounted = serviceaccount(tmp_path / "sa", ca, "token-one")
        k8s = KubernetesBackend(shipped, retry=FAST, serviceaccount=mounted)
        assert k8s.api.configuration.host == f"https://127.0.0.1:{fake.port}"
        assert k8s.replicas()["heavy"] == 2
        assert all(r.status == 200 for r in fake.requests)

        fake.token = "token-two"  # the old token expired; the kubelet wrote the new one
        (mounted / "token").write_text("token-two")
        mark = len(fake.requests)
        k8s.scale("heavy", 3, [])
        assert fake.replicas(NS, deployment("heavy")) == 3
        assert [r.status for r in fake.requests[mark:]][:2] == [401, 200]

        # A CA that did not sign the server's certificate: refused, and said so.
        other = serviceaccount(tmp_path / "other", trustme.CA(), "token-two")
        with pytest.raises(BackendError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
            KubernetesBackend(shipped, retry=FAST, serviceaccount=other).replicas()
    finally:
        fake.stop()


def test_no_cluster_and_no_kubeconfig_is_a_clear_error(shipped, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    missing = tmp_path / "nowhere" / "config"
    with pytest.raises(BackendError) as err:
        KubernetesBackend(shipped, kubeconfig_path=str(missing))
    message = str(err.value)
    assert "not inside a cluster" in message and str(missing) in message
    assert "set KUBECONFIG" in message


def write_kubeconfig(directory, server: str, token: str):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "autoscaler", "user": {"token": token}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "autoscaler",
                                                   "namespace": NS}}],
    }))
    return path


# -- the whole loop: real Redis (the test's prefix), the fake API server -----------------


def autoscaler(fleet, redis_client, k8s_api, reports: list, config=None, **kw) -> Autoscaler:
    config = config or fleet.config
    return Autoscaler(config, RedisMetrics(config, redis_client),
                      backend(config, k8s_api), report=reports.append, **kw)


def after_backlog(fleet, scaler: Autoscaler, *, tasks: int, polls: int) -> dict:
    """Send ``tasks`` heavy and io tasks, run ``polls`` passes; the last decisions."""
    app = fleet.app()
    for i in range(tasks):
        app.send_task("tasks.heavy.crunch", kwargs={"n": i})
        app.send_task("tasks.io.fetch", kwargs={"url": "http://example.invalid/"})
    for _ in range(polls):
        decisions = {d.queue: d for d in scaler.run_once()}
    return decisions


def test_the_loop_scales_a_queue_when_a_backlog_appears(fleet, redis_client, k8s_api):
    add_deployments(k8s_api, fleet.config, default=1)
    reports: list[str] = []
    scaler = autoscaler(fleet, redis_client, k8s_api, reports)
    scaler.run_once()
    assert not k8s_api.calls("PATCH"), reports  # nothing to do yet
    app = fleet.app()
    for i in range(3):
        app.send_task("tasks.heavy.crunch", kwargs={"n": i})
    decisions = {d.queue: d for d in scaler.run_once()}
    assert decisions["heavy"].desired == 3
    [patch] = k8s_api.calls("PATCH", scale_path("heavy"))
    assert patch.body["spec"]["replicas"] == 3 and patch.status == 200
    assert len(k8s_api.pod_names(NS, deployment("heavy"))) == 3
    assert any(r.startswith("scaling heavy: 0 -> 3") for r in reports), reports


def test_the_loop_spares_busy_workers_on_scale_down(fleet, redis_client, k8s_api):
    add_deployments(k8s_api, fleet.config, default=1, heavy=3)
    old, busy1, busy2 = k8s_api.pod_names(NS, deployment("heavy"))
    publish_samples(redis_client, fleet.config, [
        sample("heavy", old), sample("heavy", busy1, active=1),
        sample("heavy", busy2, active=1)])
    reports: list[str] = []
    decisions = {d.queue: d for d in autoscaler(fleet, redis_client, k8s_api,
                                                reports).run_once()}
    assert (decisions["heavy"].current, decisions["heavy"].desired) == (3, 2), reports
    # Without the annotations the controller would have removed busy2, the newest.
    assert k8s_api.pod_names(NS, deployment("heavy")) == [busy1, busy2]
    assert k8s_api.deleted_pods == [old]


def test_the_loop_holds_a_queue_whose_deployment_is_gone_and_scales_the_others(
        fleet, redis_client, k8s_api):
    for queue in ("default", "heavy", "xl"):
        k8s_api.add_deployment(NS, deployment(queue), replicas=int(queue == "default"),
                               labels=worker_labels(queue))
    k8s_api.add_deployment(NS, deployment("io"), replicas=2, labels=worker_labels("io"))
    reports: list[str] = []
    scaler = autoscaler(fleet, redis_client, k8s_api, reports)
    io_before = {d.queue: d for d in scaler.run_once()}["io"].desired
    mark = len(k8s_api.requests)
    del k8s_api.deployments[(NS, deployment("io"))]  # kubectl delete, meanwhile
    decisions = after_backlog(fleet, scaler, tasks=2, polls=2)
    assert decisions["heavy"].desired == 2 and k8s_api.replicas(NS, deployment("heavy")) == 2
    io = decisions["io"]
    assert (io.current, io.desired) == (io_before, io_before), io  # last read, not 0
    assert io_before > 0
    assert io.reason.startswith("replicas not read (Deployment fleet-worker-io not found "
                                "in namespace fleet"), io.reason
    assert io.reason.endswith("): held")
    assert not k8s_api.calls("PATCH", scale_path("io"), since=mark)
    # Said once over the two polls, not at every poll; and said again when it is back.
    assert sum(r.startswith("io: replicas not read (Deployment fleet-worker-io not found")
               for r in reports) == 1, reports
    k8s_api.add_deployment(NS, deployment("io"), replicas=0, labels=worker_labels("io"))
    decisions = {d.queue: d for d in scaler.run_once()}
    assert "io: scaled by the fleet again" in reports
    assert decisions["io"].desired >= 1 and k8s_api.replicas(NS, deployment("io")) >= 1


def test_the_loop_leaves_a_kubectl_scale_alone_and_the_dashboard_says_why(
        fleet, redis_client, k8s_api, tmp_path):
    from fleet.dashboard.sampler import Sampler
    from fleet.dashboard.store import Store
    from fleet.keys import latest_decisions_key

    add_deployments(k8s_api, fleet.config, default=1)
    reports: list[str] = []
    scaler = autoscaler(fleet, redis_client, k8s_api, reports)
    app = fleet.app()
    app.send_task("tasks.heavy.crunch")
    scaler.run_once()
    assert k8s_api.replicas(NS, deployment("heavy")) == 1
    k8s_api.set_replicas(NS, deployment("heavy"), 4)  # a platform engineer, by hand
    mark = len(k8s_api.requests)
    for _ in range(3):  # one task, four replicas: the policy alone would scale down
        decisions = {d.queue: d for d in scaler.run_once()}
    heavy = decisions["heavy"]
    assert (heavy.current, heavy.desired) == (4, 4), heavy
    assert heavy.reason.startswith("deployments/fleet-worker-heavy set to 4 by another "
                                   "writer (the fleet set 1): left alone until "), heavy
    assert not k8s_api.calls("PATCH", scale_path("heavy"), since=mark)
    assert k8s_api.replicas(NS, deployment("heavy")) == 4
    assert sum("set to 4 by another writer" in r for r in reports) == 1, reports
    latest = json.loads(redis_client.hget(latest_decisions_key(fleet.config), "heavy"))
    assert latest["reason"] == heavy.reason
    sampler = Sampler(fleet.config, redis_client, Store(f"sqlite:///{tmp_path}/dash.sqlite"))
    shown = sampler.poll().replicas["heavy"]
    assert "by another writer (the fleet set 1): left alone until" in shown["reason"], shown


def test_the_loop_scales_through_constant_status_writes_without_a_false_alarm(
        fleet, redis_client, k8s_api):
    """Every third request is followed by the controllers' status writes to every
    Deployment: patches meet 409s, are re-read and re-applied (the count unchanged), and
    no queue is taken for someone else's."""
    add_deployments(k8s_api, fleet.config, default=1)
    k8s_api.status_churn = 3
    reports: list[str] = []
    scaler = autoscaler(fleet, redis_client, k8s_api, reports)
    decisions = after_backlog(fleet, scaler, tasks=4, polls=4)
    assert k8s_api.replicas(NS, deployment("heavy")) == 4, reports
    assert k8s_api.replicas(NS, deployment("io")) >= 1, reports
    assert not any("another writer" in d.reason or "not read" in d.reason
                   for d in decisions.values()), decisions
    assert not any("could not scale" in r for r in reports), reports
    conflicts = [r for r in k8s_api.requests if r.status == 409]
    assert conflicts  # the churn did bite, and each 409 was re-read and then written
    for r in conflicts:
        reread, again = k8s_api.requests[r.index + 1: r.index + 3]
        assert (reread.method, reread.path) == ("GET", r.path), reread
        assert (again.method, again.path) == ("PATCH", r.path), again


def test_every_request_takes_a_token_from_the_rate_limit(shipped, k8s_api):
    from autoscale.backends.token_bucket import TokenBucket

    add_deployments(k8s_api, shipped)
    limiter = TokenBucket(qps=10, burst=1)
    k8s = backend(shipped, k8s_api, limiter=limiter)
    started = time.monotonic()
    k8s.replicas()
    for n in (1, 2, 3):
        k8s.scale("heavy", n, [])
    took = time.monotonic() - started
    # the list, a patch, then a read and a patch for each later change (the first
    # patch's own status writes made what the list read stale)
    assert [r.method for r in k8s_api.requests] == ["GET", "GET", "PATCH"] + \
        ["GET", "PATCH"] * 2
    assert all(r.status == 200 for r in k8s_api.requests)
    # burst 1 at 10/s: the six requests after the first waited for a token each, so the
    # seven took at least 0.6 s however fast the server answered
    assert took >= 0.58 and limiter.waited > 0, (took, limiter.waited)


def test_the_capacity_budget_comes_from_the_nodes_when_queues_yaml_has_none(
        fleet, redis_client, k8s_api):
    config = fleet.config.model_copy(update={"autoscaler": fleet.config.autoscaler
                                             .model_copy(update={"capacity": Capacity()})})
    add_deployments(k8s_api, config, default=1)
    k8s_api.add_node("n1", cpu="1500m", memory="64Gi")
    k8s_api.add_node("n2", cpu="1", memory="64Gi")
    app = fleet.app()
    for i in range(5):
        app.send_task("tasks.heavy.crunch", kwargs={"n": i})
    reports: list[str] = []
    decisions = {d.queue: d for d in autoscaler(fleet, redis_client, k8s_api, reports,
                                                config=config).run_once()}
    # 2.5 cores: default's 0.25 plus two heavy replicas of 1 core; a third won't fit.
    assert decisions["heavy"].desired == 2
    assert "capped at 2 by the capacity budget (cpu 2.5" in decisions["heavy"].reason
    assert k8s_api.replicas(NS, deployment("heavy")) == 2
    # With capacity in queues.yaml, nodes are not even listed.
    mark = len(k8s_api.requests)
    autoscaler(fleet, redis_client, k8s_api, reports).run_once()
    assert not k8s_api.calls("GET", "/api/v1/nodes", since=mark)


def test_a_held_queues_replicas_still_take_their_share_of_the_budget(fleet, redis_client,
                                                                    k8s_api):
    """heavy is an HPA's, at 2 replicas of 1 core each: with a 3.25-core budget and
    default's 0.25, io (0.1 core a replica) gets at most what is left, 1 core."""
    config = fleet.configure({"autoscaler": {"capacity": {"cpu": "3250m",
                                                          "memory": "64Gi"}},
                              "queues": {"io": {"autoscaling": {"max_replicas": 40}}}})
    add_deployments(k8s_api, config, default=1, heavy=2)
    k8s_api.add_hpa(NS, "heavy-hpa", deployment("heavy"))
    app = fleet.app()
    for _ in range(400):
        app.send_task("tasks.io.fetch", kwargs={"url": "http://example.invalid/"})
    reports: list[str] = []
    decisions = {d.queue: d for d in autoscaler(fleet, redis_client, k8s_api, reports,
                                                config=config).run_once()}
    assert decisions["heavy"].reason.startswith("scaled by HorizontalPodAutoscaler")
    assert decisions["io"].desired == 10, decisions["io"]  # 1 core / 0.1: it asks for 13
    assert "capped at 10 by the capacity budget" in decisions["io"].reason


def test_a_scale_request_arrives_within_two_passes_of_the_backlog(fleet, redis_client,
                                                                  k8s_api):
    add_deployments(k8s_api, fleet.config, default=1)
    reports: list[str] = []
    scaler = autoscaler(fleet, redis_client, k8s_api, reports)
    stop = threading.Event()
    thread = threading.Thread(target=scaler.run, args=(stop, 0.3), daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(k8s_api.calls("GET", LIST_PATH)) >= 2, 15,
                 what="two passes of the loop")
        assert not k8s_api.calls("PATCH"), reports
        mark = len(k8s_api.requests)
        # One message: a pass polling between two publishes would ask for one replica.
        fleet.app().send_task("tasks.heavy.crunch")
        [patch] = wait_for(lambda: k8s_api.calls("PATCH", scale_path("heavy"), since=mark),
                           15, what="the scale request")
        assert patch.body["spec"]["replicas"] == 1
        # Counted in passes, not seconds (a loaded machine stretches seconds): the pass
        # under way when the messages landed, and at most the next one.
        passes = [r for r in k8s_api.calls("GET", LIST_PATH, since=mark)
                  if r.index < patch.index]
        assert 1 <= len(passes) <= 2, passes
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


@pytest.mark.slow
def test_the_loop_rides_out_api_errors_and_an_outage(fleet, redis_client, k8s_api):
    add_deployments(k8s_api, fleet.config, default=1)
    reports: list[tuple[float, str]] = []
    config = fleet.config
    scaler = Autoscaler(config, RedisMetrics(config, redis_client), backend(config, k8s_api),
                        report=lambda line: reports.append((time.monotonic(), line)))
    stop = threading.Event()
    thread = threading.Thread(target=scaler.run, args=(stop, 0.2), daemon=True)
    k8s_api.stop()
    thread.start()
    try:
        app = fleet.app()
        app.send_task("tasks.heavy.crunch")

        def failures() -> list[float]:
            return [t for t, line in reports if "unreachable" in line]

        wait_for(lambda: len(failures()) >= 4, 20, what="four failed passes")
        assert thread.is_alive()
        line = next(line for _, line in reports if "unreachable" in line)
        assert line.startswith("backend error (could not list deployments in namespace "
                               f"fleet after 4 attempts: API server {k8s_api.url} "
                               "unreachable"), line
        assert "retrying in" in line
        # The loop backs off: the passes drift apart (waits 0.4, 0.8, 1.6 s, doubling).
        t = failures()
        assert t[3] - t[2] > (t[1] - t[0]) + 0.5, t
        k8s_api.start()
        [patch] = wait_for(lambda: k8s_api.calls("PATCH", scale_path("heavy")), 15,
                           what="a scale request once the API server is back")
        assert patch.body["spec"]["replicas"] == 1 and patch.status == 200

        # Errors on every read for a while (4 attempts per pass): reported, not fatal.
        k8s_api.fail(500, path=LIST_PATH, method="GET", times=8)
        wait_for(lambda: any("500 Internal Server Error" in line for _, line in reports), 15,
                 what="the 500s to be reported")
        app.send_task("tasks.io.fetch", kwargs={"url": "http://example.invalid/"})
        [patch] = wait_for(lambda: k8s_api.calls("PATCH", scale_path("io")), 15,
                           what="a scale request after the 500s")
        assert patch.body["spec"]["replicas"] == 1
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_the_loop_rides_out_a_redis_outage(fleet, k8s_api, tmp_path):
    from tests.fakes.redis_server import PersistentRedis

    server = PersistentRedis(tmp_path / "redis").start()
    stop = threading.Event()
    thread = None
    try:
        config = fleet.configure({"broker": {"url": server.url}})
        add_deployments(k8s_api, config, default=1)
        client = redis.Redis.from_url(server.url)
        reports: list[str] = []
        scaler = autoscaler(fleet, client, k8s_api, reports, config=config)
        thread = threading.Thread(target=scaler.run, args=(stop, 0.2), daemon=True)
        thread.start()
        wait_for(lambda: len(k8s_api.calls("GET", LIST_PATH)) >= 1, 15,
                 what="a first pass")
        server.stop()
        wait_for(lambda: sum(r.startswith("Redis unreachable") for r in reports) >= 2, 20,
                 what="the outage to be reported twice")
        assert thread.is_alive()
        server.start()
        fleet.app().send_task("tasks.heavy.crunch")
        [patch] = wait_for(lambda: k8s_api.calls("PATCH", scale_path("heavy")), 20,
                           what="a scale request once Redis is back")
        assert patch.body["spec"]["replicas"] == 1
    finally:
        stop.set()
        if thread is not None:
            thread.join(10)
        server.stop()
    assert thread is not None and not thread.is_alive()


# -- the CLI -----------------------------------------------------------------------------


def run_cli(fleet, kubeconfig, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in fleet.env.items() if not k.startswith("KUBERNETES_")}
    env.update(KUBECONFIG=str(kubeconfig), FLEET_CONFIG=str(fleet.config_path))
    return subprocess.run([sys.executable, "-m", "fleet.cli", "autoscale", *args],
                          env=env, cwd=fleet.tmp_path, capture_output=True, text=True,
                          timeout=60)


def test_cli_dry_run_prints_the_plan_and_changes_nothing(fleet, redis_client, k8s_api,
                                                         tmp_path):
    add_deployments(k8s_api, fleet.config, default=3)
    k8s_api.token = TOKEN
    kubeconfig = write_kubeconfig(tmp_path / "kube", k8s_api.url, TOKEN)
    idle1, busy, idle2 = k8s_api.pod_names(NS, deployment("default"))
    publish_samples(redis_client, fleet.config, [
        sample("default", idle1), sample("default", busy, active=1),
        sample("default", idle2)])
    app = fleet.app()
    for i in range(3):
        app.send_task("tasks.heavy.crunch", kwargs={"n": i})

    done = run_cli(fleet, kubeconfig, "--backend", "kubernetes", "--once", "--dry-run")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "would scale default: 3 -> 2" in out, out
    assert (f"  would set pod {busy}: {DELETION_COST} unset -> 1000 (1 task held)"
            in out), out
    assert ("  would patch deployments/fleet-worker-default/scale in fleet: replicas "
            "3 -> 2") in out
    assert "would scale heavy: 0 -> 3" in out
    assert ("  would patch deployments/fleet-worker-heavy/scale in fleet: replicas "
            "0 -> 3") in out
    # A dry run reads (with the kubeconfig's token) and writes nothing.
    assert k8s_api.requests and all(r.status == 200 for r in k8s_api.requests)
    assert {r.method for r in k8s_api.requests} == {"GET"}
    assert k8s_api.replicas(NS, deployment("default")) == 3
    assert k8s_api.annotation(NS, busy) is None


def test_cli_reports_an_unreachable_api_server_in_one_line(fleet, k8s_api, tmp_path):
    kubeconfig = write_kubeconfig(tmp_path / "kube", k8s_api.url, TOKEN)
    k8s_api.stop()
    done = run_cli(fleet, kubeconfig, "--backend", "kubernetes", "--once")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("fleet: error: could not list deployments in namespace fleet "
                           "after 4 attempts: API server "), line
    assert "Connection refused" in line


def test_cli_reports_missing_deployments_in_one_line(fleet, k8s_api, tmp_path):
    kubeconfig = write_kubeconfig(tmp_path / "kube", k8s_api.url, TOKEN)
    done = run_cli(fleet, kubeconfig, "--backend", "kubernetes", "--once")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        "fleet: error: Deployment fleet-worker-default not found in namespace fleet: apply "
        "the worker Deployments (kubectl apply -k k8s/base), or make "
        "autoscaler.kubernetes.namespace/deployment in queues.yaml name them (and 3 "
        "other queues unread)")


def test_the_fake_answers_a_stale_resource_version_with_409(k8s_api):
    """The fake's precondition check, through the client: what makes the conflict test
    above a real one."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    k8s_api.grants = None  # the fake's own semantics: PUT is a call the Role does not grant
    k8s_api.add_deployment(NS, "w", replicas=1)
    apps = client.AppsV1Api(k8s_api.api_client())
    stale = apps.read_namespaced_deployment_scale("w", NS).metadata.resource_version
    k8s_api.set_replicas(NS, "w", 2)
    with pytest.raises(ApiException) as err:
        apps.patch_namespaced_deployment_scale(
            "w", NS, {"metadata": {"resourceVersion": stale}, "spec": {"replicas": 4}})
    assert err.value.status == 409
    assert k8s_api.replicas(NS, "w") == 2
    fresh = apps.read_namespaced_deployment_scale("w", NS).metadata.resource_version
    apps.patch_namespaced_deployment_scale(
        "w", NS, [{"op": "replace", "path": "/spec/replicas", "value": 4}])
    assert k8s_api.replicas(NS, "w") == 4 and fresh != stale
    # PUT (replace) honours the same precondition.
    scale = apps.read_namespaced_deployment_scale("w", NS)
    scale.metadata.resource_version = stale
    scale.spec.replicas = 0
    with pytest.raises(ApiException) as err:
        apps.replace_namespaced_deployment_scale("w", NS, scale)
    assert err.value.status == 409
    scale.metadata.resource_version = fresh_again = apps.read_namespaced_deployment_scale(
        "w", NS).metadata.resource_version
    assert apps.replace_namespaced_deployment_scale("w", NS, scale).spec.replicas == 0
    assert k8s_api.replicas(NS, "w") == 0 and not k8s_api.pod_names(NS, "w")
    assert fresh_again != fresh
