"""The job ledger on both databases: counters that stay right under concurrent writers,
the collect step started exactly once, clear errors when the database is away."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import pytest

from fleet.config import with_ledger
from fleet.jobs.ledger import LedgerUnavailableError
from fleet.jobs.state import COLLECT, JobStore
from tests.conftest import ROOT


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_config(request, fleet, tmp_path):
    if request.param == "sqlite":
        return fleet.config
    return with_ledger(fleet.config, request.getfixturevalue("postgres_url"))


def new_job(store: JobStore, job_id: str, total: int) -> None:
    store.create(job_id, task="t", aggregate=None, total=total, records=total,
                 input_desc="x", chunk_size=1, kwargs={}, aggregate_kwargs={}, result_url="u")
    store.add_chunks(job_id, [(i, "default", 10) for i in range(total)])
    store.submitted(job_id)


def _record(config, jobs: list[str], index: int, barrier, out) -> None:
    """One of eight processes: for each job, record chunk ``index`` the moment all eight
    are ready (a barrier), and say what the ledger answered."""
    store = JobStore(config)
    for job_id in jobs:
        barrier.wait(60)
        out.put((job_id, store.record_success(job_id, index, index)))


def test_the_last_chunks_finishing_together_start_the_collect_step_once(ledger_config):
    """Eight processes record the last eight chunks of a job at the same instant, for
    ten jobs. Spawned, not forked: a fork of this many-threaded test process can copy a
    lock some other thread holds."""
    ctx = multiprocessing.get_context("spawn")
    store = JobStore(ledger_config)
    jobs = [f"job-{r:012x}" for r in range(10)]
    for job_id in jobs:
        new_job(store, job_id, 8)
    barrier, out = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_record, args=(ledger_config, jobs, i, barrier, out))
             for i in range(8)]
    for p in procs:
        p.start()
    answers: dict[str, list[str]] = {j: [] for j in jobs}
    for _ in range(8 * len(jobs)):
        job_id, answer = out.get(timeout=120)
        answers[job_id].append(answer)
    for p in procs:
        p.join(30)
    for job_id, said in answers.items():
        assert said.count(COLLECT) == 1, (job_id, said)
        status = store.status(job_id)
        assert (status.done, status.failed, status.state) == (8, 0, "aggregating")


def test_failures_and_late_successes_keep_the_counters_right(ledger_config):
    store = JobStore(ledger_config)
    new_job(store, "job-eeeeeeeeeeee", 3)
    assert store.record_failure("job-eeeeeeeeeeee", 0, "ValueError: x", "ValueError") == \
        "running"
    assert store.record_failure("job-eeeeeeeeeeee", 0, "again", "ValueError") == "running"
    assert store.record_success("job-eeeeeeeeeeee", 1, 1) == "running"
    assert store.record_failure("job-eeeeeeeeeeee", 2, "DeadLettered: poison",
                                "DeadLettered") == "failed"
    status = store.status("job-eeeeeeeeeeee")
    assert (status.done, status.failed, status.dead, status.state) == (1, 2, 1, "failed")
    env = {**os.environ, "FLEET_LEDGER_URL": ledger_config.jobs.ledger,
           "FLEET_KEY_PREFIX": ledger_config.broker.key_prefix}
    shown = subprocess.run([sys.executable, "-m", "fleet.cli", "jobs", "status",
                            "job-eeeeeeeeeeee", "--config", ledger_config.source],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert "dead      1 chunks dead-lettered" in shown.stdout, shown.stdout + shown.stderr
    assert "chunk 2: DeadLettered: poison" in shown.stdout
    # A requeued copy of chunk 0 succeeds after all: counted once, job still failed.
    assert store.record_success("job-eeeeeeeeeeee", 0, 0) == "failed"
    assert store.take_failed("job-eeeeeeeeeeee") == [2]
    status = store.status("job-eeeeeeeeeeee")
    assert (status.done, status.failed, status.state) == (2, 0, "running")
    assert store.record_success("job-eeeeeeeeeeee", 2, 2) == COLLECT
    assert [i for i, _ in store.results("job-eeeeeeeeeeee")] == [0, 1, 2]


def test_jobs_of_other_fleets_in_the_same_database_are_not_listed(ledger_config):
    mine = JobStore(ledger_config)
    other = JobStore(ledger_config.model_copy(update={"broker": ledger_config.broker.model_copy(
        update={"key_prefix": "someone-else:"})}))
    new_job(mine, "job-111111111111", 1)
    new_job(other, "job-222222222222", 1)
    assert mine.recent_ids() == ["job-111111111111"]
    assert other.recent_ids() == ["job-222222222222"]


@pytest.mark.parametrize(("url", "message"), [
    ("postgresql://nobody@127.0.0.1:1/none", "the job ledger at postgresql://nobody@127.0.0.1:1"
                                             "/none is not answering"),
    ("mysql://root@127.0.0.1/test", "only sqlite and postgresql are supported"),
    ("not a url", "is not a SQLAlchemy URL"),
])
def test_a_ledger_that_cannot_be_used_is_one_clear_error(fleet, url, message):
    env = {**fleet.env, "FLEET_LEDGER_URL": url}
    result = subprocess.run([sys.executable, "-m", "fleet.cli", "jobs", "list", "--config",
                             str(fleet.config_path)], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=60)
    assert result.returncode in (2, 3), result
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    if url.startswith("postgresql"):
        with pytest.raises(LedgerUnavailableError, match="is not answering"):
            JobStore(with_ledger(fleet.config, url)).recent_ids()
