"""Batch jobs end to end: inputs, fan-out, progress, aggregation, retries, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from fleet.embedded import EmbeddedRedis
from fleet.errors import BrokerUnavailableError, JobInputError, UnknownJobError
from fleet.jobs.ids import chunk_task_id
from fleet.jobs.state import JobStore
from fleet.jobs.submit import JobSpec, retry_failed, submit
from fleet.keys import key
from fleet.payloads import open_store
from tasks.aggregate import merge, sum_records
from tests.conftest import ROOT, wait_for

IMPORTS = ["tasks.aggregate", "tasks.io", "tasks.heavy", "tests.probe_jobs"]
PROBES = {"imports": IMPORTS, "queues": {"default": {"tasks": [
    "tasks.aggregate.*", "fleet.*", "tests.probe.flaky", "tests.probe.total"]}}}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sales(n: int) -> list[dict]:
    return [{"region": ["n", "s", "e", "w"][i % 4], "amount": i % 7, "qty": 1} for i in range(n)]


def fleet_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    return list(client.scan_iter(match=f"{prefix}*"))


def cli(fleet, *args, stdin: str | None = None, env_extra: dict | None = None):
    env = {**fleet.env, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args, "--config",
                           str(fleet.config_path)], capture_output=True, text=True,
                          input=stdin, env=env, timeout=120, cwd=ROOT)


# -- bad input: a clear error, and nothing enqueued ------------------------------------

@pytest.mark.parametrize(("spec", "message"), [
    (dict(task="tasks.aggregate.sum_by", input="{missing}"), "input file not found"),
    (dict(task="tasks.aggregate.sum_byy", input="{good}"),
     "unknown task 'tasks.aggregate.sum_byy'; did you mean tasks.aggregate.sum_by"),
    (dict(task="tasks.aggregate.sum_by", input="{good}", aggregate="nope.merge"),
     "unknown aggregate task 'nope.merge'"),
    (dict(task="tasks.aggregate.sum_by", input="{good}", chunk_size=0),
     "chunk size must be at least 1 and at most 10,000,000 records, got 0"),
    (dict(task="tasks.aggregate.sum_by", input="{good}", chunk_size=2**63),
     f"chunk size must be at least 1 and at most 10,000,000 records, got {2**63}"),
    (dict(task="tasks.aggregate.sum_by", input="{bad}"), "bad.jsonl: line 3: malformed JSON"),
    (dict(task="tasks.aggregate.sum_by", input="{empty}"), "no records in the input"),
    (dict(task="tasks.aggregate.sum_by", input="{txt}"), "unknown input format"),
    (dict(task="tasks.aggregate.sum_by", input="{good}", kwargs={"group_bye": "region"}),
     "task 'tasks.aggregate.sum_by' cannot be called with group_bye: got an unexpected "
     "keyword argument 'group_bye' (it takes sum_by(records: list[dict], group_by: str"),
    (dict(task="tasks.aggregate.sum_by", input="{good}", aggregate="tasks.aggregate.merge_sums",
          aggregate_kwargs={"fields": ["x"]}),
     "aggregate task 'tasks.aggregate.merge_sums' cannot be called with fields"),
    (dict(task="tasks.aggregate.sum_by", input="{lists}"),
     "lists.jsonl: line 3: a JSON list, not an object, and tasks.aggregate.sum_by takes "
     "objects (records: list[dict])"),
    (dict(task="tasks.aggregate.sum_by", input="{scalars}"),
     "scalars.jsonl: line 1: a JSON number, not an object"),
])
def test_bad_job_input_is_refused_before_anything_is_enqueued(fleet, redis_client, tmp_path,
                                                              spec, message):
    files = {
        "missing": str(tmp_path / "missing.jsonl"),
        "good": str(write_jsonl(tmp_path / "good.jsonl", sales(10))),
        "bad": str(tmp_path / "bad.jsonl"),
        "empty": str(tmp_path / "empty.jsonl"),
        "txt": str(tmp_path / "data.txt"),
        "lists": str(tmp_path / "lists.jsonl"),
        "scalars": str(tmp_path / "scalars.jsonl"),
    }
    Path(files["lists"]).write_text('{"a": 1}\n\n[1, 2]\n')
    Path(files["scalars"]).write_text('7\n')
    Path(files["bad"]).write_text('{"a": 1}\n{"a": 2}\n{"a": 3,,}\n{"a": 4}\n')
    Path(files["empty"]).write_text("\n\n")
    Path(files["txt"]).write_text('{"a": 1}\n')
    spec = {**spec, "input": spec["input"].format(**files)}
    spec.setdefault("chunk_size", 2)
    with pytest.raises(JobInputError, match=re.escape(message)):
        submit(fleet.app(), JobSpec(**spec))
    assert fleet_keys(redis_client, fleet.prefix) == []


def test_s3_input_with_no_s3_configured_says_so(fleet, redis_client, tmp_path, monkeypatch):
    # No credentials anywhere, as on a machine that never used AWS (and no wait for EC2's
    # metadata service): boto3 fails at once, and the error says what to configure.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert fleet.config.payloads.store == "local" and not fleet.config.payloads.endpoint_url
    with pytest.raises(JobInputError) as caught:
        submit(fleet.app(), JobSpec("tasks.aggregate.sum_by", "s3://data/in.jsonl", 2))
    message = str(caught.value)
    assert message.startswith("s3://data/in.jsonl: cannot read input: "), message
    assert "queues.yaml configures no S3: payloads.store is local" in message
    assert fleet_keys(redis_client, fleet.prefix) == []


def test_records_that_are_not_objects_go_to_a_task_that_takes_any(fleet, tmp_path):
    # tasks.heavy.crunch's records are `list | None`: lists and numbers are its business.
    data = tmp_path / "mixed.jsonl"
    data.write_text('[1, 2]\n7\n"x"\n')
    done = submit(fleet.app(), JobSpec("tasks.heavy.crunch", str(data), 2, kwargs={"mb": 1}))
    assert (done.records, done.chunks) == (3, 2)


def test_cli_bad_input_exits_2_without_traceback(fleet, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\nnot json\n')
    result = cli(fleet, "submit", "tasks.aggregate.sum_by", "--input", str(bad))
    assert result.returncode == 2
    assert f"fleet: error: {bad}: line 2: malformed JSON" in result.stderr
    assert "Traceback" not in result.stderr
    zero = cli(fleet, "submit", "tasks.aggregate.sum_by", "--input", str(bad), "-c", "0")
    assert zero.returncode == 2 and "chunk size must be at least 1" in zero.stderr


def test_csv_with_a_ragged_row_names_the_line(fleet, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("region,amount\nn,1\ns,2,extra\n")
    with pytest.raises(JobInputError, match=r"d.csv: line 3: more fields than the header"):
        submit(fleet.app(), JobSpec("tasks.aggregate.sum_by", str(data), 10))


# -- the happy path with a real worker ---------------------------------------------------

@pytest.mark.slow
def test_job_fans_out_aggregates_and_writes_its_result(fleet, tmp_path):
    records = sales(2_500)
    data = write_jsonl(tmp_path / "sales.jsonl", records)
    fleet.start_worker("default")
    app = fleet.app()
    done = submit(app, JobSpec("tasks.aggregate.sum_by", str(data), 300,
                               aggregate="tasks.aggregate.merge_sums",
                               kwargs={"group_by": "region", "fields": ["amount", "qty"]}))
    assert (done.chunks, done.records) == (9, 2_500)
    store = JobStore(fleet.config)
    status = wait_for(lambda: (s := store.status(done.job_id)).is_terminal and s, 60,
                      what="the job to end")
    assert status.state == "succeeded", status
    assert (status.done, status.failed, status.total) == (9, 0, 9)
    assert status.result_url == done.result_url
    result = json.loads(open_store(fleet.config.payloads).get(status.result_url))
    expected = merge(sum_records(records[i:i + 300], "region", ["amount", "qty"])
                     for i in range(0, 2_500, 300))
    assert result == json.loads(json.dumps(expected))
    assert result["n"]["count"] == 625


@pytest.mark.slow
def test_cli_submit_watch_status_list_and_stdin(fleet, tmp_path):
    fleet.start_worker("default")
    lines = "".join(json.dumps(r) + "\n" for r in sales(100))
    result = cli(fleet, "submit", "tasks.aggregate.sum_by", "--input", "-", "-c", "10",
                 "-k", "group_by=region", "--aggregate", "tasks.aggregate.merge_sums",
                 "--watch", stdin=lines)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.split()[1].rstrip(":")
    assert "100 records in 10 chunks of 10" in result.stdout
    assert f"result: {open_store(fleet.config.payloads).url_for(f'jobs/{job_id}/result.json')}" \
        in result.stdout
    status = json.loads(cli(fleet, "jobs", "status", job_id, "--json").stdout)
    assert status["state"] == "succeeded" and status["done"] == 10 and status["input"] == "stdin"
    listing = cli(fleet, "jobs", "list")
    assert job_id in listing.stdout and "succeeded" in listing.stdout
    csv = tmp_path / "sales.csv"
    csv.write_text("region,value\nn,1\ns,2\nn,3\n")
    result = cli(fleet, "submit", "tasks.aggregate.sum_by", "-i", str(csv), "-c", "2",
                 "-k", "group_by=region", "-a", "tasks.aggregate.merge_sums", "-w")
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip().splitlines()[-1].removeprefix("result: ")
    assert json.loads(open_store(fleet.config.payloads).get(url)) == {
        "n": {"count": 2, "value": 4.0}, "s": {"count": 1, "value": 2.0}}


def test_unknown_job_is_a_clear_error(fleet):
    with pytest.raises(UnknownJobError, match="no job 'job-000000000000'"):
        JobStore(fleet.config).status("job-000000000000")
    result = cli(fleet, "jobs", "status", "job-000000000000")
    assert result.returncode == 2 and "no job 'job-000000000000'" in result.stderr


# -- idempotency, failures, retry -------------------------------------------------------

def new_job(store: JobStore, job_id: str, total: int) -> None:
    """A job as submit leaves it: created, its manifest written, submitted."""
    store.create(job_id, task="t", aggregate=None, total=total, records=total,
                 input_desc="x", chunk_size=1, kwargs={}, aggregate_kwargs={}, result_url="u")
    store.add_chunks(job_id, [(i, "default", 10) for i in range(total)])
    store.submitted(job_id)


def test_chunk_completion_is_idempotent(fleet):
    store = JobStore(fleet.config)
    new_job(store, "job-aaaaaaaaaaaa", 3)
    assert store.record_success("job-aaaaaaaaaaaa", 0, 1) == "running"
    assert store.record_success("job-aaaaaaaaaaaa", 0, 1) == "running"  # redelivered
    assert store.record_success("job-aaaaaaaaaaaa", 1, 1) == "running"
    assert store.status("job-aaaaaaaaaaaa").done == 2
    assert store.record_success("job-aaaaaaaaaaaa", 2, 1) == "collect"
    store.collect_started("job-aaaaaaaaaaaa")
    assert store.record_success("job-aaaaaaaaaaaa", 2, 1) == "aggregating"  # once started
    # A failure reported after the chunk already succeeded does not count.
    assert store.record_failure("job-aaaaaaaaaaaa", 1, "late") == "aggregating"
    assert store.status("job-aaaaaaaaaaaa").failed == 0


@pytest.mark.slow
def test_redelivered_chunk_is_not_counted_twice(fleet, tmp_path, redis_client):
    fleet.configure(PROBES)
    records = [{"n": i} for i in range(6)]
    data = write_jsonl(tmp_path / "n.jsonl", records)
    app = fleet.app()
    done = submit(app, JobSpec("tests.probe.flaky", str(data), 2, aggregate="tests.probe.total"))
    # The same chunk message again, as Redis does when it redelivers it.
    app.send_task("tests.probe.flaky", args=[records[:2]], task_id=chunk_task_id(done.job_id, 0),
                  ignore_result=True)
    fleet.start_worker("default")
    store = JobStore(fleet.config)
    status = wait_for(lambda: (s := store.status(done.job_id)).is_terminal and s, 60)
    runs = redis_client.hgetall(key(fleet.config, "probe", "runs"))
    assert runs[chunk_task_id(done.job_id, 0).encode()] == b"2"  # it did run twice
    assert (status.state, status.done, status.total) == ("succeeded", 3, 3)
    assert json.loads(open_store(fleet.config.payloads).get(status.result_url)) == 15


@pytest.mark.slow
def test_failed_chunks_are_reported_and_retried_alone(fleet, tmp_path, redis_client):
    fleet.configure(PROBES)
    records = [{"n": i, "fail": i in (3, 8)} for i in range(10)]
    data = write_jsonl(tmp_path / "n.jsonl", records)
    flag = key(fleet.config, "probe", "failing")
    redis_client.set(flag, 1)
    fleet.start_worker("default")
    app = fleet.app()
    done = submit(app, JobSpec("tests.probe.flaky", str(data), 2, aggregate="tests.probe.total"))
    store = JobStore(fleet.config)
    status = wait_for(lambda: (s := store.status(done.job_id)).is_terminal and s, 60)
    assert (status.state, status.done, status.failed) == ("failed", 3, 2)
    failed = store.failed_chunks(done.job_id)
    assert [c.index for c in failed] == [1, 4]
    assert failed[0].error == "ValueError: refusing records [3]"
    watch = cli(fleet, "jobs", "watch", done.job_id)
    assert watch.returncode == 1 and f"job {done.job_id} failed" in watch.stderr
    shown = cli(fleet, "jobs", "status", done.job_id)
    assert "chunk 1: ValueError: refusing records [3]" in shown.stdout
    # No URL of a result that was never written.
    assert status.result_url is None and done.result_url not in shown.stdout
    assert "result    none: the job failed" in shown.stdout
    as_json = json.loads(cli(fleet, "jobs", "status", done.job_id, "--json").stdout)
    assert as_json["result_url"] is None

    redis_client.delete(flag)
    result = cli(fleet, "jobs", "retry", done.job_id)
    assert result.returncode == 0, result.stderr
    assert f"job {done.job_id}: re-sent 2 failed chunks" in result.stdout
    status = wait_for(lambda: (s := store.status(done.job_id)).is_terminal and s, 60)
    assert (status.state, status.done, status.failed) == ("succeeded", 5, 0)
    assert json.loads(open_store(fleet.config.payloads).get(status.result_url)) == 45
    runs = {k.decode(): int(v) for k, v in
            redis_client.hgetall(key(fleet.config, "probe", "runs")).items()}
    # Only the failed chunks ran again.
    assert runs == {chunk_task_id(done.job_id, i): (2 if i in (1, 4) else 1) for i in range(5)}
    nothing = cli(fleet, "jobs", "retry", done.job_id)
    assert nothing.returncode == 1 and "no failed or lost chunks to retry" in nothing.stderr


@pytest.mark.slow
def test_a_chunk_over_its_memory_limit_fails_the_job_clearly(fleet, tmp_path):
    fleet.configure({"imports": IMPORTS, "queues": {"heavy": {
        "tasks": ["tasks.heavy.*", "tests.probe.hog"], "memory_limit": "150Mi",
        "on_memory_exceeded": {"retry_on": None}}}})
    data = write_jsonl(tmp_path / "m.jsonl", [{"mb": 1}, {"mb": 1}, {"mb": 900}])
    fleet.start_worker("heavy")
    done = submit(fleet.app(), JobSpec("tests.probe.hog", str(data), 1))
    store = JobStore(fleet.config)
    status = wait_for(lambda: (s := store.status(done.job_id)).is_terminal and s, 60)
    assert (status.state, status.done, status.failed) == ("failed", 2, 1)
    [chunk] = store.failed_chunks(done.job_id)
    assert chunk.index == 2
    assert chunk.error.startswith("MemoryLimitExceeded: Task tests.probe.hog[")
    assert "memory_limit of 150.0Mi" in chunk.error


# -- publishing is batched -----------------------------------------------------------------

def test_ten_thousand_chunks_are_published_in_batches_not_round_trips(fleet, tmp_path):
    """Counted on a Redis of our own: its read events are our round trips."""
    data = write_jsonl(tmp_path / "n.jsonl", [{"n": i} for i in range(10_000)])
    with EmbeddedRedis() as server:
        fleet.configure({"broker": {"url": server.url}})
        app = fleet.app()
        client = redis.Redis.from_url(server.url)
        before = client.info("stats")["total_reads_processed"]
        done = submit(app, JobSpec("tasks.aggregate.sum_by", str(data), 1))
        after = client.info("stats")["total_reads_processed"]
        assert done.chunks == 10_000
        assert client.llen(f"{fleet.prefix}default") == 10_000
        # 10,000 LPUSHes in pipelines of 500 (jobs.publish_batch). Redis reads a socket
        # in 16 KiB blocks, so ~10 MB of messages take some 650 read events here; one
        # round trip per chunk would take at least 10,000.
        assert after - before < 2_000, after - before
        client.close()
        app.close()


def test_broker_down_is_a_clear_error(fleet, tmp_path):
    data = write_jsonl(tmp_path / "n.jsonl", [{"n": 1}])
    from tests.conftest import free_port

    down = f"redis://127.0.0.1:{free_port()}/0"
    fleet.configure({"broker": {"url": down}})
    with pytest.raises(BrokerUnavailableError, match="Redis is not answering"):
        submit(fleet.app(), JobSpec("tasks.aggregate.sum_by", str(data), 1))
    result = cli(fleet, "submit", "tasks.aggregate.sum_by", "-i", str(data))
    assert result.returncode == 3
    assert "Redis is not answering" in result.stderr and "Traceback" not in result.stderr
    # Jobs live in the ledger, not in Redis: listing them needs no broker.
    status = cli(fleet, "jobs", "list")
    assert status.returncode == 0, status.stderr


def test_retry_of_unknown_job(fleet):
    with pytest.raises(UnknownJobError):
        retry_failed(fleet.app(), "job-bbbbbbbbbbbb")


def test_chunk_results_keep_their_types(fleet):
    """datetime, Decimal and UUID come back as themselves, as they do through Celery."""
    import datetime
    import decimal
    import uuid

    store = JobStore(fleet.config)
    new_job(store, "job-cccccccccccc", 2)
    value = {"at": datetime.datetime(2026, 11, 27, 6, 0, tzinfo=datetime.UTC),
             "amount": decimal.Decimal("12.50"), "id": uuid.UUID(int=7)}
    store.record_success("job-cccccccccccc", 0, value)
    assert dict(store.results("job-cccccccccccc")) == {0: value}


def test_a_complete_job_whose_collect_never_started_is_collected_again(fleet):
    """The first completion could not send the collect step (broker down): the next
    record of a chunk (redelivered or retried) sends it again, until it starts."""
    store = JobStore(fleet.config)
    new_job(store, "job-dddddddddddd", 2)
    store.record_success("job-dddddddddddd", 0, 1)
    assert store.record_success("job-dddddddddddd", 1, 1) == "collect"
    assert store.record_success("job-dddddddddddd", 1, 1) == "collect"  # not started yet
    store.collect_started("job-dddddddddddd")
    assert store.record_success("job-dddddddddddd", 1, 1) == "aggregating"


@pytest.mark.slow
def test_retry_unsticks_a_job_whose_collect_never_ran(fleet, tmp_path):
    fleet.configure(PROBES)
    data = write_jsonl(tmp_path / "n.jsonl", [{"n": i} for i in range(4)])
    app = fleet.app()
    done = submit(app, JobSpec("tests.probe.flaky", str(data), 2, aggregate="tests.probe.total"))
    store = JobStore(fleet.config)
    # Both chunks done, but their collect message lost: what an outage can leave.
    for index, value in ((0, 1), (1, 5)):
        store.record_success(done.job_id, index, value)
    app.connection_for_write().default_channel.client.delete(f"{fleet.prefix}default")
    assert store.status(done.job_id).state == "aggregating"
    result = cli(fleet, "jobs", "retry", done.job_id)
    assert result.returncode == 0 and "re-running the aggregate step" in result.stdout
    fleet.start_worker("default")
    status = wait_for(lambda: (s := store.status(done.job_id)).is_terminal and s, 60)
    assert status.state == "succeeded"
    assert json.loads(open_store(fleet.config.payloads).get(status.result_url)) == 6


def test_chunks_lost_in_flight_are_found_and_sent_again(fleet, tmp_path, redis_client):
    """A message popped by a worker as Redis went down is gone: retry finds the chunk
    (not done, failed, queued nor held) and cuts it again from the job's copy of its
    input, whatever became of the user's file since."""
    fleet.configure(PROBES)
    data = write_jsonl(tmp_path / "n.jsonl", [{"n": i} for i in range(10)])
    app = fleet.app()
    done = submit(app, JobSpec("tests.probe.flaky", str(data), 2, aggregate="tests.probe.total"))
    queue = f"{fleet.prefix}default"
    assert redis_client.llen(queue) == 5
    store = JobStore(fleet.config)
    store.record_success(done.job_id, 0, 1)  # chunk 0 ran;
    redis_client.rpop(queue)                 # ... and its message was taken
    redis_client.rpop(queue)                 # chunk 1's message: lost in flight
    data.write_text('{"n": 99}\n')           # and the user's file changed meanwhile
    result = cli(fleet, "jobs", "retry", done.job_id)
    assert result.returncode == 0, result.stderr
    assert f"job {done.job_id}: re-sent 1 chunks lost in flight" in result.stdout
    messages = redis_client.lrange(queue, 0, -1)
    assert sum(f'"{done.job_id}.1"'.encode() in m for m in messages) == 1
    assert len(messages) == 4  # 2, 3, 4 still waiting, and 1 again
    fleet.start_worker("default")
    status = wait_for(lambda: (s := store.status(done.job_id)).is_terminal and s, 60)
    assert status.state == "succeeded"
    # 1 (chunk 0, recorded by hand) + chunks 1..4 of the original input: 2+3, ..., 8+9
    assert json.loads(open_store(fleet.config.payloads).get(status.result_url)) == 1 + 44
