"""One worker Deployment per queue, derived from queues.yaml (``fleet render k8s``).

Pure functions of the config: what k8s/base/workers.yaml holds, and what the drift test
renders again to check that file against queues.yaml.

Choices a reader may question:

- ``spec.replicas`` is left out. The autoscaler owns the replica count (it patches the
  Deployments' scale subresource); a count in the manifest would be put back by every
  ``kubectl apply`` (client-side apply re-sends it; server-side apply makes the applier
  its owner), scaling the fleet to a stale number and possibly stopping busy workers.
  Kubernetes' own advice for HPA-managed Deployments is the same. A new Deployment
  starts with one replica; the autoscaler takes it to ``min_replicas`` on its first pass.
- The termination grace period covers a task that started just before SIGTERM: a warm
  shutdown waits for running tasks, and the queue's hard time limit bounds them
  (fleet.shutdown says which signal starts which shutdown). Past the grace period the
  kubelet SIGKILLs the pod, and an acks_late task comes back only through the broker's
  visibility timeout. A pod whose grace is above Cluster Autoscaler's default cap (600
  s) is annotated not to be evicted by it (nor by Karpenter), and validation refuses a
  grace above ``autoscaler.kubernetes.max_termination_grace``.
- Probes run ``fleet probe``. Startup and readiness read the worker's own heartbeat in
  Redis: fresh figures and a recent event-loop stamp. Liveness (``--live``) reads the
  worker's local health file instead (fleet.health): its process, heartbeat thread and
  event loop, and not Redis, so a broker outage of any length restarts no worker (the
  loop's stamp is excused while the broker is unreachable: Celery's reconnect loop does
  not turn it). A wedged event loop fails liveness while a long task in a pool process
  does not (the solo pool, whose loop runs the task, gets no liveness probe).
"""

from __future__ import annotations

from fleet.config import FleetConfig, QueueClass, ResourceList
from fleet.shutdown import (  # noqa: F401 (re-exported: the docker backend, the tests)
    AUTOSCALER_GRACE_CAP,
    GRACE_MARGIN_SECONDS,
    UNBOUNDED_TASK_SECONDS,
    grace_period,
    task_bound,
)

#: Where the ConfigMap made from queues.yaml is mounted in every fleet container.
CONFIG_DIR = "/etc/fleet"
CONFIG_PATH = f"{CONFIG_DIR}/queues.yaml"
#: The ConfigMap (kustomize's configMapGenerator adds a content hash to the name and
#: rewrites the references, so a change of queues.yaml rolls the pods).
CONFIG_MAP = "fleet-config"
#: The Secret holding the broker URL (key ``url``), the Redis address for KEDA
#: (``address``) and its password (``password``).
BROKER_SECRET = "fleet-broker"
BROKER_SECRET_URL_KEY = "url"
#: The job ledger's database (jobs.ledger), shared by every pod: PostgreSQL.
LEDGER_SECRET = "fleet-ledger"

#: The image's non-root user (k8s/Dockerfile creates it with this uid).
RUN_AS_USER = 10001


#: Readiness and startup use the probe's default freshness (a few heartbeat intervals);
#: liveness allows this much staleness of the local health file before counting a
#: failure, so a slow node does not restart every worker.
LIVENESS_MAX_AGE_SECONDS = 60

LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_QUEUE = "fleet.io/queue"


def deployment_name(config: FleetConfig, queue: str) -> str:
    """The rule itself is the model's (validation checks the same names)."""
    return config.autoscaler.kubernetes.deployment_name(queue)


def worker_labels(queue: str) -> dict[str, str]:
    return {LABEL_NAME: "fleet", LABEL_COMPONENT: "worker", LABEL_QUEUE: queue}


def quantity(n_bytes: int) -> str:
    """A byte count as a Kubernetes quantity: exact binary units first (1536Mi, 5Gi),
    then exact decimal ones (100M), else plain bytes. Never rounded."""
    for unit, factor in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10),
                         ("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n_bytes >= factor and n_bytes % factor == 0:
            return f"{n_bytes // factor}{unit}"
    return str(n_bytes)


def _resource_list(resources: ResourceList) -> dict[str, str]:
    out = {}
    if resources.cpu is not None:
        out["cpu"] = resources.cpu
    if resources.memory is not None:
        out["memory"] = quantity(resources.memory)
    return out


def resources(q: QueueClass) -> dict[str, dict[str, str]]:
    out = {}
    for kind in ("requests", "limits"):
        values = _resource_list(getattr(q.kubernetes.resources, kind))
        if values:
            out[kind] = values
    return out


def probes(queue: str, q: QueueClass) -> dict[str, dict]:
    probe = ["fleet", "probe", "--queue", queue]
    # Each probe starts a Python process (measured: 0.34 s of CPU, 50 MiB peak, within
    # the container's limits): unhurried periods keep it near 0.01 CPU per pod, and the
    # timeout covers a throttled container.
    out = {
        # The worker needs a few seconds to import, connect and publish its first
        # figures; up to 5 minutes (a slow image pull is not counted here).
        "startupProbe": {"exec": {"command": list(probe)}, "periodSeconds": 5,
                         "timeoutSeconds": 10, "failureThreshold": 60},
        "readinessProbe": {"exec": {"command": list(probe)}, "periodSeconds": 30,
                           "timeoutSeconds": 10, "failureThreshold": 2},
        "livenessProbe": {
            "exec": {"command": [*probe, "--live", "--max-age",
                                 str(LIVENESS_MAX_AGE_SECONDS)]},
            "periodSeconds": 60, "timeoutSeconds": 10, "failureThreshold": 3},
    }
    if q.pool == "solo":
        # The solo pool runs each task in the event loop itself, whose stamp then ages
        # with the task, and Celery enforces no time limit there: a liveness probe would
        # kill healthy workers in the middle of long tasks.
        del out["livenessProbe"]
    return out


#: Pod annotations that keep node autoscalers from evicting a pod they would cut short.
NO_EVICTION = {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
               "karpenter.sh/do-not-disrupt": "true"}


def pod_metadata(labels: dict[str, str], q: QueueClass) -> dict:
    """A pod that needs longer to stop than Cluster Autoscaler grants by default (a long
    task in flight) is not one it may evict to empty a node: it would be killed midway."""
    out: dict = {"labels": dict(labels)}
    if grace_period(q) > AUTOSCALER_GRACE_CAP:
        out["annotations"] = dict(NO_EVICTION)
    return out


def worker_deployment(config: FleetConfig, queue: str) -> dict:
    q = config.queue(queue)
    target = config.autoscaler.kubernetes
    labels = worker_labels(queue)
    container = {
        "name": "worker",
        "image": target.image,
        "imagePullPolicy": target.image_pull_policy,
        "command": ["fleet", "worker", "--queue", queue],
        "env": [
            {"name": "FLEET_CONFIG", "value": CONFIG_PATH},
            {"name": "FLEET_BROKER_URL", "valueFrom": {"secretKeyRef": {
                "name": BROKER_SECRET, "key": BROKER_SECRET_URL_KEY}}},
            {"name": "FLEET_LEDGER_URL", "valueFrom": {"secretKeyRef": {
                "name": LEDGER_SECRET, "key": "url"}}},
        ],
        "resources": resources(q),
        **probes(queue, q),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            # Writable places on a read-only root: temporary files, and the working
            # directory's .fleet (the local payload store of a single-node setup).
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "scratch", "mountPath": "/home/fleet/.fleet"},
        ],
    }
    if not container["resources"]:
        del container["resources"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        # No namespace: kustomize's namespace transformer sets it, the one place.
        "metadata": {"name": deployment_name(config, queue), "labels": dict(labels)},
        "spec": {
            # No "replicas": the autoscaler owns it (see the module docstring).
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": pod_metadata(labels, q),
                "spec": {
                    # Workers never call the Kubernetes API.
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": grace_period(q),
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS_USER,
                        "runAsGroup": RUN_AS_USER,
                        "fsGroup": RUN_AS_USER,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [
                        {"name": "config", "configMap": {"name": CONFIG_MAP}},
                        {"name": "tmp", "emptyDir": {}},
                        {"name": "scratch", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def disruption_budget(config: FleetConfig, queue: str) -> dict | None:
    """At most one of the queue's pods evicted at a time (a node drain, an upgrade), so
    a drain does not stop all its busy workers at once; a pod that is not ready (say,
    during a broker outage) may always be evicted, so it blocks no drain. Only where
    there can be more than one replica: for one, it would guard nothing."""
    if config.queues[queue].autoscaling.max_replicas < 2:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": deployment_name(config, queue), "labels": worker_labels(queue)},
        "spec": {"maxUnavailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                 "selector": {"matchLabels": worker_labels(queue)}},
    }


def render_workers(config: FleetConfig) -> list[dict]:
    """A worker Deployment per queue, each with its PodDisruptionBudget where it has
    one, in queues.yaml's order."""
    out = []
    for queue in config.queues:
        out.append(worker_deployment(config, queue))
        budget = disruption_budget(config, queue)
        if budget is not None:
            out.append(budget)
    return out
