"""Flower, pointed at the fleet's app and broker, sees fleet workers and their tasks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from tests.conftest import ROOT, free_port, wait_for

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
        # The broker is Redis to Flower (it reads the URI's scheme): queue lengths, under
        # the fleet's key prefix, and the broker page both work.
        fleet.app().control.cancel_consumer("default", destination=[worker.hostname],
                                            reply=True, timeout=5)
        waiting = [fleet.app().send_task("tasks.aggregate.sum_by", args=[[{"key": "b"}]])
                   for _ in range(3)]

        def default_length():
            reply = requests.get(f"{base}/api/queues/length", timeout=10)
            assert reply.status_code == 200, reply.text  # was 404: broker not supported
            return {q["name"]: q["messages"] for q in reply.json()["active_queues"]
                    }.get("default") == 3

        wait_for(default_length, 20, interval=0.5, what="Flower to count 3 waiting")
        fleet.app().control.add_consumer("default", destination=[worker.hostname],
                                         reply=True, timeout=5)
        page = requests.get(f"{base}/broker", timeout=10)
        assert page.status_code == 200 and "not supported" not in page.text
        assert "redis://" in page.text and "fleet.transport" not in page.text
        assert [r.get(timeout=30) for r in waiting] == [{"b": {"count": 1, "value": 0.0}}] * 3
    finally:
        flower.terminate()
        try:
            flower.wait(timeout=10)
        except subprocess.TimeoutExpired:
            flower.kill()
            flower.wait()
