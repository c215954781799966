"""The dead-letter lists on the dashboard: the API answers with its declared shapes, and
requeue/purge act with the roles, CSRF checks and audit record of every control."""

from __future__ import annotations

import json

import pytest
import requests

from fleet.dashboard.auth import Authenticator
from fleet.deadletter import MALFORMED, SIGNAL, DeadLetterList, Reason, new_entry
from fleet.keys import list_keys
from tests.conftest import deep_merge
from tests.integration.dashboard_util import FAST, start_dashboard
from tests.integration.test_dashboard_security import SECRETS, USERS
from tests.integration.test_deadletter import envelope

pytestmark = pytest.mark.slow


@pytest.fixture
def board(fleet, tmp_path):
    fleet.configure(FAST)
    running = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'dash.sqlite'}")
    yield running
    running.stop()


def fill(config) -> tuple:
    dead = DeadLetterList.for_config(config)
    task = new_entry("heavy", Reason(SIGNAL, "its pool process was killed by signal 9 "
                                             "(SIGKILL)"),
                     message=envelope(task_id="d-1", kwargs={"how": "sigkill"}), deliveries=3)
    junk = new_entry("default", Reason(MALFORMED, "not JSON: Expecting value"), raw=b"%%%")
    dead.add(task)
    dead.add(junk)
    return task, junk


def test_the_api_lists_shows_requeues_and_purges(fleet, board, redis_client):
    task, junk = fill(fleet.config)
    page = board.json("/api/fleet/dead")
    assert page["counts"] == {"default": 1, "io": 0, "heavy": 1, "xl": 0}
    rows = {r["id"]: r for r in page["entries"]}
    assert rows[task.id] == {
        "id": task.id, "queue": "heavy", "reason": "signal",
        "detail": "its pool process was killed by signal 9 (SIGKILL)", "at": task.at,
        "deliveries": 3, "task": "tests.probe.pair", "task_id": "d-1", "worker": None,
        "requeue_problem": None}
    assert "not a task message" in rows[junk.id]["requeue_problem"]
    assert [r["id"] for r in board.json("/api/fleet/dead", params={"queue": "heavy"})[
        "entries"]] == [task.id]
    detail = board.json(f"/api/fleet/dead/{task.id}")
    assert detail["arguments"][:2] == [[1, 2], {"how": "sigkill"}]
    assert detail["message"]["headers"]["id"] == "d-1" and detail["raw"] is None
    assert board.json(f"/api/fleet/dead/{junk.id}")["raw"] == "%%%"
    spec = board.json("/openapi.json")
    assert "DeadLetterPage" in spec["components"]["schemas"]
    assert "/api/fleet/queues/{queue}/dead/purge" in spec["paths"]

    for path, status, words in [
            ("/api/fleet/dead/nope", 404, "no dead-letter entry 'nope'"),
            ("/api/fleet/dead?queue=nosuch", 404, "Unknown queue 'nosuch'")]:
        r = board.get(path)
        assert r.status_code == status and words in r.json()["error"], r.text
    r = board.post(f"/api/fleet/dead/{junk.id}/requeue")
    assert r.status_code == 409 and "cannot be requeued: not a task message" in r.json()["error"]
    r = board.post("/api/fleet/dead/nope/requeue")
    assert r.status_code == 404

    r = board.post(f"/api/fleet/dead/{task.id}/requeue")
    assert r.status_code == 200, r.text
    assert r.json() == {"message": f"requeued {task.id}: tests.probe.pair[d-1] onto heavy"}
    [sent] = redis_client.lrange(list_keys(fleet.config, "heavy")[0], 0, -1)
    assert json.loads(sent)["headers"]["id"] == "d-1"
    assert board.json("/api/fleet/dead")["counts"]["heavy"] == 0
    r = board.post("/api/fleet/queues/default/dead/requeue")
    assert r.json() == {"message": "default: 0 dead letters requeued, 1 left (not task "
                                   "messages)"}
    r = board.post("/api/fleet/queues/default/dead/purge")
    assert r.json() == {"message": "default: 1 dead letters purged"}
    assert board.post("/api/fleet/queues/nosuch/dead/purge").status_code == 404

    audit = [(a["action"], a["target"], a["ok"]) for a in board.json("/api/fleet/audit")]
    assert set(audit) == {("dead.requeue", junk.id, False), ("dead.requeue", "nope", False),
                          ("dead.requeue", task.id, True),
                          ("dead.requeue-all", "default", True),
                          ("dead.purge", "default", True)}


def test_requeue_needs_an_operator_and_purge_an_admin_with_csrf(fleet, tmp_path):
    fleet.configure(deep_merge(FAST, USERS))
    task, _ = fill(fleet.config)
    auth = Authenticator(fleet.config.dashboard, env=SECRETS)
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}", auth=auth)
    try:
        base = board.base
        assert requests.get(f"{base}/api/fleet/dead", timeout=10).status_code == 401
        assert requests.get(f"{base}/api/fleet/dead", auth=("vera", "v-pass"),
                            timeout=10).status_code == 200
        r = requests.post(f"{base}/api/fleet/dead/{task.id}/requeue", auth=("vera", "v-pass"),
                          timeout=10)
        assert r.status_code == 403 and "this needs operator" in r.json()["error"]
        r = requests.post(f"{base}/api/fleet/queues/heavy/dead/purge",
                          auth=("otto", "o-pass"), timeout=10)
        assert r.status_code == 403 and "this needs admin" in r.json()["error"]
        # A browser session must send its CSRF token.
        s = requests.Session()
        r = s.post(f"{base}/login", data={"username": "ada", "password": "a-pass"}, timeout=10)
        csrf = r.text.split('name="fleet-csrf" content="')[1].split('"')[0]
        url = f"{base}/api/fleet/queues/heavy/dead/purge"
        assert s.post(url, timeout=10).status_code == 403
        assert DeadLetterList.for_config(fleet.config).counts(["heavy"]) == {"heavy": 1}
        r = requests.post(f"{base}/api/fleet/dead/{task.id}/requeue", auth=("otto", "o-pass"),
                          timeout=10)
        assert r.status_code == 200, r.text
        r = s.post(url, headers={"X-CSRF-Token": csrf}, timeout=10)
        assert r.status_code == 200 and r.json() == {"message": "heavy: 0 dead letters purged"}
        audit = requests.get(f"{base}/api/fleet/audit", auth=("ada", "a-pass"),
                             timeout=10).json()
        assert [(a["user"], a["action"]) for a in audit] == [
            ("ada", "dead.purge"), ("otto", "dead.requeue"), ("ada", "login")]
    finally:
        board.stop()


def test_the_queues_page_shows_dead_letters_and_requeues_one(fleet, tmp_path):
    """In Debian's chromium (Playwright), as tests/integration/test_dashboard_browser.py does."""
    from tests.integration.test_dashboard_browser import CHROMIUM, playwright_api

    fleet.configure(FAST)
    task, junk = fill(fleet.config)
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}")
    dialogs: list[str] = []
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-dev-shm-usage"])
            page = browser.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
            page.goto(board.base + "/#/queues")
            page.wait_for_selector(f"#dead-letters >> text={task.detail}")
            row = page.locator(f"#dead-letters tr:has-text('{junk.detail}')")
            assert "not a task message" in row.inner_text()
            assert page.locator("#dead-queues tr:has-text('heavy')").count() == 1
            page.click("#dead-letters tr:has-text('tests.probe.pair') "
                       ">> button:has-text('Requeue')")
            page.wait_for_selector(f"#toast >> text=requeued {task.id}")
            assert dialogs == ["Send tests.probe.pair[d-1] again?"]
            page.wait_for_selector("#dead-queues >> text=heavy", state="detached")
            browser.close()
    finally:
        board.stop()
    assert DeadLetterList.for_config(fleet.config).counts(["heavy"]) == {"heavy": 0}
