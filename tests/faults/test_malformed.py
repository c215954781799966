"""Malformed messages LPUSHed raw onto a queue while an acks_late task is in flight: the
worker survives, each message is dead-lettered with its reason, the in-flight task is not
run again (no consumer reset restored it), and later tasks run. Before, bytes that were
not JSON stopped the worker ("Unrecoverable error") and JSON without ``properties`` reset
the consumer, re-running the in-flight task. Wrong arguments are dead-lettered too; a
task's own TypeError is not.
"""

from __future__ import annotations

import base64
import json
import time

import pytest

from fleet.deadletter import DeadLetterList
from fleet.keys import kombu_key, list_keys
from tests.conftest import ROOT, shipped_config, wait_for
from tests.faults.figures import Figures, report
from tests.probe_poison import runs

pytestmark = pytest.mark.slow

IMPORTS = [*shipped_config()["imports"], "tests.probe_poison"]
PROBES = {"imports": IMPORTS, "queues": {"default": {
    "tasks": ["tasks.aggregate.*", "fleet.*", "tests.probe.*"]}}}


def envelope(task: str | None = "tests.probe.pair", task_id: str | None = "m-1",
             body: object = ((1, 2), {}, {}), content_type: str = "application/json",
             queue: str = "default") -> dict:
    """A message as Celery would put it on Redis, to break one part at a time."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"lang": "py", "retries": 0, "timelimit": [None, None], "root_id": task_id}
    if task is not None:
        headers["task"] = task
    if task_id is not None:
        headers["id"] = task_id
    return {"body": base64.b64encode(raw).decode(), "content-encoding": "utf-8",
            "content-type": content_type, "headers": headers,
            "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0,
                           "delivery_info": {"exchange": "", "routing_key": queue},
                           "body_encoding": "base64", "delivery_tag": f"tag-{task_id}"}}


def without(message: dict, *path: str) -> dict:
    node = message
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]
    return message


def with_property(name: str, value: object, task_id: str) -> bytes:
    message = envelope(task_id=task_id)
    message["properties"][name] = value
    return json.dumps(message).encode()


def bad_body_encoding() -> dict:
    message = envelope(task_id="m-enc")
    message["body"] = "abc"  # not base64: bad padding
    return message


#: (what, the bytes LPUSHed, the reason, words of the detail)
MALFORMED = [
    ("not JSON", b"\xff\xfe this is not json {", "malformed", "not JSON"),
    ("JSON, not an object", b"[1, 2, 3]", "malformed", "a JSON list, not a kombu envelope"),
    ("no properties", json.dumps({"body": "", "headers": {}}).encode(), "malformed",
     "needs 'properties'"),
    ("no delivery_tag", json.dumps(without(envelope(task_id="m-tag"), "properties",
                                           "delivery_tag")).encode(),
     "malformed", "no 'delivery_tag'"),
    ("no delivery_info", json.dumps(without(envelope(task_id="m-info"), "properties",
                                            "delivery_info")).encode(),
     "malformed", "no 'delivery_info'"),
    ("delivery_tag not a string", with_property("delivery_tag", ["x"], "m-tag2"),
     "malformed", "its delivery_tag is not a string"),
    ("bad body encoding", json.dumps(bad_body_encoding()).encode(), "malformed",
     "its body is not valid base64"),
    ("unknown body encoding", with_property("body_encoding", "rot13", "m-rot"), "malformed",
     "unknown body_encoding 'rot13'"),
    ("content Celery refuses", json.dumps(envelope(
        task_id="m-pickle", content_type="application/x-python-serialize")).encode(),
     "malformed", "content Celery refuses"),
    ("body not decodable", json.dumps(envelope(task_id="m-body", body=b"not json")).encode(),
     "malformed", "its body cannot be decoded as 'application/json'"),
    ("no task header", json.dumps(envelope(task=None, task_id="m-nohdr", body={})).encode(),
     "malformed", "no 'task' header"),
    ("unknown task", json.dumps(envelope(task="no.such.task", task_id="m-unknown")).encode(),
     "unknown-task", "no task named 'no.such.task' is registered"),
    ("no id header", json.dumps(envelope(task_id=None)).encode(), "invalid-task",
     "KeyError: 'id'"),
    ("body not [args, kwargs, embed]", json.dumps(envelope(
        task_id="m-shape", body={"a": 1})).encode(), "invalid-task", "ValueError"),
]


@pytest.fixture
def probes(fleet, monkeypatch):
    monkeypatch.chdir(ROOT)
    fleet.configure(PROBES)
    return fleet


def test_malformed_messages_are_dead_lettered_and_the_worker_goes_on(probes, redis_client):
    fleet = probes
    config = fleet.config
    worker = fleet.start_worker("default")
    app = fleet.app()
    in_flight = app.send_task("tests.probe.hold", kwargs={"seconds": 8}, queue="default")
    wait_for(lambda: runs(redis_client, config, in_flight.id) == 1, 30,
             what="the acks_late task to start")
    queue_list = list_keys(config, "default")[0]
    started = time.monotonic()
    for _, raw, _, _ in MALFORMED:
        redis_client.lpush(queue_list, raw)
    dead = DeadLetterList.for_config(config)
    wait_for(lambda: len(dead.entries("default")) == len(MALFORMED), 30,
             what="every malformed message in the dead-letter list")
    kept_after = time.monotonic() - started
    entries = list(reversed(dead.entries("default")))  # oldest first: as pushed
    for (what, raw, reason, words), entry in zip(MALFORMED, entries, strict=True):
        assert entry.reason == reason, (what, entry)
        assert words in entry.detail, (what, entry.detail)
        if what == "not JSON":
            assert entry.raw == raw.decode("utf-8", errors="backslashreplace")
        elif what == "JSON, not an object":
            assert entry.message == [1, 2, 3]
        else:
            assert entry.message == json.loads(raw), what
    assert [e.requeue_problem is None for e in entries] == [
        what in ("no delivery_tag", "delivery_tag not a string", "bad body encoding",
                 "unknown body encoding", "content Celery refuses",
                 "body not decodable", "unknown task", "body not [args, kwargs, embed]")
        for what, *_ in MALFORMED]

    # The in-flight task was not restored and run again by a consumer reset.
    assert in_flight.get(timeout=30) == 8
    later = app.send_task("tests.probe.pair", args=[2, 3], queue="default")
    assert later.get(timeout=30) == 5
    time.sleep(1)
    assert runs(redis_client, config, in_flight.id) == 1
    assert worker.alive()
    log = fleet.log_of(worker)
    for sign in ("Unrecoverable error", "Restoring", "Connection to broker lost",
                 "consumer: Cannot connect"):
        assert sign not in log, sign
    # Whoever waits on a malformed task's result learns why instead of waiting forever.
    assert app.AsyncResult("m-pickle").state == "FAILURE"
    assert "content Celery refuses" in str(app.AsyncResult("m-pickle").result)
    assert type(app.AsyncResult("m-unknown").result).__name__ == "NotRegistered"
    assert not redis_client.hlen(kombu_key(config, "unacked"))
    report(Figures(case="malformed-messages", submitted=len(MALFORMED) + 2,
                   completed=len(MALFORMED) + 2, lost=0,
                   duplicated=runs(redis_client, config, in_flight.id) - 1,
                   recovery_s=kept_after, extra={"kinds": len(MALFORMED)}))
    assert kept_after < 30


def test_wrong_arguments_are_dead_lettered_and_a_tasks_own_type_error_is_not(
        fleet, redis_client, monkeypatch):
    monkeypatch.chdir(ROOT)
    # A small claim-check threshold: large arguments travel by reference and are checked
    # only once resolved, in the pool process.
    config = fleet.configure({**PROBES, "payloads": {"threshold": "1Ki"}})
    fleet.start_worker("default")
    app = fleet.app()
    dead = DeadLetterList.for_config(config)
    cases = [
        (app.send_task("tests.probe.pair", args=[1], queue="default"),
         "missing a required argument: 'b'"),
        (app.send_task("tests.probe.pair", kwargs={"a": list(range(500)), "b": [], "c": 1},
                       queue="default"),
         "got an unexpected keyword argument 'c'"),
    ]
    for result, problem in cases:
        with pytest.raises(TypeError) as caught:
            result.get(timeout=30)
        assert type(caught.value).__name__ == "WrongArguments"
        assert str(caught.value) == (f"task tests.probe.pair[{result.id}] cannot take the "
                                     f"arguments it was sent: {problem}")
    wait_for(lambda: len(dead.entries("default")) == 2, 10, what="two entries")
    entries = {e.task_id: e for e in dead.entries("default")}
    for result, problem in cases:
        entry = entries[result.id]
        assert entry.reason == "wrong-arguments" and problem in entry.detail
        assert entry.requeue_problem is None
    # The large one travelled by reference; the check ran on the resolved arguments.
    assert entries[cases[1][0].id].message["headers"]["kwargsrepr"].startswith("{claim:")
    # A large call that binds is not flagged; a TypeError inside the task is its own.
    big = app.send_task("tests.probe.pair", kwargs={"a": list(range(300)),
                                                    "b": list(range(300))}, queue="default")
    assert len(big.get(timeout=30)) == 600
    buggy = app.send_task("tests.probe.buggy", args=[1], queue="default")
    with pytest.raises(TypeError) as caught:
        buggy.get(timeout=30)
    assert type(caught.value).__name__ == "TypeError"
    time.sleep(1)
    assert len(dead.entries("default")) == 2
