"""`fleet autoscale` and `fleet probe` from the command line: output, exit codes, and a
Redis that is not there (a clear message and retries, never a traceback)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, free_port, wait_for


def run(fleet, *args, env_extra=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args, "--config",
                           str(fleet.config_path)], capture_output=True, text=True,
                          env={**fleet.env, **(env_extra or {})}, cwd=ROOT, timeout=timeout)


def test_once_prints_every_decision_with_its_reason_and_starts_nothing(fleet):
    app = fleet.app()
    for _ in range(3):
        app.send_task("tasks.heavy.crunch")
    result = run(fleet, "autoscale", "--once")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["heavy"].startswith("0 -> 3 (3 to run, service time not known yet")
    assert lines["default"].startswith("0 -> 1 (idle; min_replicas 1")
    assert lines["io"] == "0 -> 0 (idle)"
    # Once, locally, it only says what it would do.
    assert "would scale heavy: 0 -> 3" in result.stdout
    assert not list((fleet.tmp_path).glob("**/*.log"))  # no worker was started


def test_once_on_the_stub_backend_acts_and_records_its_decisions(fleet):
    """A backend from the registry by name: the stub's workers do not live here, so
    --once acts (scaling numbers in memory) and the decisions reach Redis."""
    from fleet.keys import broker_client, latest_decisions_key

    app = fleet.app()
    for _ in range(2):
        app.send_task("tasks.heavy.crunch")
    result = run(fleet, "autoscale", "--backend", "stub", "--once")
    assert result.returncode == 0, result.stderr
    assert "scaling heavy: 0 -> 2" in result.stdout and "would scale" not in result.stdout
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines()
                 if not line.startswith("scaling"))
    assert lines["heavy"].startswith("0 -> 2 (2 to run")
    latest = broker_client(fleet.config).hgetall(latest_decisions_key(fleet.config))
    assert json.loads(latest[b"heavy"])["desired"] == 2
    assert json.loads(latest[b"heavy"])["dry_run"] is False
    assert not list((fleet.tmp_path).glob("**/*.log"))  # nothing local was started


def test_once_without_redis_is_a_clear_error(fleet):
    down = f"redis://127.0.0.1:{free_port()}/0"
    result = run(fleet, "autoscale", "--once", env_extra={"FLEET_BROKER_URL": down})
    assert result.returncode == 3
    assert "Redis is not answering" in result.stderr and "Traceback" not in result.stderr


def test_the_loop_without_redis_reports_and_retries(fleet):
    down = f"redis://127.0.0.1:{free_port()}/0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "autoscale", "--interval", "0.5", "--config",
         str(fleet.config_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**fleet.env, "FLEET_BROKER_URL": down}, cwd=ROOT)
    try:
        time.sleep(4)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    retries = [line for line in out.splitlines() if line.startswith("Redis unreachable")]
    assert len(retries) >= 2, out  # backing off: 1 s, 2 s, ...
    assert retries[0].endswith("retrying in 1s") and retries[1].endswith("retrying in 2s")
    assert "Traceback" not in out


@pytest.mark.slow
def test_probe_says_whether_this_hosts_worker_is_alive(fleet):
    import socket

    host = socket.gethostname()
    missing = run(fleet, "probe", "--queue", "default", "--hostname", f"default@{host}-x")
    assert missing.returncode == 1
    assert f"worker default@{host}-x has not reported" in missing.stderr
    worker = fleet.start_worker("default")
    ok = wait_for(lambda: (r := run(fleet, "probe", "--queue", "default", "--hostname",
                                    worker.hostname)).returncode == 0 and r, 20,
                  what="the probe to pass")
    assert f"worker {worker.hostname} ok" in ok.stdout
    worker.signal(signal.SIGSTOP)  # frozen: neither the loop nor the reports go on
    try:
        stale = wait_for(lambda: (r := run(fleet, "probe", "--queue", "default",
                                           "--hostname", worker.hostname, "--max-age", "3")
                                  ).returncode == 1 and r, 30, what="the probe to fail")
        assert "last reported" in stale.stderr or "event loop last ran" in stale.stderr
    finally:
        worker.signal(signal.SIGCONT)
