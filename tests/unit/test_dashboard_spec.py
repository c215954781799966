"""Every JSON route of the dashboard declares its response shape, so the OpenAPI spec (the
API page, schemathesis in tests/integration/test_dashboard_fuzz.py, a script's client
generator) documents what each one answers. The app is built on a SQLite store with no
Redis, workers or HTTP: building it and its spec opens no connection.

The routes are read from the built app (not a list kept by hand): a route added without
a response model fails here the moment it exists.
"""

from __future__ import annotations

import pytest
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    StreamingResponse,
)
from fastapi.routing import APIRoute

from fleet.config import load_config
from fleet.dashboard.api import create_api
from fleet.dashboard.fleet_api import SVGResponse
from fleet.dashboard.service import DashboardService
from tests.conftest import ROOT

#: Responses that are not JSON (the metrics text, pages, files, redirects, streams, the
#: what-if plots).
NOT_JSON = (PlainTextResponse, HTMLResponse, RedirectResponse, StreamingResponse,
            FileResponse, SVGResponse)
#: (method, path) kept out of the spec, and why: none of them is part of the API.
OUTSIDE_THE_SPEC = {
    ("GET", "/"), ("GET", "/docs"),  # the pages
    ("GET", "/openapi.json"),  # the spec itself
    ("GET", "/static/{path:path}"), ("GET", "/static/app.css"),  # files
    ("GET", "/login"), ("POST", "/login"), ("POST", "/logout"),  # the sign-in form
    ("GET", "/healthcheck"),  # Flower's liveness probe: the text OK
}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    database = tmp_path_factory.mktemp("spec") / "d.sqlite"
    svc = DashboardService(load_config(ROOT / "queues.yaml"), f"sqlite:///{database}")
    try:
        yield create_api(svc)
    finally:
        svc.store.close()


def api_routes(app) -> list:
    """Every APIRoute of ``app``, through included routers (FastAPI >= 0.16x keeps them
    as objects; ``iter_route_contexts`` flattens them with their full paths)."""
    try:
        from fastapi.routing import iter_route_contexts
        routes = list(iter_route_contexts(app.routes))
    except ImportError:
        routes = app.routes
    return [r for r in routes if isinstance(getattr(r, "original_route", r), APIRoute)]


def response_class(route) -> type:
    declared = route.response_class
    return getattr(declared, "value", declared)  # DefaultPlaceholder(JSONResponse)


def operations(routes) -> list[tuple[str, str, object]]:
    return [(method, route.path, route) for route in routes
            for method in sorted(route.methods or ()) if method != "HEAD"]


def test_every_json_route_has_a_response_schema(api):
    spec = api.openapi()
    missing = []
    json_routes = [(m, p, r) for m, p, r in operations(api_routes(api))
                   if r.include_in_schema and not issubclass(response_class(r), NOT_JSON)]
    assert len(json_routes) >= 40, json_routes  # the whole app was found
    for method, path, _route in json_routes:
        answer = spec["paths"][path][method.lower()]["responses"].get("200", {})
        schema = answer.get("content", {}).get("application/json", {}).get("schema")
        if not schema:
            missing.append(f"{method} {path}")
    assert missing == []


def test_only_pages_files_and_sign_in_are_kept_out_of_the_spec(api):
    hidden = {(m, p) for m, p, r in operations(api_routes(api)) if not r.include_in_schema}
    assert hidden == OUTSIDE_THE_SPEC
