"""The dashboard reads the workers' event stream with a consumer group: real Redis, the
real ingester and store, events sent by Celery's own dispatcher (fleet.eventlog's)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from fleet.dashboard.gaps import RESET, TRIMMED, WORKER_BUFFER
from fleet.dashboard.ingest import Ingester
from fleet.dashboard.store import Store
from fleet.dashboard.views import TaskFilter, Views
from fleet.eventlog import Dropped, EventLog
from fleet.keys import events_stream_key
from tests.conftest import deep_merge, wait_for
from tests.integration.dashboard_util import FAST, start_dashboard
from tests.integration.test_dashboard_api import metric

HOST = "default-0@stream-test"


class Running:
    """An ingester's receiver and writer threads on a store of its own."""

    def __init__(self, fleet, database: str):
        self.store = Store(database)
        self.views = Views(self.store)
        self.ingester = Ingester(fleet.config, self.store)
        self.stop_event = threading.Event()
        self.threads = [
            threading.Thread(target=self.ingester.run_receiver,
                             args=(fleet.app(), self.stop_event), daemon=True),
            threading.Thread(target=self.ingester.run_writer, args=(self.stop_event,),
                             daemon=True)]
        for t in self.threads:
            t.start()
        wait_for(lambda: self.ingester.connected, 20, what="the ingester to attach")

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=15)
        self.store.close()

    def succeeded(self) -> int:
        return len(self.views.tasks(TaskFilter(states=("SUCCESS",)), limit=500))


@pytest.fixture
def database(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'dash.sqlite'}"


@pytest.fixture
def send(fleet):
    """send(n) runs n tasks' worth of events through a real dispatcher, made at the first
    call with the config of that moment; returns the task ids."""
    fleet.configure(deep_merge(FAST, {}))
    made = []

    def run(n: int) -> list[str]:
        if not made:
            app = fleet.app()
            conn = app.connection_for_write()
            made.extend([conn, app.events.Dispatcher(conn, hostname=HOST)])
        d = made[1]
        ids = []
        for _ in range(n):
            tid = str(uuid.uuid4())
            d.send("task-received", uuid=tid, name="tasks.io.fetch", args="()", kwargs="{}")
            d.send("task-started", uuid=tid)
            d.send("task-succeeded", uuid=tid, result="1", runtime=0.01)
            ids.append(tid)
        return ids

    yield run
    if made:
        made[1].close()
        made[0].release()


def stored_all(running: Running, n: int):
    return wait_for(lambda: running.succeeded() >= n and running.succeeded(), 30,
                    what=f"{n} tasks stored")


def pending(redis_client, fleet) -> int:
    return redis_client.xpending(events_stream_key(fleet.config),
                                 fleet.config.dashboard.event_group)["pending"]


def test_the_dashboard_resumes_where_it_stopped_and_counts_each_event_once(
        fleet, send, database, redis_client):
    running = Running(fleet, database)
    assert running.ingester.source == "stream"
    send(10)
    stored_all(running, 10)
    running.stop()
    send(40)  # nobody reading: pub/sub would lose these
    running = Running(fleet, database)
    try:
        assert stored_all(running, 50) == 50
        wait_for(lambda: pending(redis_client, fleet) == 0, 10, what="every entry acked")
        assert running.views.worker(HOST)["succeeded"] == 50
        assert running.views.gaps() == []
    finally:
        running.stop()


def test_entries_delivered_but_never_stored_are_read_again(fleet, send, database,
                                                           redis_client):
    running = Running(fleet, database)
    send(5)
    stored_all(running, 5)
    running.stop()
    ids = send(5)
    # Delivered to the dashboard's consumer, which stopped before storing them.
    key, group = events_stream_key(fleet.config), fleet.config.dashboard.event_group
    taken = redis_client.xreadgroup(group, "ingester", {key: ">"}, count=100)
    assert len(taken[0][1]) == 15
    # (and maybe the first run's last batch: stored, its XACK not sent before it stopped)
    assert pending(redis_client, fleet) >= 15
    running = Running(fleet, database)
    try:
        stored_all(running, 10)
        assert {t["uuid"] for t in running.views.tasks(TaskFilter(), limit=50)} >= set(ids)
        wait_for(lambda: pending(redis_client, fleet) == 0, 10, what="every entry acked")
        assert running.views.worker(HOST)["succeeded"] == 10
    finally:
        running.stop()


def test_entries_delivered_again_are_not_counted_twice(fleet, send, database, redis_client):
    """The group's position going back (an AOF that lost its last writes, SETID): the
    store knows the newest id it holds and only acks what it has."""
    running = Running(fleet, database)
    send(20)
    stored_all(running, 20)
    wait_for(lambda: pending(redis_client, fleet) == 0, 10, what="every entry acked")
    redis_client.xgroup_setid(events_stream_key(fleet.config), fleet.config.dashboard.event_group,
                              "0")
    send(1)
    try:
        stored_all(running, 21)
        wait_for(lambda: pending(redis_client, fleet) == 0, 10, what="every entry acked")
        assert running.views.worker(HOST)["succeeded"] == 21
    finally:
        running.stop()


def test_a_stream_trimmed_past_the_dashboard_is_a_gap(fleet, send, database, redis_client):
    redis7 = int(redis_client.info("server")["redis_version"].split(".")[0]) >= 7
    fleet.configure(deep_merge(FAST, {"event_stream": {"maxlen": 1000}}))
    running = Running(fleet, database)
    send(1)
    stored_all(running, 1)
    running.stop()
    send(1000)  # 3,000 entries: the oldest 2,000 or so are trimmed unread
    running = Running(fleet, database)
    try:
        gap = wait_for(lambda: running.views.gaps(), 20, what="a gap")[0]
        assert gap["reason"] == TRIMMED
        if redis7:  # the group's lag counts what was trimmed
            assert "stream entries trimmed unread" in gap["detail"]
            lost = int(gap["detail"].split()[0])
            assert 1900 <= lost <= 2000, gap
        else:  # e.g. the embedded redis-server 6.2
            assert "may have been trimmed unread" in gap["detail"]
        assert gap["since"] <= gap["until"] <= time.time()
        # what is left is read: the newest ~1000 entries are ~333 whole tasks
        wait_for(lambda: running.succeeded() >= 330, 30, what="the rest stored")
    finally:
        running.stop()


def test_a_stream_gone_while_the_dashboard_was_away_is_a_gap_and_new_events_arrive(
        fleet, send, database, redis_client):
    running = Running(fleet, database)
    send(3)
    stored_all(running, 3)
    running.stop()
    redis_client.delete(events_stream_key(fleet.config))  # what a Redis restarted empty shows
    send(4)
    running = Running(fleet, database)
    try:
        stored_all(running, 7)
        [gap] = running.views.gaps()
        assert gap["reason"] == RESET and "restarted empty" in gap["meaning"]
    finally:
        running.stop()


def test_a_stream_gone_while_connected_is_a_gap_and_reading_goes_on(fleet, send, database,
                                                                  redis_client):
    running = Running(fleet, database)
    try:
        send(3)
        stored_all(running, 3)
        redis_client.delete(events_stream_key(fleet.config))
        time.sleep(1.5)  # the reader finds its group gone and attaches again
        send(2)
        stored_all(running, 5)
        [gap] = wait_for(lambda: running.views.gaps(), 10, what="the gap")
        assert gap["reason"] == RESET
    finally:
        running.stop()


def test_a_workers_overflow_marker_is_a_gap(fleet, send, database, redis_client):
    running = Running(fleet, database)
    try:
        dropped = Dropped()
        dropped.add([{"timestamp": time.time() - 30}, {"timestamp": time.time() - 20}])
        log = EventLog.for_config(fleet.config)
        pipe = redis_client.pipeline()
        log.add(pipe, dropped.marker("heavy-1@pod"))
        pipe.execute()
        [gap] = wait_for(lambda: running.views.gaps(), 10, what="the gap")
        assert (gap["reason"], gap["detail"]) == (WORKER_BUFFER, "heavy-1@pod dropped 2 events")
    finally:
        running.stop()


def test_pub_sub_only_where_there_is_no_stream(fleet, send, database, redis_client):
    fleet.configure(deep_merge(FAST, {"event_stream": {"enabled": False}}))
    app = fleet.app()
    running = Running(fleet, database)
    try:
        assert running.ingester.source == "pubsub"
        time.sleep(0.5)  # subscribed
        with app.connection_for_write() as conn:
            d = app.events.Dispatcher(conn, hostname=HOST)
            assert d.log is None
            d.send("task-succeeded", uuid="by-pubsub", runtime=0.1)
            d.close()
        wait_for(lambda: running.views.task("by-pubsub"), 10, what="the task")
        assert not redis_client.exists(events_stream_key(fleet.config))
    finally:
        running.stop()


def test_a_gap_is_on_the_overview_the_api_and_metrics(fleet, send, tmp_path, redis_client):
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'b.sqlite'}")
    try:
        send(2)
        wait_for(lambda: board.json("/api/fleet/overview")["tasks_stored"] == 2, 20,
                 what="two tasks")
        overview = board.json("/api/fleet/overview")
        assert overview["events_source"] == "stream" and overview["event_gaps"] == []
        redis_client.delete(events_stream_key(fleet.config))
        send(1)
        gaps = wait_for(lambda: board.json("/api/fleet/overview")["event_gaps"], 20,
                        what="the gap on the overview")
        assert gaps[0]["reason"] == RESET and gaps[0]["since"] <= gaps[0]["until"]
        assert board.json("/api/fleet/events/gaps")[0]["id"] == gaps[0]["id"]
        text = board.get("/metrics").text
        assert metric(text, "fleet_dashboard_event_gaps_total", reason=RESET) == 1
        assert metric(text, "fleet_dashboard_event_gaps_total", reason=TRIMMED) == 0
        page = board.get("/static/app.js").text
        assert "Events missing" in page and 'id="gaps"' in board.get("/").text
    finally:
        board.stop()
