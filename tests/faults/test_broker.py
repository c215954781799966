"""Redis goes away mid-job: with its data (AOF), or empty. Every job ends by itself.

Each case runs a 200-chunk job on two real workers with the reconciler as its own
process (``fleet reconcile``, what ``fleet up`` and the autoscaler run beside the
workers), on a redis-server of the test's own, and stops that Redis once 60 chunks
are done. Runs are counted outside Redis (tests/probe_faults.py), so a Redis that
comes back empty cannot hide a lost or a duplicated chunk.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from fleet.jobs.state import JobStore
from fleet.jobs.submit import JobSpec, submit
from fleet.payloads import open_store
from tests.conftest import ROOT, wait_for
from tests.fakes.redis_server import PersistentRedis
from tests.faults.figures import Figures, report
from tests.integration.test_jobs import write_jsonl
from tests.probe_faults import read_runs

pytestmark = pytest.mark.slow

CHUNKS = 200
VISIBILITY = 10.0


def configure(fleet, url: str) -> None:
    fleet.configure({
        "imports": ["tasks.aggregate", "tasks.io", "tasks.heavy", "tests.probe_faults"],
        "broker": {"url": url, "visibility_timeout": f"{VISIBILITY:g}s",
                   "lease": {"interval": "2s"}},
        "queues": {"default": {"tasks": ["tasks.aggregate.*", "fleet.*", "tests.faults.*"],
                               "concurrency": 2}},
        "jobs": {"reconciler": {"interval": "1s", "grace": "3s", "full_scan_every": "5s"}},
        "autoscaler": {"worker_metrics_interval": "1s"},
    })


def start_reconciler(fleet):
    log = (fleet.tmp_path / "reconciler.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "reconcile", "--config", str(fleet.config_path)],
        cwd=ROOT, env=fleet.env, stdout=log, stderr=subprocess.STDOUT)


def run_case(fleet, tmp_path, *, outage: float, keep_data: bool) -> Figures:
    server = PersistentRedis(tmp_path / "redis", appendonly=keep_data).start()
    reconciler = None
    try:
        configure(fleet, server.url)
        workers = [fleet.start_worker("default", name=f"w{i}") for i in range(2)]
        reconciler = start_reconciler(fleet)
        data = write_jsonl(tmp_path / "n.jsonl", [{"n": i} for i in range(CHUNKS)])
        job = submit(fleet.app(), JobSpec("tests.faults.work", str(data), 1,
                                          kwargs={"seconds": 0.15},
                                          aggregate="tests.faults.total"))
        store = JobStore(fleet.config)
        wait_for(lambda: store.status(job.job_id).done >= 60, 120, what="60 chunks done")
        server.stop()
        if not keep_data:
            server.wipe()
        time.sleep(outage)
        server.start()
        back = time.monotonic()
        bound = VISIBILITY + 30 + 0.15 * CHUNKS / 4
        status = wait_for(lambda: (s := store.status(job.job_id)).is_terminal and s,
                          bound + 60, interval=0.5, what="the job to end by itself")
        recovery = time.monotonic() - back
        runs = read_runs(fleet.config)
        completed = sum(1 for i in range(CHUNKS) if runs.ended[f"{job.job_id}.{i}"] >= 1)
        figures = report(Figures(
            case=f"redis restarted {'with its data (AOF)' if keep_data else 'EMPTY'} "
                 f"after a {outage:g}s outage",
            submitted=CHUNKS, completed=completed, lost=CHUNKS - status.done,
            duplicated=runs.duplicated(), recovery_s=recovery,
            extra={"reconciled": status.reconciled, "state": status.state}))
        log = (fleet.tmp_path / "reconciler.log").read_text()
        assert status.state == "succeeded", (status, log)
        assert json.loads(open_store(fleet.config.payloads).get(status.result_url)) == \
            sum(range(CHUNKS))
        assert figures.lost == 0 and completed == CHUNKS
        assert figures.duplicated == 0, runs.ended.most_common(5)
        assert recovery < bound, (recovery, bound)
        assert all(w.alive() for w in workers)
        for w in workers:
            assert "Unrecoverable error" not in fleet.log_of(w)
        if not keep_data:
            assert status.reconciled > 0  # the queue was gone: the ledger sent it all again
        return figures
    finally:
        if reconciler is not None:
            reconciler.terminate()
            reconciler.wait(10)
        fleet.close()
        server.stop()


@pytest.mark.parametrize("outage", [10.0, 90.0])
def test_redis_restarted_with_its_data(fleet, tmp_path, outage):
    run_case(fleet, tmp_path, outage=outage, keep_data=True)


def test_redis_restarted_empty_the_ledger_sends_again(fleet, tmp_path):
    run_case(fleet, tmp_path, outage=5.0, keep_data=False)
