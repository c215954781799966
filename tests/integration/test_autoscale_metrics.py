"""Queue depth done right, against the real Redis: priorities, prefetched messages,
the oldest message's age, worker self-reports; one round trip per poll."""

from __future__ import annotations

import signal
import time

import pytest
import redis

from fleet.keys import list_keys, workers_key
from fleet.observe.metrics import RedisMetrics
from tests.conftest import REDIS_URL, wait_for


def metrics(fleet, redis_client) -> RedisMetrics:
    return RedisMetrics(fleet.config, redis_client)


def test_priority_sub_lists_are_counted_and_the_oldest_message_is_aged(fleet, redis_client):
    app = fleet.app()
    first = time.time()
    app.send_task("tasks.io.fetch", priority=9)
    time.sleep(0.3)
    for priority, count in ((0, 3), (3, 2), (6, 1), (9, 3)):
        for _ in range(count):
            app.send_task("tasks.io.fetch", priority=priority)
    app.send_task("tasks.heavy.crunch")
    keys = list_keys(fleet.config, "io")
    assert keys[0] == f"{fleet.prefix}io" and keys[3] == f"{fleet.prefix}io\x06\x169"
    # LLEN of the main list alone undercounts: 3 of 10.
    assert redis_client.llen(keys[0]) == 3
    obs = metrics(fleet, redis_client).poll()
    io = obs.queues["io"]
    assert (io.waiting, io.unacked) == (10, 0)
    assert io.oldest_age == pytest.approx(time.time() - first, abs=0.25)
    assert obs.queues["heavy"].waiting == 1
    assert obs.queues["default"].waiting == 0 and obs.queues["default"].oldest_age is None


@pytest.mark.slow
def test_messages_held_by_workers_are_counted_per_queue(fleet, redis_client):
    """Prefetched and running messages leave the lists for the shared unacked hash."""
    fleet.configure({"queues": {
        "heavy": {"concurrency": 1, "prefetch_multiplier": 4, "disable_prefetch": False},
        "default": {"concurrency": 1, "prefetch_multiplier": 2},
    }})
    heavy = fleet.start_worker("heavy")
    fleet.start_worker("default")
    app = fleet.app()
    for i in range(7):
        app.send_task("tasks.heavy.sleep", kwargs={"seconds": 20, "tag": str(i)})
    for _ in range(5):
        app.send_task("tasks.aggregate.sum_by", args=[[]], kwargs={"group_by": "k"},
                      countdown=60)  # ETA tasks: held by the worker, not run
    m = metrics(fleet, redis_client)
    last = []

    def settled():
        obs = m.poll()
        last[:] = [obs]
        return obs if obs.queues["heavy"].unacked == 4 and obs.queues["default"].unacked \
            == 5 and any(w.active for w in obs.workers_of("heavy")) else None

    try:
        obs = wait_for(settled, 60, interval=0.3, what="workers to hold their messages")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last poll: {last}") from None
    heavy_q, default_q = obs.queues["heavy"], obs.queues["default"]
    # heavy: prefetch count 1 x 4; one of them running, three prefetched; 3 still waiting.
    assert (heavy_q.waiting, heavy_q.unacked) == (3, 4)
    # default: all five ETA messages are held by the worker (Celery takes ETA tasks
    # beyond the prefetch count), none waiting.
    assert (default_q.waiting, default_q.unacked) == (0, 5)
    [report] = obs.workers_of("heavy")
    assert report.hostname == heavy.hostname
    assert (report.active, report.reserved, report.concurrency) == (1, 3, 1)
    assert report.rss_main > 0 and report.rss_children > 0
    assert report.memory_available > 0
    assert report.loop_at is not None and time.time() - report.loop_at < 10


@pytest.mark.slow
def test_a_dead_worker_drops_out(fleet, redis_client):
    fleet.configure({"autoscaler": {"worker_metrics_interval": "1s"}})
    worker = fleet.start_worker("default")
    m = metrics(fleet, redis_client)
    wait_for(lambda: m.poll().workers_of("default"), 15, what="the worker to report")
    worker.kill()
    # stale after 3 intervals + 5 s: gone from the poll, and from Redis.
    wait_for(lambda: not m.poll().workers_of("default"), 15, what="the worker to drop out")
    assert not redis_client.hexists(workers_key(fleet.config), worker.hostname)


@pytest.mark.slow
def test_a_worker_in_warm_shutdown_reports_its_tasks_as_draining(fleet, redis_client):
    """SIGTERM: Celery finishes the running task; until it exits, the worker's reports
    say that task is draining (the policy needs no replica for it)."""
    fleet.configure({"autoscaler": {"worker_metrics_interval": "0.5s"}})
    worker = fleet.start_worker("default")
    m = metrics(fleet, redis_client)
    result = fleet.app().send_task("tasks.heavy.sleep", kwargs={"seconds": 8},
                                   queue="default")

    def running():
        return [w for w in m.poll().workers_of("default") if w.active == 1]

    assert wait_for(running, 15, what="the task to run")[0].draining == 0
    worker.proc.send_signal(signal.SIGTERM)
    seen = wait_for(lambda: [w for w in running() if w.draining == 1], 10,
                    what="a report with the task draining")
    assert seen[0].hostname == worker.hostname
    assert result.get(timeout=20)["slept"] >= 8  # finished, not lost
    worker.proc.wait(timeout=20)


@pytest.mark.slow
def test_a_clean_worker_shutdown_withdraws_at_once(fleet, redis_client):
    fleet.configure({"autoscaler": {"worker_metrics_interval": "1s"}})
    worker = fleet.start_worker("default")
    m = metrics(fleet, redis_client)
    wait_for(lambda: m.poll().workers_of("default"), 15, what="the worker to report")
    worker.stop()
    assert not redis_client.hexists(workers_key(fleet.config), worker.hostname)


def test_one_poll_is_one_round_trip_for_a_hundred_queues(fleet, redis_client):
    """Counted on the client's socket: one write of every command, then the replies."""
    sent: list = []

    class CountingConnection(redis.Connection):
        def send_packed_command(self, command, check_health=True):
            sent.append(command)
            return super().send_packed_command(command, check_health)

    queues = {f"q{i}": {"tasks": [f"bench.q{i}.*"], "kubernetes": {}} for i in range(100)}
    config = fleet.configure({"queues": queues})
    for i in range(0, 100, 3):
        redis_client.lpush(f"{fleet.prefix}q{i}", b'{"headers": {"fleet-sent": 1.0}}')
    pool = redis.ConnectionPool.from_url(REDIS_URL, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    try:
        m = RedisMetrics(config, client)
        m.poll()  # the connection is open and the script loaded
        sent.clear()
        obs = m.poll()
        assert len(sent) == 1, len(sent)
        assert sum(q.waiting for q in obs.queues.values()) == 34
    finally:
        client.close()


@pytest.mark.parametrize("report", [
    b"not json", b"[1, 2]", b'{"hostname": "x"}',
    None,  # filled in below: a real report with "at" as a string
])
def test_a_malformed_worker_report_is_dropped_alone_and_never_trusted(fleet, redis_client,
                                                                      report, caplog):
    import json
    from dataclasses import asdict

    from fleet.observe.model import WorkerSample

    good = WorkerSample("good@h", "default", "pod", 10, 2, 1, 0, 5, 10.0, 1, 2, 3, time.time())
    if report is None:
        report = json.dumps({**asdict(good), "hostname": "bad@h", "at": str(time.time())})
    redis_client.hset(workers_key(fleet.config), mapping={
        "good@h": json.dumps(asdict(good)), "bad@h": report})
    obs = metrics(fleet, redis_client).poll()
    assert [w.hostname for w in obs.workers] == ["good@h"]
    assert not redis_client.hexists(workers_key(fleet.config), "bad@h")
    assert "ignoring the malformed report of worker bad@h" in caplog.text


def test_report_fields_are_checked_by_type_and_range():
    import json
    from dataclasses import asdict

    from fleet.observe.model import WorkerSample, parse_report

    good = asdict(WorkerSample("w@h", None, "pod", 10, 2, 1, 0, 5, 10.0, 1, 2, 3, 1.0))
    assert parse_report(json.dumps(good)).hostname == "w@h"
    for field, value, reason in [("pid", "10", "must be int"), ("active", True, "must be int"),
                                 ("at", float("nan"), "finite"), ("rss_main", -1, ">= 0"),
                                 ("queue", 3, "must be str or null")]:
        with pytest.raises(ValueError, match=reason):
            parse_report(json.dumps({**good, field: value}))
    with pytest.raises(ValueError, match="unknown field 'extra'"):
        parse_report(json.dumps({**good, "extra": 1}))
