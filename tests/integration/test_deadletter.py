"""The dead-letter list and the delivery count: the decisions as pure functions, the
Redis adapters against the real Redis, and ``fleet dead`` end to end with a real worker.

The fault cases (poison tasks, malformed messages, a warm shutdown) are in
tests/faults/test_poison.py and tests/faults/test_malformed.py.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import subprocess
import sys

import pytest
from kombu.transport import redis as kombu_redis

from fleet import deadletter, keys
from fleet.deadletter import (
    MALFORMED,
    SIGNAL,
    DeadLetter,
    DeadLetterList,
    Reason,
    message_for_requeue,
    new_entry,
    priority_list,
    requeue,
    requeue_all,
    requeue_problem,
)
from fleet.deliveries import (
    DeliveryCounter,
    max_deliveries,
    reason_of_worker_lost,
    refuse_on_receipt,
    retire_on_loss,
)
from fleet.errors import NotRequeueableError, UnknownDeadLetterError
from fleet.keys import delivery_counter_key
from fleet.transport import Channel, envelope_problem
from tests.conftest import ROOT, shipped_config, wait_for
from tests.probe_poison import cured_key, runs

IMPORTS = [*shipped_config()["imports"], "tests.probe_poison"]
HEAVY_PROBES = {"imports": IMPORTS,
                "queues": {"heavy": {"tasks": ["tasks.heavy.*", "tests.probe.*"]}}}


def envelope(task: str = "tests.probe.pair", task_id: str = "t-1", args=(1, 2), kwargs=None,
             queue: str = "heavy", priority: int = 0, **extra) -> dict:
    """A task message as Celery publishes it onto Redis (kombu's JSON envelope)."""
    body = json.dumps([list(args), kwargs or {}, {"callbacks": None, "errbacks": None,
                                                 "chain": None, "chord": None}])
    message = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id,
                    "parent_id": None, "group": None, "retries": 0, "eta": None,
                    "expires": None, "timelimit": [None, None], "argsrepr": repr(args),
                    "kwargsrepr": repr(kwargs or {}), "origin": "test"},
        "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": priority,
                       "delivery_info": {"exchange": "", "routing_key": queue},
                       "body_encoding": "base64", "delivery_tag": f"tag-{task_id}"},
    }
    message.update(extra)
    return message


# -- decisions: pure functions -----------------------------------------------------------

def test_billiards_words_for_a_lost_pool_process_become_reasons():
    assert reason_of_worker_lost("Worker exited prematurely: signal 9 (SIGKILL) Job: 0.") == (
        Reason(SIGNAL, "its pool process was killed by signal 9 (SIGKILL)"))
    assert reason_of_worker_lost("Worker exited prematurely: exitcode 3 Job: 1.") == (
        Reason("exit-code", "its pool process exited with code 3"))
    assert reason_of_worker_lost("Worker exited prematurely: exitcode 3.").kind == "exit-code"
    assert reason_of_worker_lost("something else") == Reason("worker-lost", "something else")


def test_the_bound_counts_the_first_delivery_too():
    # max_deliveries 3: deliveries 1, 2, 3 run; the third loss retires it on the spot, and
    # a fourth receipt (its worker died whole, nobody saw the loss) is refused.
    assert [retire_on_loss(n, 3) for n in (1, 2, 3)] == [False, False, True]
    assert [refuse_on_receipt(n, 3) for n in (2, 3, 4)] == [False, False, True]
    assert retire_on_loss(1, 1) and refuse_on_receipt(2, 1)


def test_max_deliveries_comes_from_the_queue_or_the_default(fleet):
    config = fleet.configure({"queues": {"heavy": {"max_deliveries": 5}}})
    assert max_deliveries(config, "heavy") == 5
    assert max_deliveries(config, "default") == 3
    assert max_deliveries(config, "no-such-queue") == 3
    assert max_deliveries(None, "heavy") == 3


def test_only_task_messages_can_be_requeued():
    assert requeue_problem(envelope()) is None
    assert "not a kombu envelope" in requeue_problem([1, 2])
    assert "no properties" in requeue_problem({"body": "x", "headers": {"task": "a", "id": "b"}})
    no_task = envelope()
    del no_task["headers"]["task"]
    assert "no task/id header" in requeue_problem(no_task)
    no_body = envelope()
    del no_body["body"]
    assert "no body" in requeue_problem(no_body)


def test_a_requeued_message_is_new_and_the_original_is_untouched():
    original = envelope()
    original["headers"]["redelivered"] = True
    original["properties"]["delivery_info"]["redelivered"] = True
    fresh = message_for_requeue(original, "new-tag")
    assert "redelivered" not in fresh["headers"]
    assert "redelivered" not in fresh["properties"]["delivery_info"]
    assert fresh["properties"]["delivery_tag"] == "new-tag"
    assert fresh["body"] == original["body"] and fresh["headers"]["id"] == "t-1"
    assert original["headers"]["redelivered"] is True  # a copy was changed


def test_requeue_goes_to_the_priority_list_kombu_would_use(fleet):
    config = fleet.config
    lists = keys.list_keys(config, "heavy")
    assert [priority_list(config, "heavy", p) for p in (0, 2, 3, 5, 9, 12, None, "x")] == [
        lists[0], lists[0], lists[1], lists[1], lists[3], lists[3], lists[0], lists[0]]


def test_entries_keep_bounded_text_of_what_is_not_a_message():
    big = new_entry("q", Reason(MALFORMED, "not JSON"), raw=b"\xff" * (deadletter.MAX_RAW + 10))
    assert big.raw.startswith("\\xff") and big.raw.endswith("more characters cut)")
    assert len(big.raw) < deadletter.MAX_RAW + 100
    junk = new_entry("q", Reason(MALFORMED, "no properties"), message={"x": "y" * 70_000})
    assert junk.message is None and junk.raw.startswith('{"x": "yyy')
    task = new_entry("q", Reason(SIGNAL, "killed"), message=envelope(), deliveries=3)
    assert (task.task, task.task_id, task.deliveries) == ("tests.probe.pair", "t-1", 3)
    assert DeadLetter.from_json(task.to_json()) == task
    unreadable = DeadLetter.from_json(b"not json")
    assert unreadable.reason == MALFORMED and unreadable.requeue_problem


@pytest.mark.parametrize(("payload", "problem"), [
    ([1, 2], "a JSON list, not a kombu envelope"),
    ({"body": ""}, "needs 'properties'"),
    ({"properties": {"delivery_info": {}}}, "no 'delivery_tag'"),
    ({"properties": {"delivery_tag": "x"}}, "no 'delivery_info'"),
    ({"properties": {"delivery_tag": ["x"]}}, "delivery_tag is not a string"),
    ({"properties": {"delivery_tag": "x", "body_encoding": 5,
                     "delivery_info": {"exchange": "", "routing_key": "q"}}},
     "body_encoding is not a string: 5"),
    ({"properties": {"delivery_tag": "x", "delivery_info": {"exchange": ""}}},
     "no 'routing_key'"),
    ({"properties": {"delivery_tag": "x", "body_encoding": "rot13",
                     "delivery_info": {"exchange": "", "routing_key": "q"}}},
     "unknown body_encoding 'rot13'"),
    ({"body": "abc", "properties": {"delivery_tag": "x", "body_encoding": "base64",
                                    "delivery_info": {"exchange": "", "routing_key": "q"}}},
     "its body is not valid base64"),
])
def test_each_unusable_envelope_is_named(payload, problem):
    assert problem in envelope_problem(payload, Channel.codecs)


def test_the_copies_of_kombus_code_still_match_kombu():
    """fleet.transport carries copies of four kombu 5.7 methods (the decode step, or the
    restore mark, changed). If kombu changes them, the copies must be looked at again."""
    expected = {
        (kombu_redis.Channel, "_brpop_read"): "c42518699709f2df",
        (kombu_redis.Channel, "_get"): "be26a9f1eb4cf8da",
        (kombu_redis.Channel, "_do_restore_message"): "8b430df94e45b5b0",
        (kombu_redis.QoS, "restore_by_tag"): "58e161d81b6fe18d",
    }
    for (cls, name), digest in expected.items():
        source = inspect.getsource(getattr(cls, name))
        assert hashlib.sha256(source.encode()).hexdigest()[:16] == digest, (
            f"kombu's {cls.__name__}.{name} changed: compare it with fleet/transport.py")


# -- the Redis adapters ------------------------------------------------------------------

def test_the_list_is_capped_newest_first_and_found_by_id(fleet, redis_client):
    dead = DeadLetterList(keys.broker_client(fleet.config), keys.dead_letter_prefix(fleet.config),
                          max_entries=5)
    entries = [new_entry("heavy", Reason(SIGNAL, f"n{i}"), message=envelope(task_id=f"t{i}"))
               for i in range(8)]
    for entry in entries:
        dead.add(entry)
    assert dead.key("heavy") == keys.key(fleet.config, "dead", "heavy")
    assert [e.detail for e in dead.entries("heavy")] == ["n7", "n6", "n5", "n4", "n3"]
    assert dead.counts(["heavy", "default"]) == {"heavy": 5, "default": 0}
    assert dead.find(entries[5].id, ["default", "heavy"])[1] == entries[5]
    with pytest.raises(UnknownDeadLetterError, match="no dead-letter entry 'abc' in"):
        dead.find("abc", ["heavy"])
    with pytest.raises(UnknownDeadLetterError):
        dead.find(entries[0].id, ["heavy"])  # pushed out by newer ones
    assert dead.purge("heavy") == 5 and dead.entries("heavy") == []


def test_a_job_retry_takes_its_chunks_entries_and_leaves_the_rest(fleet, redis_client):
    """discard_tasks (what ``fleet jobs retry`` calls for the chunks it sends again):
    the entries of those tasks, in whichever queue's list, and no other."""
    dead = DeadLetterList.for_config(fleet.config)
    mine = [new_entry(q, Reason(SIGNAL, "killed"), message=envelope(task_id=f"job-1.{i}"))
            for i, q in enumerate(["heavy", "xl", "heavy"])]
    other = new_entry("heavy", Reason(SIGNAL, "killed"), message=envelope(task_id="job-2.0"))
    for entry in [*mine, other]:
        dead.add(entry)
    queues = list(fleet.config.queues)
    taken = dead.discard_tasks({"job-1.0", "job-1.1", "job-1.2"}, queues)
    assert sorted(e.id for e in taken) == sorted(e.id for e in mine)
    assert dead.entries("heavy") == [other] and dead.entries("xl") == []
    assert dead.discard_tasks({"job-1.0"}, queues) == []  # nothing left of them
    assert dead.discard_tasks(set(), queues) == []


def test_requeue_moves_the_message_once_and_resets_its_count(fleet, redis_client):
    config = fleet.config
    dead = DeadLetterList.for_config(config)
    message = envelope(task_id="t-9", priority=5)
    message["headers"]["redelivered"] = True
    entry = new_entry("heavy", Reason(SIGNAL, "killed"), message=message, deliveries=3)
    dead.add(entry)
    counter = DeliveryCounter.for_config(config)
    assert counter.redelivered("tag-t-9")[0] == 2
    assert redis_client.exists(delivery_counter_key(config, "tag-t-9"))

    assert requeue(config, entry.id) == entry
    target = keys.list_keys(config, "heavy")[1]  # priority 5 waits on the step-3 list
    [sent] = [json.loads(m) for m in redis_client.lrange(target, 0, -1)]
    assert sent["headers"]["id"] == "t-9" and "redelivered" not in sent["headers"]
    assert sent["properties"]["delivery_tag"] != "tag-t-9"
    assert not redis_client.exists(delivery_counter_key(config, "tag-t-9"))
    assert dead.entries("heavy") == []
    with pytest.raises(UnknownDeadLetterError):
        requeue(config, entry.id)  # a second requeue sends nothing
    assert redis_client.llen(target) == 1


def test_requeue_refuses_what_is_not_a_task_message(fleet, redis_client):
    config = fleet.config
    dead = DeadLetterList.for_config(config)
    junk = new_entry("default", Reason(MALFORMED, "not JSON"), raw=b"\x00garbage")
    task = new_entry("default", Reason(SIGNAL, "killed"),
                     message=envelope(queue="default", task_id="t-2"))
    dead.add(junk)
    dead.add(task)
    with pytest.raises(NotRequeueableError, match=f"entry {junk.id} cannot be requeued: "
                                                  "not a task message"):
        requeue(config, junk.id)
    done, left = requeue_all(config, "default")
    assert [e.id for e in done] == [task.id] and [e.id for e in left] == [junk.id]
    assert [e.id for e in dead.entries("default")] == [junk.id]
    assert redis_client.llen(keys.list_keys(config, "default")[0]) == 1


# -- fleet dead, end to end ----------------------------------------------------------------

def cli(fleet, *args, stdin: str | None = None, env_extra: dict | None = None):
    env = {**fleet.env, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args, "--config",
                           str(fleet.config_path)], capture_output=True, text=True,
                          input=stdin, env=env, timeout=120, cwd=ROOT)


@pytest.mark.slow
def test_fleet_dead_lists_shows_and_requeues_a_poison_task_that_then_runs(
        fleet, redis_client, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = fleet.configure(HEAVY_PROBES)
    worker = fleet.start_worker("heavy")
    app = fleet.app()
    result = app.send_task("tests.probe.poison", kwargs={"how": "sigkill"})
    with pytest.raises(Exception, match="dead-lettered after 3 deliveries"):
        result.get(timeout=90)
    [entry] = DeadLetterList.for_config(config).entries("heavy")

    listed = cli(fleet, "dead", "list", "heavy")
    assert listed.returncode == 0, listed.stderr
    assert entry.id in listed.stdout and "signal" in listed.stdout
    assert "tests.probe.poison" in listed.stdout
    as_json = json.loads(cli(fleet, "dead", "list", "--json").stdout)
    assert [(e["id"], e["deliveries"], e["task_id"]) for e in as_json] == [
        (entry.id, 3, result.id)]
    shown = cli(fleet, "dead", "show", entry.id)
    assert shown.returncode == 0, shown.stderr
    assert "signal: its pool process was killed by signal 9 (SIGKILL)" in shown.stdout
    assert f"fleet dead requeue {entry.id}" in shown.stdout
    assert '[[], {"how": "sigkill"}' in shown.stdout

    redis_client.set(cured_key(config), 1)  # the fix is deployed
    requeued = cli(fleet, "dead", "requeue", entry.id)
    assert requeued.returncode == 0, requeued.stderr
    assert f"requeued {entry.id}: tests.probe.poison[{result.id}] onto heavy" in requeued.stdout
    # The same task id runs again: its stored FAILURE is replaced (a fresh AsyncResult,
    # the first one keeps what it read).
    wait_for(lambda: app.AsyncResult(result.id).state == "SUCCESS", 60,
             what="the requeued task to succeed")
    assert app.AsyncResult(result.id).result == "cured"
    assert runs(redis_client, config, result.id) == 4  # 3 deliveries, then the requeue
    assert cli(fleet, "dead", "list").stdout.startswith("no dead letters")
    assert worker.alive()


def test_fleet_dead_error_paths(fleet, redis_client):
    config = fleet.config
    dead = DeadLetterList.for_config(config)
    junk = new_entry("default", Reason(MALFORMED, "not JSON: Expecting value"), raw=b"%%%")
    dead.add(junk)

    unknown = cli(fleet, "dead", "show", "nope")
    assert unknown.returncode == 2
    assert "fleet: error: no dead-letter entry 'nope' in default, io, heavy, xl" in (
        unknown.stderr)
    assert "Traceback" not in unknown.stderr
    assert cli(fleet, "dead", "requeue", "nope").returncode == 2
    refused = cli(fleet, "dead", "requeue", junk.id)
    assert refused.returncode == 1
    assert f"entry {junk.id} cannot be requeued: not a task message" in refused.stderr
    no_queue = cli(fleet, "dead", "list", "nosuch")
    assert no_queue.returncode == 2 and "queues.nosuch: no such queue" in no_queue.stderr
    usage = cli(fleet, "dead", "requeue")
    assert usage.returncode == 2 and "give an entry ID, or --all [QUEUE]" in usage.stderr
    everything = cli(fleet, "dead", "requeue", "--all")
    assert everything.returncode == 0
    assert f"0 requeued; 1 left (not task messages: {junk.id})" in everything.stdout
    assert cli(fleet, "dead", "requeue", "--all", "nosuch").returncode == 2
    shown = cli(fleet, "dead", "show", junk.id)
    assert "raw         %%%" in shown.stdout and "cannot" not in shown.stderr
    assert json.loads(cli(fleet, "dead", "show", junk.id, "--json").stdout)["raw"] == "%%%"

    kept = cli(fleet, "dead", "purge", "default", stdin="n\n")
    assert kept.returncode == 130 and dead.counts(["default"]) == {"default": 1}
    purged = cli(fleet, "dead", "purge", "--yes")
    assert purged.returncode == 0 and "purged 1 entries (default: 1, io: 0" in purged.stdout

    down = cli(fleet, "dead", "list", env_extra={"FLEET_BROKER_URL": "redis://127.0.0.1:1/0"})
    assert down.returncode == 3 and "Redis is not answering" in down.stderr


def test_a_count_in_redis_expires(fleet, redis_client):
    counter = DeliveryCounter.for_config(fleet.config)
    counter.lost("tag-x", Reason(SIGNAL, "killed"))
    assert counter.redelivered("tag-x") == (2, Reason(SIGNAL, "killed"))
    assert counter.lost("tag-x", Reason(SIGNAL, "again")) == 2
    ttl = redis_client.ttl(delivery_counter_key(fleet.config, "tag-x"))
    assert 0 < ttl <= max(3600, int(fleet.config.results.expires))
