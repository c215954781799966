"""Workers append every event to the fleet's stream (fleet.eventlog): Celery's own event
dispatcher, in process, against a redis-server of the test's own (its counters are our
round trips; stopping it is an outage)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import redis

from fleet.eventlog import GAP_FIELD, StreamDispatcher
from fleet.keys import events_stream_key
from tests.conftest import deep_merge, shipped_config, wait_for
from tests.fakes.redis_server import PersistentRedis
from tests.unit.test_config_validation import only, problems, write


@pytest.fixture
def server(tmp_path):
    s = PersistentRedis(tmp_path / "redis", appendonly=False).start()
    yield s
    s.stop()


def dispatcher(app, conn, **kw) -> StreamDispatcher:
    d = app.events.Dispatcher(conn, hostname="w@test", **kw)
    assert isinstance(d, StreamDispatcher)
    return d


def subscribe(client: redis.Redis, prefix: str):
    sub = client.pubsub(ignore_subscribe_messages=True)
    sub.psubscribe(f"{prefix}/0.celeryev/*")
    wait_for(lambda: sub.get_message(timeout=0.1) is None and sub.subscribed, 5,
             what="the subscription")
    return sub


def published(sub, n: int, timeout: float = 5) -> list[bytes]:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        m = sub.get_message(timeout=0.2)
        if m:
            got.append(m["channel"])
    return got


def stream_events(client: redis.Redis, key: str) -> list:
    return [json.loads(f[b"e"]) if b"e" in f else {"gap": json.loads(f[GAP_FIELD.encode()])}
            for _, f in client.xrange(key)]


def test_each_event_is_published_and_appended_in_one_round_trip(fleet, server):
    fleet.configure({"broker": {"url": server.url}})
    app = fleet.app()
    client = server.client()
    sub = subscribe(client, fleet.prefix)
    key = events_stream_key(fleet.config)
    assert key == f"{fleet.prefix}fleet:events"
    with app.connection_for_write() as conn:
        d = dispatcher(app, conn)
        d.send("worker-online")  # connects
        client.config_resetstat()
        before = client.info("stats")["total_reads_processed"]
        for i in range(100):
            d.send("worker-heartbeat", active=i)
        reads = client.info("stats")["total_reads_processed"] - before
        calls = client.info("commandstats")
        d.close()
    # PUBLISH and XADD in one pipeline: one read event per event (plus our INFO); two
    # round trips each would be 200 or more.
    assert 100 <= reads <= 110, reads
    assert calls["cmdstat_publish"]["calls"] == 100
    assert calls["cmdstat_xadd"]["calls"] == 100
    assert len(published(sub, 101)) == 101  # pub/sub unchanged, for Flower
    events = stream_events(client, key)
    assert [e["type"] for e in events] == ["worker-online"] + ["worker-heartbeat"] * 100
    assert [e["active"] for e in events[1:]] == list(range(100))
    assert events[1]["hostname"] == "w@test" and "timestamp" in events[1]


def test_grouped_task_events_are_one_entry(fleet, server):
    """Celery's worker buffers task events and sends them as one list (task.multi)."""
    fleet.configure({"broker": {"url": server.url}})
    app = fleet.app()
    client = server.client()
    sub = subscribe(client, fleet.prefix)
    with app.connection_for_write() as conn:
        d = dispatcher(app, conn, buffer_group=["task"])
        for i in range(3):
            d.send("task-received", uuid=f"t{i}")
        assert client.xlen(events_stream_key(fleet.config)) == 0  # still grouped
        d.flush()
        d.close()
    [entry] = stream_events(client, events_stream_key(fleet.config))
    assert [e["uuid"] for e in entry] == ["t0", "t1", "t2"]
    assert published(sub, 1) == [f"{fleet.prefix}/0.celeryev/task.multi".encode()]


def test_the_stream_is_capped(fleet, server):
    fleet.configure({"broker": {"url": server.url}, "event_stream": {"maxlen": 1000}})
    app = fleet.app()
    client = server.client()
    with app.connection_for_write() as conn:
        d = dispatcher(app, conn)
        for i in range(3000):
            d.send("worker-heartbeat", n=i)
        d.close()
    length = client.xlen(events_stream_key(fleet.config))
    # MAXLEN ~ trims whole nodes (100 entries by default): at least 1000, not much more.
    assert 1000 <= length <= 1100, length
    last = json.loads(client.xrevrange(events_stream_key(fleet.config), count=1)[0][1][b"e"])
    assert last["n"] == 2999


def test_an_outage_is_buffered_bounded_and_the_overflow_is_marked(fleet, server):
    fleet.configure({"broker": {"url": server.url}, "event_stream": {"offline_buffer": 5}})
    app = fleet.app()
    with app.connection_for_write() as conn:
        d = dispatcher(app, conn)
        d.send("worker-online")
        server.stop()
        for i in range(8):
            d.send("worker-heartbeat", n=i)
        # Celery's buffer is unbounded; this one keeps the newest 5 and counts the rest.
        assert [e["n"] for e, _ in d._outbound_buffer] == [3, 4, 5, 6, 7]
        assert d.dropped.events == 3
        d.flush()  # still down: kept, in order
        assert len(d._outbound_buffer) == 5
        server.start()
        d.flush()
        assert len(d._outbound_buffer) == 0 and d.dropped.events == 0
        d.close()
    client = server.client()
    entries = stream_events(client, events_stream_key(fleet.config))
    marker = entries[0]["gap"]
    assert (marker["hostname"], marker["dropped"]) == ("w@test", 3)
    assert marker["since"] <= marker["until"]
    assert [e["n"] for e in entries[1:]] == [3, 4, 5, 6, 7]


def test_grouped_events_move_to_the_dispatcher_made_after_a_reconnect(fleet, server):
    """Celery's consumer copies only the old dispatcher's outbound buffer; task events
    still grouped in it would be lost."""
    fleet.configure({"broker": {"url": server.url}})
    app = fleet.app()
    with app.connection_for_write() as old_conn, app.connection_for_write() as conn:
        old = dispatcher(app, old_conn, buffer_group=["task"])
        old.send("task-succeeded", uuid="grouped")
        old.disable()  # what Celery's Events step does to it on reconnect
        new = dispatcher(app, conn, buffer_group=["task"])
        new.extend_buffer(old)
        new.flush()
        new.close()
    [entry] = stream_events(server.client(), events_stream_key(fleet.config))
    assert [e["uuid"] for e in entry] == ["grouped"]


def test_an_event_sent_with_retry_reaches_the_stream_too(fleet, server):
    """Task.send_event (from inside a task) publishes with retry=True."""
    fleet.configure({"broker": {"url": server.url}})
    app = fleet.app()
    with app.events.default_dispatcher(hostname="w@test") as d:
        d.send("task-progress", uuid="u", done=3, retry=True,
               retry_policy={"max_retries": 1})
    [event] = stream_events(server.client(), events_stream_key(fleet.config))
    assert (event["type"], event["done"]) == ("task-progress", 3)


def test_no_stream_when_turned_off(fleet, server):
    fleet.configure({"broker": {"url": server.url}, "event_stream": {"enabled": False}})
    app = fleet.app()
    client = server.client()
    sub = subscribe(client, fleet.prefix)
    with app.connection_for_write() as conn:
        d = dispatcher(app, conn)
        assert d.log is None
        d.send("worker-heartbeat")
        d.close()
    assert len(published(sub, 1)) == 1
    assert not client.exists(events_stream_key(fleet.config))


def test_bad_event_stream_settings_are_clear_config_errors(tmp_path):
    assert only(problems(tmp_path, {"event_stream": {"maxlen": 10}})) == \
        "event_stream.maxlen: Input should be greater than or equal to 1000 (got 10)"
    assert only(problems(tmp_path, {"event_stream": {"buffer": 5}})) == \
        "event_stream.buffer: unknown key"
    assert only(problems(tmp_path, {"dashboard": {"event_group": "two words"}})).startswith(
        "dashboard.event_group: String should match pattern")
    path = write(tmp_path, deep_merge(shipped_config(), {"event_stream": {"maxlen": 10}}))
    out = subprocess.run([sys.executable, "-m", "fleet.cli", "validate", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{path}:" in out.stderr and "event_stream.maxlen" in out.stderr


def test_a_stream_key_holding_something_else_is_said_once_and_pub_sub_goes_on(
        fleet, server, caplog):
    fleet.configure({"broker": {"url": server.url}})
    app = fleet.app()
    client = server.client()
    client.set(events_stream_key(fleet.config), "not a stream")
    sub = subscribe(client, fleet.prefix)
    with app.connection_for_write() as conn:
        d = dispatcher(app, conn)
        for _ in range(3):
            d.send("worker-heartbeat")
        assert len(d._outbound_buffer) == 0  # not kept to be refused again
        d.close()
    assert len(published(sub, 3)) == 3
    refused = [r for r in caplog.records if "refused an event's append" in r.getMessage()]
    assert len(refused) == 1 and "WRONGTYPE" in refused[0].getMessage()
