"""KEDA ScaledObjects for teams that already run KEDA (``fleet render keda``).

One ScaledObject per queue, scaling the queue's worker Deployment on the sum of every
Redis list the queue's messages wait in: kombu keeps a priority queue ``Q`` as the
lists ``Q``, ``Q\\x06\\x163``, ``Q\\x06\\x166`` and ``Q\\x06\\x169`` (all under
``broker.key_prefix``), and LLEN of ``Q`` alone misses every message sent with a
priority of 3 or more.

KEDA's redis scaler watches one key per trigger (``listName``, passed to Redis as is)
and the HPA it drives takes the *largest* of several metrics, not their sum; so the
triggers are named and ``advanced.scalingModifiers`` (KEDA 2.12+) sums them into one
composite metric with the queue's concurrency as the per-replica target.

The list names hold two control characters. YAML writers must escape them: PyYAML
writes such a string double-quoted with ``\\x06``/``\\x16`` escapes, which YAML 1.1 and
1.2 readers (Go's included) turn back into the same bytes; the tests check both.

What KEDA still misses, and fleet's own autoscaler counts (fleet.observe.metrics):
messages workers have taken but not acked (prefetched, ETA/countdown and running
tasks sit in the ``unacked`` hash, not in any list), the age of the oldest waiting
message (KEDA sees depth, not wait), and which pod is busy: on scale-down the HPA picks
a pod without regard to its running tasks, where fleet's autoscaler sets
``controller.kubernetes.io/pod-deletion-cost`` first.
"""

from __future__ import annotations

import math
from urllib.parse import urlparse

from fleet.config import FleetConfig
from fleet.keys import PRIORITY_STEPS, list_keys
from fleet.render.k8s import BROKER_SECRET, deployment_name

#: The TriggerAuthentication every ScaledObject uses: the Redis address and password
#: come from the broker Secret (keys ``address``: host:port, and ``password``), read
#: by the KEDA operator, never written into the ScaledObjects.
TRIGGER_AUTH = "fleet-redis"
#: HPA behaviour stabilization windows are capped at one hour by the API.
MAX_STABILIZATION_SECONDS = 3600


def trigger_name(step: int) -> str:
    """A name the scaling formula can use (expr identifiers): p0 is the plain list."""
    return f"p{step}"


def database_index(config: FleetConfig) -> int:
    """The Redis DB of the broker URL (``redis://host:6379/2`` -> 2; default 0)."""
    path = urlparse(config.broker.url).path.strip("/")
    return int(path) if path.isdigit() else 0


def trigger_authentication(config: FleetConfig) -> dict:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": {"name": TRIGGER_AUTH, "namespace": config.autoscaler.kubernetes.namespace},
        "spec": {"secretTargetRef": [
            {"parameter": "address", "name": BROKER_SECRET, "key": "address"},
            {"parameter": "password", "name": BROKER_SECRET, "key": "password"},
        ]},
    }


def scaled_object(config: FleetConfig, queue: str) -> dict:
    q = config.queue(queue)
    scaling = q.autoscaling
    target = config.autoscaler.kubernetes
    per_replica = str(q.concurrency)
    triggers = [
        {
            "type": "redis",
            "name": trigger_name(step),
            "metadata": {
                "listName": name,
                "listLength": per_replica,
                "databaseIndex": str(database_index(config)),
            },
            "authenticationRef": {"name": TRIGGER_AUTH},
        }
        for step, name in zip(PRIORITY_STEPS, list_keys(config, queue), strict=True)
    ]
    # KEDA activates (0 -> 1 replica) when the value is *above* the activation target;
    # fleet's activation_threshold is the count that activates, hence the minus one.
    activation = str(max(0, scaling.activation_threshold - 1))
    down = min(MAX_STABILIZATION_SECONDS, math.ceil(scaling.scale_down_stabilization))
    up = min(MAX_STABILIZATION_SECONDS, math.ceil(scaling.scale_up_stabilization))
    metadata = {
        "name": deployment_name(config, queue),
        "namespace": target.namespace,
        "labels": {"app.kubernetes.io/name": "fleet", "fleet.io/queue": queue},
    }
    if scaling.max_replicas == 0:
        # KEDA requires maxReplicaCount >= 1; a queue switched off is a paused one.
        metadata["annotations"] = {"autoscaling.keda.sh/paused-replicas": "0"}
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": metadata,
        "spec": {
            "scaleTargetRef": {"name": deployment_name(config, queue)},
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": max(1, scaling.max_replicas),
            "pollingInterval": max(1, math.ceil(config.autoscaler.interval)),
            # KEDA's cooldown applies to the last replica (1 -> 0); the HPA's own
            # scale-down window below applies above one replica.
            "cooldownPeriod": math.ceil(scaling.scale_down_stabilization),
            "advanced": {
                "scalingModifiers": {
                    "formula": " + ".join(t["name"] for t in triggers),
                    "target": per_replica,
                    "activationTarget": activation,
                    "metricType": "AverageValue",
                },
                "horizontalPodAutoscalerConfig": {"behavior": {
                    "scaleDown": {"stabilizationWindowSeconds": down},
                    "scaleUp": {"stabilizationWindowSeconds": up},
                }},
            },
            "triggers": triggers,
        },
    }


def render_scaled_objects(config: FleetConfig) -> list[dict]:
    """The TriggerAuthentication, then one ScaledObject per queue in queues.yaml order."""
    return [trigger_authentication(config),
            *(scaled_object(config, queue) for queue in config.queues)]
