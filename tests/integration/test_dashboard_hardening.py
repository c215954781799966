"""The dashboard as a security review sees it: sessions the server can take back,
throttled password guessing with every failure logged and audited, security headers on
every answer, escaped user names, and no login CSRF. Real HTTP against a real server;
the SIGHUP reload runs `fleet dashboard` as a process."""

from __future__ import annotations

import base64
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import requests
import yaml

from fleet.config import Dashboard
from fleet.dashboard import throttle
from fleet.dashboard.auth import SESSION_COOKIE, Authenticator
from fleet.dashboard.headers import CSP
from tests.conftest import ROOT, deep_merge, free_port, wait_for
from tests.integration.dashboard_util import FAST, start_dashboard

USERS = [{"name": "vera", "role": "viewer", "password_env": "T_VERA"},
         {"name": "ada", "role": "admin", "password_env": "T_ADA"}]
SECRETS = {"T_VERA": "v-pass", "T_ADA": "a-pass"}


@pytest.fixture
def secured(fleet, tmp_path):
    fleet.configure(deep_merge(FAST, {"dashboard": {"users": USERS}}))
    auth = Authenticator(fleet.config.dashboard, env=SECRETS)
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}", auth=auth)
    yield board
    board.stop()


def sign_in(base: str, name: str, password: str, **kw) -> tuple[requests.Session, str]:
    s = requests.Session()
    r = s.post(f"{base}/login", data={"username": name, "password": password}, timeout=10,
               **kw)
    assert r.status_code == 200, (r.status_code, r.text)
    return s, r.text.split('name="fleet-csrf" content="')[1].split('"')[0]


def test_the_cookie_is_an_opaque_token_with_no_role_or_csrf_secret_in_it(secured):
    s, csrf = sign_in(secured.base, "ada", "a-pass")
    cookie = s.cookies[SESSION_COOKIE]
    padded = cookie + "=" * (-len(cookie) % 4)
    decoded = base64.urlsafe_b64decode(padded)
    for secret in ("ada", "admin", csrf):
        assert secret not in cookie and secret.encode() not in decoded
    # and the database holds a keyed hash of it, not the token itself
    sessions = secured.svc.sessions
    assert sessions.count("ada") == 1
    with secured.svc.store.engine.connect() as conn:
        stored = [row[0] for row in conn.exec_driver_sql("SELECT id FROM sessions")]
    assert cookie not in stored and len(stored) == 1


def test_sign_out_ends_the_session_on_the_server_not_just_in_the_browser(secured):
    s, _ = sign_in(secured.base, "ada", "a-pass")
    stolen = s.cookies[SESSION_COOKIE]
    assert s.get(f"{secured.base}/api/fleet/me", timeout=10).json()["name"] == "ada"
    r = s.post(f"{secured.base}/logout", allow_redirects=False, timeout=10)
    assert r.status_code == 303 and r.headers["location"].endswith("/login")
    # a copy of the cookie taken before sign-out no longer works
    r = requests.get(f"{secured.base}/api/fleet/me", cookies={SESSION_COOKIE: stolen},
                     timeout=10)
    assert r.status_code == 401
    assert secured.svc.sessions.count("ada") == 0
    audit = requests.get(f"{secured.base}/api/fleet/audit", auth=("ada", "a-pass"),
                         timeout=10).json()
    assert [a["action"] for a in audit][:2] == ["logout", "login"]


def test_a_removed_or_demoted_user_loses_access_at_the_next_request(secured):
    base, auth = secured.base, secured.svc.auth
    ada, ada_csrf = sign_in(base, "ada", "a-pass")
    vera, _ = sign_in(base, "vera", "v-pass")
    assert ada.post(f"{base}/api/fleet/queues/io/pause", headers={"X-CSRF-Token": ada_csrf},
                    timeout=10).status_code == 200
    # ada demoted to operator, vera removed: as a reloaded queues.yaml says
    auth.load(Dashboard(users=[{**USERS[1], "role": "operator"}]), SECRETS)
    r = ada.post(f"{base}/api/fleet/queues/io/resume", headers={"X-CSRF-Token": ada_csrf},
                 timeout=10)
    assert r.status_code == 401  # not admin any more: the old session is gone
    assert ada.get(f"{base}/api/fleet/me", timeout=10).status_code == 401
    assert vera.get(f"{base}/api/fleet/me", timeout=10).status_code == 401
    assert secured.svc.sessions.count() == 0
    # signing in again gives the new role
    ada, _ = sign_in(base, "ada", "a-pass")
    assert ada.get(f"{base}/api/fleet/me", timeout=10).json()["role"] == "operator"
    r = requests.post(f"{base}/login", data={"username": "vera", "password": "v-pass"},
                      timeout=10)
    assert r.status_code == 401
    # a changed password ends the sessions opened with the old one
    auth.load(Dashboard(users=[{**USERS[1], "role": "operator"}]), {"T_ADA": "new-pass"})
    assert ada.get(f"{base}/api/fleet/me", timeout=10).status_code == 401


def test_a_reload_with_a_missing_secret_keeps_the_users_it_had(secured):
    s, _ = sign_in(secured.base, "vera", "v-pass")
    from fleet.dashboard.auth import AuthConfigError

    with pytest.raises(AuthConfigError, match=r"\$T_VERA is not set"):
        secured.svc.auth.load(Dashboard(users=USERS), {"T_ADA": "a-pass"})
    assert s.get(f"{secured.base}/api/fleet/me", timeout=10).json()["name"] == "vera"


def test_password_guessing_is_throttled_per_user_and_per_address_and_audited(secured, caplog):
    base = secured.base
    caplog.set_level(logging.WARNING, logger="fleet.dashboard")
    # 127.0.0.1 is a trusted proxy by default: X-Forwarded-For names the client
    def attempt(name, password, address):
        return requests.post(f"{base}/login", data={"username": name, "password": password},
                             headers={"X-Forwarded-For": address}, allow_redirects=False,
                             timeout=10)

    for _ in range(throttle.FREE):
        assert attempt("ada", "guess", "198.51.100.7").status_code == 401
    started = time.monotonic()
    # locked now, for ada from anywhere and for that address whoever it names...
    r = attempt("ada", "a-pass", "198.51.100.7")
    assert r.status_code == 429 and "Too many failed sign-ins" in r.text
    assert 1 <= int(r.headers["Retry-After"]) <= 2
    assert attempt("ada", "a-pass", "203.0.113.9").status_code == 429
    assert attempt("vera", "v-pass", "198.51.100.7").status_code == 429
    # ... Basic auth included, which checks the same passwords
    r = requests.get(f"{base}/api/fleet/me", auth=("ada", "a-pass"),
                     headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10)
    assert r.status_code == 429 and "Retry-After" in r.headers
    # while another user from another address is not slowed
    assert attempt("vera", "v-pass", "203.0.113.9").status_code == 303
    # the lock lasts BASE seconds after the FREE-th failure, then the right password works
    wait_for(lambda: attempt("ada", "a-pass", "203.0.113.9").status_code == 303,
             throttle.BASE + 5, interval=0.3, what="the lock to end")
    assert time.monotonic() - started >= throttle.BASE * 0.5
    # every failure is in the log and the audit log, with the address it came from
    failed = [r for r in caplog.records if "failed sign-in" in r.getMessage()]
    assert len(failed) == throttle.FREE
    assert "198.51.100.7" in failed[0].getMessage()
    audit = requests.get(f"{base}/api/fleet/audit", auth=("ada", "a-pass"), timeout=10).json()
    rows = [a for a in audit if a["action"] == "login.failed"]
    assert len(rows) == throttle.FREE
    assert {(a["user"], a["target"], a["ok"]) for a in rows} == {("ada", "198.51.100.7", False)}
    assert "further attempts refused for 1 s" in rows[0]["outcome"]


def test_an_unknown_api_token_is_throttled_by_address(secured):
    headers = {"Authorization": "Bearer nope", "X-Forwarded-For": "192.0.2.44"}
    codes = [requests.get(f"{secured.base}/api/fleet/me", headers=headers,
                          timeout=10).status_code for _ in range(throttle.FREE + 1)]
    assert codes == [401] * throttle.FREE + [429]


def test_security_headers_on_every_kind_of_answer(secured):
    base = secured.base
    answers = {
        "page": requests.get(f"{base}/", auth=("vera", "v-pass"), timeout=10),
        "sign-in": requests.get(f"{base}/login", timeout=10),
        "api": requests.get(f"{base}/api/fleet/queues", auth=("vera", "v-pass"), timeout=10),
        "refused": requests.get(f"{base}/api/fleet/queues", timeout=10),
        "not found": requests.get(f"{base}/no/such/path", timeout=10),
        "static": requests.get(f"{base}/static/app.js", auth=("vera", "v-pass"), timeout=10),
        "redirect": requests.get(f"{base}/", allow_redirects=False, timeout=10),
    }
    for what, r in answers.items():
        assert r.headers["Content-Security-Policy"] == CSP, what
        assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
        assert r.headers["X-Frame-Options"] == "DENY", what
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff", what
        assert r.headers["Referrer-Policy"] == "same-origin", what
        assert "Strict-Transport-Security" not in r.headers, what  # plain HTTP
    assert answers["api"].headers["Cache-Control"] == "no-store"
    assert answers["redirect"].status_code == 303
    # no inline script or handler left in the pages
    for page in (answers["page"].text, answers["sign-in"].text):
        assert "<script>" not in page and "onclick" not in page and "style=" not in page


def test_cookies_are_httponly_samesite_and_secure_behind_a_tls_proxy(secured):
    plain = requests.post(f"{secured.base}/login",
                          data={"username": "ada", "password": "a-pass"},
                          allow_redirects=False, timeout=10)
    header = plain.headers["set-cookie"]
    assert "HttpOnly" in header and "SameSite=strict" in header and "Secure" not in header
    # the (trusted, loopback) proxy in front says the browser came over HTTPS
    tls = requests.post(f"{secured.base}/login", data={"username": "ada", "password": "a-pass"},
                        headers={"X-Forwarded-Proto": "https"}, allow_redirects=False,
                        timeout=10)
    assert "Secure" in tls.headers["set-cookie"] and "HttpOnly" in tls.headers["set-cookie"]
    assert tls.headers["Strict-Transport-Security"].startswith("max-age=")


def test_sign_in_refuses_a_cross_origin_post(secured):
    r = requests.post(f"{secured.base}/login", data={"username": "ada", "password": "a-pass"},
                      headers={"Origin": "http://evil.example"}, allow_redirects=False,
                      timeout=10)
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]
    assert "set-cookie" not in {k.lower() for k in r.headers}
    r = requests.post(f"{secured.base}/login", data={"username": "ada", "password": "a-pass"},
                      headers={"Sec-Fetch-Site": "cross-site"}, allow_redirects=False,
                      timeout=10)
    assert r.status_code == 403 and "set-cookie" not in {k.lower() for k in r.headers}
    # the same POST from the dashboard's own page signs in
    host = secured.base.split("://")[1].split("/")[0]
    r = requests.post(f"{secured.base}/login", data={"username": "ada", "password": "a-pass"},
                      headers={"Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"},
                      allow_redirects=False, timeout=10)
    assert r.status_code == 303 and SESSION_COOKIE in r.headers["set-cookie"]
    # and sign-out too (a forged sign-out is refused)
    r = requests.post(f"{secured.base}/logout", headers={"Origin": "http://evil.example"},
                      cookies={SESSION_COOKIE: r.cookies[SESSION_COOKIE]}, timeout=10)
    assert r.status_code == 403


def test_a_user_name_is_text_in_the_page_not_markup(fleet, tmp_path):
    evil = '<img src=x onerror="alert(1)">'
    fleet.configure(deep_merge(FAST, {"dashboard": {"users": [
        {"name": evil, "role": "viewer", "password_env": "T_EVIL"}]}}))
    auth = Authenticator(fleet.config.dashboard, env={"T_EVIL": "pw"})
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}", auth=auth)
    try:
        s, _ = sign_in(board.base, evil, "pw")
        page = s.get(f"{board.base}/", timeout=10).text
        assert evil not in page and "<img" not in page
        assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page
        failed = requests.post(f"{board.base}/login",
                               data={"username": evil, "password": "no"}, timeout=10)
        assert failed.status_code == 401 and "<img" not in failed.text  # echoed, escaped
    finally:
        board.stop()


def test_sighup_rereads_the_users_and_a_removed_one_is_out(fleet, tmp_path):
    """`fleet dashboard` as a process: edit queues.yaml, send SIGHUP, the user is out."""
    fleet.configure(deep_merge(FAST, {"dashboard": {"users": USERS}}))
    port = free_port()
    env = {**fleet.env, **SECRETS}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "dashboard", "--port", str(port), "--database",
         f"sqlite:///{tmp_path / 'd.sqlite'}", "--config", str(fleet.config_path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return requests.get(f"{base}/healthcheck", timeout=2).ok
            except requests.ConnectionError:
                return False
        wait_for(up, 30, what="the dashboard")
        vera, _ = sign_in(base, "vera", "v-pass")
        assert vera.get(f"{base}/api/fleet/me", timeout=10).status_code == 200
        data = yaml.safe_load(fleet.config_path.read_text())
        data["dashboard"]["users"] = [USERS[1]]
        fleet.config_path.write_text(yaml.safe_dump(data))
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: vera.get(f"{base}/api/fleet/me", timeout=10).status_code == 401, 10,
                 what="vera's session to end")
        assert requests.get(f"{base}/api/fleet/me", auth=("ada", "a-pass"),
                            timeout=10).status_code == 200
        # a broken file on the next SIGHUP keeps the users, and says why
        fleet.config_path.write_text("version: [1\n")
        os.kill(proc.pid, signal.SIGHUP)
        time.sleep(1)
        assert requests.get(f"{base}/api/fleet/me", auth=("ada", "a-pass"),
                            timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert "users, tokens and single sign-on re-read" in err
    assert "not reloaded, the users it had stay" in err and "Traceback" not in err


# -- the throttle's arithmetic, without a server ----------------------------------------

def test_the_delay_doubles_after_the_free_attempts_up_to_the_cap():
    assert [throttle.delay(n) for n in range(throttle.FREE)] == [0.0] * throttle.FREE
    assert throttle.delay(throttle.FREE) == throttle.BASE
    assert throttle.delay(throttle.FREE + 3) == throttle.BASE * 8
    assert throttle.delay(10_000) == throttle.CAP


def test_the_throttle_forgets_and_stays_bounded():
    t = throttle.LoginThrottle(kept=50)
    keys = throttle.keys_for("ada", "10.0.0.1")
    for i in range(throttle.FREE):
        assert t.wait(keys, now=100.0 + i) == 0.0
        t.failed(keys, now=100.0 + i)
    assert t.wait(keys, now=104.0) == pytest.approx(throttle.BASE)
    assert t.wait(("user:ada",), now=104.0 + throttle.BASE) == 0.0
    t.succeeded("user:ada")  # a success clears the name, not the address
    assert t.wait(("user:ada",), now=104.1) == 0.0
    assert t.wait(("addr:10.0.0.1",), now=104.1) > 0
    assert t.wait(keys, now=104.0 + throttle.FORGET_AFTER + 1) == 0.0
    for i in range(1000):
        t.failed(throttle.keys_for(f"u{i}", f"10.1.{i // 250}.{i % 250}"), now=200.0)
    assert len(t._counts) <= 50


def test_sessions_end_after_their_lifetime_or_when_idle(tmp_path):
    from fleet.dashboard.sessions import IDLE, MAX_AGE, TOUCH_EVERY, SessionStore
    from fleet.dashboard.store import Store

    store = Store(f"sqlite:///{tmp_path / 's.sqlite'}")
    sessions = SessionStore(store.engine, "key")
    try:
        t0 = 1_000_000.0
        busy = sessions.create("ada", "admin", "password", "fp", now=t0)
        idle = sessions.create("vera", "viewer", "password", "fp", now=t0)
        # used every half IDLE: alive until MAX_AGE, however busy
        t = t0
        while t + IDLE / 2 < t0 + MAX_AGE:
            t += IDLE / 2
            assert sessions.get(busy, now=t) is not None, t - t0
        assert sessions.get(busy, now=t0 + MAX_AGE + 1) is None
        assert sessions.get(idle, now=t0 + IDLE + TOUCH_EVERY) is None
        assert sessions.count() == 0  # both deleted, not only refused
        assert sessions.get("not-a-token") is None and sessions.get("x" * 500) is None
    finally:
        store.close()


def test_dashboards_sharing_a_database_and_key_share_sessions(fleet, tmp_path, postgres_url):
    """Two replicas behind one ingress: signed in on one, signed in on the other; signed
    out on one, out on both."""
    fleet.configure(deep_merge(FAST, {"dashboard": {"users": USERS,
                                                    "session_secret_env": "T_KEY"}}))
    env = {**SECRETS, "T_KEY": "shared-session-key"}
    boards = [start_dashboard(fleet.config, postgres_url,
                              auth=Authenticator(fleet.config.dashboard, env=env))
              for _ in range(2)]
    try:
        one, two = boards
        s, _ = sign_in(one.base, "ada", "a-pass")
        cookie = {SESSION_COOKIE: s.cookies[SESSION_COOKIE]}
        me = requests.get(f"{two.base}/api/fleet/me", cookies=cookie, timeout=10)
        assert me.status_code == 200 and me.json()["name"] == "ada"
        s.post(f"{one.base}/logout", timeout=10)
        assert requests.get(f"{two.base}/api/fleet/me", cookies=cookie,
                            timeout=10).status_code == 401
    finally:
        for board in boards:
            board.stop()
