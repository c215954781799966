"""Folding events (pure) and decoding them off the wire: no Redis, no database."""

from __future__ import annotations

import base64
import json

from fleet.dashboard.events import EVENT_TYPES_MAX, HEARTBEATS_KEPT, Batch, queue_of, wins
from fleet.dashboard.eventstream import decode

QUEUES = frozenset({"default", "heavy"})


def test_a_batch_folds_a_tasks_events_into_one_row():
    b = Batch(QUEUES)
    b.add({"type": "task-received", "uuid": "a", "name": "n", "args": "[1]", "retries": 0,
           "hostname": "heavy@h", "timestamp": 10.0})
    b.add({"type": "task-started", "uuid": "a", "hostname": "heavy@h", "timestamp": 11.0})
    b.add({"type": "task-failed", "uuid": "a", "hostname": "heavy@h", "timestamp": 12.0,
           "exception": "MemoryLimitExceeded('task a used 700 MiB, limit 512 MiB')"})
    assert list(b.tasks) == ["a"] and b.events == 3
    row = b.tasks["a"]
    assert (row["state"], row["queue"], row["worker"]) == ("FAILURE", "heavy", "heavy@h")
    assert (row["received"], row["started"], row["failed"]) == (10.0, 11.0, 12.0)
    assert row["memory_kill"] is True and row["first_seen"] == 10.0
    w = b.workers["heavy@h"]
    assert (w.failed, w.memory_kills, w.succeeded) == (1, 1, 0)
    assert [o[0] for o in b.outcomes] == ["task-received", "task-started", "task-failed"]


def test_state_precedence():
    assert wins("SUCCESS", "STARTED") and not wins("STARTED", "SUCCESS")
    assert wins("RECEIVED", "RETRY")  # the next attempt
    assert wins("RETRY", "STARTED") and not wins("RECEIVED", "STARTED")
    assert wins("PENDING", None)


def test_queue_of_prefers_the_workers_own_report():
    assert queue_of("heavy@pod-1", QUEUES) == "heavy"
    assert queue_of("custom-name@pod-1", QUEUES) is None
    assert queue_of("custom-name@pod-1", QUEUES, {"custom-name@pod-1": "default"}) == "default"


def test_worker_events_keep_the_newest():
    b = Batch(QUEUES)
    b.add({"type": "worker-heartbeat", "hostname": "w", "timestamp": 5.0, "active": 2})
    b.add({"type": "worker-heartbeat", "hostname": "w", "timestamp": 4.0, "active": 9})
    b.add({"type": "worker-offline", "hostname": "x", "timestamp": 6.0})
    assert b.workers["w"].active == 2 and b.workers["x"].status == "offline"


def test_events_are_counted_by_type_and_the_newest_times_kept_as_flower_does():
    b = Batch(QUEUES)
    b.add({"type": "worker-online", "hostname": "w", "timestamp": 1.0, "clock": 4})
    for at in (5.0, 3.0, 2.0, 4.0):  # out of order: counted, sorted in
        b.add({"type": "worker-heartbeat", "hostname": "w", "timestamp": at, "clock": 9})
    b.add({"type": "task-sent", "uuid": "a", "hostname": "client@h", "timestamp": 6.0})
    b.add({"type": "task-received", "uuid": "a", "hostname": "w", "timestamp": 6.5})
    w = b.workers["w"]
    assert dict(w.events) == {"worker-online": 1, "worker-heartbeat": 4, "task-received": 1}
    assert len(w.heartbeats) == HEARTBEATS_KEPT and w.heartbeats == [3.0, 4.0, 5.0, 6.5]
    assert w.clock == 9
    assert "client@h" not in b.workers  # task-sent is the client's, not a worker's
    for i in range(EVENT_TYPES_MAX + 10):  # made-up types: the count stays bounded
        b.add({"type": f"task-custom{i}", "uuid": "a", "hostname": "w", "timestamp": 7.0})
        b.add({"type": "task-" + "x" * 80, "uuid": "a", "hostname": "w", "timestamp": 7.0})
    assert len(w.events) == EVENT_TYPES_MAX and w.events["worker-heartbeat"] == 4


def envelope(body, encoding="base64") -> bytes:
    raw = json.dumps(body).encode()
    return json.dumps({"body": base64.b64encode(raw).decode() if encoding else raw.decode(),
                       "properties": {"body_encoding": encoding}}).encode()


def test_decode_single_grouped_and_garbage():
    one = {"type": "task-received", "uuid": "a", "timestamp": 1.0, "utcoffset": 0}
    assert decode(envelope(one))[0]["uuid"] == "a"
    # workers buffer task events and send them as one list (routing key task.multi)
    many = [one, {**one, "type": "task-started"}]
    assert [e["type"] for e in decode(envelope(many))] == ["task-received", "task-started"]
    assert decode(envelope(one, encoding=None))[0]["type"] == "task-received"
    assert decode(b"not json") == []
    assert decode(envelope({"no": "type"})) == []
    assert decode(envelope([1, "x", None])) == []
