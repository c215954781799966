"""A scale-down that must stop busy workers: max_replicas lowered from the dashboard
while every heavy worker runs a long chunk. The stopped worker finishes its chunk first
(warm shutdown); nothing is lost, nothing runs twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from fleet.jobs.state import JobStore
from fleet.jobs.submit import JobSpec, submit
from tests.conftest import ROOT, free_port, http_answers, wait_for
from tests.faults.figures import Figures, report
from tests.integration.test_jobs import write_jsonl
from tests.probe_faults import read_runs, runs_log

pytestmark = pytest.mark.slow

CHUNK_S = 15.0


def heavy_workers(proc: subprocess.Popen) -> list[psutil.Process]:
    """fleet up's heavy workers (its children; their pool processes share their command
    line, so the grandchildren are not counted)."""
    out = []
    for p in psutil.Process(proc.pid).children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "--queue heavy" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_lowering_max_replicas_stops_busy_workers_warm(fleet, tmp_path):
    fleet.configure({
        "imports": ["tasks.aggregate", "tasks.io", "tasks.heavy", "tests.probe_faults"],
        "autoscaler": {"interval": "1s", "worker_metrics_interval": "1s"},
        "queues": {
            "default": {"autoscaling": {"min_replicas": 0, "max_replicas": 1}},
            "heavy": {"tasks": ["tasks.heavy.*", "tests.faults.*"], "concurrency": 1,
                      "time_limit": {"soft": "50s", "hard": "60s"},
                      "autoscaling": {"min_replicas": 2, "max_replicas": 2}}},
    })
    port = free_port()
    out = (tmp_path / "up.out").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "up", "--workdir", str(tmp_path / "work"),
         "--config", str(fleet.config_path), "--dashboard-port", str(port)],
        cwd=ROOT, env=fleet.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(heavy_workers(proc)) == 2, 90, what="two heavy workers")
        wait_for(lambda: http_answers(f"http://127.0.0.1:{port}/api/fleet/queues"), 60,
                 what="the dashboard")
        data = write_jsonl(tmp_path / "n.jsonl", [{"n": 1}, {"n": 2}])
        job = submit(fleet.app(), JobSpec("tests.faults.work", str(data), 1,
                                          kwargs={"seconds": CHUNK_S}))

        def both_running():
            log = runs_log(fleet.config)
            return log.exists() and log.read_text().count("start ") == 2

        wait_for(both_running, 60, what="both chunks to run, one per worker")
        before = {p.pid for p in heavy_workers(proc)}
        answer = requests.post(f"http://127.0.0.1:{port}/api/fleet/queues/heavy/bounds",
                               data={"min_replicas": 0, "max_replicas": 1}, timeout=10)
        assert answer.ok, answer.text
        lowered = time.monotonic()
        # One busy worker is asked to stop: it finishes its chunk, then exits.
        try:
            wait_for(lambda: len(heavy_workers(proc)) == 1, CHUNK_S + 60,
                     what="the autoscaler to stop one heavy worker, warm")
        except AssertionError:
            left = [(p.pid, p.status(), p.cmdline()) for p in heavy_workers(proc)]
            raise AssertionError(f"{left}\n{(tmp_path / 'up.out').read_text()}") from None
        stopped_after = time.monotonic() - lowered
        store = JobStore(fleet.config)
        status = wait_for(lambda: (s := store.status(job.job_id)).is_terminal and s, 60)
        runs = read_runs(fleet.config)
        figures = report(Figures(
            case="scale-down of busy workers (max_replicas lowered from the dashboard)",
            submitted=2, completed=sum(1 for n in runs.ended.values() if n), lost=2 - status.done,
            duplicated=runs.duplicated(), recovery_s=time.monotonic() - lowered,
            extra={"worker_exit_s": round(stopped_after, 1)}))
        assert status.state == "succeeded"
        assert figures.lost == 0 and figures.duplicated == 0
        assert all(n == 1 for n in runs.started.values()), runs.started
        # It was not killed early: it ran its chunk to the end before exiting.
        assert stopped_after > CHUNK_S / 2
        assert len(before - {p.pid for p in heavy_workers(proc)}) == 1
        audit = requests.get(f"http://127.0.0.1:{port}/api/fleet/audit", timeout=5).json()
        assert any(a["action"] == "autoscaler.bounds" for a in audit), json.dumps(audit)[:500]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        out.close()
