"""Every route the dashboard serves (API, Flower's paths, pages, static files, metrics,
single sign-on), asked without credentials while auth is on: each refuses, except the
short list of public ones named here. A route added without a role fails this test.

The routes are read from the running server's own app (not a list kept by hand), so a
new route is in this test the moment it exists.
"""

from __future__ import annotations

import re

import pytest
import requests
from starlette.routing import Mount, Route

from fleet.dashboard.auth import Authenticator
from fleet.dashboard.headers import HEADERS
from tests.conftest import deep_merge
from tests.integration.dashboard_util import FAST, start_dashboard

#: (method, path) anyone may reach, and why.
PUBLIC = {
    ("GET", "/healthcheck"),  # Flower's liveness path: probes carry no credentials
    ("GET", "/login"), ("POST", "/login"), ("POST", "/logout"),
    ("GET", "/static/app.css"),  # the sign-in page's stylesheet
    ("GET", "/login/oidc"), ("GET", "/auth/oidc"),  # the single sign-on code flow
}
USERS = {"dashboard": {"users": [
    {"name": "vera", "role": "viewer", "password_env": "T_VERA"},
    {"name": "ada", "role": "admin", "password_env": "T_ADA"}]}}


@pytest.fixture
def board(fleet, tmp_path):
    from tests.fakes.oidc_provider import Provider

    provider = Provider("fleet-dashboard", "s3cret").start()
    fleet.configure(deep_merge(deep_merge(FAST, USERS), {"dashboard": {"oidc": {
        "issuer": provider.issuer, "client_id": "fleet-dashboard",
        "client_secret_env": "T_OIDC", "roles": {"ops": "operator"}}}}))
    auth = Authenticator(fleet.config.dashboard,
                         env={"T_VERA": "v-pass", "T_ADA": "a-pass", "T_OIDC": "s3cret"})
    running = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}", auth=auth,
                              url_prefix="/fleet")
    yield running
    running.stop()
    provider.stop()


def served_routes(app, prefix: str = "") -> list[tuple[str, str, object]]:
    """(method, path, route) for every route under ``app``, through mounts, included
    routers and middleware."""
    while not hasattr(app, "routes") and hasattr(app, "app"):
        app = app.app  # middleware (SecurityHeaders) around the app
    try:  # FastAPI >= 0.16x keeps included routers as objects: flatten them
        from fastapi.routing import iter_route_contexts
        routes = list(iter_route_contexts(app.routes))
    except ImportError:
        routes = app.routes
    out = []
    for route in routes:
        inner = getattr(route, "original_route", route)
        if isinstance(inner, Mount):
            out += served_routes(inner.app, prefix + inner.path)
        elif isinstance(inner, Route):
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    out.append((method, prefix + route.path, route))
    return out


def role_dependencies(route) -> list[str]:
    return [d.call.__name__ for d in route.dependant.dependencies
            if getattr(d.call, "__name__", "").startswith("requires_")]


def concrete(path: str) -> str:
    """A path with its parameters filled in: a file that exists for static paths."""
    path = path.replace("{path:path}", "app.js")
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_refuses_an_anonymous_caller_but_the_public_ones(board):
    routes = served_routes(board.server.server.config.app)
    assert len(routes) > 50, routes  # the whole app was found, not a sub-router
    under = [(m, p.removeprefix("/fleet"), r) for m, p, r in routes if p.startswith("/fleet")]
    found_public = set()
    for method, path, route in under:
        url = board.base + concrete(path)
        reply = requests.request(method, url, allow_redirects=False, timeout=15)
        for name, value in HEADERS.items():  # refused or not, every answer has them
            assert reply.headers.get(name) == value, (method, path, name)
        if (method, path) in PUBLIC:
            found_public.add((method, path))
            assert reply.status_code != 404, (method, path)
            continue
        # Declared, not remembered: the role comes from the router's dependency.
        assert role_dependencies(route), f"{method} {path} has no role dependency"
        if path in ("/", "/docs"):
            assert reply.status_code == 303, (method, path, reply.status_code)
            assert reply.headers["location"] == "/fleet/login"
        else:
            assert reply.status_code == 401, (method, path, reply.status_code, reply.text)
            assert "authentication required" in reply.json()["error"]
    assert found_public == PUBLIC  # the list has no stale entries


def test_a_viewer_is_refused_every_action_route(board):
    routes = served_routes(board.server.server.config.app)
    actions = [(m, p.removeprefix("/fleet")) for m, p, _ in routes
               if m == "POST" and (m, p.removeprefix("/fleet")) not in PUBLIC]
    assert len(actions) >= 20
    for method, path in actions:
        reply = requests.request(method, board.base + concrete(path), auth=("vera", "v-pass"),
                                 timeout=15)
        assert reply.status_code == 403, (path, reply.status_code, reply.text)
        assert "vera is viewer; this needs" in reply.json()["error"]
    # and the admin gets past the role check on each (into argument or target checks)
    for method, path in actions:
        reply = requests.request(method, board.base + concrete(path), auth=("ada", "a-pass"),
                                 timeout=15)
        assert reply.status_code not in (401, 403), (path, reply.status_code, reply.text)
