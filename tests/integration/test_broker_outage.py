"""Redis goes away mid-job and comes back: workers reconnect, no chunk is lost.

This test restarts Redis, so it runs its own redis-server (append-only file on, on a free
port), never the shared one on 6379.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import redis

from fleet.jobs.state import JobStore
from fleet.jobs.submit import JobSpec, submit
from fleet.keys import key
from tests.conftest import wait_for
from tests.fakes.redis_server import PersistentRedis
from tests.integration.test_jobs import PROBES, write_jsonl

pytestmark = pytest.mark.slow


def test_job_survives_a_broker_restart(fleet, tmp_path):
    server = PersistentRedis(tmp_path / "redis").start()
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
        # Redis may go down after popping a message and before the worker reads it:
        # kombu's Redis transport loses that message (fleet.jobs.recover). The job
        # then stalls with nothing queued or held, until `fleet jobs retry` sends the
        # lost chunks again. One visibility timeout (10 s) brings back what was held.
        def ended():
            s = store.status(done.job_id)
            return s if s.is_terminal else None

        try:
            status = wait_for(ended, 40, interval=0.5, what="the job to end")
        except AssertionError:
            result = subprocess.run(
                [sys.executable, "-m", "fleet.cli", "jobs", "retry", done.job_id,
                 "--config", str(fleet.config_path)], capture_output=True, text=True,
                env=fleet.env, timeout=60)
            assert result.returncode == 0, result.stderr
            assert "chunks lost in flight" in result.stdout, result.stdout
        try:
            status = wait_for(ended, 60, interval=0.5, what="the job to end after the retry")
        except AssertionError as exc:
            r = redis.Redis.from_url(server.url)
            p = fleet.prefix
            now = time.time()
            state = {
                "job": r.hgetall(f"{p}fleet:job:{done.job_id}"),
                "unacked ages": [now - score for _, score in
                                 r.zrange(f"{p}unacked_index", 0, -1, withscores=True)],
                "unacked": r.hgetall(f"{p}unacked"),
                "queue": r.llen(f"{p}default"),
                "mutex ttl": r.ttl(f"{p}unacked_mutex"),
            }
            raise AssertionError(f"{exc}: {state}\n{fleet.log_of(worker)[-3000:]}") from None
        assert (status.state, status.done, status.total) == ("succeeded", 40, 40), status
        from fleet.payloads import open_store

        assert json.loads(open_store(fleet.config.payloads).get(status.result_url)) == 780
        assert worker.alive()  # reconnected rather than died
        wait_for(lambda: "Connected to " in fleet.log_of(worker).split(
            "Connection to broker lost")[-1], 20, what="the worker to reconnect")
        assert "Unrecoverable error" not in fleet.log_of(worker)
        runs = redis.Redis.from_url(server.url).hgetall(key(fleet.config, "probe", "runs"))
        assert len(runs) == 40  # every chunk ran (some maybe twice: at-least-once)
    finally:
        fleet.close()
        server.stop()
