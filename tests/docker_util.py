"""The docker tests' engine: .ci/docker-engine installs, starts or reuses a Docker engine
and builds (or reuses) the fleet image from this tree; the tests talk to it with the
docker SDK. docs/docker.md, "Engine in CI".
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "docker-engine"
#: A cold machine installs the engine, makes a base image and builds the fleet image.
SETUP_TIMEOUT = 900
#: Every container a test starts carries it, so a leftover is easy to find and remove.
TEST_LABEL = "fleet.test"


@dataclass(frozen=True)
class DockerEngine:
    """Where the engine answers and the fleet image built from this tree."""

    host: str  # a DOCKER_HOST, unix:///...
    image: str  # fleet:tree-<hash of the image's inputs>

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.host, timeout=120)


def start_engine() -> DockerEngine:
    """Run .ci/docker-engine (idempotent; seconds when the engine runs and the tree's
    image exists) and read what it exports; fail, never skip, when it cannot."""
    try:
        proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True,
                              timeout=SETUP_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{SCRIPT} did not finish in {SETUP_TIMEOUT}s")
    if proc.returncode != 0:
        pytest.fail(f"the docker tests need a Docker engine, and {SCRIPT} failed "
                    f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}", pytrace=False)
    exported = dict(line.removeprefix("export ").split("=", 1)
                    for line in proc.stdout.splitlines() if line.startswith("export "))
    try:
        return DockerEngine(host=exported["DOCKER_HOST"], image=exported["FLEET_IMAGE"])
    except KeyError as missing:
        pytest.fail(f"{SCRIPT} exported no {missing}: {proc.stdout!r}")


def run_container(client: docker.DockerClient, image: str, command: list[str], *,
                  timeout: float = 120, **options) -> tuple[int, str]:
    """Run ``command`` in a new container of ``image`` on the host network (the engine
    here has no bridge; Redis is on 127.0.0.1) until it exits; (exit code, output).
    ``options`` go to ``containers.run`` (mem_limit, environment, volumes, entrypoint)."""
    container = client.containers.run(image, command, detach=True, network_mode="host",
                                      labels={TEST_LABEL: "1"}, **options)
    try:
        status = container.wait(timeout=timeout)
        output = container.logs(stdout=True, stderr=True).decode(errors="replace")
        return status["StatusCode"], output
    finally:
        container.remove(force=True)
