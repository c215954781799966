"""The plots' series on both databases and over HTTP: a day of 1,000 queues comes back
as at most 300 buckets per series, 10 series per plot, covering the whole window."""

from __future__ import annotations

import json
import time

import pytest

from fleet.dashboard.downsample import MAX_POINTS, TOP, plan
from fleet.dashboard.store import Store
from fleet.dashboard.views import Views
from tests.integration.dashboard_util import FAST, start_dashboard

QUEUES = 1000
WORKERS = 50
STEP = 300.0  # one sample per queue every 5 min: 288,000 rows for the day
SPIKE = 5000


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'dash.sqlite'}"
    return request.getfixturevalue("postgres_url")


def fill(store: Store, now: float) -> None:
    """A day of samples: queue i waits i tasks, completes (1000 - i) / 100 a second and
    runs i % 7 replicas; q0500 has one spike, and one sample older than the day."""
    rows = []
    at = now - 86400
    while at <= now:
        rows.extend({"at": at, "queue": f"q{i:04d}", "waiting": i, "unacked": 0, "running": 0,
                     "oldest_age": 0.0, "arrival_rate": 0.0,
                     "completion_rate": (QUEUES - i) / 100, "service_time": 0.1,
                     "workers": 1, "desired": i % 7, "actual": i % 7}
                    for i in range(QUEUES))
        if len(rows) >= 50_000:
            store.add_samples(rows, [])
            rows = []
        at += STEP
    spike = {**rows[-1], "queue": "q0500", "waiting": SPIKE, "at": now - 600}
    old = {**rows[-1], "queue": "q-old", "waiting": 10**6, "at": now - 86400 - 60}
    workers = [{"at": now - k * STEP, "hostname": f"w{j:02d}", "queue": "default",
                "cpu_percent": 1.0, "rss": (j + 1) << 20, "active": 0, "concurrency": 2}
               for k in range(int(86400 / STEP)) for j in range(WORKERS)]
    store.add_samples([*rows, spike, old], workers)


def test_a_day_of_1000_queues_is_bounded_per_series_and_covers_the_window(store_url):
    store = Store(store_url)
    now = time.time()
    fill(store, now)
    views = Views(store)
    t0 = time.perf_counter()
    day = views.series(plan(now, "24h", sample_interval=5.0))
    took = time.perf_counter() - t0
    print(f"24h of {QUEUES} queues: {took * 1000:.0f} ms, "
          f"{len(json.dumps(day)) // 1024} KiB")
    t = day["t"]
    assert len(t) <= MAX_POINTS and day["step"] == 300.0
    assert t[0] <= now - 86400 < t[0] + day["step"] and t[-1] <= now < t[-1] + day["step"]

    depth = day["queues"]["waiting"]
    # the top 10 by peak depth, the spike first; the 990 others counted, not sent
    assert [s["name"] for s in depth["series"]] == ["q0500", *(f"q{i:04d}" for i in
                                                               range(999, 990, -1))]
    assert (depth["aggregate"], depth["names"], depth["more"]) == ("max", QUEUES, QUEUES - TOP)
    for s in depth["series"]:
        assert len(s["values"]) == len(t)
        filled = [v for v in s["values"] if v is not None]
        assert len(filled) >= len(t) - 2  # every bucket of the day has its sample
    spike = depth["series"][0]["values"]
    assert max(spike) == SPIKE and spike.count(SPIKE) == 1  # a peak survives the bucket
    assert depth["series"][1]["values"][0] == 999 and depth["series"][1]["values"][-1] == 999
    # throughput ranks the other end, by mean; replicas by peak, ties by name
    rate = day["queues"]["completion_rate"]
    assert [s["name"] for s in rate["series"]][:3] == ["q0000", "q0001", "q0002"]
    assert rate["aggregate"] == "avg" and rate["series"][0]["values"][5] == 10.0
    assert [s["name"] for s in day["queues"]["actual"]["series"]][:2] == ["q0006", "q0013"]
    memory = day["workers"]["rss"]
    assert [s["name"] for s in memory["series"]][:2] == ["w49", "w48"]
    assert (memory["more"], memory["series"][0]["values"][-1]) == (WORKERS - TOP, 50 << 20)
    points = sum(len(s["values"]) for kind in ("queues", "workers")
                 for figure in day[kind].values() for s in figure["series"])
    assert points <= 4 * TOP * MAX_POINTS
    print(f"points returned: {points} ({len(t)} buckets x {points // len(t)} series)")

    # 15 minutes: only samples of the last 15 minutes (the spike 10 min ago is in them)
    recent = views.series(plan(now, "15m", sample_interval=5.0), what=("queues",))
    assert recent["workers"] == {} and recent["step"] == 10.0
    assert recent["t"][0] <= now - 900 < recent["t"][0] + 10
    depth = recent["queues"]["waiting"]
    assert depth["series"][0]["name"] == "q0500" and SPIKE in depth["series"][0]["values"]
    for s in depth["series"]:
        for start, v in zip(recent["t"], s["values"], strict=True):
            if v is not None:
                assert start >= now - 900 - 10
        assert 3 <= sum(v is not None for v in s["values"]) <= 4  # samples 5 min apart

    # one queue
    one = views.series(plan(now, "1h"), queue="q0007", what=("queues",))
    assert [s["name"] for s in one["queues"]["waiting"]["series"]] == ["q0007"]
    assert one["queues"]["waiting"]["more"] == 0
    store.close()


@pytest.mark.slow
def test_the_api_answers_a_window_bounded_and_fast(fleet, tmp_path):
    fleet.configure(FAST)
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}")
    try:
        now = time.time()
        fill(board.svc.store, now)
        for window, step in (("15m", 5.0), ("1h", 15.0), ("24h", 300.0)):
            t0 = time.perf_counter()
            body = board.json("/api/fleet/series", params={"window": window})
            took = time.perf_counter() - t0
            print(f"GET /api/fleet/series?window={window}: {took * 1000:.0f} ms")
            assert (body["window"], body["step"]) == (window, step)
            assert len(body["t"]) <= MAX_POINTS
            assert body["until"] - body["since"] == {"15m": 900, "1h": 3600, "24h": 86400}[window]
            for kind in ("queues", "workers"):
                for figure in body[kind].values():
                    assert len(figure["series"]) <= TOP
                    assert all(len(s["values"]) == len(body["t"]) for s in figure["series"])
            assert body["queues"]["waiting"]["more"] >= QUEUES - TOP
            assert took < 10
        since = board.json("/api/fleet/series",
                           params={"since": now - 7200, "until": now - 3600, "what": "workers"})
        assert since["window"] is None and since["queues"] == {}
        assert since["t"][0] <= now - 7200 and since["t"][-1] <= now - 3600
        assert board.json("/api/fleet/series", params={"top": 3})["queues"]["waiting"][
            "series"][2]["name"] == "q0998"
        for bad in ({"window": "7d"}, {"window": "1h", "since": now}, {"since": now + 60},
                    {"since": "nan"}, {"top": 0}):
            reply = board.get("/api/fleet/series", params=bad)
            assert reply.status_code == 400, (bad, reply.text)
            assert reply.json()["error"]
    finally:
        board.stop()
