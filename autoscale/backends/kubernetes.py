"""The Kubernetes backend: each queue's worker Deployment, through its scale subresource.

API calls (and the RBAC rule each needs; k8s/base/autoscaler.yaml grants exactly these):

- ``GET  apis/apps/v1/namespaces/NS/deployments/NAME/scale``  (get deployments/scale):
  the replicas of each queue, and the resourceVersion a change is made against.
- ``PATCH .../deployments/NAME/scale`` (patch deployments/scale): a JSON merge patch of
  ``spec.replicas`` carrying that resourceVersion, so a count changed meanwhile by someone
  else (``kubectl scale``, a second autoscaler) comes back as 409 instead of being
  overwritten unseen; the backend then re-reads and re-applies (the policy owns the count).
  The subresource, not the Deployment: this role cannot change a pod template.
- ``GET  .../deployments/NAME`` (get deployments): its label selector, before a scale-down.
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
from typing import Any, TypeVar

import urllib3

from autoscale.backends.base import BackendContext, BackendError, BackendPlugin

try:
    from kubernetes import client as k8s
    from kubernetes import config as kubeconfig
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.utils.quantity import parse_quantity
except ImportError as exc:  # an optional extra: say how to get it, not a traceback
    raise BackendError(f"the Kubernetes backend needs the kubernetes client ({exc}): "
                       f"pip install 'fleet[k8s]'") from None

from autoscale.policy import Budget
from fleet.config import FleetConfig
from fleet.observe.model import WorkerSample
from fleet.render.k8s import deployment_name

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
             "deployments/scale and list/patch pods in the namespace; ClusterRole "
             "fleet-autoscaler-nodes grants list nodes")
#: Taints that keep worker pods (which carry no tolerations) off a node.
BLOCKING_TAINTS = {"NoSchedule", "NoExecute"}
#: Node allocatable changes rarely; list nodes at most this often (seconds).
BUDGET_TTL = 60.0


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


def connect(kubeconfig_path: str | None = None) -> k8s.ApiClient:
    """An API client from the pod's ServiceAccount, else from a kubeconfig.

    ``KUBECONFIG`` is read here and passed on because the client library reads it only
    once, when it is imported.
    """
    configuration = k8s.Configuration()
    try:
        kubeconfig.load_incluster_config(client_configuration=configuration)
    except ConfigException as in_cluster:
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
    return k8s.ApiClient(configuration)


class KubernetesBackend:
    name = "kubernetes"

    def __init__(self, config: FleetConfig, api_client: k8s.ApiClient | None = None, *,
                 retry: RetryPolicy | None = None,
                 request_timeout: tuple[float, float] = (3.0, 5.0),
                 kubeconfig_path: str | None = None):
        self.config = config
        self.namespace = config.autoscaler.kubernetes.namespace
        self.deployments = {q: deployment_name(config, q) for q in config.queues}
        self.api = api_client if api_client is not None else connect(kubeconfig_path)
        self.apps = k8s.AppsV1Api(self.api)
        self.core = k8s.CoreV1Api(self.api)
        self.retry = retry or RetryPolicy()
        self.timeout = request_timeout
        self._budget: tuple[float, Budget] | None = None

    # -- the Backend protocol ------------------------------------------------------------

    def replicas(self) -> dict[str, int]:
        return {q: self._read_scale(q).spec.replicas or 0 for q in self.deployments}

    def scale(self, queue: str, replicas: int, workers: list[WorkerSample]) -> None:
        current = self._read_scale(queue)
        if replicas < (current.spec.replicas or 0):
            for change in self._cost_changes(queue, workers):
                self._annotate(change)
        self._patch_scale(queue, replicas, current.metadata.resource_version)

    def close(self) -> None:
        self.api.close()

    # -- optional hooks the loop uses ----------------------------------------------------

    def plan(self, queue: str, replicas: int, workers: list[WorkerSample]) -> list[str]:
        """What ``scale`` would do, in words, for a dry run (reads only)."""
        name = self.deployments[queue]
        current = self._read_scale(queue).spec.replicas or 0
        lines = []
        if replicas < current:
            lines = [f"would set {change}" for change in self._cost_changes(queue, workers)]
        lines.append(f"would patch deployments/{name}/scale in {self.namespace}: replicas "
                     f"{current} -> {replicas}")
        return lines

    def budget(self) -> Budget:
        """The nodes' allocatable CPU and memory together, for the nodes worker pods can
        use (not cordoned, no NoSchedule/NoExecute taint). An upper bound: other pods'
        requests (Redis, the dashboard, daemons) are not subtracted. Cached for
        BUDGET_TTL; a failed refresh keeps the last value (and logs it)."""
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

    def _read_scale(self, queue: str) -> Any:
        name = self.deployments[queue]
        return self._call("get", "deployments/scale", f"deployments/{name}/scale",
                          lambda: self.apps.read_namespaced_deployment_scale(
                              name, self.namespace, _request_timeout=self.timeout))

    def _patch_scale(self, queue: str, replicas: int, version: str | None) -> None:
        name = self.deployments[queue]
        state = {"version": version}

        def patch() -> Any:
            body = {"metadata": {"resourceVersion": state["version"]},
                    "spec": {"replicas": replicas}}
            return self.apps.patch_namespaced_deployment_scale(
                name, self.namespace, body, _content_type=MERGE_PATCH,
                _request_timeout=self.timeout)

        def reread() -> None:
            logger.info("deployments/%s changed while scaling it (409): re-read, re-apply",
                        name)
            state["version"] = self._read_scale(queue).metadata.resource_version

        self._call("patch", "deployments/scale", f"deployments/{name}/scale", patch,
                   on_conflict=reread)

    def _cost_changes(self, queue: str, workers: list[WorkerSample]) -> list[CostChange]:
        name = self.deployments[queue]
        deployment = self._call("get", "deployments", f"deployments/{name}",
                                lambda: self.apps.read_namespaced_deployment(
                                    name, self.namespace, _request_timeout=self.timeout))
        selector = label_selector(deployment.spec.selector)
        pods = self._call("list", "pods", f"pods of deployments/{name}",
                          lambda: self.core.list_namespaced_pod(
                              self.namespace, label_selector=selector,
                              _request_timeout=self.timeout)).items
        live = [p for p in pods if p.metadata.deletion_timestamp is None]
        wanted = deletion_costs([p.metadata.name for p in live], workers)
        busy = held(workers)
        changes = []
        for pod in live:
            old = (pod.metadata.annotations or {}).get(DELETION_COST)
            new = wanted[pod.metadata.name]
            if _cost(old) != new:
                changes.append(CostChange(pod.metadata.name, old, new, busy[pod.metadata.name]))
        return changes

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
            try:
                return fn()
            except ApiException as exc:
                status = exc.status or 0
                message = _status_message(exc)
                if status == 404 and missing_ok:
                    raise _Gone() from None
                if status == 404 and resource.startswith("deployments"):
                    name = what.split("/")[1]
                    raise BackendError(
                        f"Deployment {name} not found in namespace {self.namespace}: apply "
                        f"the worker Deployments (kubectl apply -k k8s/base), or make "
                        f"autoscaler.kubernetes.namespace/deployment in queues.yaml name "
                        f"them") from None
                if status == 403:
                    raise BackendError(
                        f"forbidden: the autoscaler's ServiceAccount may not {verb} "
                        f"{resource} {where} ({message}); {RBAC_HINT}") from None
                if status == 401:
                    raise BackendError(
                        f"the Kubernetes API rejected the credentials (401) to {verb} "
                        f"{what}: check the kubeconfig or the ServiceAccount token") from None
                if not (status in (409, 429) or status >= 500):
                    raise BackendError(f"could not {verb} {what} {where}: {status} "
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
