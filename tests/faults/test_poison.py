"""Poison messages on ``heavy`` (acks_late + reject_on_worker_lost): a task that kills its
own pool process (SIGKILL, ``os._exit``, SystemExit) or rejects its message with requeue
runs exactly ``max_deliveries`` times, then waits in the dead-letter list with the reason;
its result is FAILED, never PENDING; the worker lives on and serves the next task; a job
whose chunk does this fails visibly and ``fleet jobs retry`` re-runs it. A warm shutdown's
given-back messages are not deliveries. Real workers, real signals, the real Redis.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from fleet.deadletter import DeadLetterList
from fleet.jobs.state import JobStore
from fleet.jobs.submit import JobSpec, retry_failed, submit
from fleet.keys import kombu_key, list_keys
from fleet.payloads import open_store
from tests.conftest import ROOT, shipped_config, wait_for
from tests.faults.figures import Figures, report
from tests.probe_poison import cured_key, runs

pytestmark = pytest.mark.slow

IMPORTS = [*shipped_config()["imports"], "tests.probe_poison"]
#: Each loss costs billiard a new pool process (~1-2 s here); 3 deliveries fit easily.
BOUND = 60.0


def heavy_probes(**heavy) -> dict:
    return {"imports": IMPORTS, "queues": {
        "default": {"tasks": ["tasks.aggregate.*"]},
        "heavy": {"tasks": ["tasks.heavy.*", "tests.probe.*", "fleet.*"], **heavy}}}


@pytest.fixture
def probes(fleet, monkeypatch):
    """Workers import tests.probe_poison: ``python -m fleet.cli`` from the repository root."""
    monkeypatch.chdir(ROOT)
    return fleet


def held(redis_client, fleet) -> list[str]:
    """Task ids in kombu's ``unacked`` hash (held by some worker) under this test's prefix."""
    raw = redis_client.hvals(kombu_key(fleet.config, "unacked"))
    return [json.loads(r)[0]["headers"]["id"] for r in raw]


def waiting(redis_client, fleet, queue: str) -> int:
    return sum(redis_client.llen(k) for k in list_keys(fleet.config, queue))


@pytest.mark.parametrize(("how", "max_deliveries", "kind", "detail"), [
    ("sigkill", 3, "signal", "its pool process was killed by signal 9 (SIGKILL)"),
    ("exit", 2, "exit-code", "its pool process exited with code 3"),
    ("systemexit", 3, "exit-code", "its pool process exited with code 3"),
    ("reject", 3, "redelivered", "the task rejected it with requeue (poison: not now)"),
])
def test_a_poison_task_runs_max_deliveries_times_then_is_dead_lettered(
        probes, redis_client, how, max_deliveries, kind, detail):
    fleet = probes
    config = fleet.configure(heavy_probes(max_deliveries=max_deliveries))
    worker = fleet.start_worker("heavy")
    app = fleet.app()
    started = time.monotonic()
    result = app.send_task("tests.probe.poison", kwargs={"how": how})
    with pytest.raises(Exception) as caught:
        result.get(timeout=BOUND)
    ended = time.monotonic() - started
    error = caught.value
    assert type(error).__name__ == "DeadLettered", repr(error)
    assert str(error).startswith(f"task tests.probe.poison[{result.id}] dead-lettered after "
                                 f"{max_deliveries} deliveries: {kind}: {detail}")
    assert app.AsyncResult(result.id).state == "FAILURE"

    ran = runs(redis_client, config, result.id)
    [entry] = DeadLetterList.for_config(config).entries("heavy")
    assert (entry.reason, entry.detail, entry.deliveries) == (kind, detail, max_deliveries)
    assert (entry.task, entry.task_id, entry.requeue_problem) == (
        "tests.probe.poison", result.id, None)
    assert f"see: fleet dead show {entry.id}" in str(error)
    # Nowhere else: not waiting, not held, so never delivered again.
    # (Celery acks on the event loop's next turn, just after the result is stored.)
    wait_for(lambda: result.id not in held(redis_client, fleet), 5, what="the ack")
    assert waiting(redis_client, fleet, "heavy") == 0

    # The worker lives on and serves the next task.
    assert worker.alive()
    redis_client.set(cured_key(config), 1)
    after = app.send_task("tests.probe.poison", kwargs={"how": "raise"})
    assert after.get(timeout=30) == "cured"
    time.sleep(2)  # nothing more arrives for the poison task
    assert runs(redis_client, config, result.id) == ran == max_deliveries
    report(Figures(case=f"poison-{how}", submitted=1, completed=1, lost=0,
                   duplicated=ran - max_deliveries, recovery_s=ended,
                   extra={"deliveries": ran, "max_deliveries": max_deliveries}))
    assert ended < BOUND


def test_a_task_that_raises_fails_once_and_is_not_dead_lettered(probes, redis_client):
    """An exception is a task failure Celery records and acks: no loop, nothing to bound."""
    fleet = probes
    config = fleet.configure(heavy_probes())
    fleet.start_worker("heavy")
    app = fleet.app()
    result = app.send_task("tests.probe.poison", kwargs={"how": "raise"})
    with pytest.raises(ValueError, match="poison: this task always raises"):
        result.get(timeout=30)
    time.sleep(2)
    assert runs(redis_client, config, result.id) == 1
    assert DeadLetterList.for_config(config).entries("heavy") == []
    report(Figures(case="poison-raise", submitted=1, completed=1, lost=0, duplicated=0,
                   extra={"deliveries": 1}))


def test_a_job_whose_chunk_is_poison_fails_visibly_and_retry_reruns_it(
        probes, redis_client, tmp_path):
    fleet = probes
    config = fleet.configure(heavy_probes())
    data = tmp_path / "n.jsonl"
    records = [{"n": i, "poison": i == 2} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    fleet.start_worker("heavy")
    app = fleet.app()
    started = time.monotonic()
    done = submit(app, JobSpec("tests.probe.poison_chunk", str(data), 1,
                               aggregate="tests.probe.poison_total"))
    store = JobStore(config)
    status = wait_for(lambda: (s := store.status(done.job_id)).is_terminal and s, BOUND + 30,
                      what="the job to end by itself")
    failed_after = time.monotonic() - started
    assert (status.state, status.done, status.failed) == ("failed", 3, 1)
    [chunk] = store.failed_chunks(done.job_id)
    assert chunk.index == 2
    assert chunk.error.startswith("DeadLettered: task tests.probe.poison_chunk[")
    assert "dead-lettered after 3 deliveries: signal: its pool process was killed by " \
           "signal 9 (SIGKILL)" in chunk.error
    [entry] = DeadLetterList.for_config(config).entries("heavy")
    assert entry.task == "tests.probe.poison_chunk" and entry.deliveries == 3

    redis_client.set(cured_key(config), 1)  # the fix is deployed
    retried = retry_failed(app, done.job_id)
    assert retried.chunks == 1
    # Its dead-letter entry went with the retry: requeued as well, the chunk would run twice.
    assert retried.dead_letters == 1
    assert DeadLetterList.for_config(config).entries("heavy") == []
    status = wait_for(lambda: (s := store.status(done.job_id)).is_terminal and s, 60,
                      what="the retried job to end")
    assert (status.state, status.done, status.failed) == ("succeeded", 4, 0)
    assert json.loads(open_store(config.payloads).get(status.result_url)) == 6
    report(Figures(case="poison-job-chunk", submitted=4, completed=4, lost=0, duplicated=0,
                   recovery_s=failed_after, extra={"job_failed_after_s": round(failed_after, 1),
                                                   "chunk_deliveries": 3}))
    assert failed_after < BOUND + 30


def test_a_warm_shutdown_does_not_count_as_a_delivery(probes, redis_client):
    """Messages a prefetching worker gives back at a warm shutdown ran nowhere: with
    max_deliveries 1 a single counted delivery would dead-letter them, yet all run once."""
    fleet = probes
    config = fleet.configure({"imports": IMPORTS, "queues": {"default": {
        "tasks": ["tasks.aggregate.*", "fleet.*", "tests.probe.*"], "concurrency": 1,
        "prefetch_multiplier": 4, "max_deliveries": 1}}})
    first = fleet.start_worker("default", name="first")
    app = fleet.app()
    long = app.send_task("tests.probe.hold", kwargs={"seconds": 4}, queue="default")
    wait_for(lambda: runs(redis_client, config, long.id) == 1, 30, what="the long task to start")
    behind = [app.send_task("tests.probe.hold", kwargs={"seconds": 0.1}, queue="default")
              for _ in range(3)]
    wait_for(lambda: set(held(redis_client, fleet)) == {long.id, *(r.id for r in behind)}, 15,
             what="the worker to prefetch the tasks behind the long one")
    started = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)  # warm, to the worker alone: its task finishes
    first.proc.wait(timeout=60)
    assert long.get(timeout=5) == 4
    given_back = [json.loads(m) for k in list_keys(config, "default")
                  for m in redis_client.lrange(k, 0, -1)]
    assert sorted(m["headers"]["id"] for m in given_back) == sorted(r.id for r in behind)
    assert not any(m["headers"].get("redelivered") for m in given_back)
    assert "Restoring 3 unacknowledged message(s)" in fleet.log_of(first)

    fleet.start_worker("default", name="second")
    assert [r.get(timeout=60) for r in behind] == [0.1, 0.1, 0.1]
    recovered = time.monotonic() - started
    counts = [runs(redis_client, config, r.id) for r in behind]
    assert counts == [1, 1, 1]
    assert DeadLetterList.for_config(config).entries("default") == []
    report(Figures(case="warm-shutdown-prefetched", submitted=4, completed=4, lost=0,
                   duplicated=sum(counts) - 3, recovery_s=recovered))


def test_a_message_whose_whole_worker_dies_each_time_is_refused_on_receipt(
        probes, redis_client):
    """No worker sees the loss when the whole worker is SIGKILLed: the message comes back
    after visibility_timeout, counted on receipt, and is refused once over the bound."""
    fleet = probes
    config = fleet.configure({
        **heavy_probes(max_deliveries=2),
        "broker": {"visibility_timeout": "6s", "lease": {"interval": "2s"}}})
    app = fleet.app()
    result = app.send_task("tests.probe.hold", kwargs={"seconds": 120}, queue="heavy")
    for delivery in (1, 2):
        worker = fleet.start_worker("heavy", name=f"doomed{delivery}")
        wait_for(lambda d=delivery: runs(redis_client, config, result.id) == d, 60,
                 what=f"delivery {delivery} to start")
        worker.kill()  # the worker and its pool, at once
    started = time.monotonic()
    last = fleet.start_worker("heavy", name="last")
    with pytest.raises(Exception) as caught:
        result.get(timeout=60)
    refused_after = time.monotonic() - started
    assert type(caught.value).__name__ == "DeadLettered"
    assert "dead-lettered after 2 deliveries: worker-lost: delivered 2 times, its worker " \
           "lost each time" in str(caught.value)
    assert runs(redis_client, config, result.id) == 2
    [entry] = DeadLetterList.for_config(config).entries("heavy")
    assert (entry.reason, entry.deliveries) == ("worker-lost", 2)
    assert last.alive() and waiting(redis_client, fleet, "heavy") == 0
    report(Figures(case="poison-whole-worker-killed", submitted=1, completed=1, lost=0,
                   duplicated=0, recovery_s=refused_after, extra={"deliveries": 2}))
    assert refused_after < 6 + 30  # visibility timeout + a worker's start


def test_the_final_memory_kill_leaves_a_dead_letter_entry(probes, redis_client):
    """No larger class left: the result stays MemoryLimitExceeded, and the message is kept
    for a requeue once the queue's memory_limit has been raised."""
    fleet = probes
    config = fleet.configure({"queues": {"heavy": {
        "memory_limit": "200Mi", "on_memory_exceeded": {"retry_on": None}}}})
    worker = fleet.start_worker("heavy")
    app = fleet.app()
    started = time.monotonic()
    result = app.send_task("tasks.heavy.grow", kwargs={"target_mb": 2000, "step_mb": 16})
    with pytest.raises(Exception) as caught:
        result.get(timeout=60)
    ended = time.monotonic() - started
    assert type(caught.value).__name__ == "MemoryLimitExceeded"
    [entry] = wait_for(lambda: DeadLetterList.for_config(config).entries("heavy"), 10,
                       what="the dead-letter entry")
    assert entry.reason == "memory-limit" and entry.task_id == result.id
    assert entry.detail == str(caught.value)
    assert "memory_limit of 200.0Mi" in entry.detail and entry.requeue_problem is None
    assert worker.alive()
    report(Figures(case="memory-kill-final", submitted=1, completed=1, lost=0, duplicated=0,
                   recovery_s=ended))
