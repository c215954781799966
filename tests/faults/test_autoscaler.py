"""A broken worker report does not stop the autoscaler: `fleet autoscale` goes on
polling, deciding and starting workers, and the report is dropped with a log line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from fleet.keys import latest_decisions_key, workers_key
from tests.conftest import ROOT, wait_for
from tests.faults.figures import Figures, report

pytestmark = pytest.mark.slow


def test_a_broken_worker_report_does_not_stop_the_autoscaler(fleet, redis_client):
    fleet.configure({
        "autoscaler": {"interval": "1s", "worker_metrics_interval": "1s"},
        "queues": {"heavy": {"autoscaling": {"min_replicas": 0, "max_replicas": 1}}},
    })
    # What killed the loop before: a report with "at" as a string, and one not JSON.
    bad = {"hostname": "liar@h", "queue": "heavy", "pod": "p", "pid": 1, "concurrency": 1,
           "active": 0, "reserved": 0, "processed": 0, "cpu_percent": 0.0, "rss_main": 1,
           "rss_children": 0, "memory_available": 1, "at": "yesterday"}
    redis_client.hset(workers_key(fleet.config),
                      mapping={"liar@h": json.dumps(bad), "garbage@h": b"\x00not json"})
    out = fleet.tmp_path / "autoscale.out"
    with out.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli", "autoscale", "--backend", "local",
             "--workdir", str(fleet.tmp_path / "work"), "--config", str(fleet.config_path)],
            cwd=ROOT, env=fleet.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def decided_at():
            raw = redis_client.hget(latest_decisions_key(fleet.config), "heavy")
            return json.loads(raw)["at"] if raw else None

        first = wait_for(decided_at, 30, what="a first decision")
        app = fleet.app()
        results = [app.send_task("tasks.heavy.sleep", kwargs={"seconds": 0.2, "tag": str(i)})
                   for i in range(3)]
        started = time.monotonic()

        def heavy_worker():
            found = []
            for p in psutil.Process(proc.pid).children(recursive=True):
                try:  # a child may exit between the listing and the look (a pool process)
                    if "--queue heavy" in " ".join(p.cmdline()):
                        found.append(p)
                except psutil.Error:
                    pass
            return found

        wait_for(heavy_worker, 60, what="the autoscaler to start a heavy worker")
        values = [r.get(timeout=90) for r in results]
        figures = report(Figures(case="broken worker reports", submitted=3,
                                 completed=len(values), lost=3 - len(values),
                                 recovery_s=time.monotonic() - started))
        assert figures.completed == 3
        assert proc.poll() is None, out.read_text()
        assert decided_at() > first  # the loop still turns
        text = out.read_text()
        assert "ignoring the malformed report of worker liar@h" in text, text
        assert "Traceback" not in text, text
        assert not redis_client.hexists(workers_key(fleet.config), "liar@h")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
