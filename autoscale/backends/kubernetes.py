"""The Kubernetes backend: each queue's worker Deployment, through its scale subresource.

API calls (and the RBAC rule each needs; k8s/base/autoscaler.yaml grants exactly these):

- ``GET  apis/apps/v1/namespaces/NS/deployments?labelSelector=...`` (list deployments):
  once per poll, every worker Deployment (the labels ``fleet render k8s`` gives them):
  each queue's replicas, its pod selector and the resourceVersion a change is made
  against. One request however many queues (a GET per queue was 100 requests a poll at
  100 queues). A queue whose Deployment the list does not hold (unlabelled, or missing)
  is read with a GET of its own (get deployments); if that fails too, that queue alone
  is held for the poll, with the reason (``unread``), and the others still scale. If
  listing is forbidden (an older Role), every queue is read with its own GET.
- ``PATCH .../deployments/NAME/scale`` (patch deployments/scale): a JSON merge patch of
  ``spec.replicas`` carrying that resourceVersion, so a count changed meanwhile by someone
  else (``kubectl scale``, a second autoscaler) comes back as 409 instead of being
  overwritten unseen; the backend then re-reads the scale (get deployments/scale). The
  subresource, not the Deployment: this role cannot change a pod template.
- ``GET  api/v1/namespaces/NS/pods?labelSelector=...`` (list pods) and
  ``PATCH api/v1/namespaces/NS/pods/POD`` (patch pods): before a scale-down, each pod's
  ``controller.kubernetes.io/pod-deletion-cost``. The ReplicaSet controller, not the
  autoscaler, picks which pods a scale-down removes; among running, ready pods it removes
  the lowest cost first. Busy workers (tasks running or held, from their own reports in
  Redis) get a cost proportional to what they hold, idle ones 0, so idle workers go first.
  A pod that turns busy between the annotation and the controller's choice can still be
  picked: its warm shutdown and grace period (k8s/base/workers.yaml) cover that case.
  Only pods whose cost changes are patched; Kubernetes advises against frequent updates.
- ``GET  api/v1/nodes`` (list nodes, cluster-wide): the capacity budget from the nodes'
  allocatable when queues.yaml's ``autoscaler.capacity`` leaves CPU or memory out.

- ``GET  apis/autoscaling/v2/namespaces/NS/horizontalpodautoscalers`` (list
  horizontalpodautoscalers): at start and every minute, to find an HPA that targets a
  worker Deployment (KEDA makes one per ScaledObject). Such a queue is the HPA's: the
  fleet reads its count and does not write it.

Who owns the count: the fleet, unless the Deployment is annotated
``fleet.io/autoscaling: manual`` (handed to manual control), an HPA targets it, or its
count is not the one the fleet last wrote (``kubectl scale``, another autoscaler); then
the queue is held, with that reason in its decision, for as long as the annotation or
the HPA is there, or for ``autoscaler.kubernetes.foreign_write_hold`` after a foreign
write. A 409 on the scale patch is re-applied only if the count is still the one the
decision was made on (a status write moved the resourceVersion); a changed count is a
foreign write.

So a quiet poll is one request, a scale-up one more, a scale-down two more plus a patch
per pod whose cost changes. Every request first takes a token from a client-side rate
limit (``autoscaler.kubernetes.api_qps`` / ``api_burst``, client-go's token bucket).
Every call is retried with backoff (doubling, capped, within a few seconds in all so the
loop is not held up) on connection errors, 409, 429 (Retry-After, capped) and 5xx; 401,
403 and 404 fail at once with a BackendError that says what to fix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import urllib3

from autoscale.backends.base import BackendContext, BackendError, BackendPlugin
from autoscale.backends.token_bucket import TokenBucket

try:
    from kubernetes import client as k8s
    from kubernetes import config as kubeconfig
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.config.incluster_config import InClusterConfigLoader
    from kubernetes.utils.quantity import parse_quantity
except ImportError as exc:  # an optional extra: say how to get it, not a traceback
    raise BackendError(f"the Kubernetes backend needs the kubernetes client ({exc}): "
                       f"pip install 'fleet[k8s]'") from None

from autoscale.policy import Budget
from fleet.config import FleetConfig
from fleet.observe.model import WorkerSample
from fleet.render.k8s import LABEL_COMPONENT, LABEL_NAME, deployment_name

logger = logging.getLogger("autoscale.kubernetes")

T = TypeVar("T")

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
#: Cost per task a worker holds (running or prefetched); idle workers get IDLE_COST,
#: the same as a pod without the annotation.
BUSY_COST = 1000
IDLE_COST = 0
#: The annotation is an int32 (the API server rejects anything else).
MAX_COST = 2**31 - 1

#: RFC 7386: understood for every resource, built-in or not; null deletes a key.
MERGE_PATCH = "application/merge-patch+json"

#: What RBAC k8s/base grants, named in 403 messages.
RBAC_HINT = ("apply k8s/base: Role fleet-autoscaler grants get/list deployments, get/patch "
             "deployments/scale, list/patch pods and list horizontalpodautoscalers in "
             "the namespace; ClusterRole "
             "fleet-autoscaler-nodes grants list nodes")
#: Taints that keep worker pods (which carry no tolerations) off a node.
BLOCKING_TAINTS = {"NoSchedule", "NoExecute"}
#: Node allocatable changes rarely; list nodes at most this often (seconds).
BUDGET_TTL = 60.0
#: Every worker Deployment ``fleet render k8s`` writes carries these labels (and its
#: queue's): the one LIST per poll selects by them.
WORKERS = f"{LABEL_COMPONENT}=worker,{LABEL_NAME}=fleet"
#: ``kubectl annotate deployment NAME fleet.io/autoscaling=manual`` hands a queue to
#: manual control; ``fleet.io/autoscaling-`` gives it back.
CONTROL = "fleet.io/autoscaling"
MANUAL = "manual"
#: HPAs come and go rarely; list them at most this often (seconds).
OWNERS_TTL = 60.0
#: The label KEDA puts on the HPA it makes for a ScaledObject.
KEDA_OWNER = "scaledobject.keda.sh/name"


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for one API call: ``first``, doubling, at most ``cap`` between attempts,
    and no new attempt once ``total`` seconds have gone by."""

    attempts: int = 4
    first: float = 0.25
    cap: float = 2.0
    total: float = 6.0

    def delays(self) -> Iterable[float]:
        delay = self.first
        for _ in range(self.attempts - 1):
            yield delay
            delay = min(self.cap, delay * 2)


@dataclass(frozen=True)
class Listed:
    """What this poll read of one queue's Deployment: enough to scale it without a GET."""

    replicas: int
    version: str | None
    selector: Any  # V1LabelSelector (None if the Deployment has none)
    control: str | None = None  # its fleet.io/autoscaling annotation
    uid: str | None = None  # a Deployment deleted and made again is another object

    @classmethod
    def of(cls, deployment: Any) -> Listed:
        meta = deployment.metadata
        return cls(deployment.spec.replicas or 0, meta.resource_version,
                   deployment.spec.selector, (meta.annotations or {}).get(CONTROL), meta.uid)


@dataclass(frozen=True)
class CostChange:
    """One pod's pod-deletion-cost, before (None: unset) and after."""

    pod: str
    old: str | None
    new: int
    busy: int

    def __str__(self) -> str:
        held = f"{self.busy} task{'s' if self.busy != 1 else ''} held" if self.busy \
            else "idle"
        return (f"pod {self.pod}: {DELETION_COST} {self.old or 'unset'} -> {self.new} "
                f"({held})")


def held(workers: Iterable[WorkerSample]) -> Counter[str]:
    """Tasks held (running or prefetched) per pod, from the workers' own reports."""
    busy: Counter[str] = Counter()
    for w in workers:
        busy[w.pod] += w.active + w.reserved
    return busy


def deletion_costs(pods: Iterable[str], workers: Iterable[WorkerSample]) -> dict[str, int]:
    """The pod-deletion-cost each pod should have: busy ones in proportion to the tasks
    their workers hold, idle (or not reporting) ones IDLE_COST."""
    busy = held(workers)
    return {pod: min(MAX_COST, BUSY_COST * busy[pod]) if busy[pod] > 0 else IDLE_COST
            for pod in pods}


_PHASES = {"Pending": 0, "Unknown": 1, "Running": 2}
TEMPLATE_HASH = "pod-template-hash"


def _rank_key(pod: Any, cost: int) -> tuple[int, int, int, int]:
    """The first keys of the ReplicaSet controller's deletion ranking (controller_utils.go
    ActivePodsWithRanks): unassigned, then Pending < Unknown < Running, then not ready,
    then the deletion cost; lower goes first."""
    status = pod.status
    ready = any(c.type == "Ready" and c.status == "True"
                for c in (status.conditions if status is not None else None) or [])
    return (int(bool(pod.spec.node_name)),
            _PHASES.get(status.phase if status is not None else "Pending", 0),
            int(ready), cost)


def safe_decrease(pods: list[Any], costs: dict[str, int], busy: Counter[str],
                  wanted: int) -> tuple[int, str | None]:
    """How many pods a scale-down by ``wanted`` may remove without the ReplicaSet
    controller choosing a busy one, given the deletion costs about to be set; and why
    fewer, if fewer.

    The cost is only the controller's fourth key: a busy pod that is not ready (or not
    Running) goes before every ready idle pod, whatever its cost, so only idle pods that
    rank before each such busy pod are safe to remove. And it ranks within one
    ReplicaSet: during a rollout (live pods of two templates) the Deployment controller
    first shares the decrease among them, so no cost can keep a busy pod; then the
    scale-down waits for the rollout to end."""
    live = [p for p in pods if p.metadata.deletion_timestamp is None]
    busy_pods = [p for p in live if busy[p.metadata.name] > 0]
    if not busy_pods:
        return wanted, None
    templates = {(p.metadata.labels or {}).get(TEMPLATE_HASH) for p in live}
    if len(templates) > 1:
        return 0, (f"a rollout is under way (pods of {len(templates)} ReplicaSets, "
                   f"{len(busy_pods)} busy): the ReplicaSet controller ranks each set's pods "
                   f"apart, so the deletion cost cannot spare a busy one; the scale-down "
                   f"waits for the rollout")
    keys = {p.metadata.name: _rank_key(p, costs.get(p.metadata.name, 0)) for p in live}
    exposed = [p for p in busy_pods if keys[p.metadata.name][:3] != (1, 2, 1)]
    if not exposed:
        return wanted, None
    idle = [p for p in live if busy[p.metadata.name] == 0]
    first = [p for p in idle
             if all(keys[p.metadata.name] < keys[b.metadata.name] for b in exposed)]
    allowed = min(wanted, len(first))
    if allowed == wanted:
        return wanted, None
    names = ", ".join(sorted(p.metadata.name for p in exposed))
    return allowed, (f"busy pod {names} is not ready (or not running): the ReplicaSet "
                     f"controller removes such pods before it looks at the deletion cost, "
                     f"so only {allowed} of the {wanted} fewer replicas can go without it")


def label_selector(selector: Any) -> str:
    """A V1LabelSelector as the ``labelSelector`` query string."""
    parts = [f"{k}={v}" for k, v in sorted((selector.match_labels or {}).items())]
    for req in selector.match_expressions or []:
        values = ",".join(req.values or [])
        op = req.operator
        if op == "In":
            parts.append(f"{req.key} in ({values})")
        elif op == "NotIn":
            parts.append(f"{req.key} notin ({values})")
        elif op == "Exists":
            parts.append(req.key)
        elif op == "DoesNotExist":
            parts.append(f"!{req.key}")
        else:
            raise BackendError(f"unknown label selector operator {op!r}")
    return ",".join(parts)


#: Set from the downward API in the autoscaler's pod (k8s/base/autoscaler.yaml).
NAMESPACE_ENV = "FLEET_K8S_NAMESPACE"


def namespace_of(config: FleetConfig) -> str:
    """The namespace the autoscaler runs in, inside a cluster (so an overlay that moves
    the fleet moves what it scales); queues.yaml's outside it."""
    return os.environ.get(NAMESPACE_ENV) or config.autoscaler.kubernetes.namespace


#: Where the kubelet mounts the pod's ServiceAccount token and the cluster's CA.
SERVICEACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def load_in_cluster(configuration: k8s.Configuration, serviceaccount: Path) -> None:
    """The pod's ServiceAccount (token, CA) and the API server's address from the
    environment, with the client's own token refresh (it re-reads the token file, which
    the kubelet rotates, every minute). Raises ConfigException outside a pod."""
    InClusterConfigLoader(token_filename=str(serviceaccount / "token"),
                          cert_filename=str(serviceaccount / "ca.crt")
                          ).load_and_set(configuration)


def connect(kubeconfig_path: str | None = None,
            serviceaccount: Path = SERVICEACCOUNT_DIR) -> tuple[k8s.ApiClient, bool]:
    """An API client from the pod's ServiceAccount, else from a kubeconfig; and whether
    it is the ServiceAccount's.

    ``KUBECONFIG`` is read here and passed on because the client library reads it only
    once, when it is imported.
    """
    configuration = k8s.Configuration()
    in_pod = True
    try:
        load_in_cluster(configuration, serviceaccount)
    except ConfigException as in_cluster:
        in_pod = False
        path = kubeconfig_path or os.environ.get("KUBECONFIG") or "~/.kube/config"
        try:
            kubeconfig.load_kube_config(config_file=path, client_configuration=configuration)
        except Exception as exc:  # the loader raises ConfigException, OSError, YAML errors
            raise BackendError(
                f"no Kubernetes API to talk to: not inside a cluster ({in_cluster}) and no "
                f"usable kubeconfig at {path} ({exc}); run the autoscaler in the cluster "
                f"with the fleet-autoscaler ServiceAccount, or set KUBECONFIG") from None
    # Retries are ours (with backoff, counted); urllib3's own would multiply them.
    configuration.retries = 0
    return k8s.ApiClient(configuration), in_pod


class KubernetesBackend:
    name = "kubernetes"

    def __init__(self, config: FleetConfig, api_client: k8s.ApiClient | None = None, *,
                 retry: RetryPolicy | None = None,
                 request_timeout: tuple[float, float] = (3.0, 5.0),
                 kubeconfig_path: str | None = None,
                 limiter: TokenBucket | None = None,
                 serviceaccount: Path = SERVICEACCOUNT_DIR):
        self.config = config
        target = config.autoscaler.kubernetes
        self.namespace = namespace_of(config)
        self.deployments = {q: deployment_name(config, q) for q in config.queues}
        in_pod = False
        if api_client is None:
            api_client, in_pod = connect(kubeconfig_path, serviceaccount)
        self.api = api_client
        #: In a pod: where its token is, re-read at once on a 401 (a rotated token).
        self._serviceaccount = serviceaccount if in_pod else None
        self.apps = k8s.AppsV1Api(self.api)
        self.core = k8s.CoreV1Api(self.api)
        self.autoscaling = k8s.AutoscalingV2Api(self.api)
        self.retry = retry or RetryPolicy()
        self.timeout = request_timeout
        self.limiter = limiter or TokenBucket(target.api_qps, target.api_burst)
        self._budget: tuple[float, Budget] | None = None
        #: This poll's reading of each queue's Deployment (replicas()), kept up to date
        #: by scale(); and the queues it could not read, with why.
        self._listed: dict[str, Listed] = {}
        self._held: dict[str, str] = {}
        self._may_list = True
        self._told_unlabelled: set[str] = set()
        self.foreign_hold = target.foreign_write_hold
        #: The count the fleet last wrote per queue, and to which Deployment (uid): a
        #: different count read back from it is a foreign write; and the queues left
        #: alone after one: until when, and why.
        self._written: dict[str, tuple[str | None, int]] = {}
        self._hands_off: dict[str, tuple[float, str]] = {}
        #: Deployment name -> the HPA that scales it, as last listed (and when).
        self._owners: tuple[float, dict[str, str]] | None = None
        self._may_list_hpas = True
        self._notices: dict[str, list[str]] = {}

    # -- the Backend protocol ------------------------------------------------------------

    def replicas(self) -> dict[str, int]:
        """Every queue's replicas from one LIST; a queue it misses from a GET of its own.
        A queue neither could read is left out (``held`` says why) unless none could be
        read at all: then the poll fails as a whole, with the first reason."""
        listed = self._list_deployments()
        self._listed, self._held = {}, {}
        for queue, name in self.deployments.items():
            found = listed.get(name)
            if found is None:
                try:
                    found = self._get_deployment(queue)
                except BackendError as exc:
                    self._held[queue] = f"replicas not read ({exc})"
                    continue
                if self._may_list and name not in self._told_unlabelled:
                    self._told_unlabelled.add(name)
                    logger.warning("deployments/%s does not carry the labels %s: read with "
                                   "a GET of its own at every poll", name, WORKERS)
            self._listed[queue] = found
        if self._held and not self._listed:
            first = next(iter(self._held.values()))
            first = first.removeprefix("replicas not read (").removesuffix(")")
            others = len(self._held) - 1
            raise BackendError(first + (f" (and {others} other queue"
                                        f"{'s' if others != 1 else ''} unread)"
                                        if others else ""))
        owners = self._hpa_owners()
        for queue, found in self._listed.items():
            why = self._owner(queue, found, owners)
            if why is not None:
                self._held[queue] = why
        return {q: found.replicas for q, found in self._listed.items()}

    def held(self) -> dict[str, str]:
        """The queues the last ``replicas()`` found not the fleet's to scale, and why
        (HoldingBackend): unread, handed to manual control, an HPA's, or left alone
        after a foreign write."""
        return dict(self._held)

    def scale(self, queue: str, replicas: int, workers: list[WorkerSample]) -> None:
        if queue in self._held:
            raise BackendError(f"not scaling {queue}: {self._held[queue]}")
        current = self._current(queue)
        if replicas < current.replicas:
            changes, allowed, why = self._scale_down_plan(queue, current, workers,
                                                          current.replicas - replicas)
            if allowed == 0:
                raise BackendError(f"not scaling {queue} down: {why}")
            for change in changes:
                self._annotate(change)
            if why is not None:
                replicas = current.replicas - allowed
                self._notice(queue, f"scaled down to {replicas} only: {why}")
        self._patch_scale(queue, replicas, current)
        self._written[queue] = (current.uid, replicas)
        # The controllers' status writes follow at once with new resourceVersions, so
        # what was read is stale now: a second change before the next poll reads again.
        self._listed.pop(queue, None)

    def close(self) -> None:
        self.api.close()

    # -- optional hooks the loop uses ----------------------------------------------------

    def plan(self, queue: str, replicas: int, workers: list[WorkerSample]) -> list[str]:
        """What ``scale`` would do, in words, for a dry run (reads only)."""
        name = self.deployments[queue]
        current = self._current(queue)
        lines = []
        if replicas < current.replicas:
            changes, allowed, why = self._scale_down_plan(queue, current, workers,
                                                          current.replicas - replicas)
            if allowed == 0:
                return [f"would not scale down: {why}"]
            lines = [f"would set {change}" for change in changes]
            if why is not None:
                replicas = current.replicas - allowed
                lines.append(f"would scale down to {replicas} only: {why}")
        lines.append(f"would patch deployments/{name}/scale in {self.namespace}: replicas "
                     f"{current.replicas} -> {replicas}")
        return lines

    def budget(self) -> Budget:
        """The nodes' allocatable CPU and memory together, for the nodes worker pods can
        use (not cordoned, no NoSchedule/NoExecute taint). An upper bound: other pods'
        requests (Redis, the dashboard, daemons) are not subtracted. Cached for
        BUDGET_TTL; a failed refresh keeps the last value (and logs it). Unbounded
        (no node is listed) when ``budget_from_nodes`` is off: a node autoscaler makes
        today's nodes no limit."""
        if not self.config.autoscaler.kubernetes.budget_from_nodes:
            return Budget(None, None)
        now = time.monotonic()
        if self._budget is not None and now - self._budget[0] < BUDGET_TTL:
            return self._budget[1]
        try:
            nodes = self._call("list", "nodes", "nodes", lambda: self.core.list_node(
                _request_timeout=self.timeout), cluster=True).items
        except BackendError as exc:
            if self._budget is None:
                raise BackendError(f"{exc} (or set autoscaler.capacity in queues.yaml)") \
                    from None
            logger.warning("keeping the last capacity budget: %s", exc)
            return self._budget[1]
        cpu, memory, used = 0.0, 0, []
        for node in nodes:
            spec = node.spec
            if spec is not None and (spec.unschedulable or any(
                    t.effect in BLOCKING_TAINTS for t in spec.taints or [])):
                continue
            allocatable = (node.status.allocatable if node.status else None) or {}
            cpu += float(parse_quantity(allocatable.get("cpu", "0")))
            memory += int(parse_quantity(allocatable.get("memory", "0")))
            used.append(node.metadata.name)
        if not used:
            logger.warning("no node can take worker pods (all cordoned or tainted): the "
                           "capacity budget is zero")
        budget = Budget(round(cpu, 3), memory)
        self._budget = (now, budget)
        return budget

    # -- API calls -----------------------------------------------------------------------

    def _owner(self, queue: str, found: Listed, owners: dict[str, str]) -> str | None:
        """Why the fleet must not write this queue's count now, if it must not."""
        name = self.deployments[queue]
        if found.control == MANUAL:
            self._written.pop(queue, None)
            return (f"under manual control (annotation {CONTROL}={MANUAL} on "
                    f"deployments/{name}; remove it to hand the queue back)")
        if name in owners:
            self._written.pop(queue, None)
            return f"scaled by {owners[name]}, not by the fleet"
        uid, written = self._written.get(queue, (None, None))
        if written is not None and uid == found.uid and written != found.replicas:
            self._yield(queue, f"deployments/{name} set to {found.replicas} by another "
                               f"writer (the fleet set {written})")
        hands_off = self._hands_off.get(queue)
        if hands_off is not None:
            until, why = hands_off
            if time.time() < until:
                return why
            del self._hands_off[queue]
            logger.info("%s: the hold after a foreign write is over", queue)
        return None

    def _yield(self, queue: str, what: str) -> None:
        """Leave the queue to whoever wrote its count, for ``foreign_hold`` seconds."""
        self._written.pop(queue, None)
        until = time.time() + self.foreign_hold
        stamp = time.strftime("%H:%M:%S UTC", time.gmtime(until))
        self._hands_off[queue] = (until, (
            f"{what}: left alone until {stamp} (annotate deployments/"
            f"{self.deployments[queue]} {CONTROL}={MANUAL} to keep it so)"))

    def _hpa_owners(self) -> dict[str, str]:
        """Worker Deployment name -> the HPA (and KEDA ScaledObject) that scales it;
        listed at most every OWNERS_TTL. Not knowing (forbidden, an API without
        autoscaling/v2) is said once and leaves the fleet in charge."""
        now = time.monotonic()
        if not self._may_list_hpas or (
                self._owners is not None and now - self._owners[0] < OWNERS_TTL):
            return self._owners[1] if self._owners is not None else {}
        try:
            hpas = self._call("list", "horizontalpodautoscalers", "horizontalpodautoscalers",
                              lambda: self.autoscaling.list_namespaced_horizontal_pod_autoscaler(
                                  self.namespace, _request_timeout=self.timeout)).items
        except BackendError as exc:
            if isinstance(exc, _Forbidden | _NotFound):
                self._may_list_hpas = False
                logger.warning("%s: an HPA or KEDA ScaledObject that also scales a worker "
                               "Deployment will not be noticed", exc)
            else:
                logger.warning("keeping the last list of HPAs: %s", exc)
            return self._owners[1] if self._owners is not None else {}
        names = set(self.deployments.values())
        owners = {}
        for hpa in hpas:
            ref = hpa.spec.scale_target_ref
            if ref.kind == "Deployment" and ref.name in names:
                keda = (hpa.metadata.labels or {}).get(KEDA_OWNER)
                owners[ref.name] = (f"HorizontalPodAutoscaler {hpa.metadata.name}"
                                    + (f" (KEDA ScaledObject {keda})" if keda else ""))
        self._owners = (now, owners)
        return owners

    def _list_deployments(self) -> dict[str, Listed]:
        """Every worker Deployment in the namespace by name, from one LIST; empty (every
        queue then read alone) if this ServiceAccount may not list them."""
        if not self._may_list:
            return {}
        try:
            items = self._call("list", "deployments", "deployments",
                               lambda: self.apps.list_namespaced_deployment(
                                   self.namespace, label_selector=WORKERS,
                                   _request_timeout=self.timeout)).items
        except _Forbidden as exc:
            self._may_list = False
            logger.warning("%s: reading each queue's Deployment with a GET of its own", exc)
            return {}
        return {d.metadata.name: Listed.of(d) for d in items}

    def _get_deployment(self, queue: str) -> Listed:
        name = self.deployments[queue]
        return Listed.of(self._call("get", "deployments", f"deployments/{name}",
                                    lambda: self.apps.read_namespaced_deployment(
                                        name, self.namespace,
                                        _request_timeout=self.timeout)))

    def _current(self, queue: str) -> Listed:
        """This poll's reading of the queue's Deployment, else a GET of it (a scale
        outside a poll: the CLI's dry run, tests)."""
        found = self._listed.get(queue)
        return found if found is not None else self._get_deployment(queue)

    def _read_scale(self, queue: str) -> Any:
        name = self.deployments[queue]
        return self._call("get", "deployments/scale", f"deployments/{name}/scale",
                          lambda: self.apps.read_namespaced_deployment_scale(
                              name, self.namespace, _request_timeout=self.timeout))

    def _patch_scale(self, queue: str, replicas: int, current: Listed) -> None:
        """Set the count against the version read. A 409 is re-applied only when the
        count is still the one read (a status write moved the version on); a count
        changed meanwhile is someone else's, and is left to them."""
        name = self.deployments[queue]
        state = {"version": current.version}

        def patch() -> Any:
            body = {"metadata": {"resourceVersion": state["version"]},
                    "spec": {"replicas": replicas}}
            return self.apps.patch_namespaced_deployment_scale(
                name, self.namespace, body, _content_type=MERGE_PATCH,
                _request_timeout=self.timeout)

        def reread() -> None:
            scale = self._read_scale(queue)
            now = scale.spec.replicas or 0
            if now != current.replicas:
                what = (f"deployments/{name} set to {now} by another writer while the "
                        f"fleet scaled it from {current.replicas} to {replicas}")
                self._yield(queue, what)
                raise BackendError(f"{what}: left to them")
            logger.info("deployments/%s changed while scaling it (409, count unchanged): "
                        "re-read, re-apply", name)
            state["version"] = scale.metadata.resource_version

        self._call("patch", "deployments/scale", f"deployments/{name}/scale", patch,
                   on_conflict=reread)

    def notices(self) -> dict[str, list[str]]:
        """What a scale call did other than asked, per queue, once (NoticingBackend)."""
        out, self._notices = self._notices, {}
        return out

    def _notice(self, queue: str, text: str) -> None:
        logger.warning("%s: %s", queue, text)
        self._notices.setdefault(queue, []).append(text)

    def _scale_down_plan(self, queue: str, current: Listed, workers: list[WorkerSample],
                         wanted: int) -> tuple[list[CostChange], int, str | None]:
        """Before a scale-down by ``wanted``: the pod-deletion-cost changes to make (only
        the pods whose cost changes are patched), how many pods may go without the
        ReplicaSet controller taking a busy one, and why fewer than wanted."""
        name = self.deployments[queue]
        if current.selector is None:
            raise BackendError(f"deployments/{name} has no pod selector: cannot find its "
                               f"pods to spare the busy ones")
        selector = label_selector(current.selector)
        pods = self._call("list", "pods", f"pods of deployments/{name}",
                          lambda: self.core.list_namespaced_pod(
                              self.namespace, label_selector=selector,
                              _request_timeout=self.timeout)).items
        live = [p for p in pods if p.metadata.deletion_timestamp is None]
        costs = deletion_costs([p.metadata.name for p in live], workers)
        busy = held(workers)
        changes = []
        for pod in live:
            old = (pod.metadata.annotations or {}).get(DELETION_COST)
            new = costs[pod.metadata.name]
            if _cost(old) != new:
                changes.append(CostChange(pod.metadata.name, old, new, busy[pod.metadata.name]))
        allowed, why = safe_decrease(live, costs, busy, wanted)
        return changes, allowed, why

    def _annotate(self, change: CostChange) -> None:
        body = {"metadata": {"annotations": {DELETION_COST: str(change.new)}}}
        try:
            self._call("patch", "pods", f"pods/{change.pod}",
                       lambda: self.core.patch_namespaced_pod(
                           change.pod, self.namespace, body, _content_type=MERGE_PATCH,
                           _request_timeout=self.timeout), missing_ok=True)
        except _Gone:
            return  # the pod went away meanwhile: nothing left to protect
        logger.info("set %s", change)

    def _call(self, verb: str, resource: str, what: str, fn: Callable[[], T], *,
              on_conflict: Callable[[], None] | None = None, cluster: bool = False,
              missing_ok: bool = False) -> T:
        """``fn()`` with retries; every failure becomes a BackendError a user can act on."""
        where = "cluster-wide" if cluster else f"in namespace {self.namespace}"
        started = time.monotonic()
        delays = iter(self.retry.delays())
        attempt = 0
        while True:
            attempt += 1
            wait = None
            self.limiter.acquire()
            try:
                return fn()
            except ApiException as exc:
                status = exc.status or 0
                message = _status_message(exc)
                if status == 404 and missing_ok:
                    raise _Gone() from None
                if status == 404 and resource.startswith("deployments") and "/" in what:
                    name = what.split("/")[1]
                    raise BackendError(
                        f"Deployment {name} not found in namespace {self.namespace}: apply "
                        f"the worker Deployments (kubectl apply -k k8s/base), or make "
                        f"autoscaler.kubernetes.namespace/deployment in queues.yaml name "
                        f"them") from None
                if status == 403:
                    raise _Forbidden(
                        f"forbidden: the autoscaler's ServiceAccount may not {verb} "
                        f"{resource} {where} ({message}); {RBAC_HINT}") from None
                if status == 401 and self._serviceaccount is not None and attempt == 1:
                    # The kubelet rotated the token since the client last read it (it
                    # re-reads once a minute): read it now and try once more.
                    load_in_cluster(self.api.configuration, self._serviceaccount)
                    logger.info("401 to %s %s: re-read the ServiceAccount token", verb, what)
                    continue
                if status == 401:
                    raise BackendError(
                        f"the Kubernetes API rejected the credentials (401) to {verb} "
                        f"{what}: check the kubeconfig or the ServiceAccount token") from None
                if not (status in (409, 429) or status >= 500):
                    error = _NotFound if status == 404 else BackendError
                    raise error(f"could not {verb} {what} {where}: {status} "
                                f"{exc.reason}: {message}") from None
                failure = f"{status} {exc.reason}: {message}"
                if status == 429:
                    wait = _retry_after(exc)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                failure = f"API server {self.api.configuration.host} unreachable " \
                          f"({_reason(exc)})"
                status = None
            delay = next(delays, None)
            if delay is not None and wait is not None:
                delay = min(self.retry.cap, max(delay, wait))
            if delay is None or time.monotonic() - started + delay > self.retry.total:
                raise BackendError(f"could not {verb} {what} {where} after {attempt} "
                                   f"attempts: {failure}")
            logger.debug("%s %s: %s; retrying in %.2fs", verb, what, failure, delay)
            time.sleep(delay)
            if status == 409 and on_conflict is not None:
                on_conflict()


class _Gone(Exception):
    """A pod to annotate no longer exists."""


class _Forbidden(BackendError):
    """A 403: RBAC does not grant the call (the message names the rule)."""


class _NotFound(BackendError):
    """A 404 of something other than a worker Deployment (an API the cluster lacks)."""


def _cost(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def _status_message(exc: ApiException) -> str:
    """The ``message`` of the API server's Status object, else the raw body."""
    try:
        return str(json.loads(exc.body)["message"])
    except (TypeError, ValueError, KeyError):
        return (exc.body or "").strip()[:200] or str(exc.reason)


def _retry_after(exc: ApiException) -> float | None:
    value = (exc.headers or {}).get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _reason(exc: BaseException) -> str:
    """The innermost cause of a urllib3 error, without its object reprs."""
    while getattr(exc, "reason", None) is not None and isinstance(exc.reason, BaseException):
        exc = exc.reason
    return re.sub(r"^<[^>]*>: ", "", str(exc))


def create(ctx: BackendContext) -> KubernetesBackend:
    """The ``kubernetes`` entry point: in-cluster credentials, else ``KUBECONFIG``."""
    return KubernetesBackend(ctx.config)


PLUGIN = BackendPlugin(create)
