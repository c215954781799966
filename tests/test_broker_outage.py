"""Redis goes away mid-job and comes back: workers reconnect, no chunk is lost.

This test restarts Redis, so it runs its own redis-server (append-only file on, on a free
port), never the shared one on 6379.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from fleet.embedded import redis_server_binary
from fleet.jobs.state import JobStore
from fleet.jobs.submit import JobSpec, submit
from fleet.keys import key

from .conftest import free_port, wait_for
from .test_jobs import PROBES, write_jsonl

pytestmark = pytest.mark.slow


class PersistentRedis:
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.dir = workdir
        self.binary = shutil.which("redis-server") or redis_server_binary()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.dir), "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        wait_for(lambda: _pings(client), 10, what="redis-server to answer")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis-server flushes the AOF and exits
            self.proc.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_job_survives_a_broker_restart(fleet, tmp_path):
    server = PersistentRedis(tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    try:
        fleet.configure({**PROBES, "broker": {"url": server.url, "visibility_timeout": "10s",
                                              "lease": {"interval": "2s"}}})
        records = [{"n": i} for i in range(40)]
        data = write_jsonl(tmp_path / "n.jsonl", records)
        worker = fleet.start_worker("default")
        app = fleet.app()
        done = submit(app, JobSpec("tests.probe.flaky", str(data), 1,
                                   aggregate="tests.probe.total"))
        store = JobStore(fleet.config)
        server.stop()
        time.sleep(3)  # the worker finds its broker gone
        assert worker.alive()
        server.start()
        status = wait_for(lambda: (s := store.status(done.job_id)).is_terminal and s, 120,
                          interval=0.5, what="the job to end after the broker came back")
        assert (status.state, status.done, status.total) == ("succeeded", 40, 40), status
        from fleet.payloads import open_store

        assert json.loads(open_store(fleet.config.payloads).get(status.result_url)) == 780
        assert worker.alive()  # reconnected rather than died
        log = fleet.log_of(worker)
        assert "Unrecoverable error" not in log
        assert "Connected to " in log.split("Connection to broker lost")[-1]
        runs = redis.Redis.from_url(server.url).hgetall(key(fleet.config, "probe", "runs"))
        assert len(runs) == 40  # every chunk ran (some maybe twice: at-least-once)
    finally:
        fleet.close()
        server.stop()
