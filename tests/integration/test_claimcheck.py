"""Claim-check: large arguments and results travel as references to a payload store.

The stores are exercised for real: a directory, and S3 through boto3 against a moto
server started as a subprocess (plain HTTP, in the test process and in the workers).
What travels is checked where it travels: the raw kombu message in the Redis queue
list and the raw result key, both under the test's own key prefix. The store itself is
inspected with boto3 / the filesystem directly, not through the code under test.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

import boto3
import pytest
from botocore.exceptions import ClientError

from fleet.claimcheck import (
    CLAIM_KEY,
    is_claim,
    offload_arguments,
    resolve_arguments,
    resolve_value,
)
from fleet.config import Payloads
from fleet.errors import JobInputError, PayloadError
from fleet.jobs.state import JobStore
from fleet.jobs.submit import JobSpec, submit
from fleet.payloads import LocalStore, S3Store, open_store
from tests.conftest import ROOT, shipped_config, wait_for
from tests.probe_payloads import fingerprint, make_blob

THRESHOLD = 64 * 1024
#: Lists replace the shipped ones in ``fleet.configure``: keep the real task modules.
IMPORTS = [*shipped_config()["imports"], "tests.probe_payloads"]
DIGEST = "tests.probe_payloads.digest"
BLOB = "tests.probe_payloads.blob"
FLAKY = "tests.probe_payloads.flaky"
TYPED = "tests.probe_payloads.typed"
FAIL = "tests.probe_payloads.fail"


def s3_client(endpoint_url: str):
    return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")


def s3_keys(client, bucket: str, prefix: str = "") -> list[str]:
    response = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in response.get("Contents", []))


# --- the stores on their own ----------------------------------------------------------


def test_local_store_puts_gets_and_deletes(tmp_path: Path):
    store = LocalStore(tmp_path / "payloads")
    url = store.put("args/a/b.json", b"hello")
    assert url == store.url_for("args/a/b.json")
    assert url == (tmp_path / "payloads" / "args/a/b.json").resolve().as_uri()
    assert (tmp_path / "payloads" / "args" / "a" / "b.json").read_bytes() == b"hello"
    assert store.get(url) == b"hello"
    store.put("args/a/b.json", b"again")  # overwrite, atomically
    assert store.get(url) == b"again"
    assert [p.name for p in (tmp_path / "payloads" / "args" / "a").iterdir()] == ["b.json"]
    store.delete(url)
    assert not (tmp_path / "payloads" / "args" / "a" / "b.json").exists()
    store.delete(url)  # cleanup may run twice: a missing payload is fine


def test_local_store_missing_payload_is_a_payload_error_naming_the_url(tmp_path: Path):
    store = LocalStore(tmp_path)
    url = store.url_for("args/never.json")
    with pytest.raises(PayloadError) as caught:
        store.get(url)
    assert url in str(caught.value)
    assert "gone" in str(caught.value)
    with pytest.raises(PayloadError, match=r"s3://b/k is not in the local store"):
        store.get("s3://b/k")


def test_s3_store_puts_keys_under_its_prefix(moto_s3: str, s3_bucket: str):
    store = S3Store(s3_bucket, "team/fleet/", endpoint_url=moto_s3, region="us-east-1")
    url = store.put("args/x.json", b'{"a":1}')
    assert url == f"s3://{s3_bucket}/team/fleet/args/x.json" == store.url_for("args/x.json")
    client = s3_client(moto_s3)
    assert s3_keys(client, s3_bucket) == ["team/fleet/args/x.json"]
    body = client.get_object(Bucket=s3_bucket, Key="team/fleet/args/x.json")["Body"].read()
    assert body == b'{"a":1}'
    assert store.get(url) == b'{"a":1}'
    store.delete(url)
    assert s3_keys(client, s3_bucket) == []
    store.delete(url)  # deleting a missing payload is fine


def test_s3_store_missing_payload_is_a_payload_error_naming_the_url(moto_s3: str,
                                                                      s3_bucket: str):
    store = S3Store(s3_bucket, "p/", endpoint_url=moto_s3)
    url = store.url_for("args/never.json")
    with pytest.raises(PayloadError) as caught:
        store.get(url)
    assert str(caught.value) == f"payload {url} is gone (deleted or never written)"
    with pytest.raises(PayloadError, match=r"is not an s3://bucket/key URL"):
        store.get("file:///tmp/x.json")


def test_s3_store_write_to_a_missing_bucket_names_the_url(moto_s3: str):
    store = S3Store("no-such-bucket-here", "p/", endpoint_url=moto_s3)
    with pytest.raises(PayloadError) as caught:
        store.put("args/x.json", b"data")
    assert "s3://no-such-bucket-here/p/args/x.json" in str(caught.value)
    assert "NoSuchBucket" in str(caught.value)


def test_open_store_builds_the_configured_store(tmp_path: Path, moto_s3: str):
    local = open_store(Payloads(path=str(tmp_path)))
    assert isinstance(local, LocalStore) and local.root == tmp_path.resolve()
    s3 = open_store(Payloads(store="s3", bucket="b", prefix="x/", endpoint_url=moto_s3))
    assert isinstance(s3, S3Store) and s3.url_for("k") == "s3://b/x/k"
    with pytest.raises(PayloadError, match=r"payloads\.bucket is not set"):
        open_store(Payloads(store="s3"))


def test_only_arguments_above_the_threshold_are_offloaded(tmp_path: Path):
    settings = Payloads(path=str(tmp_path), threshold=100)
    # The JSON of [args, kwargs] is what is measured: [["xx..."],{}] is 9 bytes + the string.
    assert offload_arguments(settings, "t1", ["x" * 91], {}) is None  # exactly 100 bytes
    assert offload_arguments(settings, "t1", (), {}) is None
    assert not (tmp_path / "args").exists()
    args, kwargs = offload_arguments(settings, "t2", ["x" * 92], {"k": 1})
    assert args == ()
    assert is_claim(kwargs)
    claim = kwargs[CLAIM_KEY]
    assert claim["url"] == (tmp_path / "args" / "t2.json").resolve().as_uri()
    assert json.loads((tmp_path / "args" / "t2.json").read_bytes()) == [["x" * 92], {"k": 1}]
    assert claim["size"] == (tmp_path / "args" / "t2.json").stat().st_size
    # kombu's JSON is the format, as in the message: a datetime comes back a datetime.
    when = datetime.datetime(2024, 5, 6, 7, 8, 9)
    args, kwargs = offload_arguments(settings, "t3", [when, "x" * 100], {"at": when})
    assert resolve_arguments(settings, args, kwargs) == (
        (when, "x" * 100), {"at": when}, (tmp_path / "args" / "t3.json").resolve().as_uri())
    assert resolve_arguments(settings, ("a",), {"b": 1}) == (("a",), {"b": 1}, None)
    # A dict that merely contains the key is a value, not a reference.
    lookalike = {CLAIM_KEY: {"url": "file:///nope"}, "other": 1}
    assert resolve_value(settings, lookalike) == lookalike


def test_a_reference_can_be_sent_again_through_apply_async(fleet, redis_client):
    """Retries, rate-limit requeues and memory re-routes re-send the request's
    (args, kwargs): the reference. Celery's argument check must not reject it,
    and it must travel as it is (not be offloaded again); real calls are still checked."""
    app = fleet.app()
    task = app.tasks[DIGEST]
    claim = {CLAIM_KEY: {"url": "file:///somewhere/args/x.json", "size": 123456}}
    sent = task.apply_async(args=(), kwargs=claim)
    (_raw, body), = queued(redis_client, fleet.prefix).values()
    assert body[:2] == [[], claim]
    assert sent.id
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        task.apply_async(args=["x"], kwargs={"nope": 1})


# --- end to end, with real workers, for both stores -----------------------------------


class StoreUnderTest:
    """One store kind configured into a test fleet, and a direct view of its contents."""

    def __init__(self, kind: str, fleet, bucket: str | None, endpoint_url: str | None):
        self.kind = kind
        self.fleet = fleet
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.prefix = f"fleet/{fleet.prefix.rstrip(':')}/"
        self.root = fleet.tmp_path / "payloads"

    def configure(self, *, cleanup: bool = True):
        payloads: dict = {"threshold": "64Ki", "cleanup": cleanup}
        if self.kind == "s3":
            payloads.update(store="s3", bucket=self.bucket, prefix=self.prefix,
                            endpoint_url=self.endpoint_url, region="us-east-1")
        return self.fleet.configure({
            "payloads": payloads,
            "imports": IMPORTS,
            # One pool process is enough and kinder to a shared 2-core machine.
            "queues": {"default": {"concurrency": 1}},
        })

    def url_of(self, key: str) -> str:
        if self.kind == "s3":
            return f"s3://{self.bucket}/{self.prefix}{key}"
        return (self.root / key).resolve().as_uri()

    def read(self, url: str) -> bytes | None:
        """The stored bytes at ``url``, or None when there is no such payload."""
        if self.kind == "s3":
            parsed = urlparse(url)
            assert parsed.netloc == self.bucket
            try:
                response = s3_client(self.endpoint_url).get_object(
                    Bucket=self.bucket, Key=parsed.path.lstrip("/"))
            except ClientError as exc:
                assert exc.response["Error"]["Code"] == "NoSuchKey", exc
                return None
            return response["Body"].read()
        path = Path(unquote(urlparse(url).path))
        assert path.is_relative_to(self.root.resolve())
        return path.read_bytes() if path.exists() else None

    def delete(self, url: str) -> None:
        if self.kind == "s3":
            s3_client(self.endpoint_url).delete_object(
                Bucket=self.bucket, Key=urlparse(url).path.lstrip("/"))
        else:
            Path(unquote(urlparse(url).path)).unlink()

    def stored(self) -> list[str]:
        """Every stored payload, as its key relative to the store's root / prefix."""
        if self.kind == "s3":
            everything = s3_keys(s3_client(self.endpoint_url), self.bucket)
            return [k.removeprefix(self.prefix) for k in everything
                    if k.startswith(self.prefix)]
        if not self.root.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")
                      if p.is_file())


@pytest.fixture(params=["local", "s3"])
def store(request, fleet) -> StoreUnderTest:
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        endpoint = request.getfixturevalue("moto_s3")
        return StoreUnderTest("s3", fleet, bucket, endpoint)
    return StoreUnderTest("local", fleet, None, None)


def queued(redis_client, prefix: str, queue: str = "default") -> dict[str, tuple[bytes, list]]:
    """{task id: (raw message, decoded body)} of every message waiting in ``queue``."""
    out = {}
    for name in [queue] + [f"{queue}\x06\x16{n}" for n in (3, 6, 9)]:
        for raw in redis_client.lrange(prefix + name, 0, -1):
            message = json.loads(raw)
            assert message["properties"]["body_encoding"] == "base64"
            body = json.loads(base64.b64decode(message["body"]))
            out[message["headers"]["id"]] = (raw, body)
    return out


def succeeded_in_log(fleet, worker, task_id: str) -> bool:
    """The worker's main process logs success only after the pool child returned from
    the whole trace, ``after_return`` (the cleanup) included."""
    return f"[{task_id}] succeeded" in fleet.log_of(worker)


@pytest.mark.slow
def test_large_arguments_travel_as_references_and_reach_the_task_whole(
        fleet, store, redis_client):
    store.configure(cleanup=True)
    app = fleet.app()
    small = make_blob(1000, "small")
    large = make_blob(200_000, f"large-{uuid.uuid4()}")
    # Sent before any worker runs, so the messages can be read where they wait.
    r_small = app.send_task(DIGEST, args=[small], kwargs={"label": "small"})
    r_large = app.send_task(DIGEST, args=[large], kwargs={"label": "large"})

    messages = queued(redis_client, fleet.prefix)
    assert set(messages) == {r_small.id, r_large.id}
    # Small: the data is in the message itself, and nothing went to the store.
    _raw, body = messages[r_small.id]
    assert body[0] == [small] and body[1] == {"label": "small"}
    # Large: only a reference travels; the 200 kB are in the store, nowhere in Redis.
    raw, body = messages[r_large.id]
    url = store.url_of(f"args/{r_large.id}.json")
    assert body[0] == []
    assert body[1] == {CLAIM_KEY: {"url": url, "size": len(store.read(url))}}
    assert large[:64] not in json.dumps(body)
    assert len(raw) < 4096, f"the message still carries the payload ({len(raw)} bytes)"
    assert json.loads(store.read(url)) == [[large], {"label": "large"}]
    assert store.stored() == [f"args/{r_large.id}.json"]
    if store.kind == "s3":  # under the configured prefix, and nothing elsewhere
        assert s3_keys(s3_client(store.endpoint_url), store.bucket) == [
            f"{store.prefix}args/{r_large.id}.json"]

    worker = fleet.start_worker("default")
    # Transparent: task code got the real argument and keyword argument.
    assert r_large.get(timeout=30) == {**fingerprint(large), "label": "large"}
    assert r_small.get(timeout=30) == {**fingerprint(small), "label": "small"}
    # cleanup: true: the argument payload is deleted once the task has succeeded.
    wait_for(lambda: succeeded_in_log(fleet, worker, r_large.id), 15,
             what="the worker to log the success")
    assert store.read(url) is None
    assert store.stored() == []


@pytest.mark.slow
def test_payload_outlives_retries_and_failures_and_goes_after_success(fleet, store):
    """A retry re-sends the reference (not the data), so the payload must outlive it; a
    task that failed for good keeps its payload (`fleet jobs retry` re-sends the same
    reference); only success deletes it. The default queue retries ConnectionError."""
    store.configure(cleanup=True)
    worker = fleet.start_worker("default")
    app = fleet.app()
    large = make_blob(100_000, f"flaky-{uuid.uuid4()}")
    flaky = app.send_task(FLAKY, args=[large], kwargs={"fail_times": 2})
    failing = app.send_task(FAIL, args=[large])
    with pytest.raises(ValueError, match="refused a blob of 100000 characters"):
        failing.get(timeout=30)
    assert flaky.get(timeout=45) == {**fingerprint(large), "retries": 2}
    wait_for(lambda: succeeded_in_log(fleet, worker, flaky.id)
             and f"[{failing.id}] raised unexpected" in fleet.log_of(worker), 15,
             what="the worker to log both outcomes")
    assert fleet.log_of(worker).count(f"[{flaky.id}] retry: Retry in") == 2
    assert store.read(store.url_of(f"args/{flaky.id}.json")) is None
    assert json.loads(store.read(store.url_of(f"args/{failing.id}.json"))) == [[large], {}]
    assert store.stored() == [f"args/{failing.id}.json"]


@pytest.mark.slow
def test_values_kombu_json_carries_survive_the_store(fleet, store):
    """A datetime argument or result works inline in plain Celery (kombu's JSON); it must
    work the same when it travels by reference, and must not break small messages."""
    store.configure()
    fleet.start_worker("default")
    app = fleet.app()
    when = datetime.datetime(2024, 5, 6, 7, 8, 9)
    large = make_blob(100_000, f"typed-{uuid.uuid4()}")
    inline = app.send_task(TYPED, args=[when])
    offloaded = app.send_task(TYPED, args=[when, large])
    assert inline.get(timeout=30) == {"type": "datetime", "when": when, **fingerprint("")}
    assert offloaded.get(timeout=30) == {"type": "datetime", "when": when,
                                         **fingerprint(large)}


@pytest.mark.slow
def test_argument_payload_is_kept_when_cleanup_is_off(fleet, store):
    store.configure(cleanup=False)
    app = fleet.app()
    large = make_blob(100_000, f"keep-{uuid.uuid4()}")
    result = app.send_task(DIGEST, args=[large])
    url = store.url_of(f"args/{result.id}.json")
    worker = fleet.start_worker("default")
    assert result.get(timeout=30) == {**fingerprint(large), "label": None}
    wait_for(lambda: succeeded_in_log(fleet, worker, result.id), 15,
             what="the worker to log the success")
    assert json.loads(store.read(url)) == [[large], {}]


@pytest.mark.slow
def test_large_result_is_stored_and_get_returns_the_real_value(fleet, store, redis_client):
    store.configure()
    fleet.start_worker("default")
    app = fleet.app()
    seed = str(uuid.uuid4())
    big = app.send_task(BLOB, args=[150_000, seed])
    tiny = app.send_task(BLOB, args=[100, seed])
    expected = make_blob(150_000, seed)
    assert big.get(timeout=30) == expected
    assert tiny.get(timeout=30) == make_blob(100, seed)

    # The result key in Redis holds only the reference...
    raw = redis_client.get(f"{fleet.prefix}celery-task-meta-{big.id}")
    assert raw is not None and len(raw) < 4096, raw and len(raw)
    meta = json.loads(raw)
    assert meta["status"] == "SUCCESS"
    assert is_claim(meta["result"])
    url = meta["result"][CLAIM_KEY]["url"]
    # ... and the value is in the store (results are not argument payloads: kept).
    assert url.startswith(store.url_of("results/"))
    assert json.loads(store.read(url)) == expected
    # A small result stays inline.
    tiny_meta = json.loads(redis_client.get(f"{fleet.prefix}celery-task-meta-{tiny.id}"))
    assert tiny_meta["result"] == make_blob(100, seed)
    # A fresh reader (another app, no cached state) resolves the reference too.
    assert fleet.app().AsyncResult(big.id).get(timeout=10) == expected


@pytest.mark.slow
def test_missing_payload_fails_the_task_with_a_clear_error(fleet, store):
    store.configure()
    app = fleet.app()
    result = app.send_task(DIGEST, args=[make_blob(100_000, "gone")])
    url = store.url_of(f"args/{result.id}.json")
    store.delete(url)  # before any worker could read it
    assert store.read(url) is None
    worker = fleet.start_worker("default")
    with pytest.raises(PayloadError) as caught:
        result.get(timeout=30)
    assert str(caught.value) == f"payload {url} is gone (deleted or never written)"
    assert result.state == "FAILURE"
    # Not a crash: the worker is alive and serves the next task.
    assert worker.alive()
    after = app.send_task(DIGEST, args=["ok"])
    assert after.get(timeout=30) == {**fingerprint("ok"), "label": None}


# --- batch job input from S3 ------------------------------------------------------------


@pytest.fixture
def s3_input(fleet, moto_s3: str, s3_bucket: str) -> str:
    """25 JSON-lines records in the moto bucket; the fleet's S3 endpoint points there."""
    lines = [json.dumps({"key": f"k{i % 3}", "value": i}) for i in range(25)]
    s3_client(moto_s3).put_object(Bucket=s3_bucket, Key="in/records.jsonl",
                                  Body="\n".join(lines).encode() + b"\n")
    fleet.configure({"payloads": {"endpoint_url": moto_s3, "region": "us-east-1"}})
    return f"s3://{s3_bucket}/in/records.jsonl"


def test_submit_reads_its_input_from_s3(fleet, s3_input: str, redis_client):
    app = fleet.app()
    done = submit(app, JobSpec(task="tasks.aggregate.sum_by", input=s3_input, chunk_size=10))
    assert (done.records, done.chunks) == (25, math.ceil(25 / 10))
    status = JobStore(fleet.config).status(done.job_id)
    assert (status.total, status.records, status.input) == (3, 25, s3_input)
    # The chunks are in the queue, with the records read from S3.
    chunks = sorted((body[0][0] for _raw, body in queued(redis_client, fleet.prefix).values()),
                    key=len)
    assert [len(c) for c in chunks] == [5, 10, 10]
    assert sorted(r["value"] for c in chunks for r in c) == list(range(25))


def test_submit_with_a_missing_s3_key_is_a_job_input_error(fleet, s3_input: str,
                                                            redis_client):
    missing = s3_input.replace("records.jsonl", "missing.jsonl")
    with pytest.raises(JobInputError) as caught:
        submit(fleet.app(), JobSpec(task="tasks.aggregate.sum_by", input=missing,
                                    chunk_size=10))
    assert str(caught.value) == f"{missing}: no such object in S3"
    assert queued(redis_client, fleet.prefix) == {}


@pytest.mark.slow
def test_a_job_from_s3_runs_with_its_chunks_by_reference(fleet, moto_s3: str, s3_bucket: str,
                                                        redis_client):
    """Input from S3, chunks above the threshold offloaded to S3, the job's result in S3,
    and each chunk's argument payload deleted once its chunk succeeded."""
    store = StoreUnderTest("s3", fleet, s3_bucket, moto_s3)
    records = [{"key": f"k{i % 4}", "value": i, "pad": "p" * 60} for i in range(2000)]
    s3_client(moto_s3).put_object(
        Bucket=s3_bucket, Key="in/big.jsonl",
        Body="".join(json.dumps(r) + "\n" for r in records).encode())
    store.configure()
    app = fleet.app()
    done = submit(app, JobSpec(
        task="tasks.aggregate.sum_by", input=f"s3://{s3_bucket}/in/big.jsonl",
        chunk_size=1000, aggregate="tasks.aggregate.merge_sums"))
    assert (done.records, done.chunks) == (2000, 2)
    # Each chunk (about 100 kB of records) waits in Redis as a reference only.
    messages = queued(redis_client, fleet.prefix)
    assert len(messages) == 2
    assert all(body[0] == [] and is_claim(body[1]) for _raw, body in messages.values())
    assert len([k for k in store.stored() if k.startswith("args/")]) == 2

    fleet.start_worker("default")
    jobs = JobStore(fleet.config)
    status = wait_for(lambda: (s := jobs.status(done.job_id)).is_terminal and s, 45,
                      interval=0.3, what="the job to end")
    assert status.state == "succeeded", status
    assert status.result_url == done.result_url == store.url_of(
        f"jobs/{done.job_id}/result.json")
    expected = {f"k{g}": {"count": 500, "value": float(sum(range(g, 2000, 4)))}
                for g in range(4)}
    assert json.loads(store.read(status.result_url)) == expected
    assert [k for k in store.stored() if k.startswith("args/")] == []


def run_cli(fleet, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fleet.cli", *args, "--config", str(fleet.config_path)],
        cwd=ROOT, env=fleet.env, capture_output=True, text=True, timeout=60)


def test_cli_submit_from_s3_and_a_missing_key(fleet, s3_input: str, redis_client):
    ok = run_cli(fleet, "submit", "tasks.aggregate.sum_by", "--input", s3_input,
                 "--chunk-size", "10")
    assert ok.returncode == 0, ok.stderr
    assert ": 25 records in 3 chunks of 10" in ok.stdout
    assert len(queued(redis_client, fleet.prefix)) == 3

    missing = s3_input.replace("records.jsonl", "missing.jsonl")
    bad = run_cli(fleet, "submit", "tasks.aggregate.sum_by", "--input", missing)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert bad.stderr.startswith(f"fleet: error: {missing}: no such object in S3")
    assert "Traceback" not in bad.stderr
    assert len(queued(redis_client, fleet.prefix)) == 3  # nothing more was sent


def test_corrupt_payload_is_a_payload_error(tmp_path):
    from fleet.claimcheck import CLAIM_KEY, resolve_value
    from fleet.config import Payloads
    from fleet.errors import PayloadError
    from fleet.payloads import LocalStore

    settings = Payloads(path=str(tmp_path))
    url = LocalStore(tmp_path).put("results/bad.json", b"{not json")
    with pytest.raises(PayloadError, match=r"results/bad.json is not valid JSON"):
        resolve_value(settings, {CLAIM_KEY: {"url": url, "size": 9}})
