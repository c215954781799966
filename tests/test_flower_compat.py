"""Flower, pointed at the fleet's app and broker, sees fleet workers and their tasks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from .conftest import ROOT, free_port, wait_for

pytestmark = pytest.mark.slow
pytest.importorskip("flower", reason="flower is in the dev extra")


def test_flower_sees_fleet_workers_and_tasks(fleet):
    worker = fleet.start_worker("default")
    port = free_port()
    env = {**fleet.env, "FLEET_CONFIG": str(fleet.config_path),
           "FLOWER_UNAUTHENTICATED_API": "true"}  # loopback only, for the test
    log = fleet.tmp_path / "flower.log"
    with log.open("wb") as out:
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "fleet.app", "flower",
             f"--port={port}", "--address=127.0.0.1"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def workers():
            try:
                reply = requests.get(f"{base}/api/workers", params={"refresh": "true"},
                                     timeout=5)
            except requests.ConnectionError:
                return None
            return reply.ok and worker.hostname in reply.json() and reply.json()

        found = wait_for(workers, 60, interval=0.5, what="Flower to list the worker")
        assert found[worker.hostname]["stats"]["pool"]["max-concurrency"] == 2
        result = fleet.app().send_task("tasks.aggregate.sum_by", args=[[{"key": "a"}]])
        assert result.get(timeout=30) == {"a": {"count": 1, "value": 0.0}}

        def task_seen():
            reply = requests.get(f"{base}/api/task/info/{result.id}", timeout=5)
            return reply.ok and reply.json().get("state") == "SUCCESS" and reply.json()

        info = wait_for(task_seen, 30, interval=0.5, what="Flower to see the task succeed")
        assert info["name"] == "tasks.aggregate.sum_by"
        assert info["worker"] == worker.hostname
    finally:
        flower.terminate()
        try:
            flower.wait(timeout=10)
        except subprocess.TimeoutExpired:
            flower.kill()
            flower.wait()
