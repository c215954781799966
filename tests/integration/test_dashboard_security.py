"""Who may do what: basic auth, tokens, form login with CSRF, three roles, a URL prefix
as under an ingress, and no unauthenticated dashboard on a public address."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import requests

from fleet.dashboard.auth import AuthConfigError, Authenticator
from tests.conftest import ROOT, deep_merge, free_port, http_answers, wait_for
from tests.integration.dashboard_util import FAST, start_dashboard

USERS = {"dashboard": {
    "users": [{"name": "vera", "role": "viewer", "password_env": "T_VERA"},
              {"name": "otto", "role": "operator", "password_env": "T_OTTO"},
              {"name": "ada", "role": "admin", "password_env": "T_ADA"}],
    "tokens": [{"name": "ci-script", "role": "operator", "token_env": "T_TOKEN"}]}}
SECRETS = {"T_VERA": "v-pass", "T_OTTO": "o-pass", "T_ADA": "a-pass", "T_TOKEN": "tok-123"}


@pytest.fixture
def secured(fleet, tmp_path):
    fleet.configure(deep_merge(FAST, USERS))
    auth = Authenticator(fleet.config.dashboard, env=SECRETS)
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}", auth=auth)
    yield board
    board.stop()


def test_roles_decide_what_each_user_may_do(secured):
    base = secured.base
    r = requests.get(f"{base}/api/workers", timeout=10)
    assert r.status_code == 401 and "authentication required" in r.json()["error"]
    assert "www-authenticate" not in {k.lower() for k in r.headers}
    assert requests.get(f"{base}/api/fleet/queues", auth=("vera", "wrong"),
                        timeout=10).status_code == 401
    assert requests.get(f"{base}/api/fleet/queues", auth=("vera", "v-pass"),
                        timeout=10).status_code == 200
    # a viewer reads but does not act
    r = requests.post(f"{base}/api/fleet/queues/heavy/pause", auth=("vera", "v-pass"),
                      timeout=10)
    assert r.status_code == 403 and "vera is viewer; this needs admin" in r.json()["error"]
    # an operator may not pause queues (admin) nor read... but may see the audit log
    r = requests.post(f"{base}/api/fleet/queues/heavy/pause", auth=("otto", "o-pass"),
                      timeout=10)
    assert r.status_code == 403
    assert requests.get(f"{base}/api/fleet/audit", auth=("vera", "v-pass"),
                        timeout=10).status_code == 403
    # the admin may; the audit log names who did it
    r = requests.post(f"{base}/api/fleet/queues/heavy/pause", auth=("ada", "a-pass"),
                      timeout=10)
    assert r.status_code == 200, r.text
    # a script's token (Bearer) acts with its role
    headers = {"Authorization": "Bearer tok-123"}
    me = requests.get(f"{base}/api/fleet/me", headers=headers, timeout=10).json()
    assert me == {"name": "ci-script", "role": "operator", "via": "token",
                  "may": ["viewer", "operator"]}
    r = requests.post(f"{base}/api/fleet/queues/heavy/resume", headers=headers, timeout=10)
    assert r.status_code == 403
    audit = requests.get(f"{base}/api/fleet/audit", headers=headers, timeout=10).json()
    # newest first: the pause, and vera's wrong password before it
    assert [(a["user"], a["action"], a["ok"]) for a in audit] == [
        ("ada", "queue.pause", True), ("vera", "login.failed", False)]
    assert requests.get(f"{base}/metrics", timeout=10).status_code == 401
    assert requests.get(f"{base}/metrics", headers=headers, timeout=10).status_code == 200


def test_flowers_worker_list_refuses_anonymous_callers(secured):
    base = secured.base
    for params in ({"json": "1"}, {"json": "1", "refresh": "1"}, {}):
        r = requests.get(f"{base}/workers", params=params, allow_redirects=False, timeout=10)
        assert r.status_code == 401, (params, r.status_code, r.text)
        assert "authentication required" in r.json()["error"]
    r = requests.get(f"{base}/workers", params={"json": "1"}, auth=("vera", "wrong"),
                     timeout=10)
    assert r.status_code == 401
    r = requests.get(f"{base}/workers", params={"json": "1"}, auth=("vera", "v-pass"),
                     timeout=10)
    assert r.status_code == 200 and r.json() == {"data": []}
    r = requests.get(f"{base}/workers", auth=("vera", "v-pass"), allow_redirects=False,
                     timeout=10)
    assert r.status_code == 303 and r.headers["location"] == "/#/workers"


def test_browser_sessions_need_the_csrf_token_and_same_origin(secured):
    s = requests.Session()
    r = s.get(f"{secured.base}/", allow_redirects=False, timeout=10)
    assert r.status_code == 303 and r.headers["location"].endswith("/login")
    r = s.post(f"{secured.base}/login", data={"username": "ada", "password": "nope"},
               timeout=10)
    assert "Wrong user name or password" in r.text
    r = s.post(f"{secured.base}/login", data={"username": "ada", "password": "a-pass"},
               timeout=10)
    assert r.status_code == 200 and "fleet-csrf" in r.text
    csrf = r.text.split('name="fleet-csrf" content="')[1].split('"')[0]
    assert len(csrf) > 10 and "a-pass" not in r.text
    url = f"{secured.base}/api/fleet/queues/io/pause"
    r = s.post(url, timeout=10)
    assert r.status_code == 403 and "X-CSRF-Token" in r.json()["error"]
    r = s.post(url, headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
               timeout=10)
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]
    r = s.post(url, headers={"X-CSRF-Token": csrf}, timeout=10)
    assert r.status_code == 200, r.text
    s.post(f"{secured.base}/logout", timeout=10)
    assert s.get(f"{secured.base}/api/fleet/queues", timeout=10).status_code == 401


def test_missing_secrets_are_named(fleet):
    fleet.configure(USERS)
    with pytest.raises(AuthConfigError) as err:
        Authenticator(fleet.config.dashboard, env={"T_VERA": "x"})
    message = str(err.value)
    assert "dashboard.users[otto].password_env: $T_OTTO is not set" in message
    assert "dashboard.tokens[ci-script].token_env: $T_TOKEN is not set" in message


def test_served_under_a_url_prefix_as_behind_an_ingress(fleet, tmp_path):
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}",
                            url_prefix="/ops/fleet/")
    try:
        root = board.base.removesuffix("/ops/fleet")
        assert board.base.endswith("/ops/fleet")
        r = requests.get(root + "/", allow_redirects=False, timeout=10)
        assert r.status_code in (302, 307) and r.headers["location"] == "/ops/fleet/"
        page = board.get("/").text
        assert 'content="/ops/fleet"' in page and 'src="/ops/fleet/static/app.js"' in page
        assert board.get("/static/app.js").status_code == 200
        assert board.get("/api/fleet/queues").status_code == 200
        r = board.get("/workers", allow_redirects=False)  # Flower's page: ours, here
        assert r.status_code == 303 and r.headers["location"] == "/ops/fleet/#/workers"
        assert board.json("/workers", params={"json": "1"}) == {"data": []}
        spec = board.json("/openapi.json")
        assert "/api/task/info/{task_id}" in spec["paths"]
        assert requests.get(root + "/api/fleet/queues", timeout=10).status_code == 404
    finally:
        board.stop()


def run_cli(fleet, *args, timeout=30):
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args, "--config",
                           str(fleet.config_path)], cwd=ROOT, env=fleet.env,
                          capture_output=True, text=True, timeout=timeout)


def test_no_unauthenticated_dashboard_on_a_public_address(fleet):
    done = run_cli(fleet, "dashboard", "--address", "0.0.0.0", "--port", str(free_port()),
                   "--database", f"sqlite:///{fleet.tmp_path / 'd.sqlite'}")
    assert done.returncode == 2
    assert "refusing to serve the dashboard on 0.0.0.0 without authentication" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_database_url_is_one_clear_line(fleet):
    done = run_cli(fleet, "dashboard", "--port", str(free_port()), "--database",
                   "postgresql://nobody:secret@127.0.0.1:1/none")
    assert done.returncode == 2
    assert "cannot open the dashboard database" in done.stderr
    assert "secret" not in done.stderr and "Traceback" not in done.stderr


def test_a_taken_port_is_one_clear_line_and_no_url_is_announced(fleet):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli(fleet, "dashboard", "--port", str(port), "--database",
                       f"sqlite:///{fleet.tmp_path / 'd.sqlite'}")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot serve the dashboard on 127.0.0.1:{port}: Address already in use" \
        in done.stderr
    assert "dashboard on http" not in done.stdout  # no URL that leads to someone else
    assert "Traceback" not in done.stderr


def test_the_url_is_announced_once_the_port_is_bound_and_port_0_picks_one(fleet):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet.cli", "dashboard", "--port", "0", "--database",
         f"sqlite:///{fleet.tmp_path / 'd.sqlite'}", "--config", str(fleet.config_path)],
        cwd=ROOT, env=fleet.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("dashboard on http://127.0.0.1:"), line
        url = line.split()[2]
        port = int(url.rsplit(":", 1)[1].strip("/"))
        assert port != 0
        # Bound before it was printed: a connection is accepted at once (the kernel
        # queues it even before uvicorn's loop runs), and answered soon after.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        wait_for(lambda: http_answers(url + "healthcheck"), 30, what="the dashboard")
    finally:
        proc.terminate()
        proc.wait(30)


def test_fleet_up_runs_on_without_a_dashboard_when_its_port_is_taken(fleet, tmp_path):
    import io

    from rich.console import Console

    from fleet.up import _start_dashboard

    out = io.StringIO()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert _start_dashboard(fleet.config, tmp_path, port, Console(file=out)) is None
    assert f"port {port} is taken: no dashboard (pass --dashboard-port)" in out.getvalue()
    assert "dashboard on" not in out.getvalue()


@pytest.fixture
def oidc(fleet, tmp_path):
    from tests.fakes.oidc_provider import Provider

    provider = Provider("fleet-dashboard", "s3cret").start()
    fleet.configure(deep_merge(FAST, {"dashboard": {"oidc": {
        "issuer": provider.issuer, "client_id": "fleet-dashboard",
        "client_secret_env": "T_OIDC_SECRET", "groups_claim": "groups",
        "roles": {"ops": "operator", "platform": "admin"}}}}))
    auth = Authenticator(fleet.config.dashboard, env={"T_OIDC_SECRET": "s3cret"})
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}", auth=auth,
                            url_prefix="/fleet")
    yield provider, board
    board.stop()
    provider.stop()


def test_single_sign_on_with_an_oidc_provider_maps_groups_to_roles(oidc):
    provider, board = oidc
    s = requests.Session()
    assert "/fleet/login/oidc" in s.get(f"{board.base}/login", timeout=10).text
    page = s.get(f"{board.base}/login/oidc", timeout=10)
    assert page.status_code == 200 and "olga (operator)" in page.text
    me = s.get(f"{board.base}/api/fleet/me", timeout=10).json()
    assert (me["name"], me["role"], me["via"]) == ("olga", "operator", "session")
    # a user in no mapped group gets no role (default_role is unset)
    provider.user = {"sub": "u-2", "preferred_username": "mallory", "groups": ["sales"]}
    other = requests.Session()
    r = other.get(f"{board.base}/login/oidc", timeout=10)
    assert r.status_code == 403 and "mallory signed in but has no dashboard role" in r.text
    assert other.get(f"{board.base}/api/fleet/me", timeout=10).status_code == 401


def test_the_kubernetes_way_an_admin_token_from_a_secret(fleet):
    """k8s/base starts the dashboard with --admin-token-env and an empty Secret: it must
    refuse to start until an overlay sets the token, and work once it does."""
    env = {**fleet.env, "FLEET_DASHBOARD_TOKEN": ""}
    done = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "dashboard", "--address", "0.0.0.0", "--port",
         str(free_port()), "--admin-token-env", "FLEET_DASHBOARD_TOKEN", "--database",
         f"sqlite:///{fleet.tmp_path / 'd.sqlite'}", "--config", str(fleet.config_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "dashboard.tokens[admin-token].token_env: $FLEET_DASHBOARD_TOKEN is not set" \
        in done.stderr
