"""The pages in a real headless browser (Debian's chromium, driven by Playwright): sign
in, open every page, watch live data change as a task runs, click control actions,
confirm them, and see their effect and their audit record.

Set FLEET_SCREENSHOTS=docs/screenshots to refresh the screenshots the docs show.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fleet.dashboard.auth import Authenticator
from tests.conftest import deep_merge, wait_for
from tests.integration.dashboard_util import FAST, start_dashboard

pytestmark = pytest.mark.slow
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in dev")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ADMIN = {"dashboard": {"users": [{"name": "ada", "role": "admin",
                                  "password_env": "T_ADA"}]}}


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("the browser tests need Debian's chromium: apt-get install chromium "
                    "(.ci/test installs it when run as root)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path):
    target = Path(os.environ.get("FLEET_SCREENSHOTS") or tmp_path / "shots")
    target.mkdir(parents=True, exist_ok=True)
    return target


def test_every_page_live_data_and_control_actions(fleet, tmp_path, browser, shots):
    fleet.configure(deep_merge(FAST, ADMIN))
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}",
                            auth=Authenticator(fleet.config.dashboard, env={"T_ADA": "pw"}),
                            url_prefix="/fleet")
    worker = fleet.start_worker("default")
    app = fleet.app()
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    dialogs: list[str] = []

    def on_dialog(dialog):
        dialogs.append(dialog.message)
        if dialog.type == "prompt":
            dialog.accept(dialog.default_value)
        else:
            dialog.accept()
    page.on("dialog", on_dialog)
    try:
        page.goto(board.base + "/")
        page.wait_for_selector("#signin")
        page.screenshot(path=str(shots / "login.png"))
        page.fill("#username", "ada")
        page.fill("#password", "pw")
        page.click("#signin")
        page.wait_for_selector(f"#workers >> text={worker.hostname}", timeout=20_000)
        assert "ada (admin)" in page.inner_text("header")
        page.wait_for_selector(f"#workers tr:has-text('{worker.hostname}') >> text=online")
        page.screenshot(path=str(shots / "workers.png"), full_page=True)

        # live: a task sent now shows up on the open tasks page without a reload
        page.click("nav >> text=Tasks")
        page.wait_for_selector("#tasks")
        result = app.send_task("tasks.aggregate.sum_by", args=[[{"key": "k", "value": 1}]],
                               queue="default")
        result.get(timeout=30)
        try:
            page.wait_for_selector(f"#tasks >> text={result.id}", timeout=15_000)
        except Exception:
            print("STATUS", page.inner_text("#status"), page.inner_text("#page")[:2000])
            raise
        page.wait_for_selector(f"#tasks tr:has-text('{result.id}') >> text=SUCCESS",
                               timeout=15_000)
        page.screenshot(path=str(shots / "tasks.png"), full_page=True)
        page.click(f"#tasks >> text={result.id}")
        page.wait_for_selector("#task-info >> text=tasks.aggregate.sum_by")
        assert "received" in page.inner_text("#task-info")
        page.screenshot(path=str(shots / "task.png"), full_page=True)

        # a failure, grouped
        app.send_task("tasks.aggregate.sum_by", args=["oops"], queue="default")
        page.click("nav >> text=Failures")
        page.wait_for_selector("#failures >> text=tasks.aggregate.sum_by (1)", timeout=15_000)
        page.screenshot(path=str(shots / "failures.png"), full_page=True)

        # a job with progress
        data = tmp_path / "in.jsonl"
        data.write_text("".join(json.dumps({"region": r, "amount": 1}) + "\n"
                                for r in ["n", "s", "e", "w"] * 50))
        from fleet.jobs.submit import JobSpec, submit

        job = submit(app, JobSpec(task="tasks.aggregate.sum_by", input=str(data),
                                  chunk_size=20, aggregate="tasks.aggregate.merge_sums",
                                  kwargs={"group_by": "region", "fields": ["amount"]}))
        page.click("nav >> text=Jobs")
        page.wait_for_selector(f"#jobs tr:has-text('{job.job_id}') >> text=succeeded",
                               timeout=30_000)
        page.screenshot(path=str(shots / "jobs.png"), full_page=True)
        page.click(f"#jobs >> text={job.job_id}")
        page.wait_for_selector(f"h2:has-text('Job {job.job_id}')")
        page.screenshot(path=str(shots / "job.png"), full_page=True)

        # control: grow the worker's pool from its page, confirmed in a dialog
        page.click("nav >> text=Workers")
        page.click(f"#workers >> text={worker.hostname}")
        page.wait_for_selector("#worker-info >> text=max concurrency")
        page.screenshot(path=str(shots / "worker.png"), full_page=True)
        page.click("button:has-text('Grow pool')")
        page.wait_for_selector(f"#toast >> text=Growing {worker.hostname}")
        assert any("Grow" in d for d in dialogs)

        # fleet control: pause a queue from the queues page
        page.click("nav >> text=Queues")
        page.click("#queues tr:has-text('heavy') >> button:has-text('Pause')")
        page.wait_for_selector("#queues >> text=heavy (paused)", timeout=10_000)
        page.screenshot(path=str(shots / "queues.png"), full_page=True)

        # the autoscaler's next decision holds the paused queue at zero, with its reason
        run_autoscaler_once(fleet)
        page.click("nav >> text=Autoscaler")
        page.wait_for_selector("#decisions >> text=bounds 0..0", timeout=15_000)
        page.screenshot(path=str(shots / "autoscaler.png"), full_page=True)
        page.click("nav >> text=Broker")
        page.wait_for_selector("#broker >> text=default")
        page.screenshot(path=str(shots / "broker.png"), full_page=True)

        page.click("nav >> text=Audit")
        page.wait_for_selector("#audit >> text=queue.pause")
        text = page.inner_text("#audit")
        assert "worker.pool_grow" in text and "ada (admin)" in text
        page.screenshot(path=str(shots / "audit.png"), full_page=True)
    finally:
        page.close()
        board.stop()


def run_autoscaler_once(fleet) -> None:
    """One poll of the real autoscaler loop over a backend that reports 2 replicas each."""
    from autoscale.backends.base import Backend
    from autoscale.loop import Autoscaler
    from fleet.keys import broker_client
    from fleet.observe.metrics import RedisMetrics

    class TwoEach(Backend):
        def replicas(self):
            return dict.fromkeys(fleet.config.queues, 2)

        def scale(self, queue, replicas, workers):
            pass

    Autoscaler(fleet.config, RedisMetrics(fleet.config, broker_client(fleet.config)),
               TwoEach()).run_once()


def test_a_viewer_cannot_act_from_the_page(fleet, tmp_path, browser):
    fleet.configure(deep_merge(FAST, {"dashboard": {"users": [
        {"name": "vera", "role": "viewer", "password_env": "T_VERA"}]}}))
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}",
                            auth=Authenticator(fleet.config.dashboard, env={"T_VERA": "pw"}))
    page = browser.new_page()
    page.on("dialog", lambda d: d.accept())
    try:
        page.goto(board.base + "/login")
        page.fill("#username", "vera")
        page.fill("#password", "pw")
        page.click("#signin")
        page.click("nav >> text=Queues")
        page.click("#queues tr:has-text('heavy') >> button:has-text('Pause')")
        page.wait_for_selector("#toast >> text=vera is viewer; this needs admin")
        wait_for(lambda: "(paused)" not in page.inner_text("#queues"), 5,
                 what="the queue to stay unpaused")
    finally:
        page.close()
        board.stop()


def test_a_gap_in_the_events_is_a_banner_on_every_page(fleet, tmp_path, browser, redis_client):
    from fleet.keys import events_stream_key

    fleet.configure(FAST)
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}")
    app = fleet.app()
    page = browser.new_page()
    try:
        with app.connection_for_write() as conn:
            d = app.events.Dispatcher(conn, hostname="default-0@banner")
            d.send("task-succeeded", uuid="before-the-gap")
            wait_for(lambda: board.svc.views.task("before-the-gap"), 20, what="the task")
            page.goto(board.base + "/")
            page.wait_for_selector("#workers")
            assert not page.is_visible("#gaps")
            redis_client.delete(events_stream_key(fleet.config))  # as a Redis restarted empty
            d.send("task-succeeded", uuid="after-the-gap")
            d.close()
        page.wait_for_selector("#gaps >> text=Events missing", timeout=20_000)
        assert "restarted empty" in page.inner_text("#gaps")
        page.click("nav >> text=Queues")
        page.wait_for_selector("#queues")
        assert page.is_visible("#gaps")  # on every page
    finally:
        page.close()
        board.stop()


#: Markup that runs script if a page ever treats a value as HTML.
HOSTILE = '<img src=x onerror="window.__xss=1">'
#: Collects every CSP violation of a page (init scripts run before the page's own and
#: are not subject to its policy).
WATCH_CSP = ("window.__csp = []; document.addEventListener('securitypolicyviolation', "
             "(e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")


def test_no_page_breaks_the_csp_and_hostile_values_render_as_text(fleet, tmp_path, browser):
    fleet.configure(deep_merge(FAST, {"dashboard": {"users": [
        {"name": HOSTILE, "role": "admin", "password_env": "T_HOSTILE"}]}}))
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}",
                            auth=Authenticator(fleet.config.dashboard, env={"T_HOSTILE": "pw"}))
    worker = fleet.start_worker("default")
    app = fleet.app()
    ok = app.send_task("tasks.aggregate.sum_by", args=[[{"key": HOSTILE, "v": 1}], "key", ["v"]])
    bad = app.send_task("tasks.aggregate.sum_by", kwargs={
        "records": [{"key": "k", "v": HOSTILE}], "group_by": "key", "fields": ["v"]})
    assert ok.get(timeout=60) == {HOSTILE: {"count": 1, "v": 1.0}}
    wait_for(lambda: (board.svc.views.task(bad.id) or {}).get("state") == "FAILURE", 30,
             what="the failed task in the store")
    page = browser.new_page()
    page.add_init_script(WATCH_CSP)
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text))
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    visited = []

    def visit(hash_: str, selector: str, expect: str | None = None):
        page.goto(f"{board.base}/#/{hash_}")
        page.wait_for_selector(selector, timeout=20_000)
        if expect:
            page.wait_for_selector(f"{selector} >> text={expect}", timeout=20_000)
        visited.append((hash_, page.evaluate("window.__csp")))

    try:
        page.goto(board.base + "/login")
        visited.append(("login", page.evaluate("window.__csp")))
        page.fill("#username", HOSTILE)
        page.fill("#password", "pw")
        page.click("#signin")
        page.wait_for_selector("#workers")
        assert page.inner_text("#user") == f"{HOSTILE} (admin)"  # text, as typed
        visit("workers", "#workers", worker.hostname)
        visit(f"worker/{worker.hostname}", "#worker-info")
        visit("queues", "#queues")
        visit("tasks", "#tasks", "FAILURE")
        assert HOSTILE in page.inner_text("#tasks")  # the args column, as text
        visit(f"task/{ok.id}", "#task-info")
        info = page.inner_text("#task-info")
        assert HOSTILE in info  # args and result, as text
        visit(f"task/{bad.id}", "#task-info", "ValueError")
        assert f"not a number: '{HOSTILE}'" in page.inner_text("#task-info")  # exception
        visit("failures", "#failures", "ValueError")
        assert HOSTILE in page.inner_text("#failures")
        visit("jobs", "#jobs")
        visit("autoscaler", "#latest")
        visit("broker", "#broker")
        visit("audit", "#audit", "login")
        assert HOSTILE in page.inner_text("#audit")  # the sign-in, under its user name
        page.goto(board.base + "/docs")
        page.wait_for_selector("#swagger-ui .opblock", timeout=20_000)
        visited.append(("docs", page.evaluate("window.__csp")))
        # nothing ran, nothing was parsed as markup, nothing was blocked
        assert page.evaluate("window.__xss") is None
        assert dialogs == []
        for where, violations in visited:
            assert violations == [], (where, violations)
        assert not [c for c in console if "Content Security Policy" in c], console
        page.goto(f"{board.base}/#/task/{ok.id}")
        page.wait_for_selector("main h2 >> text=SUCCESS")
        assert page.locator("img[src=x]").count() == 0
    finally:
        page.close()
        board.stop()
