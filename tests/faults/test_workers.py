"""A worker, or one of its pool processes, is SIGKILLed mid-job: the job still ends.

What the killed process held comes back (the pool child's task at once, through
reject_on_worker_lost; a dead worker's after its lease lapses, one visibility timeout)
and runs again; nothing else runs twice. ``fleet jobs status`` says where the chunks
are meanwhile, the dead worker's among them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from fleet.heartbeat import stale_after
from fleet.jobs.state import JobStore
from fleet.jobs.submit import JobSpec, submit
from fleet.payloads import open_store
from tests.conftest import ROOT, wait_for
from tests.faults.figures import Figures, report
from tests.integration.test_jobs import write_jsonl
from tests.probe_faults import read_runs, runs_log

pytestmark = pytest.mark.slow

CHUNKS = 40
SECONDS = 0.6
VISIBILITY = 20.0


def configure(fleet) -> None:
    fleet.configure({
        "imports": ["tasks.aggregate", "tasks.io", "tasks.heavy", "tests.probe_faults"],
        "broker": {"visibility_timeout": f"{VISIBILITY:g}s", "lease": {"interval": "2s"}},
        "queues": {"default": {"tasks": ["tasks.aggregate.*", "fleet.*", "tests.faults.*"],
                               "concurrency": 2, "prefetch_multiplier": 1}},
        "jobs": {"reconciler": {"interval": "1s", "grace": "3s"}},
        "autoscaler": {"worker_metrics_interval": "1s"},
    })


def running_now(fleet, pids: set[int]) -> dict[str, int]:
    """task id -> pool pid of the chunks started and not ended, in processes ``pids``."""
    started, ended = {}, set()
    log = runs_log(fleet.config)
    for line in (log.read_text() if log.exists() else "").splitlines():
        what, task_id, _host, pid, _at = line.split()
        if what == "start" and int(pid) in pids:
            started[task_id] = int(pid)
        elif what == "end":
            ended.add(task_id)
    return {t: p for t, p in started.items() if t not in ended}


def start_job(fleet, tmp_path):
    data = write_jsonl(tmp_path / "n.jsonl", [{"n": i} for i in range(CHUNKS)])
    return submit(fleet.app(), JobSpec("tests.faults.work", str(data), 1,
                                       kwargs={"seconds": SECONDS},
                                       aggregate="tests.faults.total"))


def finish(fleet, job, killed_at: float, excused: set[str], case: str, bound: float):
    store = JobStore(fleet.config)
    status = wait_for(lambda: (s := store.status(job.job_id)).is_terminal and s,
                      bound + 60, interval=0.5, what="the job to end by itself")
    recovery = time.monotonic() - killed_at
    runs = read_runs(fleet.config)
    completed = sum(1 for i in range(CHUNKS) if runs.ended[f"{job.job_id}.{i}"] >= 1)
    figures = report(Figures(case=case, submitted=CHUNKS, completed=completed,
                             lost=CHUNKS - status.done, duplicated=runs.duplicated(excused),
                             recovery_s=recovery, extra={"rerun": len(excused)}))
    assert status.state == "succeeded", status
    assert json.loads(open_store(fleet.config.payloads).get(status.result_url)) == \
        sum(range(CHUNKS))
    assert figures.lost == 0 and completed == CHUNKS
    assert figures.duplicated == 0, runs.ended.most_common(5)
    assert recovery < bound, (recovery, bound)
    return figures


def test_a_sigkilled_worker_loses_no_chunk(fleet, tmp_path):
    configure(fleet)
    doomed = fleet.start_worker("default", name="doomed")
    fleet.start_worker("default", name="survivor")
    job = start_job(fleet, tmp_path)
    pool = {p.pid for p in psutil.Process(doomed.pid).children()}
    held = wait_for(lambda: running_now(fleet, pool), 60, interval=0.05,
                    what="the doomed worker to run chunks")
    doomed.kill()  # SIGKILL to the worker and its pool: what node loss or OOM does
    killed_at = time.monotonic()
    # Meanwhile, `fleet jobs status` tells the dead worker's chunks from lost ones: once
    # its last report is stale (stale_after) and its leases older than two renewals,
    # and until the visibility timeout puts the messages back in the queue.
    shows_from = max(stale_after(fleet.config), 2 * 2 + 1)
    assert shows_from < VISIBILITY - 5, "no window in which the status can say it"
    time.sleep(shows_from)

    def status() -> str:
        done = subprocess.run([sys.executable, "-m", "fleet.cli", "jobs", "status",
                               job.job_id, "--config", str(fleet.config_path)],
                              capture_output=True, text=True, env=fleet.env, cwd=ROOT,
                              timeout=60)
        return done.stdout + done.stderr

    seen: list[str] = []

    def shows_them() -> bool:
        seen.append(status())
        return "held by a worker that stopped (back in the queue within" in seen[-1]

    try:
        wait_for(shows_them, VISIBILITY - 2 - (time.monotonic() - killed_at), interval=0.5,
                 what="fleet jobs status to show the dead worker's chunks")
    except AssertionError:
        raise AssertionError(seen[-1] if seen else "no status") from None
    figures = finish(fleet, job, killed_at, set(held), "worker SIGKILLed mid-job",
                     bound=VISIBILITY + 30 + CHUNKS * SECONDS / 2)
    assert figures.extra["rerun"] >= 1


def test_a_sigkilled_pool_process_loses_no_chunk(fleet, tmp_path):
    configure(fleet)
    worker = fleet.start_worker("default", name="one")
    fleet.start_worker("default", name="two")
    job = start_job(fleet, tmp_path)
    pool = {p.pid for p in psutil.Process(worker.pid).children()}
    held = wait_for(lambda: running_now(fleet, pool), 60, interval=0.05,
                    what="a pool process to run a chunk")
    task_id, pid = next(iter(held.items()))
    psutil.Process(pid).send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    finish(fleet, job, killed_at, {task_id}, "pool process SIGKILLed mid-chunk",
           bound=30 + CHUNKS * SECONDS / 2)
    assert worker.alive()  # the worker replaced its pool process and went on
