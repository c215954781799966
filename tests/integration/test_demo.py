"""The README's run command (`fleet up --demo`): an autoscaled fleet on an embedded
Redis runs the demo jobs, and Ctrl-C stops everything."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from tests.conftest import ROOT, free_port, wait_for

pytestmark = pytest.mark.slow


def demo_cmd(fleet, *extra, dashboard_port: int = 0):
    return [sys.executable, "-m", "fleet.cli", "up", "--demo", "--records", "3000",
            "--workdir", str(fleet.tmp_path / "work"), "--config", str(fleet.config_path),
            "--dashboard-port", str(dashboard_port), *extra]


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def assert_all_gone(procs: list[psutil.Process]) -> None:
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


def test_demo_runs_on_an_embedded_redis_and_exits_cleanly(fleet):
    nothing_here = f"redis://127.0.0.1:{free_port()}/0"
    env = {**fleet.env, "FLEET_BROKER_URL": nothing_here}
    proc = subprocess.Popen(demo_cmd(fleet, "--exit-when-done"), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, psutil.Process] = {}

    def heavy_worker_up():
        # heavy has min_replicas 0: its worker exists only because the autoscaler saw
        # the heavy job's backlog.
        for p in descendants(proc.pid):
            seen.setdefault(p.pid, p)
        return any(_cmdline(p).find("--queue heavy") >= 0 for p in seen.values())

    wait_for(heavy_worker_up, 90, what="the autoscaler to start a heavy worker")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out + err
    assert f"no Redis at {nothing_here}: starting an embedded one" in out
    assert out.count(" succeeded: result at file://") == 2
    assert "sales by region:" in out and "north" in out
    assert out.strip().endswith("stopped.")
    assert_all_gone(list(seen.values()))


def test_ctrl_c_stops_everything_and_leaves_no_orphans(fleet):
    env = {**fleet.env, "FLEET_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    log = fleet.tmp_path / "demo.out"
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(demo_cmd(fleet, dashboard_port=port), cwd=ROOT, env=env,
                                stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: "the fleet is running" in log.read_text(), 240,
                 what="the demo jobs to finish")
        assert f"dashboard on http://127.0.0.1:{port}/" in log.read_text()
        # The dashboard fleet up started saw both demo jobs through to the end.
        def both_succeeded():
            jobs = requests.get(f"http://127.0.0.1:{port}/api/fleet/jobs", timeout=5).json()
            return [j for j in jobs if j["state"] == "succeeded"] if len(jobs) == 2 else None
        jobs = wait_for(both_succeeded, 30, what="the dashboard to list the jobs")
        assert len(jobs) == 2, jobs
        tree = descendants(proc.pid)
        assert any("redis-server" in " ".join(p.cmdline()) for p in tree)
        assert any("--queue default" in " ".join(p.cmdline()) for p in tree)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - started < 45
        assert log.read_text().strip().endswith("stopped.")
        assert "Traceback" not in log.read_text()
        wait_for(lambda: not [p for p in tree if p.is_running()
                              and p.status() != psutil.STATUS_ZOMBIE], 10,
                 what="every child process to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
