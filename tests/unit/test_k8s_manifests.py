"""The Kubernetes manifests: rendered by real kustomize, validated against the real
Kubernetes schemas, and checked against queues.yaml (drift).

No cluster here: `kubectl kustomize` builds each kustomization offline, the
kubernetes-validate package holds the API's JSON schemas, and KEDA's objects (CRDs,
not in those schemas) are checked against a schema of the fields fleet writes.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import shutil
import subprocess
from functools import cache
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from fleet.config import FleetConfig, KubernetesTarget, load_config, parse_config
from fleet.render import k8s, keda
from fleet.render.yamlout import dump_all
from tests.conftest import ROOT, deep_merge, shipped_config

K8S = ROOT / "k8s"
#: The Kubernetes version whose schemas the objects must satisfy: the kubectl client
#: here is 1.32, and kubernetes-validate bundles the schemas of 1.32 (and later).
KUBE_VERSION = "1.32"
KUSTOMIZATIONS = ["base", "overlays/external-redis", "overlays/keda"]
QUEUES = list(shipped_config()["queues"])

#: Kubernetes' resource.Quantity syntax (the schema only says "int or string").
QUANTITY_STRICT = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """Render from the files alone: the broker/prefix overrides of a developer's shell
    would change KEDA's list names."""
    for name in ("FLEET_CONFIG", "FLEET_BROKER_URL", "FLEET_KEY_PREFIX"):
        monkeypatch.delenv(name, raising=False)


def config_with(overrides: dict) -> FleetConfig:
    return parse_config(deep_merge(shipped_config(), overrides), "test.yaml")


def shipped() -> FleetConfig:
    return load_config(ROOT / "queues.yaml", key_prefix="")


@cache
def _kustomize(path: str) -> tuple[int, str, str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return -1, "", ""
    done = subprocess.run([kubectl, "kustomize", str(K8S / path)], capture_output=True,
                          text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


def kustomize(path: str) -> list[dict]:
    """The objects `kubectl kustomize k8s/<path>` renders (cached: kubectl runs once)."""
    code, out, err = _kustomize(path)
    if code == -1:
        pytest.skip("kubectl is not installed: cannot render the kustomizations "
                    "(install the kubectl client; it needs no cluster)")
    assert code == 0, f"kubectl kustomize k8s/{path} failed:\n{err}"
    return [doc for doc in yaml.safe_load_all(out) if doc]


def of_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def broker_secret(objects: list[dict]) -> dict:
    found = [o for n, o in of_kind(objects, "Secret").items() if n.startswith("fleet-broker")]
    assert len(found) == 1, found
    return found[0]


def test_the_dashboard_is_deployed_with_auth_a_volume_and_probes():
    objects = kustomize("base")
    dep = of_kind(objects, "Deployment")["fleet-dashboard"]
    spec = dep["spec"]["template"]["spec"]
    container = spec["containers"][0]
    command = container["command"]
    assert command[:2] == ["fleet", "dashboard"] and "--insecure-no-auth" not in command
    assert command[command.index("--admin-token-env") + 1] == "FLEET_DASHBOARD_TOKEN"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthcheck"
    assert spec["automountServiceAccountToken"] is False
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    token = [o for n, o in of_kind(objects, "Secret").items()
             if n.startswith("fleet-dashboard")]
    assert len(token) == 1 and secret_value(token[0], "token") == ""
    claim = spec["volumes"][1]["persistentVolumeClaim"]["claimName"]
    assert claim in of_kind(objects, "PersistentVolumeClaim")


def one(objects: list[dict], kind: str) -> dict:
    found = list(of_kind(objects, kind).values())
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def mounted_config(objects: list[dict]) -> FleetConfig:
    """The queues.yaml the pods get: the data of the generated fleet-config ConfigMap."""
    cm = one(objects, "ConfigMap")
    assert cm["metadata"]["name"].startswith(k8s.CONFIG_MAP + "-")
    return parse_config(yaml.safe_load(cm["data"]["queues.yaml"]), "ConfigMap fleet-config")


def strip_generated_names(deployment: dict) -> dict:
    """kustomize suffixes generated ConfigMaps and Secrets with a content hash and
    rewrites their references; put the plain names back to compare with a render."""
    d = copy.deepcopy(deployment)
    spec = d["spec"]["template"]["spec"]
    for volume in spec.get("volumes", []):
        if "configMap" in volume:
            volume["configMap"]["name"] = k8s.CONFIG_MAP
    for container in spec["containers"]:
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                for plain in (k8s.BROKER_SECRET, k8s.LEDGER_SECRET):
                    if ref["name"].startswith(plain + "-"):
                        ref["name"] = plain
    return d


# --- (a) kustomize renders every kustomization ------------------------------------


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomize_renders(path: str):
    objects = kustomize(path)
    assert set(of_kind(objects, "Namespace")) == {shipped().autoscaler.kubernetes.namespace}
    workers = {n for n, o in of_kind(objects, "Deployment").items()
               if o["metadata"]["labels"].get(k8s.LABEL_COMPONENT) == "worker"}
    assert workers == {f"fleet-worker-{q}" for q in QUEUES}


def test_base_has_redis_autoscaler_config_and_secret():
    objects = kustomize("base")
    assert set(of_kind(objects, "StatefulSet")) == {"redis", "postgres"}
    assert set(of_kind(objects, "Service")) == {"redis", "postgres", "fleet-dashboard"}
    assert {"fleet-autoscaler", "fleet-dashboard"} <= set(of_kind(objects, "Deployment"))
    assert set(of_kind(objects, "ServiceAccount")) == {"fleet-autoscaler"}
    mounted_config(objects)
    broker_secret(objects)


def test_external_redis_overlay_drops_redis_and_points_elsewhere():
    objects = kustomize("overlays/external-redis")
    assert set(of_kind(objects, "StatefulSet")) == {"postgres"}  # the ledger stays
    assert set(of_kind(objects, "Service")) == {"postgres", "fleet-dashboard"}
    url = urlparse(secret_value(broker_secret(objects), "url"))
    assert url.hostname == "redis.example.internal" and url.path == "/2"
    config = mounted_config(objects)
    assert config.payloads.store == "s3"
    images = {name: {c["image"] for c in o["spec"]["template"]["spec"]["containers"]}
              for name, o in of_kind(objects, "Deployment").items()}
    # Workers and the autoscaler run the worker image; only the dashboard has its extra.
    assert images.pop("fleet-dashboard") == {
        "registry.example.com/data-platform/fleet-dashboard:0.1.0"}
    assert set().union(*images.values()) == {"registry.example.com/data-platform/fleet:0.1.0"}


def test_keda_overlay_replaces_fleets_autoscaler_with_scaled_objects():
    objects = kustomize("overlays/keda")
    assert "fleet-autoscaler" not in of_kind(objects, "Deployment")
    for kind in ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"):
        assert not of_kind(objects, kind), kind
    scaled = of_kind(objects, "ScaledObject")
    assert {o["spec"]["scaleTargetRef"]["name"] for o in scaled.values()} == {
        f"fleet-worker-{q}" for q in QUEUES}


# --- (b) schema validation ------------------------------------------------------------


def _kubernetes_objects() -> list[tuple[str, dict]]:
    return [(path, o) for path in KUSTOMIZATIONS for o in kustomize(path)
            if not o["apiVersion"].startswith("keda.sh/")]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_object_validates_against_the_kubernetes_schemas(path: str):
    failures = []
    checked = 0
    for obj in kustomize(path):
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # CRDs: checked against KEDA's fields below
        try:
            # strict: unknown fields are errors (a typo would otherwise be dropped).
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: "
                            f"{'.'.join(map(str, exc.path))}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            failures.append(exc.message)
        checked += 1
    assert not failures, "\n".join(failures)
    assert checked >= len(QUEUES) + 4


def test_the_schema_check_rejects_a_misspelt_field():
    """The validation above can fail: strict mode rejects a field the API does not have."""
    worker = k8s.render_workers(shipped())[0]
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriod"):
        kubernetes_validate.validate(worker, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_names_labels_and_quantities_are_well_formed(path: str):
    """What the JSON schemas leave to the API server: name, label and quantity syntax."""
    problems = []
    for obj in kustomize(path):
        meta = obj["metadata"]
        if not DNS_SUBDOMAIN.match(meta["name"]) or len(meta["name"]) > 253:
            problems.append(f"name {meta['name']!r}")
        for value in meta.get("labels", {}).values():
            if not LABEL_VALUE.match(value) or len(value) > 63:
                problems.append(f"{meta['name']}: label value {value!r}")
        template = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in template.get("containers", []):
            for kind, values in container.get("resources", {}).items():
                for name, value in values.items():
                    if not QUANTITY_STRICT.match(str(value)):
                        problems.append(f"{meta['name']}: {kind}.{name} {value!r}")
    assert not problems, problems


#: The fields of keda.sh/v1alpha1 ScaledObject and TriggerAuthentication that fleet
#: writes, with the types and bounds of KEDA's CRD (config/crd/bases in kedacore/keda).
#: Unknown fields are rejected here, where the API server would silently prune them.
_STR = {"type": "string"}
_INT0 = {"type": "integer", "minimum": 0}
_KEDA_META = {"type": "object", "required": ["name", "namespace"],
              "properties": {"name": _STR, "namespace": _STR,
                             "labels": {"type": "object", "additionalProperties": _STR},
                             "annotations": {"type": "object", "additionalProperties": _STR}}}
SCALED_OBJECT_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
        "metadata": _KEDA_META,
        "spec": {
            "type": "object", "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "additionalProperties": False,
                                   "required": ["name"],
                                   "properties": {"name": {"type": "string", "minLength": 1}}},
                "minReplicaCount": _INT0,
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": _INT0,
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "scalingModifiers": {
                        "type": "object", "additionalProperties": False,
                        "required": ["formula", "target"],
                        "properties": {"formula": _STR, "target": _STR,
                                       "activationTarget": _STR,
                                       "metricType": {"enum": ["AverageValue", "Value"]}}},
                    "horizontalPodAutoscalerConfig": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"behavior": {
                            "type": "object", "additionalProperties": False,
                            "patternProperties": {"^scale(Up|Down)$": {
                                "type": "object", "additionalProperties": False,
                                "properties": {"stabilizationWindowSeconds": {
                                    "type": "integer", "minimum": 0, "maximum": 3600}}}}}}},
                }},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "required": ["type", "metadata"],
                    "properties": {
                        "type": {"const": "redis"}, "name": _STR,
                        "metadata": {"type": "object", "additionalProperties": _STR,
                                     "required": ["listName", "listLength"]},
                        "authenticationRef": {
                            "type": "object", "additionalProperties": False,
                            "required": ["name"], "properties": {"name": _STR}}}}},
            },
        },
    },
}
TRIGGER_AUTH_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"}, "metadata": _KEDA_META,
        "spec": {"type": "object", "additionalProperties": False, "properties": {
            "secretTargetRef": {"type": "array", "items": {
                "type": "object", "additionalProperties": False,
                "required": ["parameter", "name", "key"],
                "properties": {"parameter": _STR, "name": _STR, "key": _STR}}}}},
    },
}
KEDA_SCHEMAS = {"ScaledObject": SCALED_OBJECT_SCHEMA,
                "TriggerAuthentication": TRIGGER_AUTH_SCHEMA}


def test_keda_objects_match_kedas_fields():
    objects = [o for o in kustomize("overlays/keda") if o["apiVersion"].startswith("keda.sh/")]
    assert len(objects) == len(QUEUES) + 1
    for obj in objects:
        jsonschema.validate(obj, KEDA_SCHEMAS[obj["kind"]])
    for so in of_kind(objects, "ScaledObject").values():
        names = [t["name"] for t in so["spec"]["triggers"]]
        assert len(set(names)) == len(names)
        # KEDA's formula may only name triggers of its own ScaledObject.
        formula = so["spec"]["advanced"]["scalingModifiers"]["formula"]
        assert set(re.findall(r"[A-Za-z_]\w*", formula)) == set(names)


def test_the_keda_check_rejects_a_misspelt_field():
    so = keda.render_scaled_objects(shipped())[1]
    so["spec"]["pollingInteval"] = 30
    with pytest.raises(jsonschema.ValidationError, match="pollingInteval"):
        jsonschema.validate(so, SCALED_OBJECT_SCHEMA)


# --- references between objects --------------------------------------------------------


def secret_value(secret: dict, key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_reference_resolves(path: str):
    """Generated names carry a hash: each reference must follow it (kustomize rewrites
    core references; TriggerAuthentication's through overlays/keda/kustomizeconfig.yaml)."""
    objects = kustomize(path)
    secrets = of_kind(objects, "Secret")
    config_maps = of_kind(objects, "ConfigMap")
    accounts = of_kind(objects, "ServiceAccount")
    missing = []
    for name, dep in of_kind(objects, "Deployment").items():
        spec = dep["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            cm = volume.get("configMap")
            if cm and "queues.yaml" not in config_maps.get(cm["name"], {}).get("data", {}):
                missing.append(f"{name}: ConfigMap {cm['name']}")
        for container in spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["key"] not in secrets.get(ref["name"], {}).get("data", {}):
                    missing.append(f"{name}: Secret {ref['name']} key {ref['key']}")
        account = spec.get("serviceAccountName")
        if account and account not in accounts:
            missing.append(f"{name}: ServiceAccount {account}")
    for name, auth in of_kind(objects, "TriggerAuthentication").items():
        for ref in auth["spec"]["secretTargetRef"]:
            if ref["key"] not in secrets.get(ref["name"], {}).get("data", {}):
                missing.append(f"TriggerAuthentication {name}: Secret {ref['name']} {ref['key']}")
    auths = of_kind(objects, "TriggerAuthentication")
    for name, so in of_kind(objects, "ScaledObject").items():
        if so["spec"]["scaleTargetRef"]["name"] not in of_kind(objects, "Deployment"):
            missing.append(f"ScaledObject {name}: target")
        for trigger in so["spec"]["triggers"]:
            if trigger["authenticationRef"]["name"] not in auths:
                missing.append(f"ScaledObject {name}: TriggerAuthentication")
    assert not missing, missing


def test_in_cluster_secret_points_at_the_redis_service():
    objects = kustomize("base")
    service = of_kind(objects, "Service")["redis"]
    secret = broker_secret(objects)
    port = service["spec"]["ports"][0]["port"]
    url = urlparse(secret_value(secret, "url"))
    # The fleet's pods are in the Service's namespace: its short name, whatever that is.
    assert (url.hostname, url.port) == (service["metadata"]["name"], port)
    # KEDA's operator runs in its own namespace: the fully qualified name.
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert secret_value(secret, "address") == f"{host}:{port}"


def test_redis_is_persistent():
    redis_set = of_kind(kustomize("base"), "StatefulSet")["redis"]
    container = redis_set["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    claim = redis_set["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data"
    assert {"name": "data", "mountPath": args[args.index("--dir") + 1]} in container["volumeMounts"]


# --- (c) drift: the manifests are what queues.yaml renders -----------------------------


def test_workers_yaml_is_rendered_from_queues_yaml():
    expected = dump_all(k8s.render_workers(shipped()))
    assert (K8S / "base" / "workers.yaml").read_text() == expected, (
        "k8s/base/workers.yaml has drifted from queues.yaml: "
        "run `fleet render sync`")


def test_base_queues_yaml_is_a_copy_of_the_repositorys():
    assert (K8S / "base" / "queues.yaml").read_bytes() == (ROOT / "queues.yaml").read_bytes(), (
        "k8s/base/queues.yaml (the ConfigMap's source) differs from queues.yaml: "
        "run `fleet render sync`")


def test_keda_scaled_objects_are_rendered_from_queues_yaml():
    expected = dump_all(keda.render_scaled_objects(shipped()))
    assert (K8S / "overlays" / "keda" / "scaledobjects.yaml").read_text() == expected, (
        "k8s/overlays/keda/scaledobjects.yaml has drifted from queues.yaml: "
        "run `fleet render keda -o k8s/overlays/keda/scaledobjects.yaml`")


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_worker_deployments_match_the_mounted_queues_yaml(path: str):
    """What is applied agrees with the config the pods read: each kustomization's worker
    Deployments equal a render of the queues.yaml in its own ConfigMap (an overlay that
    replaces queues.yaml must not change what the base's workers were rendered from)."""
    objects = kustomize(path)
    config = mounted_config(objects)
    namespace = config.autoscaler.kubernetes.namespace
    applied = {n: strip_generated_names(o) for n, o in of_kind(objects, "Deployment").items()
               if o["metadata"]["labels"].get(k8s.LABEL_COMPONENT) == "worker"}
    # Rendered without a namespace: the kustomization's transformer sets it.
    expected = {o["metadata"]["name"]: {**o, "metadata": {**o["metadata"],
                                                          "namespace": namespace}}
                for o in k8s.render_workers(config) if o["kind"] == "Deployment"}
    assert applied.keys() == expected.keys(), (
        f"k8s/{path}: worker Deployments {sorted(applied)} but its queues.yaml has queues "
        f"for {sorted(expected)}: render the workers again and keep overlays in step")
    for name in expected:
        assert applied[name] == expected[name], (
            f"k8s/{path}: Deployment {name} differs from what its queues.yaml renders: run "
            "`fleet render k8s -o k8s/base/workers.yaml`, and keep an overlay's queues.yaml "
            "(resources, time limits, image) in step with the base")
    for obj in objects:
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == namespace, obj["metadata"]["name"]


def test_drift_is_detected():
    """The drift checks can fail: a changed resource class renders different YAML."""
    changed = config_with({"queues": {"heavy": {"kubernetes": {"resources": {
        "limits": {"cpu": "1", "memory": "2Gi"}, "requests": {"cpu": "1", "memory": "2Gi"}}}}}})
    assert dump_all(k8s.render_workers(changed)) != (K8S / "base" / "workers.yaml").read_text()


# --- (d) render_workers ----------------------------------------------------------------


def worker(config: FleetConfig, queue: str) -> dict:
    (found,) = [d for d in k8s.render_workers(config) if d["kind"] == "Deployment"
                and d["metadata"]["labels"][k8s.LABEL_QUEUE] == queue]
    return found


def test_a_disruption_budget_guards_each_queue_that_can_have_two_pods():
    objects = kustomize("base")
    budgets = of_kind(objects, "PodDisruptionBudget")
    deployments = of_kind(objects, "Deployment")
    config = shipped()
    for queue, q in config.queues.items():
        name = k8s.deployment_name(config, queue)
        if q.autoscaling.max_replicas < 2:
            assert name not in budgets, queue
            continue
        spec = budgets[name]["spec"]
        # One pod at a time, and a not-ready pod never blocks a drain.
        assert spec["maxUnavailable"] == 1
        assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        # Exactly that Deployment's pods.
        assert spec["selector"] == deployments[name]["spec"]["selector"]
    assert set(budgets) == {k8s.deployment_name(config, q) for q, c in config.queues.items()
                            if c.autoscaling.max_replicas >= 2}


def test_every_container_says_its_pull_policy():
    """Left out, a :latest image is pulled Always: it fails where the image was loaded
    onto the nodes rather than pushed."""
    for obj in kustomize("base"):
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            assert container.get("imagePullPolicy") == "IfNotPresent", \
                (obj["metadata"]["name"], container["name"])


def test_an_overlay_can_move_the_fleet_to_another_namespace(tmp_path):
    """With kustomize's NamespaceTransformer (setRoleBindingSubjects), as
    docs/kubernetes.md says: every namespaced object, the RoleBinding's subject and the
    autoscaler (which reads its namespace from the downward API) move together."""
    overlay = tmp_path / "moved"
    overlay.mkdir()
    (overlay / "namespace.yaml").write_text(yaml.safe_dump({
        "apiVersion": "builtin", "kind": "NamespaceTransformer",
        "metadata": {"name": "namespace", "namespace": "team-a"},
        "setRoleBindingSubjects": "allServiceAccounts"}))
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "base", overlay)],
        "transformers": ["namespace.yaml"]}))
    done = subprocess.run(["kubectl", "kustomize", str(overlay)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    objects = [o for o in yaml.safe_load_all(done.stdout) if o]
    for obj in objects:
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "team-a", obj["metadata"]["name"]
        for subject in obj.get("subjects", []):
            assert subject["namespace"] == "team-a", obj["metadata"]["name"]
    autoscaler = container_of(of_kind(objects, "Deployment")["fleet-autoscaler"])
    [env] = [e for e in autoscaler["env"] if e["name"] == "FLEET_K8S_NAMESPACE"]
    assert env["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # Nothing else names the old namespace but queues.yaml's out-of-cluster default
    # (inside the ConfigMap) and KEDA's fully qualified Redis address.
    leftovers = [line.strip() for line in done.stdout.splitlines() if "fleet.svc" in line
                 or line.strip() == "namespace: fleet"]
    assert leftovers == ["namespace: fleet"], leftovers


def container_of(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_one_deployment_per_queue_named_and_labelled_from_the_config():
    config = config_with({"autoscaler": {"kubernetes": {
        "namespace": "data", "deployment": "team-{queue}-workers", "image": "reg/fleet:1.2"}}})
    deployments = [d for d in k8s.render_workers(config) if d["kind"] == "Deployment"]
    assert [d["metadata"]["name"] for d in deployments] == [
        f"team-{q}-workers" for q in QUEUES]
    heavy = worker(config, "heavy")
    labels = {"app.kubernetes.io/name": "fleet", "app.kubernetes.io/component": "worker",
              "fleet.io/queue": "heavy"}
    assert "namespace" not in heavy["metadata"]  # the kustomization's, in one place
    assert heavy["metadata"]["labels"] == labels
    assert heavy["spec"]["selector"]["matchLabels"] == labels
    assert heavy["spec"]["template"]["metadata"]["labels"] == labels
    assert container_of(heavy)["image"] == "reg/fleet:1.2"
    assert container_of(heavy)["command"] == ["fleet", "worker", "--queue", "heavy"]


def test_replicas_are_left_to_the_autoscaler():
    config = config_with({"queues": {"default": {"autoscaling": {"min_replicas": 3}}}})
    assert "replicas" not in worker(config, "default")["spec"]


def test_config_and_broker_url_reach_the_container():
    deployment = worker(shipped(), "default")
    container = container_of(deployment)
    env = {e["name"]: e for e in container["env"]}
    assert env["FLEET_CONFIG"]["value"] == "/etc/fleet/queues.yaml"
    assert env["FLEET_BROKER_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "fleet-broker", "key": "url"}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/fleet")
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "fleet-config"


def test_resources_come_from_the_queue_class_in_kubernetes_units():
    config = config_with({"queues": {
        "heavy": {"memory_limit": "1Gi", "kubernetes": {"resources": {
            "requests": {"cpu": "0.5", "memory": "1.5Gi"},
            "limits": {"cpu": "1500m", "memory": "1536Mi"}}}},
        "io": {"kubernetes": {"resources": {"requests": {"memory": "100M"},
                                            "limits": {"memory": "200M"}}}},
    }})
    assert container_of(worker(config, "heavy"))["resources"] == {
        "requests": {"cpu": "0.5", "memory": "1536Mi"},
        "limits": {"cpu": "1500m", "memory": "1536Mi"}}
    assert container_of(worker(config, "io"))["resources"] == {
        "requests": {"cpu": "100m", "memory": "100M"},
        "limits": {"cpu": "500m", "memory": "200M"}}


@pytest.mark.parametrize(("n_bytes", "expected"), [
    (512 * 2**20, "512Mi"), (1536 * 2**20, "1536Mi"), (5 * 2**30, "5Gi"),
    (2**40, "1Ti"), (100 * 10**6, "100M"), (3 * 10**9, "3G"), (1500, "1500"), (0, "0"),
    (2**10 + 1, "1025")])
def test_quantity_is_exact(n_bytes: int, expected: str):
    assert k8s.quantity(n_bytes) == expected
    assert QUANTITY_STRICT.match(expected)


def test_grace_period_covers_hard_limit_and_a_margin_not_the_soft_shutdown():
    """SIGTERM, all the kubelet sends before SIGKILL, starts a warm shutdown, which the
    soft shutdown timeout plays no part in (fleet.shutdown; the fault test pins it)."""
    config = config_with({"queues": {
        "heavy": {"time_limit": {"soft": "10m", "hard": "11m"}, "soft_shutdown_timeout": "90s"},
        "default": {"time_limit": {"soft": "50s", "hard": "61.5s"}},
    }})

    def grace(queue: str) -> int:
        return worker(config, queue)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]

    assert grace("heavy") == 660 + k8s.GRACE_MARGIN_SECONDS
    assert grace("default") == 62 + k8s.GRACE_MARGIN_SECONDS  # rounded up, never down
    # No hard limit (threads pool): the documented default bound.
    assert config.queues["io"].time_limit.hard is None
    assert grace("io") == k8s.UNBOUNDED_TASK_SECONDS + k8s.GRACE_MARGIN_SECONDS


def test_grace_period_without_hard_limit_still_covers_a_long_soft_limit():
    config = config_with({"queues": {"default": {
        "time_limit": {"soft": "20m", "hard": None}, "soft_shutdown_timeout": "1m"}}})
    spec = worker(config, "default")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 1200 + k8s.GRACE_MARGIN_SECONDS


def grace_of(config, queue: str) -> int:
    return worker(config, queue)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def test_shipped_grace_periods_exceed_every_hard_limit():
    config = shipped()
    for queue, q in config.queues.items():
        grace = worker(config, queue)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= (q.time_limit.hard or 0) + 30, queue
        assert grace <= config.autoscaler.kubernetes.max_termination_grace, queue
        # Past Cluster Autoscaler's default cap, the pod asks not to be evicted by it.
        annotations = worker(config, queue)["spec"]["template"]["metadata"].get(
            "annotations", {})
        if grace > k8s.AUTOSCALER_GRACE_CAP:
            assert annotations == k8s.NO_EVICTION, queue
        else:
            assert annotations == {}, queue
    assert [q for q in config.queues if grace_of(config, q) > k8s.AUTOSCALER_GRACE_CAP] \
        == ["heavy", "xl"]


def test_probes_run_fleet_probe_for_the_queue():
    container = container_of(worker(shipped(), "heavy"))
    probe = ["fleet", "probe", "--queue", "heavy"]
    assert container["startupProbe"]["exec"]["command"] == probe
    assert container["readinessProbe"]["exec"]["command"] == probe
    # Liveness reads the local health file, not Redis: a broker outage restarts nothing.
    assert container["livenessProbe"]["exec"]["command"] == [
        *probe, "--live", "--max-age", str(k8s.LIVENESS_MAX_AGE_SECONDS)]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        # A probe starts a Python process: it needs more than the 1 s default timeout.
        assert container[kind]["timeoutSeconds"] >= 5, kind
    live = container["livenessProbe"]
    # A slow node must not restart every worker.
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


def test_solo_pool_has_no_liveness_probe():
    """The solo pool runs each task in the event loop, whose stamp then ages with the
    task (and Celery enforces no time limit there): liveness would kill long tasks."""
    config = config_with({"queues": {"heavy": {
        "pool": "solo", "memory_limit": None, "time_limit": {"soft": None, "hard": None},
        "on_memory_exceeded": {"retry_on": None}}}})
    container = container_of(worker(config, "heavy"))
    assert "livenessProbe" not in container
    assert container["readinessProbe"]["exec"]["command"][:2] == ["fleet", "probe"]


def test_workers_run_as_non_root_without_api_access():
    spec = worker(shipped(), "xl")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    security = container_of(worker(shipped(), "xl"))["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}


def test_dockerfile_user_matches_the_manifests():
    text = (K8S / "Dockerfile").read_text()
    # The base is a build argument (CI builds on a Debian base of its own); users get
    # python:3.11-slim.
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert f"--uid {k8s.RUN_AS_USER}" in text
    assert re.search(rf"^USER {k8s.RUN_AS_USER}$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["fleet"\]$', text, re.M)
    # The worker image leaves the dashboard out; the dashboard's is built with it.
    assert re.search(r"^ARG EXTRAS=s3,k8s$", text, re.M)
    assert 'pip install ".[${EXTRAS}]"' in text
    assert "--build-arg EXTRAS=s3,k8s,dashboard" in text
    # The emptyDir for the local payload store is mounted in the image's workdir.
    workdir = re.findall(r"^WORKDIR (\S+)$", text, re.M)[-1]
    mounts = {m["mountPath"] for m in container_of(worker(shipped(), "io"))["volumeMounts"]}
    assert f"{workdir}/.fleet" in mounts


# --- (d) render_scaled_objects ---------------------------------------------------------


def scaled(config: FleetConfig, queue: str) -> dict:
    (found,) = [o for o in keda.render_scaled_objects(config) if o["kind"] == "ScaledObject"
                and o["metadata"]["labels"]["fleet.io/queue"] == queue]
    return found


def test_keda_watches_every_list_of_a_queue_under_the_key_prefix():
    config = config_with({"broker": {"key_prefix": "team-a:"}})
    triggers = scaled(config, "heavy")["spec"]["triggers"]
    # kombu: the queue's list holds priority 0-2, sub-lists "<q>\x06\x16<step>" the rest.
    assert [t["metadata"]["listName"] for t in triggers] == [
        "team-a:heavy", "team-a:heavy\x06\x163", "team-a:heavy\x06\x166",
        "team-a:heavy\x06\x169"]
    assert {t["type"] for t in triggers} == {"redis"}
    assert {t["authenticationRef"]["name"] for t in triggers} == {keda.TRIGGER_AUTH}


def test_keda_lists_are_the_ones_fleets_autoscaler_counts():
    from fleet.keys import list_keys

    config = config_with({"broker": {"key_prefix": "p:"}})
    for queue in QUEUES:
        names = [t["metadata"]["listName"] for t in scaled(config, queue)["spec"]["triggers"]]
        assert names == list_keys(config, queue)


def test_keda_sums_the_lists_and_targets_the_concurrency():
    config = config_with({
        "broker": {"url": "redis://redis.example:6379/3"},
        "autoscaler": {"interval": "2.5s"},
        "queues": {"io": {"concurrency": 16, "autoscaling": {
            "min_replicas": 1, "max_replicas": 9, "activation_threshold": 5,
            "scale_down_stabilization": "7m", "scale_up_stabilization": "30s"}}},
    })
    so = scaled(config, "io")
    spec = so["spec"]
    assert so["metadata"]["name"] == spec["scaleTargetRef"]["name"] == "fleet-worker-io"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 9)
    assert spec["pollingInterval"] == 3
    assert spec["cooldownPeriod"] == 420
    modifiers = spec["advanced"]["scalingModifiers"]
    assert modifiers["formula"] == "p0 + p3 + p6 + p9"
    assert modifiers["target"] == "16"
    # KEDA activates above the target; fleet's threshold is the count that activates.
    assert modifiers["activationTarget"] == "4"
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 420
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 30
    for trigger in spec["triggers"]:
        assert trigger["metadata"]["listLength"] == "16"
        assert trigger["metadata"]["databaseIndex"] == "3"


def test_keda_redis_address_comes_from_the_secret():
    auth = keda.render_scaled_objects(shipped())[0]
    assert auth["kind"] == "TriggerAuthentication"
    assert {(r["parameter"], r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]} == {
        ("address", "fleet-broker", "address"), ("password", "fleet-broker", "password")}
    text = dump_all(keda.render_scaled_objects(shipped()))
    assert "redis://" not in text and "6379" not in text


def test_a_queue_with_no_replicas_is_paused_in_keda():
    config = config_with({"queues": {"xl": {"autoscaling": {"min_replicas": 0,
                                                              "max_replicas": 0}}}})
    so = scaled(config, "xl")
    assert so["spec"]["maxReplicaCount"] == 1
    assert so["metadata"]["annotations"] == {"autoscaling.keda.sh/paused-replicas": "0"}


def test_control_characters_round_trip_through_yaml():
    config = config_with({"broker": {"key_prefix": "x:"}})
    objects = keda.render_scaled_objects(config)
    text = dump_all(objects)
    # Written as escapes: the file is plain printable text ...
    assert all(ch.isprintable() or ch == "\n" for ch in text)
    assert '"x:heavy\\x06\\x163"' in text
    # ... and reads back as the very same strings.
    assert list(yaml.safe_load_all(text)) == objects


def test_control_characters_survive_kustomize():
    """Go's YAML (kustomize, kubectl) reads the escapes back into the same bytes."""
    expected = {o["metadata"]["name"]: [t["metadata"]["listName"] for t in o["spec"]["triggers"]]
                for o in keda.render_scaled_objects(shipped()) if o["kind"] == "ScaledObject"}
    built = {n: [t["metadata"]["listName"] for t in o["spec"]["triggers"]]
             for n, o in of_kind(kustomize("overlays/keda"), "ScaledObject").items()}
    assert built == expected
    assert built["fleet-worker-heavy"][1] == "heavy\x06\x163"


# --- (e) RBAC: exactly what the autoscaler uses ---------------------------------------


def grants(role: dict) -> set[tuple[str, str, str]]:
    out = set()
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, (
            f"{role['metadata']['name']}: unexpected rule fields {set(rule)}")
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


#: What the Kubernetes backend calls: read Deployments, set their scale, annotate pods
#: with their deletion cost; and, cluster-wide, list nodes for the capacity budget.
ROLE_GRANTS = {
    ("apps", "deployments", "get"), ("apps", "deployments", "list"),
    ("apps", "deployments/scale", "get"), ("apps", "deployments/scale", "patch"),
    ("", "pods", "list"), ("", "pods", "patch"),
    ("autoscaling", "horizontalpodautoscalers", "list"),
}
CLUSTER_ROLE_GRANTS = {("", "nodes", "list")}


def test_autoscaler_role_grants_only_what_it_uses():
    objects = kustomize("base")
    roles = of_kind(objects, "Role")
    cluster_roles = of_kind(objects, "ClusterRole")
    assert set(roles) == {"fleet-autoscaler"}
    assert set(cluster_roles) == {"fleet-autoscaler-nodes"}
    assert grants(roles["fleet-autoscaler"]) == ROLE_GRANTS
    assert grants(cluster_roles["fleet-autoscaler-nodes"]) == CLUSTER_ROLE_GRANTS


def test_autoscaler_runs_as_its_service_account_bound_to_those_roles():
    objects = kustomize("base")
    namespace = shipped().autoscaler.kubernetes.namespace
    subject = {"kind": "ServiceAccount", "name": "fleet-autoscaler", "namespace": namespace}
    bindings = [*of_kind(objects, "RoleBinding").values(),
                *of_kind(objects, "ClusterRoleBinding").values()]
    assert {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in bindings} == {
        ("Role", "fleet-autoscaler"), ("ClusterRole", "fleet-autoscaler-nodes")}
    for binding in bindings:
        assert binding["subjects"] == [subject]
    deployment = of_kind(objects, "Deployment")["fleet-autoscaler"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    assert spec["template"]["spec"]["serviceAccountName"] == "fleet-autoscaler"
    assert container_of(deployment)["command"] == [
        "fleet", "autoscale", "--backend", "kubernetes"]


def test_rbac_check_notices_an_extra_grant_or_a_wildcard():
    role = of_kind(kustomize("base"), "Role")["fleet-autoscaler"]
    extra = copy.deepcopy(role)
    extra["rules"][0]["verbs"].append("delete")
    assert grants(extra) != ROLE_GRANTS
    wildcard = copy.deepcopy(role)
    wildcard["rules"][2]["resources"] = ["*"]
    assert grants(wildcard) != ROLE_GRANTS
    named = copy.deepcopy(role)
    named["rules"][0]["resourceNames"] = ["x"]
    with pytest.raises(AssertionError, match="unexpected rule fields"):
        grants(named)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_fleet_pod_shares_one_job_ledger(path: str):
    """A SQLite file per pod would be a ledger per pod: every worker, the autoscaler
    (it runs the reconciler) and the dashboard read FLEET_LEDGER_URL from one Secret,
    and it names a PostgreSQL server."""
    objects = kustomize(path)
    [secret] = [o for n, o in of_kind(objects, "Secret").items() if n.startswith("fleet-ledger")]
    assert urlparse(secret_value(secret, "url")).scheme == "postgresql"
    for name, deployment in of_kind(objects, "Deployment").items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            ref = env["FLEET_LEDGER_URL"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] == "url", name


def test_the_ledgers_postgres_is_persistent_and_where_its_url_says():
    objects = kustomize("base")
    server = of_kind(objects, "StatefulSet")["postgres"]
    service = of_kind(objects, "Service")["postgres"]
    [secret] = [o for n, o in of_kind(objects, "Secret").items() if n.startswith("fleet-ledger")]
    url = urlparse(secret_value(secret, "url"))
    # By the Service's short name: the pods are in its namespace, whichever that is.
    assert (url.hostname, url.port) == (service["metadata"]["name"],
                                        service["spec"]["ports"][0]["port"])
    assert url.password == secret_value(secret, "password")
    container = server["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    assert (env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"]) == (
        url.username, url.path.lstrip("/"))
    assert server["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_kubectl_apply_k_k8s_applies_the_base():
    assert kustomize(".") == kustomize("base")


def test_one_deployment_name_rule_for_manifests_autoscaler_and_validation():
    assert KubernetesTarget(deployment="w-{queue}-x").deployment_name("io") == "w-io-x"
    config = load_config(ROOT / "queues.yaml")
    target = config.autoscaler.kubernetes.model_copy(update={"deployment": "batch-{queue}"})
    config = config.model_copy(update={"autoscaler": config.autoscaler.model_copy(
        update={"kubernetes": target})})
    for queue in config.queues:
        assert k8s.deployment_name(config, queue) == f"batch-{queue}"
        assert k8s.worker_deployment(config, queue)["metadata"]["name"] == f"batch-{queue}"
