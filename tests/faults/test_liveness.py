"""A broker outage longer than the liveness window restarts no worker: the liveness probe
(``fleet probe --live``) reads the worker's local health file, not Redis, while the
readiness probe, which asks Redis, fails for the outage as it should. A frozen or a
killed worker still fails liveness.

The worker's broker is a redis-server of the test's own (it is stopped here).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import wait_for
from tests.fakes.redis_server import PersistentRedis

pytestmark = pytest.mark.slow

MAX_AGE = 3  # the rendered manifest's is 60 s; the same rule on a shorter clock


def probe(fleet, worker, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet.cli", "probe", "--queue", "default",
                           "--hostname", worker.hostname, "--max-age", str(MAX_AGE), *extra,
                           "--config", str(fleet.config_path)],
                          env=fleet.env, capture_output=True, text=True, timeout=30)


def test_liveness_holds_through_a_broker_outage_and_fails_a_frozen_worker(fleet, tmp_path):
    server = PersistentRedis(tmp_path / "redis").start()
    try:
        fleet.configure({"broker": {"url": server.url},
                         "autoscaler": {"worker_metrics_interval": "0.5s"}})
        worker = fleet.start_worker("default")
        wait_for(lambda: probe(fleet, worker, "--live").returncode == 0, 20,
                 what="liveness to pass")
        assert probe(fleet, worker).returncode == 0  # readiness too

        server.stop()
        outage = time.monotonic()
        live, ready = [], []
        # Four liveness windows without a broker (the old probe, which read Redis,
        # failed from the first second, and the kubelet restarted after three).
        while time.monotonic() - outage < 4 * MAX_AGE:
            live.append(probe(fleet, worker, "--live"))
            ready.append(probe(fleet, worker))
        assert live and all(r.returncode == 0 for r in live), [r.stderr for r in live]
        assert "broker unreachable for" in live[-1].stdout, live[-1].stdout
        # Not ready: it cannot take work, and says why.
        refused = [r for r in ready if r.returncode != 0]
        assert refused and "Redis is not answering" in refused[-1].stderr, refused
        assert "Traceback" not in "".join(r.stderr for r in ready + live)
        assert worker.alive()

        server.start()
        wait_for(lambda: probe(fleet, worker).returncode == 0, 60,
                 what="readiness once the broker is back")
        ok = probe(fleet, worker, "--live")
        assert ok.returncode == 0 and "broker unreachable" not in ok.stdout, ok

        worker.signal(signal.SIGSTOP)  # frozen: no beat, no loop
        try:
            frozen = wait_for(lambda: (r := probe(fleet, worker, "--live")).returncode == 1
                              and r, 30, what="liveness to fail on the frozen worker")
            assert "heartbeat last ran" in frozen.stderr, frozen.stderr
        finally:
            worker.signal(signal.SIGCONT)
        wait_for(lambda: probe(fleet, worker, "--live").returncode == 0, 20,
                 what="liveness after SIGCONT")

        worker.kill()
        gone = probe(fleet, worker, "--live")
        assert gone.returncode == 1
        assert ("process" in gone.stderr and "is gone" in gone.stderr) or \
            "has written no health file" in gone.stderr, gone.stderr
        assert "Traceback" not in gone.stderr
    finally:
        server.stop()
