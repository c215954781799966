"""`fleet up --backend docker`: the README's demo with every worker in a container.

The embedded Redis, the dashboard's store and the demo's files stay on the machine;
the workers are containers of the image built from this tree, on the host network,
sharing the current directory, the workdir and the payload store at the same paths.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from autoscale.backends.docker import LABEL_FLEET, LABEL_QUEUE
from tests.conftest import ROOT, free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]


def test_the_demo_runs_with_every_worker_in_a_container(fleet, docker_engine, docker_client):
    fleet.configure({"autoscaler": {"docker": {"image": docker_engine.image}}})
    fleet_id = fleet.prefix.rstrip(":")
    label = {"label": f"{LABEL_FLEET}={fleet_id}"}
    env = {**fleet.env, "DOCKER_HOST": docker_engine.host,
           "FLEET_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing there: embedded
    seen: dict[str, str] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            for c in docker_client.containers.list(sparse=True, filters=label):
                seen[c.id] = c.attrs["Labels"][LABEL_QUEUE]

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "fleet.cli", "up", "--backend", "docker", "--demo",
             "--exit-when-done", "--records", "400", "--dashboard-port", "0",
             "--workdir", str(fleet.tmp_path / "work"), "--config", str(fleet.config_path)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        done.set()
        watcher.join(5)
    out = run.stdout + run.stderr
    try:
        assert run.returncode == 0, out[-4000:]
        assert out.count(" succeeded: result at file://") == 2, out[-4000:]
        assert "sales by region:" in out
        # Both demo queues ran in containers, and none is left once fleet up is done.
        assert {"default", "heavy"} <= set(seen.values()), seen
        assert docker_client.containers.list(all=True, filters=label) == []
    finally:
        for c in docker_client.containers.list(all=True, filters=label):
            c.remove(force=True)


@pytest.mark.parametrize("broken", ["no engine", "no image"])
def test_fleet_up_without_an_engine_or_its_image_stops_at_once_saying_so(
        fleet, docker_engine, broken):
    image = docker_engine.image if broken == "no engine" else "fleet:not-built-here"
    fleet.configure({"autoscaler": {"docker": {"image": image}}})
    host = "unix:///nonexistent/docker.sock" if broken == "no engine" else docker_engine.host
    env = {**fleet.env, "DOCKER_HOST": host,
           "FLEET_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    run = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "up", "--backend", "docker", "--demo",
         "--dashboard-port", "0", "--workdir", str(fleet.tmp_path / "work"),
         "--config", str(fleet.config_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    expected = ("no Docker engine answers at unix:///nonexistent/docker.sock"
                if broken == "no engine" else
                "image 'fleet:not-built-here' is not on the Docker engine")
    assert expected in run.stderr, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Traceback" not in run.stdout + run.stderr
    assert "stopped." in run.stdout  # the embedded Redis it had started is stopped too
