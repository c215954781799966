"""The job ledger's database goes away for 10 s mid-job (a partition between the fleet
and its PostgreSQL): chunks finishing meanwhile wait to be recorded, ``fleet jobs
watch`` says it is waiting and resumes, and the job ends by itself."""

from __future__ import annotations

import subprocess
import sys
import time
from urllib.parse import urlparse

import pytest

from fleet.jobs.state import JobStore
from fleet.jobs.submit import JobSpec, submit
from tests.conftest import ROOT, wait_for
from tests.fakes.tcp_proxy import TcpProxy
from tests.faults.figures import Figures, report
from tests.integration.test_jobs import write_jsonl
from tests.probe_faults import read_runs

pytestmark = pytest.mark.slow

CHUNKS = 60
OUTAGE = 10.0


def test_a_ledger_outage_is_waited_out(fleet, tmp_path, postgres_url):
    real = urlparse(postgres_url)
    proxy = TcpProxy((real.hostname, real.port or 5432))
    ledger = f"postgresql://{real.username}@127.0.0.1:{proxy.port}{real.path}"
    watch = None
    try:
        fleet.configure({
            "imports": ["tasks.aggregate", "tasks.io", "tasks.heavy", "tests.probe_faults"],
            "queues": {"default": {"tasks": ["tasks.aggregate.*", "fleet.*", "tests.faults.*"],
                                   "concurrency": 2}},
            "jobs": {"ledger": ledger},
        })
        for i in range(2):
            fleet.start_worker("default", name=f"w{i}")
        data = write_jsonl(tmp_path / "n.jsonl", [{"n": i} for i in range(CHUNKS)])
        job = submit(fleet.app(), JobSpec("tests.faults.work", str(data), 1,
                                          kwargs={"seconds": 0.3},
                                          aggregate="tests.faults.total"))
        watch = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli", "jobs", "watch", job.job_id, "--config",
             str(fleet.config_path)], cwd=ROOT, env=fleet.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        store = JobStore(fleet.config)
        wait_for(lambda: store.status(job.job_id).done >= 15, 60, what="15 chunks done")
        proxy.cut()
        time.sleep(OUTAGE)
        proxy.mend()
        back = time.monotonic()
        out, err = watch.communicate(timeout=120)
        recovery = time.monotonic() - back
        status = store.status(job.job_id)
        runs = read_runs(fleet.config)
        completed = sum(1 for i in range(CHUNKS) if runs.ended[f"{job.job_id}.{i}"] >= 1)
        figures = report(Figures(
            case=f"job ledger (PostgreSQL) unreachable for {OUTAGE:g}s", submitted=CHUNKS,
            completed=completed, lost=CHUNKS - status.done, duplicated=runs.duplicated(),
            recovery_s=recovery))
        assert watch.returncode == 0, out + err
        assert "waiting: the job ledger at" in err and "is not answering" in err, err
        assert "the job ledger answers again" in err, err
        assert "Traceback" not in err
        assert status.state == "succeeded"
        assert figures.lost == 0 and completed == CHUNKS
        assert figures.duplicated == 0, runs.ended.most_common(5)
    finally:
        if watch is not None and watch.poll() is None:
            watch.kill()
        fleet.close()
        proxy.close()
