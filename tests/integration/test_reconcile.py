"""The reconciler: lost chunks and collect steps are found and sent again, nothing else.

The decision is tested as a pure function; the passes against the real Redis (the
test's key prefix) and the ledger, with messages removed by hand the way a broker
fault removes them.
"""

from __future__ import annotations

import json
import time

import pytest

from autoscale.reconcile import Reconciler, Unit, confirm_lost, should_scan
from fleet.jobs.ids import chunk_task_id, collect_task_id
from fleet.jobs.state import JobStore
from fleet.jobs.submit import JobSpec, submit
from fleet.payloads import open_store
from tests.conftest import wait_for
from tests.integration.test_jobs import write_jsonl

FAULTS = {"imports": ["tasks.aggregate", "tasks.io", "tasks.heavy", "tests.probe_faults"],
          "queues": {"default": {"tasks": ["tasks.aggregate.*", "fleet.*", "tests.faults.*"]}},
          "jobs": {"reconciler": {"grace": "1s", "interval": "1s"}},
          # Reports every 0.5 s: a lost chunk is confirmed after 2 s of passes.
          "autoscaler": {"worker_metrics_interval": "0.5s"}}


def later(reconciler: Reconciler):
    """The next pass, once a suspicion is old enough to be confirmed."""
    time.sleep(reconciler.confirm_after + 0.1)
    return reconciler.run_once()


def unit(job: str, index: int) -> Unit:
    return Unit(job, index, frozenset({chunk_task_id(job, index)}))


# -- the decision -------------------------------------------------------------------

def test_a_unit_is_lost_only_when_passes_miss_it_for_long_enough():
    job = "job-aaaaaaaaaaaa"
    units = [unit(job, 0), unit(job, 1), unit(job, 2)]
    present = {chunk_task_id(job, 0)}
    first = confirm_lost(units, present, {}, now=100.0, confirm_after=5.0)
    assert first.lost == ()
    assert first.suspected == {chunk_task_id(job, 1): 100.0, chunk_task_id(job, 2): 100.0}
    # Too soon: a worker that runs chunk 1 may not have reported since Redis came back.
    early = confirm_lost(units, present, first.suspected, now=103.0, confirm_after=5.0)
    assert early.lost == () and early.suspected == first.suspected
    # Chunk 2 turned up meanwhile (it was moving between a list and unacked).
    second = confirm_lost(units, present | {chunk_task_id(job, 2)}, early.suspected,
                          now=105.0, confirm_after=5.0)
    assert [u.index for u in second.lost] == [1] and second.suspected == {}


def test_a_collect_step_is_alive_while_its_collect_or_aggregate_task_is():
    job = "job-bbbbbbbbbbbb"
    step = Unit(job, None, frozenset({collect_task_id(job), f"{job}.agg"}))
    assert confirm_lost([step], {f"{job}.agg"}, {step.key: 0.0}, 10.0, 5.0).lost == ()
    assert confirm_lost([step], set(), {step.key: 0.0}, 10.0, 5.0).lost == (step,)


@pytest.mark.parametrize(("suspects", "messages", "before", "since", "why"), [
    ({}, {}, {}, 999.0, None),
    ({"default": 3}, {"default": 3}, {}, 1.0, None),
    ({"default": 3}, {"default": 2}, {}, 1.0, "fewer messages than pending"),
    ({"default": 3}, {"default": 5}, {}, 31.0, "periodic check"),
    ({}, {}, {"x": 0.0}, 1.0, "confirming"),
])
def test_the_lists_are_read_only_when_the_counts_do_not_add_up(suspects, messages, before,
                                                               since, why):
    found = should_scan(suspects, messages, 0, before, since, 30.0)
    assert (found is None) if why is None else why in found


# -- passes against Redis and the ledger ------------------------------------------------

def submitted_job(fleet, tmp_path, n: int = 6, chunk: int = 2):
    fleet.configure(FAULTS)
    data = write_jsonl(tmp_path / "n.jsonl", [{"n": i} for i in range(n)])
    app = fleet.app()
    done = submit(app, JobSpec("tests.faults.work", str(data), chunk,
                               aggregate="tests.faults.total"))
    return app, done


def test_a_chunk_lost_in_flight_is_sent_again_after_two_passes(fleet, tmp_path, redis_client):
    app, done = submitted_job(fleet, tmp_path)
    queue = f"{fleet.prefix}default"
    lost = redis_client.rpop(queue)  # the oldest message: chunk 0, popped and gone
    assert f'"{done.job_id}.0"'.encode() in lost
    reconciler = Reconciler(fleet.config, app)
    assert reconciler.run_once().scanned is None  # within the grace: not suspected yet
    time.sleep(1.2)
    first = reconciler.run_once()
    assert "fewer messages than pending chunks in default" in first.scanned
    assert (first.suspected, first.resent) == (1, {})
    assert reconciler.run_once().resent == {}  # suspected, but not for long enough
    second = later(reconciler)
    assert second.resent == {done.job_id: 1}
    messages = redis_client.lrange(queue, 0, -1)
    assert len(messages) == 3 and sum(f'"{done.job_id}.0"'.encode() in m for m in messages) == 1
    status = JobStore(fleet.config).status(done.job_id)
    assert status.reconciled == 1
    from tests.integration.test_jobs import cli

    shown = cli(fleet, "jobs", "status", done.job_id)
    assert "healed    1 chunks or steps sent again by the reconciler" in shown.stdout
    assert "3 waiting in a queue" in shown.stdout, shown.stdout
    # Everything is where it should be now: the next passes send nothing.
    assert reconciler.run_once().resent == {} and reconciler.run_once().resent == {}


def test_chunks_that_are_queued_held_or_done_are_never_sent_again(fleet, tmp_path, redis_client):
    app, done = submitted_job(fleet, tmp_path, n=8)
    store = JobStore(fleet.config)
    store.record_success(done.job_id, 0, 1)           # done (its message still queued)
    time.sleep(1.2)
    reconciler = Reconciler(fleet.config, app)
    for _ in range(3):
        assert later(reconciler).resent == {}
    assert redis_client.llen(f"{fleet.prefix}default") == 4


def test_a_lost_collect_step_is_sent_again(fleet, tmp_path, redis_client):
    app, done = submitted_job(fleet, tmp_path, n=4)
    store = JobStore(fleet.config)
    redis_client.delete(f"{fleet.prefix}default")      # every chunk message...
    store.record_success(done.job_id, 0, 1)            # ... but both chunks ran:
    assert store.record_success(done.job_id, 1, 5) == "collect"  # and the collect was lost
    time.sleep(1.2)
    reconciler = Reconciler(fleet.config, app)
    assert reconciler.run_once().collects == []
    assert later(reconciler).collects == [done.job_id]
    [message] = redis_client.lrange(f"{fleet.prefix}default", 0, -1)
    assert f'"{collect_task_id(done.job_id)}"'.encode() in message
    fleet.start_worker("default")
    status = wait_for(lambda: (s := store.status(done.job_id)).is_terminal and s, 60)
    assert status.state == "succeeded" and status.reconciled == 1
    assert json.loads(open_store(fleet.config.payloads).get(status.result_url)) == 6


def test_a_submission_whose_submitter_died_is_completed(fleet, tmp_path, redis_client):
    """The submitter wrote the job and part of its manifest, then was killed."""
    app, done = submitted_job(fleet, tmp_path, n=6)
    store = JobStore(fleet.config)
    redis_client.delete(f"{fleet.prefix}default")
    from sqlalchemy import delete, update

    from fleet.database import transaction
    from fleet.jobs.ledger import chunks, jobs

    with transaction(store.engine, write=True) as conn:  # as it was before chunks 1, 2
        conn.execute(delete(chunks).where(chunks.c.job_id == done.job_id, chunks.c.idx > 0))
        conn.execute(update(jobs).where(jobs.c.id == done.job_id).values(
            state="submitting", updated=time.time() - 60))
    reconciler = Reconciler(fleet.config, app)
    first = reconciler.run_once()
    assert first.resent == {done.job_id: 2}            # the two it never wrote
    assert store.status(done.job_id).state == "running"
    time.sleep(1.2)
    reconciler.run_once()
    assert later(reconciler).resent == {done.job_id: 1}  # and chunk 0, lost too
    fleet.start_worker("default")
    status = wait_for(lambda: (s := store.status(done.job_id)).is_terminal and s, 60)
    assert status.state == "succeeded"
    assert json.loads(open_store(fleet.config.payloads).get(status.result_url)) == 15


def test_reconcile_once_on_the_command_line(fleet, tmp_path, redis_client):
    from tests.integration.test_jobs import cli

    _app, done = submitted_job(fleet, tmp_path)
    redis_client.rpop(f"{fleet.prefix}default")
    time.sleep(1.2)
    first = cli(fleet, "reconcile", "--once")
    assert first.returncode == 0, first.stderr
    assert "0 chunks and 0 collect steps sent again; 1 suspected" in first.stdout
    # A second process starts with no memory of what the first suspected: the ledger
    # and Redis are all it goes by, so it needs its own two passes.
    status = cli(fleet, "jobs", "status", done.job_id)
    assert "1 lost in flight (the reconciler sends them again)" in status.stdout, status.stdout
    assert "2 waiting in a queue" in status.stdout
