"""The fleet image, built from this tree by .ci/docker-engine, run on a real engine.

The engine here is cgroup v1, so the memory test covers the v1 path on a real kernel;
tests/unit/test_heartbeat_memory.py covers both layouts from files.
"""

from __future__ import annotations

import psutil
import pytest

from fleet.config import ENV_KEY_PREFIX
from tests.docker_util import run_container

# A cold machine's set-up (engine, base image, build) runs in the first test's fixtures.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

MiB = 1 << 20
READ_MEMORY = ["-c", "from fleet.cgroup import memory_available; print(memory_available())"]


def test_memory_available_is_the_containers_limit(docker_engine, docker_client):
    code, out = run_container(docker_client, docker_engine.image, READ_MEMORY,
                              entrypoint="python3", mem_limit="1536m")
    assert code == 0, out
    reading = int(out.split()[-1])
    # The limit less what the interpreter and its imports use (some tens of MiB); the
    # host's figure (about 22 GiB here) would be far above it.
    assert 1536 * MiB - 256 * MiB < reading <= 1536 * MiB, f"{reading / MiB:.0f} MiB"


def test_without_a_limit_it_is_the_hosts(docker_engine, docker_client):
    # v1 writes "no limit" as a huge number: it must not be taken for a limit.
    code, out = run_container(docker_client, docker_engine.image, READ_MEMORY,
                              entrypoint="python3")
    assert code == 0, out
    reading = int(out.split()[-1])
    assert abs(reading - psutil.virtual_memory().available) < 1024 * MiB, reading


def test_the_image_runs_fleet_as_its_entrypoint(docker_engine, docker_client):
    code, out = run_container(docker_client, docker_engine.image, ["--help"])
    assert code == 0, out
    assert "Usage: fleet" in out and "probe" in out


def test_fleet_probe_in_the_image_sees_a_worker_on_the_host(docker_engine, docker_client,
                                                            fleet):
    """`fleet probe`, the manifests' liveness and readiness command, inside the image
    with the config mounted where the ConfigMap goes, against the host's Redis."""
    worker = fleet.start_worker("io")
    options = {"environment": {ENV_KEY_PREFIX: fleet.prefix},
               "volumes": {str(fleet.config_path): {"bind": "/etc/fleet/queues.yaml",
                                                   "mode": "ro"}}}
    code, out = run_container(docker_client, docker_engine.image,
                              ["probe", "--queue", "io", "--hostname", worker.hostname],
                              **options)
    assert code == 0, out
    assert f"worker {worker.hostname} ok" in out
    absent = f"io-absent@{fleet.prefix.rstrip(':')}"
    code, out = run_container(docker_client, docker_engine.image,
                              ["probe", "--queue", "io", "--hostname", absent], **options)
    assert code == 1, out
    assert f"worker {absent} has not reported" in out
