"""The plots in a real browser (Debian's chromium, driven by Playwright), served under
the strict Content-Security-Policy the dashboard sends: clock-time and unit axis
labels, a legend of the series, values on hover that survive the 2 s refresh, and a
window chooser that asks the API for its window and is remembered.

Set FLEET_SCREENSHOTS=docs/screenshots to refresh the screenshots the docs show.
"""

from __future__ import annotations

import math
import re
import time

import pytest

from fleet.dashboard.headers import CSP
from tests.conftest import wait_for
from tests.integration.dashboard_util import FAST, start_dashboard
from tests.integration.test_dashboard_browser import browser, shots  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

def serve_with_csp(page) -> list[str]:
    """The console's CSP messages (Chromium reports each refused script, style or
    attribute there), and any page that arrives without the dashboard's own policy."""
    violations: list[str] = []
    page.on("console", lambda m: "Content Security Policy" in m.text and
            violations.append(m.text))
    page.on("pageerror", lambda e: violations.append(f"page error: {e}"))

    def check(response):
        if (response.request.resource_type == "document"
                and response.headers.get("content-security-policy") != CSP):
            violations.append(f"{response.url} came without the CSP")
    page.on("response", check)
    return violations


def legend(page, plot: str) -> list[str]:
    return page.locator(f"#plot-{plot} .u-legend .u-label").all_inner_texts()


def value_of(page, plot: str, name: str) -> str:
    row = page.locator(f"#plot-{plot} .u-legend tr", has=page.locator(".u-label", has_text=name))
    return row.locator(".u-value").first.inner_text()


def hover(page, plot: str, shown, sweep: int = 80) -> None:
    box = page.locator(f"#plot-{plot} .u-over").bounding_box()
    for dx in range(sweep):
        page.mouse.move(box["x"] + box["width"] - 0.5 - dx, box["y"] + box["height"] / 2)
        if shown():
            return
    raise AssertionError(f"no value in the legend of {plot} when hovered: "
                         f"{page.inner_text(f'#plot-{plot} .u-legend')!r}")


def history(store, queues: list[str], hostname: str, until: float) -> None:
    """An hour of samples before the dashboard started, as its sampler would have
    written them (every 5 s), so the plots and their screenshots have lines to show;
    the newest minute is the live sampler's, from the real worker and queues."""
    rows, workers = [], []
    for k in range(720):
        at = until - 3600 + 5 * k
        wave = (1 + math.sin(k / 60)) / 2
        for j, q in enumerate(queues):
            busy = q == "default"
            rows.append({"at": at, "queue": q, "waiting": round((40 - 8 * j) * wave) + 5 * j,
                         "unacked": 0, "running": 0, "oldest_age": 0.0,
                         "arrival_rate": 0.0, "service_time": 0.1, "workers": int(busy),
                         "completion_rate": round(2 * wave / (j + 1), 3), "desired": None,
                         "actual": 1 + round(3 * wave) if busy else j % 2})
        workers.append({"at": at, "hostname": hostname, "queue": "default",
                        "cpu_percent": 5.0, "rss": int((150 + 60 * wave) * 2**20),
                        "active": 1, "concurrency": 2})
    store.add_samples(rows, workers)


def test_the_plots_read_with_axes_legend_hover_and_window(fleet, tmp_path, browser, shots):  # noqa: F811
    fleet.configure(FAST)  # a sample every 0.5 s
    started = time.time()
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}")
    worker = fleet.start_worker("default")
    history(board.svc.store, list(fleet.config.queues), worker.hostname, started - 30)
    app = fleet.app()
    for i in range(6):  # throughput on default; three waiting on heavy (no worker there)
        app.send_task("tasks.aggregate.sum_by", args=[[{"key": "k", "value": i}]],
                      queue="default").get(timeout=30)
    for _ in range(3):
        app.send_task("tasks.aggregate.sum_by", args=[[]], queue="heavy")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    violations = serve_with_csp(page)
    asked: list[str] = []
    page.on("request", lambda r: "/api/fleet/series" in r.url and asked.append(r.url))
    try:
        page.goto(board.base + "/#/queues")
        page.wait_for_selector("#queues")
        # the CSP is in force: an inline style attribute is refused, and reported
        page.evaluate("document.body.insertAdjacentHTML('beforeend', "
                      "'<span id=\"probe\" style=\"color: red\"></span>')")
        wait_for(lambda: violations, 5, what="the CSP to refuse an inline style")
        assert "style-src" in violations[0], violations
        violations.clear()

        # queue depth: 3 waiting on heavy, once a sample holds them
        page.wait_for_selector("#plot-waiting .u-legend >> text=heavy", timeout=20_000)
        assert asked and "window=1h" in asked[0] and "what=queues" in asked[0]
        units = {p: page.inner_text(f"#plot-{p} .y-label")
                 for p in ("waiting", "completion_rate", "actual")}
        assert units == {"waiting": "tasks", "completion_rate": "tasks/s", "actual": "replicas"}
        assert page.locator("#plots .x-label").all_inner_texts() == ["time"] * 3
        for p in units:
            names = legend(page, p)
            assert names[0] == "time" and {"default", "heavy"} <= set(names), (p, names)
        assert "one point per 15 s" in page.inner_text("#plot-step")
        page.locator("#plots").screenshot(path=str(shots / "plots-queues.png"))
        page.screenshot(path=str(shots / "queues-with-plots.png"), full_page=True)

        # 15 min: the API is asked for it, and reread every 5 s (a bucket's width)
        series = lambda w: lambda r: "/api/fleet/series" in r.url and f"window={w}" in r.url  # noqa: E731
        with page.expect_request(series("15m"), timeout=10_000):
            page.click("#plots button[data-window='15m']")
        page.wait_for_selector("#plot-step >> text=one point per 5 s")

        # hover the newest samples (a user's mouse: from the right edge leftwards until
        # it is over them): the legend shows their time and values, with units
        assert value_of(page, "waiting", "heavy") == "\N{EN DASH}"  # nothing hovered yet
        hover(page, "waiting", lambda: value_of(page, "waiting", "heavy") == "3 tasks")
        assert re.search(r"\d:\d\d", value_of(page, "waiting", "time"))
        # the page re-renders every 2 s and rereads the series: the same canvas stays, and
        # the hovered value with it
        page.evaluate("document.querySelector('#plot-waiting canvas').dataset.kept = 'yes'")
        for _ in range(2):
            with page.expect_request(series("15m"), timeout=15_000):
                pass
        page.wait_for_timeout(300)
        assert page.get_attribute("#plot-waiting canvas", "data-kept") == "yes"
        assert value_of(page, "waiting", "heavy") == "3 tasks"
        page.locator("#plots").screenshot(path=str(shots / "plots-queues-hover.png"))

        # the window: 24 h asks the API for 24 h, and is remembered
        page.mouse.move(5, 5)
        with page.expect_request(series("24h"), timeout=10_000):
            page.click("#plots button[data-window='24h']")
        assert page.get_attribute("button[data-window='24h']", "aria-pressed") == "true"
        assert "window=24h" in page.evaluate("location.hash")
        page.wait_for_selector("#plot-step >> text=one point per 5 min")
        page.goto(board.base + "/#/workers")
        page.wait_for_selector(f"#plot-rss .u-legend >> text={worker.hostname}",
                               timeout=20_000)
        assert "window=24h" in asked[-1] and "what=workers" in asked[-1]
        assert page.get_attribute("button[data-window='24h']", "aria-pressed") == "true"
        assert page.inner_text("#plot-rss .y-label") == "MiB"
        assert page.inner_text("#plot-rss .x-label") == "time"
        assert legend(page, "rss") == ["time", worker.hostname]
        hover(page, "rss", lambda: value_of(page, "rss", worker.hostname).endswith(" MiB"))
        assert float(value_of(page, "rss", worker.hostname).split()[0]) > 10
        page.locator("#plots").screenshot(path=str(shots / "plots-workers.png"))
        page.screenshot(path=str(shots / "workers-with-plots.png"), full_page=True)

        # a page without plots hides them
        page.click("nav >> text=Tasks")
        page.wait_for_selector("#tasks")
        assert not page.is_visible("#plots")
        assert violations == []
    finally:
        page.close()
        board.stop()
