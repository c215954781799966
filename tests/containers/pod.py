"""A worker Deployment's pod, run on the Docker engine as the kubelet would run it.

From the manifest ``fleet render k8s`` writes (fleet.render.k8s.worker_deployment), not
from a copy of it: the container's command replaces the image's entrypoint, its env
comes from the manifest (secretKeyRef values from ``secrets``), the ConfigMap's
queues.yaml is mounted where the manifest mounts it, the emptyDirs are tmpfs, the
securityContext is the pod's (uid/gid 10001, read-only root, no capabilities, no
privilege escalation), and ``resources.limits`` become ``--memory`` / ``--cpus``. The
probes run as the kubelet's exec probes do: the command inside the running container,
exit code 0 is success, a command past ``timeoutSeconds`` is a failure.

What differs from a kubelet (docs/docker.md): the container is on the host network (the
engine here has no bridge), the probes run when a test calls them rather than every
``periodSeconds``, and a memory limit below the manifest's may be passed on purpose
(``memory=``), as a LimitRange or a node's own limit would impose.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import docker

from fleet.config import ENV_KEY_PREFIX, FleetConfig
from fleet.render.k8s import worker_deployment
from fleet.units import parse_size
from tests.docker_util import TEST_LABEL

#: Where a test's own ledger lives inside the container (the scratch emptyDir).
LEDGER = "sqlite:////home/fleet/.fleet/ledger.sqlite"


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@dataclass
class Pod:
    """One running worker container and the manifest it came from."""

    container: docker.models.containers.Container
    spec: dict
    grace: int
    probes: dict[str, dict] = field(default_factory=dict)

    def probe(self, kind: str) -> tuple[bool, str]:
        """Run the manifest's ``kind`` probe (liveness, readiness, startup) once, as an
        exec probe: (passed, output)."""
        probe = self.probes[kind]
        command = probe["exec"]["command"]
        timeout = probe.get("timeoutSeconds", 1)
        api = self.container.client.api
        exec_id = api.exec_create(self.container.id, command)["Id"]
        out: list[bytes] = []
        runner = threading.Thread(target=lambda: out.append(api.exec_start(exec_id)),
                                  daemon=True)
        runner.start()
        runner.join(timeout)
        if runner.is_alive():
            return False, f"probe timed out after {timeout}s"
        code = api.exec_inspect(exec_id)["ExitCode"]
        return code == 0, b"".join(out).decode(errors="replace")

    def main_pid(self) -> int:
        """The worker's main process as the host sees it (the container's PID 1)."""
        self.container.reload()
        return int(self.container.attrs["State"]["Pid"])

    def logs(self) -> str:
        return self.container.logs(stdout=True, stderr=True).decode(errors="replace")

    def remove(self) -> None:
        try:
            self.container.remove(force=True)
        except docker.errors.NotFound:
            pass


def run_pod(client: docker.DockerClient, image: str, config: FleetConfig,
            config_path: Path, queue: str, *, prefix: str, memory: str | None = None,
            extra_env: dict[str, str] | None = None) -> Pod:
    """Start the ``queue`` worker Deployment's pod from ``image``. ``memory`` overrides
    the manifest's memory limit (a Kubernetes quantity, e.g. "600Mi"). Its node name
    is ``QUEUE@<this machine's host name>``: one such pod per queue and key prefix."""
    deployment = worker_deployment(config, queue)
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    secrets = {"fleet-broker": {"url": config.broker.url}, "fleet-ledger": {"url": LEDGER}}
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    env[ENV_KEY_PREFIX] = prefix
    env.update(extra_env or {})
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    binds, tmpfs = {}, {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            binds[str(config_path)] = {"bind": f"{mount['mountPath']}/queues.yaml",
                                       "mode": "ro"}
        elif "emptyDir" in volume:
            tmpfs[mount["mountPath"]] = "uid=10001,gid=10001,mode=0770"
    limits = container.get("resources", {}).get("limits", {})
    security = container.get("securityContext", {})
    pod_security = spec.get("securityContext", {})
    options = {
        "entrypoint": container["command"][:1],
        # No --hostname: the worker's default node name (QUEUE@host) is what the probes
        # look for; on the host network the container's host name is the machine's.
        "command": container["command"][1:] + container.get("args", []),
        "environment": env,
        "volumes": binds,
        "tmpfs": tmpfs,
        "network_mode": "host",
        "labels": {TEST_LABEL: "1", "fleet.queue": queue},
        "user": f"{pod_security.get('runAsUser', 0)}:{pod_security.get('runAsGroup', 0)}",
        "read_only": security.get("readOnlyRootFilesystem", False),
        "cap_drop": security.get("capabilities", {}).get("drop", []),
        "security_opt": (["no-new-privileges"]
                         if security.get("allowPrivilegeEscalation") is False else []),
        "detach": True,
    }
    mem = memory or limits.get("memory")
    if mem:
        options["mem_limit"] = parse_size(mem)
        options["memswap_limit"] = parse_size(mem)  # no swap, as a kubelet sets it
    if limits.get("cpu"):
        options["nano_cpus"] = int(cpus(limits["cpu"]) * 1e9)
    started = client.containers.run(image, **options)
    probes = {kind: container[f"{kind}Probe"] for kind in ("liveness", "readiness", "startup")
              if f"{kind}Probe" in container}
    return Pod(started, spec, int(spec.get("terminationGracePeriodSeconds", 30)), probes)
