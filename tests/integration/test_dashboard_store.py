"""The dashboard's store on both databases: upserts that tolerate out-of-order events,
caps by count and age, offline workers, and everything still there after a restart."""

from __future__ import annotations

import time

import psycopg
import pytest
from sqlalchemy import func, select

from fleet.dashboard.events import Batch
from fleet.dashboard.store import Store, StoreError, tasks

QUEUES = frozenset({"default", "heavy"})


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'dash.sqlite'}"
    return request.getfixturevalue("postgres_url")


def fold(*events) -> Batch:
    batch = Batch(QUEUES)
    for e in events:
        batch.add(e)
    return batch


def write(store: Store, *events) -> None:
    batch = fold(*events)
    store.write(list(batch.tasks.values()), batch.workers.values())


def count(store: Store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(tasks)).scalar()


def test_events_across_batches_and_out_of_order_settle_on_the_right_state(store_url):
    store = Store(store_url)
    t = time.time()
    write(store, {"type": "task-received", "uuid": "a", "name": "tasks.x", "args": "[1]",
                  "hostname": "heavy@h", "timestamp": t})
    # succeeded arrives before started (separate connections): it must stay SUCCESS.
    write(store, {"type": "task-succeeded", "uuid": "a", "result": "3", "runtime": 0.5,
                  "hostname": "heavy@h", "timestamp": t + 2})
    write(store, {"type": "task-started", "uuid": "a", "hostname": "heavy@h",
                  "timestamp": t + 1})
    with store.engine.connect() as conn:
        row = conn.execute(select(tasks).where(tasks.c.uuid == "a")).one()
    assert (row.state, row.name, row.queue, row.worker) == ("SUCCESS", "tasks.x", "heavy",
                                                            "heavy@h")
    assert (row.args, row.result, row.runtime) == ("[1]", "3", 0.5)
    assert row.started == t + 1 and row.succeeded == t + 2
    # a retry gives way to the next attempt
    write(store, {"type": "task-retried", "uuid": "b", "name": "n", "timestamp": t,
                  "hostname": "default@h", "exception": "E()"},
          {"type": "task-received", "uuid": "b", "retries": 1, "timestamp": t + 1,
           "hostname": "default@h"})
    with store.engine.connect() as conn:
        row = conn.execute(select(tasks).where(tasks.c.uuid == "b")).one()
    assert (row.state, row.retries) == ("RECEIVED", 1)
    store.close()


def test_cap_by_count_keeps_the_newest_and_by_age_drops_the_old(store_url):
    store = Store(store_url)
    now = time.time()
    for start in range(0, 3000, 1000):
        write(store, *({"type": "task-received", "uuid": f"t{i}", "name": "n",
                        "timestamp": now - 10_000 + i, "hostname": "default@h"}
                       for i in range(start, start + 1000)))
    assert count(store) == 3000
    store.prune_tasks(max_count=1200, max_age=10**9, now=now)
    assert count(store) == 1200
    with store.engine.connect() as conn:
        kept = set(conn.execute(select(tasks.c.uuid)).scalars())
    assert kept == {f"t{i}" for i in range(1800, 3000)}
    # now by age: everything first seen more than 500 s ago goes
    store.prune_tasks(max_count=10**6, max_age=10_000 - 2500, now=now)
    with store.engine.connect() as conn:
        kept = set(conn.execute(select(tasks.c.uuid)).scalars())
    assert kept == {f"t{i}" for i in range(2500, 3000)}
    store.close()


def test_workers_go_offline_then_are_purged(store_url):
    store = Store(store_url)
    now = time.time()
    write(store, {"type": "worker-heartbeat", "hostname": "default@a", "timestamp": now - 30,
                  "freq": 2.0, "active": 0, "processed": 5},
          {"type": "worker-heartbeat", "hostname": "default@b", "timestamp": now,
           "freq": 2.0, "active": 1, "processed": 1},
          {"type": "task-succeeded", "uuid": "x", "hostname": "default@b", "timestamp": now})
    assert store.mark_offline(now, silent_for=10) == ["default@a"]
    assert store.purge_offline(now + 5, after=10) == 0
    assert store.purge_offline(now + 11, after=10) == 1
    with store.engine.connect() as conn:
        from fleet.dashboard.store import workers

        rows = conn.execute(select(workers)).all()
    assert [(r.hostname, r.status, r.succeeded) for r in rows] == [("default@b", "online", 1)]
    store.close()


def test_flowers_worker_fields_and_event_counts_add_up_across_batches(store_url):
    from fleet.dashboard.views import Views

    store = Store(store_url)
    t = time.time()
    write(store, {"type": "worker-online", "hostname": "default@a", "timestamp": t,
                  "clock": 3, "freq": 2.0, "pid": 7, "loadavg": [0.5, 0.25, 0.0],
                  "sw_ident": "py-celery", "sw_ver": "5.7.0", "sw_sys": "Linux",
                  "active": 0, "processed": 0})
    write(store, {"type": "task-received", "uuid": "x", "hostname": "default@a",
                  "timestamp": t + 1})
    write(store, *[{"type": "worker-heartbeat", "hostname": "default@a", "timestamp": t + i,
                    "clock": 10 + i, "active": 1, "processed": 1} for i in (2, 3, 4)])
    write(store, {"type": "worker-heartbeat", "hostname": "default@a", "timestamp": t + 1.5,
                  "clock": 99, "active": 5})  # late: counted and heard, fields kept
    [w] = Views(store).flower_workers()
    assert w == {"worker-online": 1, "task-received": 1, "worker-heartbeat": 4,
                 "hostname": "default@a", "pid": 7, "freq": 2.0,
                 "heartbeats": [t + 1.5, t + 2, t + 3, t + 4], "clock": 14, "active": 1,
                 "processed": 1, "loadavg": [0.5, 0.25, 0.0], "sw_ident": "py-celery",
                 "sw_ver": "5.7.0", "sw_sys": "Linux", "status": True}
    assert store.mark_offline(t + 60, silent_for=10) == ["default@a"]
    assert Views(store).flower_workers()[0]["status"] is False
    assert store.purge_offline(t + 600, after=10) == 1
    with store.engine.connect() as conn:
        from fleet.dashboard.store import worker_events

        assert conn.execute(select(func.count()).select_from(worker_events)).scalar() == 0
    store.close()


def test_a_database_from_before_the_flower_worker_fields_is_upgraded(store_url):
    from sqlalchemy import text

    from fleet.dashboard.views import Views

    store = Store(store_url)
    with store.engine.begin() as conn:  # as an older fleet made it
        conn.execute(text("ALTER TABLE workers DROP COLUMN clock"))
        conn.execute(text("ALTER TABLE workers DROP COLUMN heartbeats"))
        conn.execute(text("INSERT INTO workers (hostname, status, seen, succeeded, failed, "
                          "retried, memory_kills) VALUES ('old@h', 'online', 1, 2, 0, 0, 0)"))
    store.close()
    store = Store(store_url)
    write(store, {"type": "worker-heartbeat", "hostname": "new@h", "timestamp": 5.0,
                  "clock": 2})
    new, old = Views(store).flower_workers()  # by hostname
    assert (old["hostname"], old["heartbeats"], old["clock"]) == ("old@h", [], 0)
    assert (new["heartbeats"], new["clock"], new["worker-heartbeat"]) == ([5.0], 2, 1)
    store.close()


def test_everything_survives_a_restart(store_url):
    store = Store(store_url)
    write(store, {"type": "task-received", "uuid": "keep-me", "name": "n",
                  "timestamp": time.time(), "hostname": "default@h"})
    store.record_action(user="ann", role="admin", action="queue.pause", target="heavy",
                        params={}, outcome="paused", ok=True)
    store.close()
    again = Store(store_url)
    from fleet.dashboard.views import Views

    views = Views(again)
    assert views.task("keep-me")["name"] == "n"
    assert [a["action"] for a in views.audit()] == ["queue.pause"]
    again.close()


@pytest.mark.parametrize("url, says", [
    ("not a url", "is not a SQLAlchemy URL"),
    ("mysql://root@127.0.0.1/test", "only sqlite and postgresql"),
    ("postgresql://nobody@127.0.0.1:1/none", "cannot open the dashboard database"),
])
def test_a_bad_database_url_is_a_clear_error(url, says):
    with pytest.raises(StoreError, match=says):
        Store(url)


def test_a_database_outage_loses_no_events(postgres_url):
    """Writes fail while PostgreSQL refuses connections; the held batch is written once it
    is back, and the events that came meanwhile too."""
    from fleet.config import load_config
    from fleet.dashboard.ingest import Ingester
    from tests.conftest import ROOT

    name = postgres_url.rsplit("/", 1)[1]
    store = Store(postgres_url)
    ingester = Ingester(load_config(ROOT / "queues.yaml"), store)
    admin = psycopg.connect("postgresql://postgres@127.0.0.1/test", autocommit=True)
    now = time.time()
    try:
        ingester.feed({"type": "task-received", "uuid": "before", "timestamp": now,
                       "hostname": "default@h", "name": "n"})
        assert ingester.flush() == 1
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = %s", (name,))
        ingester.feed({"type": "task-received", "uuid": "during", "timestamp": now + 1,
                       "hostname": "default@h", "name": "n"})
        with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises
            ingester.flush()
        ingester.feed({"type": "task-succeeded", "uuid": "during", "timestamp": now + 2,
                       "hostname": "default@h", "result": "1"})
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        assert ingester.flush() == 2
        from fleet.dashboard.views import Views

        views = Views(store)
        assert views.task("before")["state"] == "RECEIVED"
        assert views.task("during")["state"] == "SUCCESS"
        assert ingester.events == 3
    finally:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.close()
        store.close()


def test_the_stream_cursor_and_gaps_go_in_the_batchs_transaction(store_url):
    from fleet.dashboard.gaps import RESET, Gap
    from fleet.dashboard.views import Views

    store = Store(store_url)
    try:
        assert store.stream_cursor("p:fleet:events", "dashboard") is None
        batch = fold({"type": "task-succeeded", "uuid": "a", "timestamp": 5.0})
        gap = Gap(1.0, 4.0, RESET, "gone").row(6.0)
        store.write(list(batch.tasks.values()), batch.workers.values(), [gap],
                    ("p:fleet:events", "dashboard", "1000-0"))
        store.write([], [], (), ("p:fleet:events", "dashboard", "2000-3"))
        assert store.stream_cursor("p:fleet:events", "dashboard") == "2000-3"
        assert store.stream_cursor("p:fleet:events", "other") is None
        [row] = Views(store).gaps()
        assert (row["since"], row["until"], row["reason"]) == (1.0, 4.0, RESET)
        assert "restarted empty" in row["meaning"]
        # a refused batch leaves neither its cursor nor its gaps behind
        from sqlalchemy.exc import IntegrityError

        with pytest.raises(IntegrityError):  # a task row without its id
            store.write([{**batch.tasks["a"], "uuid": None}], [], [gap],
                        ("p:fleet:events", "dashboard", "9-0"))
        assert store.stream_cursor("p:fleet:events", "dashboard") == "2000-3"
        assert len(Views(store).gaps()) == 1
        store.prune_history(now=10_000.0, keep=60.0)
        assert Views(store).gaps() == []
    finally:
        store.close()


def test_a_database_user_who_may_not_create_or_alter_tables_gets_a_clear_error(postgres_url):
    """An existing dashboard database whose user may read and write but not change the
    schema (a common DBA setup): the upgrade step says so, no driver traceback."""
    import uuid

    import psycopg

    Store(postgres_url).close()  # the schema as the owner made it
    role = f"fleet_ro_{uuid.uuid4().hex[:8]}"
    name = postgres_url.rsplit("/", 1)[1]
    with psycopg.connect(postgres_url, autocommit=True) as owner:
        owner.execute(f'CREATE ROLE "{role}" LOGIN')
        owner.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public '
                      f'TO "{role}"')
        owner.execute('ALTER TABLE workers DROP COLUMN clock')  # as made by an older fleet
    try:
        with pytest.raises(StoreError, match=r"cannot open the dashboard database .*"
                                              r"must be owner of table workers"):
            Store(f"postgresql://{role}@127.0.0.1/{name}")
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as owner:
            owner.execute(f'REASSIGN OWNED BY "{role}" TO postgres')
            owner.execute(f'DROP OWNED BY "{role}"')
            owner.execute(f'DROP ROLE "{role}"')
