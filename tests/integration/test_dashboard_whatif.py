"""The "what if" view over real HTTP: a real dashboard (real Redis for its sampler and
the export's decisions) on a SQLite store holding an hour of tasks as its writer would
have stored them, with the simulator's WhatIf wired in as `fleet dashboard` does, and a
real alternative proposer (the current config with other max_replicas and target_wait)
standing in for the tuner, which is not in this branch.

The figures are checked against `Simulation` run directly on the same exported window
(numbers compared, not written down), so what the page shows is what `fleet simulate`
would say of that trace.
"""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime

import pytest
import requests

from autoscale.sim.engine import Simulation
from autoscale.sim.startup import STARTUP
from autoscale.sim.tracefile import tasks_in_send_order
from autoscale.sim.whatif import SimulatedWhatIf
from fleet.dashboard import traces
from fleet.dashboard.events import TASK_FIELDS
from fleet.dashboard.store import Store
from fleet.whatif import UnavailableWhatIf
from tests.conftest import wait_for
from tests.integration.dashboard_util import FAST, start_dashboard
from tests.integration.test_dashboard_browser import browser, shots  # noqa: F401 (fixtures)
from tests.integration.test_dashboard_plots import serve_with_csp

pytestmark = pytest.mark.slow

TOTALS = ("tasks", "worker_seconds", "wait_p50", "wait_p95", "wait_p99",
          "slo_violation_seconds", "scale_events", "max_replicas", "max_backlog")


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


def fill(url: str, t0: float, seconds: float = 3000, n: int = 2400) -> None:
    """Tasks received in [t0, t0 + seconds) on default and io, with a burst at a third
    of the way in (so replicas scale and waits exceed target_wait)."""
    rng = random.Random(7)
    rows = []
    for i in range(n):
        at = t0 + (seconds / 3 + rng.random() * 20 if i % 4 == 0 else rng.random() * seconds)
        service = rng.expovariate(1 / 3.0)
        row = dict.fromkeys(TASK_FIELDS)
        row.update(uuid=f"task-{i}", name="t.work", state="SUCCESS", state_rank=3,
                   queue="default" if i % 3 else "io", received=at, started=at + 0.01,
                   succeeded=at + 0.01 + service, runtime=service, retries=0,
                   memory_kill=False, first_seen=at, updated=at + service)
        rows.append(row)
    store = Store(url)
    store.write(rows, [])
    store.close()


class Proposer:
    """The candidate: every queue's max_replicas halved (at least 1) and target_wait
    10 s. ``hold`` makes a call wait (the busy test), ``entered`` says it started."""

    def __init__(self):
        self.calls = 0
        self.hold: threading.Event | None = None
        self.entered = threading.Event()

    def __call__(self, header, tasks, config):
        self.calls += 1
        self.entered.set()
        if self.hold is not None:
            self.hold.wait(30)
        return propose(config)


def propose(config):
    queues = {name: cls.model_copy(update={"autoscaling": cls.autoscaling.model_copy(
        update={"max_replicas": max(1, cls.autoscaling.max_replicas // 2),
                "target_wait": 10.0})}) for name, cls in config.queues.items()}
    return config.model_copy(update={"queues": queues})


@pytest.fixture
def board(fleet, tmp_path):
    fleet.configure(FAST)
    url = f"sqlite:///{tmp_path / 'd.sqlite'}"
    t0 = float(int(time.time()) - 3300)
    fill(url, t0)
    proposer = Proposer()
    running = start_dashboard(fleet.config, url, whatif=SimulatedWhatIf(proposer))
    running.t0, running.url, running.proposer = t0, url, proposer
    yield running
    running.stop()


def simulated(config, url, since, until):
    """What `fleet trace export` + `fleet simulate` say of the window, per side."""
    done = traces.export(config, url, since=since, until=until, queues=list(config.queues))
    header, records = done.header, list(done.records)
    tasks = tasks_in_send_order(records)
    out = {}
    for label, cfg in (("current", config), ("candidate", propose(config))):
        total = Simulation(header, tasks, cfg, startup=STARTUP["local"], seed=0).run().total
        w = total.waits
        out[label] = {"tasks": total.tasks, "worker_seconds": total.worker_seconds,
                      "wait_p50": w.quantile(0.5), "wait_p95": w.quantile(0.95),
                      "wait_p99": w.quantile(0.99),
                      "slo_violation_seconds": total.slo_violation_seconds,
                      "scale_events": total.scale_events, "max_replicas": total.max_replicas,
                      "max_backlog": total.max_backlog}
    return out


def test_both_sides_match_the_simulator_on_the_exported_window_and_are_kept(fleet, board):
    since, until = board.t0, board.t0 + 3600
    window = {"since": iso(since), "until": iso(until)}
    d = board.json("/api/fleet/whatif", params=window)
    assert d["status"] == "ok" and d["cached"] is False
    assert d["tasks"] == 2400 and d["queues"] == list(fleet.config.queues)
    assert (d["since"], d["until"]) == (pytest.approx(since), pytest.approx(until))
    expected = simulated(fleet.config, board.url, since, until)
    for label in ("current", "candidate"):
        got = d[label]["total"]
        for name in TOTALS:
            assert got[name] == pytest.approx(expected[label][name], abs=1e-3), (label, name)
    assert d["candidate"]["source"] == "tuner" and d["current"]["source"] == "queues.yaml"
    # The burst: halved max_replicas and a tighter target_wait make a difference.
    assert expected["candidate"]["max_replicas"] < expected["current"]["max_replicas"]
    cur, cand = d["current"]["total"], d["candidate"]["total"]
    assert d["ratios"]["worker_seconds"] == pytest.approx(
        cand["worker_seconds"] / cur["worker_seconds"], abs=1e-3)
    most = fleet.config.queues["default"].autoscaling.max_replicas
    assert {"setting": "queues.default.autoscaling.max_replicas", "current": most,
            "candidate": max(1, most // 2)} in d["changes"]
    assert [q["queue"] for q in d["current"]["queues"]] == ["default", "io"]
    for label in ("current", "candidate"):
        svg = board.get(d[label]["plot"])
        assert svg.status_code == 200, svg.text
        assert svg.headers["content-type"].startswith("image/svg+xml")
        assert "<svg" in svg.text and "default: backlog" in svg.text
    # Asked again: the kept answer, the proposer not asked again.
    calls = board.proposer.calls
    again = board.json("/api/fleet/whatif", params=window)
    assert again["cached"] is True and again["run"] == d["run"]
    assert again["current"] == d["current"] and board.proposer.calls == calls
    # The default window is the last hour, ending now.
    last = board.json("/api/fleet/whatif")
    assert last["until"] == pytest.approx(time.time(), abs=30)
    assert last["until"] - last["since"] == pytest.approx(3600, abs=1)
    assert last["status"] == "ok"
    assert board.get("/api/fleet/whatif/nosuchrun/current.svg").status_code == 404


def test_a_second_window_while_one_runs_is_429_and_the_same_one_waits(board):
    board.proposer.hold = threading.Event()
    first: dict = {}
    window = {"since": iso(board.t0), "until": iso(board.t0 + 1800)}

    def ask(out, params):
        out["reply"] = requests.get(board.base + "/api/fleet/whatif", params=params,
                                    timeout=60)

    runner = threading.Thread(target=ask, args=(first, window))
    runner.start()
    same: dict = {}
    try:
        assert board.proposer.entered.wait(20)
        busy = board.get("/api/fleet/whatif", params={"since": iso(board.t0)})
        assert busy.status_code == 429, busy.text
        assert "another what-if is running" in busy.json()["error"]
        assert int(busy.headers["Retry-After"]) >= 1
        # Other pages are served meanwhile: the run is off the event loop.
        assert board.get("/api/fleet/queues").status_code == 200
        waiter = threading.Thread(target=ask, args=(same, window))
        waiter.start()
        time.sleep(0.3)
    finally:
        board.proposer.hold.set()
        runner.join(60)
    waiter.join(60)
    assert first["reply"].status_code == 200 and same["reply"].status_code == 200
    assert first["reply"].json()["cached"] is False
    assert same["reply"].json()["cached"] is True
    assert same["reply"].json()["run"] == first["reply"].json()["run"]
    assert board.proposer.calls == 1


def test_pasted_settings_are_the_candidate_instead_of_the_tuners(fleet, board):
    since, until = board.t0, board.t0 + 3600
    pasted = "queues:\n  default:\n    autoscaling: {max_replicas: 2}\n"
    d = board.json("/api/fleet/whatif", params={"since": iso(since), "until": iso(until),
                                                "candidate": pasted})
    assert d["candidate"]["source"] == "given" and board.proposer.calls == 0
    most = fleet.config.queues["default"].autoscaling.max_replicas
    assert d["changes"] == [{"setting": "queues.default.autoscaling.max_replicas",
                             "current": most, "candidate": 2}]
    done = traces.export(fleet.config, board.url, since=since, until=until,
                         queues=list(fleet.config.queues))
    tasks = tasks_in_send_order(list(done.records))
    cls = fleet.config.queues["default"]
    config = fleet.config.model_copy(update={"queues": {**fleet.config.queues, "default":
        cls.model_copy(update={"autoscaling": cls.autoscaling.model_copy(
            update={"max_replicas": 2})})}})
    total = Simulation(done.header, tasks, config, startup=STARTUP["local"]).run().total
    assert d["candidate"]["total"]["worker_seconds"] == pytest.approx(total.worker_seconds)
    assert d["candidate"]["total"]["max_replicas"] == total.max_replicas


@pytest.mark.parametrize(("candidate", "says"), [
    ("queues: {nosuch: {autoscaling: {max_replicas: 1}}}", "no queue 'nosuch'"),
    ("dashboard: {max_tasks: 1}", "dashboard cannot be changed here"),
    ("queues: {io: {autoscaling: {max_replicas: -1}}}",
     "candidate settings: queues.io.autoscaling.max_replicas"),
    ("[1, 2", "not YAML"),
])
def test_bad_pasted_settings_are_400_saying_why(board, candidate, says):
    reply = board.get("/api/fleet/whatif", params={"candidate": candidate})
    assert reply.status_code == 400, reply.text
    assert says in reply.json()["error"]


@pytest.mark.parametrize(("params", "says"), [
    ({"since": "banana"}, "since: expected a duration ago"),
    ({"since": "1h", "until": "2h"}, "the window is empty"),
    ({"since": "3d"}, "at most 24 h"),
    ({"queue": "nosuch"}, "no queue 'nosuch'"),
])
def test_a_bad_window_is_400_saying_why(board, params, says):
    reply = board.get("/api/fleet/whatif", params=params)
    assert reply.status_code == 400, reply.text
    assert says in reply.json()["error"]


def test_an_empty_window_says_so(board):
    reply = board.json("/api/fleet/whatif", params={"since": "2020-01-01T00:00",
                                                    "until": "2020-01-01T01:00"})
    assert reply["status"] == "empty" and reply["tasks"] == 0
    assert reply["message"].startswith("no tasks in this window")
    assert reply["current"] is None and reply["candidate"] is None
    assert board.proposer.calls == 0


def test_without_the_simulator_the_view_says_what_is_missing(board):
    board.svc.whatif.whatif = None  # as a dashboard built without the seam
    reply = board.get("/api/fleet/whatif")
    assert reply.status_code == 501
    assert "not configured" in reply.json()["error"]
    assert "fleet[tune]" in reply.json()["error"]
    board.svc.whatif.whatif = UnavailableWhatIf("what-if needs matplotlib: pip install x")
    reply = board.get("/api/fleet/whatif", params={"since": "30m"})
    assert reply.status_code == 501
    assert reply.json()["error"] == "what-if needs matplotlib: pip install x"


def test_the_page_shows_both_sides_and_their_plots_under_the_csp(board, browser, shots):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    violations = serve_with_csp(page)
    try:
        page.goto(board.base + "/#/whatif")
        page.wait_for_selector("#whatif-candidate-total", timeout=20000)
        d = board.json("/api/fleet/whatif")  # the page's answer, kept
        assert d["cached"] is True
        hours = f"{d['candidate']['total']['worker_seconds'] / 3600:.2f}"
        assert hours in page.inner_text("#whatif-candidate-total")
        assert "Current settings" in page.inner_text("#whatif-current")
        assert "Tuner's settings" in page.inner_text("#whatif-candidate")
        wait_for(lambda: page.eval_on_selector_all(
            "img.whatif-plot", "els => els.filter(e => e.naturalWidth > 0).length") == 2,
            10, what="both plots to load")
        page.screenshot(path=str(shots / "whatif.png"), full_page=True)
        page.click("button[data-whatif-since='15m']")
        wait_for(lambda: "since=15m" in page.url and page.input_value(
            "#whatif-form input[name=since]") == "15m", 10, what="the 15-min window")
        page.wait_for_selector("#whatif-status:not(:has-text('replaying'))", timeout=20000)
        assert violations == []
    finally:
        page.close()
