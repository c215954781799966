"""An emulated Kubernetes API server over real HTTP, for the Kubernetes backend's tests.

There is no cluster on the machines this project is built and tested on, so this keeps
the state of the objects the autoscaler touches and answers the calls it makes the way
the real API server does, closely enough that the official ``kubernetes`` client works
against it unmodified (``kubernetes.client.Configuration(host=fake.url)``, or a
kubeconfig naming ``fake.url``):

- apps/v1 Deployments: get, list, and the ``scale`` subresource (get, patch, put) with
  resourceVersion preconditions (409 when stale) and 422 on a bad replica count;
- the ReplicaSet and Deployment controllers (tests/fakes/k8s_controllers.py): when a
  Deployment's replicas change, pods are created at once or chosen for deletion as the
  real ReplicaSet controller ranks them (unassigned, Pending, not ready first, then the
  lowest ``controller.kubernetes.io/pod-deletion-cost``, doubled-up, ready for less
  time, more restarts, newer), within each ReplicaSet; during a rollout
  (``begin_rollout`` .. ``finish_rollout``) a change is shared among the ReplicaSets in
  proportion to their sizes; a deleted pod is Terminating (``deletionTimestamp`` set,
  still listed) for its grace period or until ``finish_terminating``;
- pod state a test sets (``set_pod``): phase, readiness (with its transition time),
  restarts, node;
- v1 Pods: get, list with ``labelSelector`` (=, ==, !=, in, notin, exists, !exists),
  patch with merge-patch, strategic-merge-patch or json-patch; only metadata may change,
  annotation values must be strings and pod-deletion-cost an int32 (as validated there);
- v1 Nodes: list, with status.allocatable;
- autoscaling/v2 HorizontalPodAutoscalers: list (``add_hpa``);
- ``annotate`` (kubectl annotate) and ``touch`` (a controller's status write: a new
  resourceVersion, the same spec), and ``status_churn``: such writes to every
  Deployment after every N requests;
- RBAC from the rendered manifests (``grants``, tests/fakes/k8s_rbac.py), and every
  write checked against the Kubernetes OpenAPI schema of its kind (kubernetes-validate,
  unknown fields refused);
- Status objects for errors (404 NotFound, 403 Forbidden with the real wording, 409,
  422, 429 with Retry-After, 500), and bearer-token authentication (401) when a token is
  set.

Test controls: ``fail(status, path=..., times=N)`` makes the next N matching requests
fail; ``forbid(verb, resource)`` denies a permission until ``allow``; ``on(method, path,
action)`` runs a change right after a request (a concurrent writer); ``stop()`` and
``start()`` take the server off its port and back (connection refused meanwhile); every
request is recorded (method, path, query, content type, JSON body, status returned);
``latency`` adds a round trip's seconds to every answer.

Not emulated: watches, server-side apply, field selectors, admission, namespaces as
objects, a rollout's own progress (it stays mid-way until the test ends it), the
kubelet (pods start Running and Ready at once).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import random
import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import kubernetes_validate

from tests.fakes.k8s_controllers import deletion_order, facts, share

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
#: The Kubernetes version whose OpenAPI schemas writes are checked against.
SCHEMA_VERSION = "1.31"
SERVICE_ACCOUNT = "system:serviceaccount:fleet:fleet-autoscaler"

_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            405: "MethodNotAllowed", 409: "Conflict", 415: "UnsupportedMediaType",
            422: "Invalid", 429: "TooManyRequests", 500: "InternalError",
            503: "ServiceUnavailable"}
_PHRASES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 415: "Unsupported Media Type",
            422: "Unprocessable Entity", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}

# (method, path regex) -> handler name; group names become arguments.
_ROUTES = [
    ("GET", r"/version", "get_version"),
    ("GET", r"/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments", "list_deployments"),
    ("GET", r"/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments/(?P<name>[^/]+)",
     "get_deployment"),
    ("GET", r"/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments/(?P<name>[^/]+)/scale",
     "get_scale"),
    ("PATCH", r"/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments/(?P<name>[^/]+)/scale",
     "patch_scale"),
    ("PUT", r"/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments/(?P<name>[^/]+)/scale",
     "put_scale"),
    ("GET", r"/api/v1/namespaces/(?P<ns>[^/]+)/pods", "list_pods"),
    ("GET", r"/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)", "get_pod"),
    ("PATCH", r"/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)", "patch_pod"),
    ("GET", r"/api/v1/nodes", "list_nodes"),
    ("GET", r"/apis/autoscaling/v2/namespaces/(?P<ns>[^/]+)/horizontalpodautoscalers",
     "list_hpas"),
]


class ApiError(Exception):
    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass
class Recorded:
    index: int
    method: str
    path: str
    query: dict[str, str]
    content_type: str | None
    body: Any
    status: int = 0
    #: What the fake answered (a Status object for errors).
    response: Any = None


@dataclass
class _Fault:
    status: int
    path: str | None
    method: str | None
    times: int
    retry_after: int | None
    message: str | None


@dataclass
class _Hook:
    method: str
    path: str
    action: Callable[[], None]
    times: int


@dataclass
class _Target:
    """What a request is about, for RBAC and messages."""

    verb: str
    resource: str  # "deployments", "deployments/scale", "pods", "nodes"
    group: str  # "apps" or ""
    namespace: str | None
    name: str | None
    params: dict[str, str] = field(default_factory=dict)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (strategic merge is the same for maps and scalars)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ApiError(422, f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json_patch(doc: Any, ops: list[dict]) -> Any:
    """RFC 6902, the ops a client would send here: add, replace, remove, test."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op.get("path", ""))
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.get(part)
            if parent is None:
                raise ApiError(422, f"json patch: path {op['path']} does not exist")
        last = parts[-1]
        kind = op.get("op")
        if kind in ("add", "replace"):
            if kind == "replace" and isinstance(parent, dict) and last not in parent:
                raise ApiError(422, f"json patch: replace of missing {op['path']}")
            parent[last] = op.get("value")
        elif kind == "remove":
            if last not in parent:
                raise ApiError(422, f"json patch: remove of missing {op['path']}")
            del parent[last]
        elif kind == "test":
            if parent.get(last) != op.get("value"):
                raise ApiError(422, f"json patch: test of {op['path']} failed")
        else:
            raise ApiError(422, f"json patch: unsupported op {kind!r}")
    return doc


def parse_selector(text: str) -> list[tuple[str, str, set[str]]]:
    """``a=b,c!=d,e in (f,g),h notin (i),j,!k`` -> [(key, op, values)]."""
    out = []
    for part in re.findall(r"[^,(]+(?:\([^)]*\))?", text or ""):
        part = part.strip()
        if not part:
            continue
        if m := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", part):
            values = {v.strip() for v in m.group(3).split(",") if v.strip()}
            out.append((m.group(1), m.group(2), values))
        elif m := re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)", part):
            out.append((m.group(1), "!=" if m.group(2) == "!=" else "=", {m.group(3)}))
        elif m := re.fullmatch(r"!\s*([\w./-]+)", part):
            out.append((m.group(1), "!exists", set()))
        elif re.fullmatch(r"[\w./-]+", part):
            out.append((part, "exists", set()))
        else:
            raise ApiError(400, f"unable to parse requirement: {part!r}")
    return out


def selector_matches(requirements: list[tuple[str, str, set[str]]],
                     labels: dict[str, str]) -> bool:
    for key, op, values in requirements:
        present = key in labels
        value = labels.get(key)
        if op == "=" and value not in values:
            return False
        if op == "!=" and present and value in values:
            return False
        if op == "in" and value not in values:
            return False
        if op == "notin" and present and value in values:
            return False
        if op == "exists" and not present:
            return False
        if op == "!exists" and present:
            return False
    return True


class FakeKubernetes:
    """The emulated API server: state, controls, and the HTTP front."""

    def __init__(self, port: int, *, token: str | None = None, seed: int = 0,
                 latency: float = 0.0, tls: ssl.SSLContext | None = None):
        self.port = port
        self.token = token
        #: Serve HTTPS with this server context (a throwaway CA's certificate).
        self.tls = tls
        #: Seconds added before each answer (a real API server's round trip, for the
        #: bench), slept outside the lock so concurrent requests overlap as they would.
        self.latency = latency
        self.lock = threading.RLock()
        self.deployments: dict[tuple[str, str], dict] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.nodes: dict[str, dict] = {}
        self.hpas: dict[tuple[str, str], dict] = {}
        self.requests: list[Recorded] = []
        #: Pod names in the order the emulated ReplicaSet controller deleted them.
        self.deleted_pods: list[str] = []
        self._faults: list[_Fault] = []
        self._denied: set[tuple[str, str]] = set()
        #: RBAC from the manifests (tests/fakes/k8s_rbac.py); None: every call allowed.
        self.grants: Any = None
        #: Every write checked against the OpenAPI schema of its kind (``_check_schema``).
        self.validate_bodies = True
        #: After every this many requests (0: never), every Deployment gets a status
        #: write (a new resourceVersion, the same spec), as the controllers make now and
        #: then; a count, not a chance, so a test's 409s do not depend on luck.
        self.status_churn = 0
        self._hooks: list[_Hook] = []
        self._revision = itertools.count(1000)
        self._created = itertools.count()
        self._order: dict[tuple[str, str], int] = {}
        #: Per Deployment its ReplicaSets, oldest first: [name, size] (the newest is the
        #: current template's).
        self._sets: dict[tuple[str, str], list[list]] = {}
        self._born: dict[tuple[str, str], float] = {}
        self._ready_since: dict[tuple[str, str], float] = {}
        #: Terminating pods: until when (their grace), and how many rollouts a
        #: Deployment has had (each one a new pod-template-hash).
        self._ending: dict[tuple[str, str], float] = {}
        self._rollouts: dict[tuple[str, str], int] = {}
        self._random = random.Random(seed)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> FakeKubernetes:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        server.fake = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="fake-k8s-api",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listening socket: clients get connection refused until ``start``.
        Responses close their connection (HTTP/1.0), so no kept-alive one lingers."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> FakeKubernetes:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def api_client(self, **settings: Any):
        """An official-client ApiClient pointed here (``settings`` go on its
        Configuration, e.g. ``api_key``)."""
        from kubernetes import client

        configuration = client.Configuration(host=self.url)
        configuration.retries = 0
        for name, value in settings.items():
            setattr(configuration, name, value)
        return client.ApiClient(configuration)

    # -- test controls -------------------------------------------------------------------

    def fail(self, status: int, *, path: str | None = None, method: str | None = None,
             times: int = 1, retry_after: int | None = None,
             message: str | None = None) -> None:
        """The next ``times`` requests matching ``path`` (exact, no query; None: any) and
        ``method`` get ``status`` instead of their answer."""
        with self.lock:
            self._faults.append(_Fault(status, path, method, times, retry_after, message))

    def on(self, method: str, path: str, action: Callable[[], None], *,
           times: int = 1) -> None:
        """Run ``action`` right after the next ``times`` ``method`` requests to ``path``
        are answered, before any other request: e.g. a ``kubectl scale`` between the
        autoscaler's read of a Deployment's scale and its write."""
        with self.lock:
            self._hooks.append(_Hook(method, path, action, times))

    def forbid(self, verb: str, resource: str) -> None:
        """Deny ``verb`` on ``resource`` (e.g. "patch", "deployments/scale") with 403."""
        with self.lock:
            self._denied.add((verb, resource))

    def allow(self, verb: str, resource: str) -> None:
        with self.lock:
            self._denied.discard((verb, resource))

    def add_deployment(self, namespace: str, name: str, *, replicas: int = 0,
                       labels: dict[str, str] | None = None) -> dict:
        labels = dict(labels or {"app": name})
        with self.lock:
            self.deployments[(namespace, name)] = {
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": namespace, "uid": self._uid(),
                             "resourceVersion": self._rv(), "generation": 1,
                             "creationTimestamp": _now(), "labels": dict(labels)},
                "spec": {"replicas": replicas, "selector": {"matchLabels": dict(labels)},
                         "template": {"metadata": {"labels": dict(labels)},
                                      "spec": {"containers": [
                                          {"name": "worker", "image": "fleet:latest"}]}},
                         "strategy": {"type": "RollingUpdate"}},
                "status": {},
            }
            self._sets[(namespace, name)] = [[_replica_set(name), replicas]]
            self._reconcile(namespace, name)
            return copy.deepcopy(self.deployments[(namespace, name)])

    def add_node(self, name: str, *, cpu: str, memory: str, unschedulable: bool = False,
                 taints: list[dict] | None = None) -> None:
        with self.lock:
            spec: dict[str, Any] = {}
            if unschedulable:
                spec["unschedulable"] = True
            if taints:
                spec["taints"] = taints
            resources = {"cpu": cpu, "memory": memory, "pods": "110"}
            self.nodes[name] = {
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "uid": self._uid(),
                             "resourceVersion": self._rv(), "creationTimestamp": _now(),
                             "labels": {"kubernetes.io/hostname": name}},
                "spec": spec,
                "status": {"allocatable": resources, "capacity": dict(resources),
                           "conditions": [{"type": "Ready", "status": "True"}]},
            }

    def add_hpa(self, namespace: str, name: str, deployment: str, *,
                labels: dict[str, str] | None = None) -> None:
        """An autoscaling/v2 HPA scaling ``deployment`` (KEDA makes one per ScaledObject,
        labelled ``scaledobject.keda.sh/name``)."""
        with self.lock:
            self.hpas[(namespace, name)] = {
                "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": name, "namespace": namespace, "uid": self._uid(),
                             "resourceVersion": self._rv(), "creationTimestamp": _now(),
                             "labels": dict(labels or {})},
                "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                            "name": deployment},
                         "minReplicas": 1, "maxReplicas": 10},
                "status": {"currentReplicas": 0, "desiredReplicas": 0},
            }

    def annotate(self, namespace: str, name: str, key: str, value: str | None) -> None:
        """``kubectl annotate deployment NAME key=value`` (None: ``key-``)."""
        with self.lock:
            d = self.deployments[(namespace, name)]
            annotations = d["metadata"].setdefault("annotations", {})
            if value is None:
                annotations.pop(key, None)
            else:
                annotations[key] = value
            d["metadata"]["resourceVersion"] = self._rv()

    def touch(self, namespace: str, name: str) -> None:
        """A controller's status write: a new resourceVersion, the same spec (what makes
        a real scale patch with a precondition meet a 409 it may safely re-apply)."""
        with self.lock:
            d = self.deployments[(namespace, name)]
            d["status"] = {**d["status"], "observedGeneration": d["metadata"]["generation"]}
            d["metadata"]["resourceVersion"] = self._rv()

    def set_replicas(self, namespace: str, name: str, replicas: int) -> None:
        """What ``kubectl scale`` does: change the count behind the autoscaler's back."""
        with self.lock:
            self._set_replicas(namespace, name, replicas)

    def replicas(self, namespace: str, name: str) -> int:
        with self.lock:
            return self.deployments[(namespace, name)]["spec"]["replicas"]

    def pods_of(self, namespace: str, deployment: str, *,
                terminating: bool = False) -> list[dict]:
        """The deployment's pods (all its ReplicaSets'), oldest first; the Terminating
        ones instead if ``terminating``."""
        with self.lock:
            self._purge()
            sets = {rs for rs, _ in self._sets.get((namespace, deployment), [])}
            found = [(self._order[k], copy.deepcopy(p)) for k, p in self.pods.items()
                     if k[0] == namespace and _owner(p) in sets
                     and (k in self._ending) == terminating]
            return [p for _, p in sorted(found, key=lambda op: op[0])]

    def pod_names(self, namespace: str, deployment: str, *,
                  terminating: bool = False) -> list[str]:
        return [p["metadata"]["name"]
                for p in self.pods_of(namespace, deployment, terminating=terminating)]

    def set_pod(self, namespace: str, pod: str, *, ready: bool | None = None,
                phase: str | None = None, restarts: int | None = None,
                node: str | None = None) -> None:
        """What the kubelet and the scheduler would report: readiness (its transition
        time now), phase, container restarts, node."""
        with self.lock:
            key = (namespace, pod)
            p = self.pods[key]
            status = p["status"]
            if ready is not None:
                status["conditions"] = [{"type": "Ready", "status": str(ready),
                                         "lastTransitionTime": _now()}]
                if ready:
                    self._ready_since[key] = time.time()
            if phase is not None:
                status["phase"] = phase
            if restarts is not None:
                status["containerStatuses"] = [{"name": "worker", "restartCount": restarts,
                                                "ready": status["conditions"][0]["status"]
                                                == "True"}]
            if node is not None:
                p["spec"]["nodeName"] = node
            p["metadata"]["resourceVersion"] = self._rv()

    def begin_rollout(self, namespace: str, name: str, *, surge: int = 1) -> str:
        """A template change (a queues.yaml edit rolls every worker): a new ReplicaSet
        with ``surge`` pods beside the old ones, and the rollout stopped there, as a
        rolling update is while its new pods become ready. Returns the new pod-template
        hash."""
        with self.lock:
            key = (namespace, name)
            self._rollouts[key] = self._rollouts.get(key, 0) + 1
            rs = _replica_set(f"{name}#{self._rollouts[key]}", prefix=name)
            self._sets[key].append([rs, surge])
            d = self.deployments[key]
            d["metadata"]["generation"] += 1
            self._scale_sets(namespace, name)  # surged: more pods than spec.replicas
            return rs.rsplit("-", 1)[1]

    def finish_rollout(self, namespace: str, name: str) -> None:
        """The rollout completes: every replica in the newest ReplicaSet, the old ones'
        pods Terminating."""
        with self.lock:
            sets = self._sets[(namespace, name)]
            want = self.deployments[(namespace, name)]["spec"]["replicas"]
            for rs in sets[:-1]:
                rs[1] = 0
            sets[-1][1] = want
            self._scale_sets(namespace, name)

    def finish_terminating(self, namespace: str, pod: str | None = None) -> None:
        """End the grace period now: of ``pod``, or of every Terminating pod."""
        with self.lock:
            for key in list(self._ending):
                if key[0] == namespace and (pod is None or key[1] == pod):
                    self._ending[key] = 0.0
            self._purge()

    def annotation(self, namespace: str, pod: str, key: str = DELETION_COST) -> str | None:
        with self.lock:
            return self.pods[(namespace, pod)]["metadata"].get("annotations", {}).get(key)

    def calls(self, method: str | None = None, path: str | None = None,
              since: int = 0) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests[since:]
                    if (method is None or r.method == method)
                    and (path is None or r.path == path)]

    # -- the emulated controllers --------------------------------------------------------

    def _rv(self) -> str:
        return str(next(self._revision))

    def _set_replicas(self, namespace: str, name: str, replicas: int) -> str:
        d = self.deployments[(namespace, name)]
        if d["spec"]["replicas"] != replicas:
            d["spec"]["replicas"] = replicas
            d["metadata"]["generation"] += 1
        d["metadata"]["resourceVersion"] = version = self._rv()
        self._reconcile(namespace, name)
        return version

    def _uid(self) -> str:
        return str(uuid.UUID(int=self._random.getrandbits(128), version=4))

    def _reconcile(self, namespace: str, name: str) -> None:
        """The Deployment controller (at once): a change of replicas shared among its
        ReplicaSets (all to the one outside a rollout); then each ReplicaSet's; then the
        status update (a new resourceVersion)."""
        d = self.deployments[(namespace, name)]
        sets = self._sets[(namespace, name)]
        want = d["spec"]["replicas"]
        if sum(size for _, size in sets) != want:
            for rs, size in zip(sets, share([size for _, size in sets], want), strict=True):
                rs[1] = size
        self._scale_sets(namespace, name)

    def _scale_sets(self, namespace: str, name: str) -> None:
        """Each ReplicaSet's controller: create pods up to its size, or mark the ones it
        ranks first for deletion (Terminating for their grace period)."""
        self._purge()
        d = self.deployments[(namespace, name)]
        sets = self._sets[(namespace, name)]
        now = time.time()
        related = [k for k, p in self.pods.items() if k[0] == namespace
                   and _owner(p) in {rs for rs, _ in sets} and k not in self._ending]
        for rs, size in sets:
            mine = [k for k in related if _owner(self.pods[k]) == rs]
            while len(mine) < size:
                key = self._new_pod(d, namespace, rs)
                mine.append(key)
                related.append(key)
            if len(mine) > size:
                order = deletion_order([self._facts(k) for k in mine],
                                       [self._facts(k) for k in related], now)
                grace = d["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
                for victim in order[: len(mine) - size]:
                    key = (namespace, victim.name)
                    meta = self.pods[key]["metadata"]
                    meta["deletionTimestamp"] = _now()
                    meta["deletionGracePeriodSeconds"] = grace
                    meta["resourceVersion"] = self._rv()
                    self._ending[key] = now + grace
                    self.deleted_pods.append(victim.name)
        total = sum(size for _, size in sets)
        newest = sets[-1][1]
        d["status"] = {"observedGeneration": d["metadata"]["generation"], "replicas": total,
                       "updatedReplicas": newest, "readyReplicas": total,
                       "availableReplicas": total}
        d["metadata"]["resourceVersion"] = self._rv()

    def _new_pod(self, d: dict, namespace: str, rs: str) -> tuple[str, str]:
        template_hash = rs.rsplit("-", 1)[1]
        while True:
            suffix = "".join(self._random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
            key = (namespace, f"{rs}-{suffix}")
            if key not in self.pods:
                break
        labels = {**d["spec"]["template"]["metadata"]["labels"],
                  "pod-template-hash": template_hash}
        self.pods[key] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": key[1], "generateName": f"{rs}-", "namespace": namespace,
                         "uid": self._uid(), "resourceVersion": self._rv(),
                         "creationTimestamp": _now(), "labels": labels,
                         "annotations": {},
                         "ownerReferences": [{"apiVersion": "apps/v1",
                                              "kind": "ReplicaSet", "name": rs,
                                              "uid": d["metadata"]["uid"],
                                              "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": copy.deepcopy(d["spec"]["template"]["spec"]) | {"nodeName": "node-1"},
            "status": {"phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True",
                                       "lastTransitionTime": _now()}]},
        }
        self._order[key] = next(self._created)
        self._born[key] = self._ready_since[key] = time.time()
        return key

    def _facts(self, key: tuple[str, str]):
        return facts(self.pods[key], self._born[key], self._ready_since.get(key))

    def _purge(self) -> None:
        """Terminating pods whose grace is over are gone."""
        now = time.time()
        for key in [k for k, until in self._ending.items() if until <= now]:
            del self._ending[key]
            self.pods.pop(key, None)
            self._order.pop(key, None)
            self._born.pop(key, None)
            self._ready_since.pop(key, None)

    # -- HTTP ----------------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: dict[str, str],
               raw_body: bytes) -> tuple[int, dict[str, str], dict]:
        split = urlsplit(raw_path)
        path = unquote(split.path).rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        content_type = (headers.get("content-type") or "").split(";")[0].strip() or None
        try:
            body = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = raw_body.decode(errors="replace")
        with self.lock:
            record = Recorded(len(self.requests), method, path, query, content_type, body)
            self.requests.append(record)
            try:
                status, extra, payload = self._dispatch(method, path, query, headers,
                                                        content_type, body)
            except ApiError as exc:
                status, extra, payload = exc.code, exc.headers, _status(exc.code, exc.message)
            record.status, record.response = status, copy.deepcopy(payload)
            for hook in self._hooks:
                if hook.times > 0 and hook.method == method and hook.path == path:
                    hook.times -= 1
                    hook.action()
            if self.status_churn and len(self.requests) % self.status_churn == 0:
                for namespace, name in list(self.deployments):
                    self.touch(namespace, name)
            return status, extra, payload

    def _dispatch(self, method, path, query, headers, content_type, body):
        route = None
        for verb, pattern, handler in _ROUTES:
            m = re.fullmatch(pattern, path)
            if m:
                if verb == method:
                    route = (handler, m.groupdict())
                    break
                route = route or ("", {})
        target = _target(method, path, route[1] if route else {})
        for fault in self._faults:
            if fault.times > 0 and (fault.path is None or fault.path == path) \
                    and (fault.method is None or fault.method == method):
                fault.times -= 1
                extra = {"Retry-After": str(fault.retry_after)} \
                    if fault.retry_after is not None else {}
                raise ApiError(fault.status, fault.message or self._fault_message(
                    fault.status, target), extra)
        if self.token is not None:
            scheme, _, given = (headers.get("authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or given != self.token:  # the scheme: any case
                raise ApiError(401, "Unauthorized")
        if route is None:
            raise ApiError(404, "the server could not find the requested resource")
        if not route[0]:
            raise ApiError(405, f"the server does not allow this method on {path}")
        if target and ((target.verb, target.resource) in self._denied or (
                self.grants is not None and not self.grants.allows(
                    target.group, target.resource, target.verb, target.namespace))):
            raise ApiError(403, _forbidden(target))
        handler, params = route
        kwargs = dict(params)
        if method in ("PATCH", "PUT"):
            kwargs.update(content_type=content_type, body=body)
        if handler.startswith("list_") or handler == "get_version":
            kwargs["query"] = query
        return 200, {}, getattr(self, f"_{handler}")(**kwargs)

    def _fault_message(self, status: int, target: _Target | None) -> str:
        if status == 403 and target is not None:
            return _forbidden(target)
        if status == 404 and target is not None and target.name:
            return f'{_kind(target)} "{target.name}" not found'
        if status == 409 and target is not None and target.name:
            return (f'Operation cannot be fulfilled on {_kind(target)} "{target.name}": the '
                    f"object has been modified; please apply your changes to the latest "
                    f"version and try again")
        if status == 429:
            return "Too many requests, please try again later."
        return f"injected error {status}"

    # -- handlers ------------------------------------------------------------------------

    def _check_schema(self, obj: dict, name: str) -> None:
        """The object a write would store, against Kubernetes' own OpenAPI schema (the
        kubernetes-validate package): a wrong type is a 400 as the API server's decoder
        gives, an unknown field too (fieldValidation=Strict: stricter than the server's
        default, which drops it with a warning, so a misspelt field fails a test rather
        than being silently ignored on a cluster)."""
        if not self.validate_bodies:
            return
        try:
            kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path) or "(root)"
            raise ApiError(400, f'{obj.get("kind")} "{name}" is invalid: {where}: '
                                f"{exc.message}") from None

    def _get_version(self, query):
        return {"major": "1", "minor": "31", "gitVersion": "v1.31.0-fleet-fake"}

    def _deployment(self, ns: str, name: str) -> dict:
        try:
            return self.deployments[(ns, name)]
        except KeyError:
            raise ApiError(404, f'deployments.apps "{name}" not found') from None

    def _list_deployments(self, ns, query):
        reqs = parse_selector(query.get("labelSelector", ""))
        items = [copy.deepcopy(d) for (n, _), d in sorted(self.deployments.items())
                 if n == ns and selector_matches(reqs, d["metadata"].get("labels", {}))]
        return _list("DeploymentList", "apps/v1", items, self._rv())

    def _get_deployment(self, ns, name):
        return copy.deepcopy(self._deployment(ns, name))

    def _scale_of(self, d: dict) -> dict:
        labels = d["spec"]["selector"]["matchLabels"]
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": d["metadata"]["name"],
                             "namespace": d["metadata"]["namespace"],
                             "uid": d["metadata"]["uid"],
                             "resourceVersion": d["metadata"]["resourceVersion"],
                             "creationTimestamp": d["metadata"]["creationTimestamp"]},
                "spec": {"replicas": d["spec"]["replicas"]},
                "status": {"replicas": d["status"].get("replicas", 0),
                           "selector": ",".join(f"{k}={v}" for k, v in sorted(labels.items()))}}

    def _get_scale(self, ns, name):
        return self._scale_of(self._deployment(ns, name))

    def _apply_scale(self, ns: str, name: str, new: dict) -> dict:
        d = self._deployment(ns, name)
        self._check_schema({"apiVersion": "autoscaling/v1", "kind": "Scale", **new}, name)
        version = (new.get("metadata") or {}).get("resourceVersion")
        if version is not None and version != d["metadata"]["resourceVersion"]:
            raise ApiError(409, self._fault_message(409, _Target("patch", "deployments/scale",
                                                                 "apps", ns, name)))
        replicas = (new.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise ApiError(422, f'Scale.autoscaling "{name}" is invalid: spec.replicas: '
                                f"Invalid value: {json.dumps(replicas)}: must be greater "
                                f"than or equal to 0")
        # The spec change answers with its own resourceVersion; the status update that
        # follows (the controllers) moves it on, as in a real cluster.
        scale = self._scale_of(d)
        d["spec"]["replicas"], before = replicas, d["spec"]["replicas"]
        if before != replicas:
            d["metadata"]["generation"] += 1
        d["metadata"]["resourceVersion"] = self._rv()
        scale["spec"]["replicas"] = replicas
        scale["metadata"]["resourceVersion"] = d["metadata"]["resourceVersion"]
        self._reconcile(ns, name)
        return scale

    def _patch_scale(self, ns, name, content_type, body):
        current = self._scale_of(self._deployment(ns, name))
        current["metadata"].pop("resourceVersion")  # only a patch may set a precondition
        return self._apply_scale(ns, name, _patched(current, content_type, body))

    def _put_scale(self, ns, name, content_type, body):
        if not isinstance(body, dict):
            raise ApiError(400, "the body of the request was in an unknown format")
        return self._apply_scale(ns, name, body)

    def _list_pods(self, ns, query):
        self._purge()
        reqs = parse_selector(query.get("labelSelector", ""))
        items = [copy.deepcopy(p) for k, p in sorted(self.pods.items(),
                                                     key=lambda kp: self._order[kp[0]])
                 if k[0] == ns and selector_matches(reqs, p["metadata"].get("labels", {}))]
        return _list("PodList", "v1", items, self._rv())

    def _pod(self, ns: str, name: str) -> dict:
        try:
            return self.pods[(ns, name)]
        except KeyError:
            raise ApiError(404, f'pods "{name}" not found') from None

    def _get_pod(self, ns, name):
        return copy.deepcopy(self._pod(ns, name))

    def _patch_pod(self, ns, name, content_type, body):
        pod = self._pod(ns, name)
        new = _patched(pod, content_type, body)
        self._check_schema(new, name)
        version = new["metadata"].get("resourceVersion")
        if version != pod["metadata"]["resourceVersion"]:
            raise ApiError(409, self._fault_message(409, _Target("patch", "pods", "", ns,
                                                                 name)))
        for part in ("apiVersion", "kind", "spec", "status"):
            if new.get(part) != pod.get(part):
                raise ApiError(422, f'Pod "{name}" is invalid: spec: Forbidden: pod updates '
                                    f"may not change fields other than metadata here")
        meta, old = new["metadata"], pod["metadata"]
        for key in set(meta) | set(old):
            if key not in ("annotations", "labels", "resourceVersion") \
                    and meta.get(key) != old.get(key):
                raise ApiError(422, f'Pod "{name}" is invalid: metadata.{key}: field is '
                                    f"immutable")
        for key, value in (meta.get("annotations") or {}).items():
            if not isinstance(value, str):
                raise ApiError(400, "json: cannot unmarshal number into Go struct field "
                                    "ObjectMeta.metadata.annotations of type string")
            if key == DELETION_COST:
                try:
                    ok = str(int(value)) == value.lstrip("+") and -2**31 <= int(value) < 2**31
                except ValueError:
                    ok = False
                if not ok:
                    raise ApiError(422, f'Pod "{name}" is invalid: metadata.annotations'
                                        f"[{DELETION_COST}]: Invalid value: \"{value}\": "
                                        f"must be a 32bit integer")
        meta["resourceVersion"] = self._rv()
        self.pods[(ns, name)] = new
        return copy.deepcopy(new)

    def _list_hpas(self, ns, query):
        items = [copy.deepcopy(h) for (n, _), h in sorted(self.hpas.items()) if n == ns]
        return _list("HorizontalPodAutoscalerList", "autoscaling/v2", items, self._rv())

    def _list_nodes(self, query):
        reqs = parse_selector(query.get("labelSelector", ""))
        items = [copy.deepcopy(n) for _, n in sorted(self.nodes.items())
                 if selector_matches(reqs, n["metadata"].get("labels", {}))]
        return _list("NodeList", "v1", items, self._rv())


def _patched(current: dict, content_type: str | None, body: Any) -> dict:
    """``current`` with a patch applied; the precondition check is the caller's."""
    if content_type in ("application/merge-patch+json",
                        "application/strategic-merge-patch+json"):
        if not isinstance(body, dict):
            raise ApiError(400, "the body of the request was in an unknown format")
        return _merge(current, body)
    if content_type == "application/json-patch+json":
        if not isinstance(body, list):
            raise ApiError(400, "json patch must be a list of operations")
        return _json_patch(current, body)
    raise ApiError(415, f"the body of the request was in an unknown format - accepted media "
                        f"types include: application/json-patch+json, "
                        f"application/merge-patch+json, "
                        f"application/strategic-merge-patch+json (fake: not {content_type})")


def _replica_set(template: str, prefix: str | None = None) -> str:
    """A ReplicaSet's name: the Deployment's and a pod-template-hash of ``template``."""
    return f"{prefix or template}-{hashlib.sha1(template.encode()).hexdigest()[:10]}"


def _owner(pod: dict) -> str:
    return pod["metadata"]["ownerReferences"][0]["name"]


def _list(kind: str, api_version: str, items: list[dict], version: str) -> dict:
    for item in items:  # list items carry no kind/apiVersion, as in the real API
        item.pop("kind", None)
        item.pop("apiVersion", None)
    return {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": version},
            "items": items}


def _status(code: int, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": _REASONS.get(code, "Unknown"), "code": code}


def _target(method: str, path: str, params: dict[str, str]) -> _Target | None:
    ns, name = params.get("ns"), params.get("name")
    if path.startswith("/apis/apps/v1/") and "/deployments" in path:
        resource, group = ("deployments/scale" if path.endswith("/scale")
                           else "deployments"), "apps"
    elif "/pods" in path:
        resource, group = "pods", ""
    elif path.startswith("/api/v1/nodes"):
        resource, group = "nodes", ""
    elif "/horizontalpodautoscalers" in path:
        resource, group = "horizontalpodautoscalers", "autoscaling"
    else:
        return None
    if method == "GET":
        verb = "get" if name else "list"
    else:
        verb = {"PATCH": "patch", "PUT": "update", "POST": "create",
                "DELETE": "delete"}.get(method, method.lower())
    return _Target(verb, resource, group, ns, name)


def _kind(target: _Target) -> str:
    base = target.resource.split("/")[0]
    return f"{base}.{target.group}" if target.group else base


def _forbidden(target: _Target) -> str:
    subject = f'{_kind(target)} "{target.name}"' if target.name else _kind(target)
    scope = (f'in the namespace "{target.namespace}"' if target.namespace
             else "at the cluster scope")
    return (f'{subject} is forbidden: User "{SERVICE_ACCOUNT}" cannot {target.verb} '
            f'resource "{target.resource}" in API group "{target.group}" {scope}')


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: stop() leaves none open

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        fake: FakeKubernetes = self.server.fake  # type: ignore[attr-defined]
        if fake.latency:
            time.sleep(fake.latency)
        status, extra, payload = fake.handle(self.command, self.path, headers, raw)
        data = json.dumps(payload).encode()
        self.send_response(status, _PHRASES.get(status))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PATCH = do_PUT = do_POST = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass
