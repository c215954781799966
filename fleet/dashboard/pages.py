"""The pages: the single-page app, the API page, sign-in and sign-out, and static files.

The app itself (static/app.js) renders every page from the JSON API and re-reads it
every two seconds; the server only fills in the base path, the CSRF token and the user,
through Jinja2 with autoescaping on (a user name from an identity provider is text, never
markup). Pages sit on the viewer router like the API; an anonymous browser asking for
one is sent to sign in (api.py). The only open routes are ``public_routes``.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl

import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from starlette.responses import Response

from fleet.dashboard.auth import SESSION_COOKIE
from fleet.dashboard.gate import Denied, Gate, RoleRouters, Throttled, client_address
from fleet.dashboard.sessions import MAX_AGE

HERE = Path(__file__).parent
STATIC = HERE / "static"
TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                               autoescape=True, undefined=jinja2.StrictUndefined)
#: Paths (under the prefix) a signed-out browser is redirected from to sign in.
PAGES = ("/", "/docs")
#: The one static file the sign-in page needs before anyone is signed in.
PUBLIC_STATIC = ("app.css",)


def base_of(request: Request) -> str:
    return request.scope.get("root_path", "")


def render(name: str, status: int = 200, headers: dict | None = None, **values) -> Response:
    return HTMLResponse(TEMPLATES.get_template(name).render(**values), status_code=status,
                        headers=headers)


def static_files() -> dict[str, Path]:
    """Every file under static/, by its path there: served by name from this table, so
    no request path reaches the file system."""
    return {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file()}


def serve_static(files: dict[str, Path], path: str) -> Response:
    found = files.get(path)
    if found is None:
        raise Denied(404, f"no such file: /static/{path}")
    kind = mimetypes.guess_type(found.name)[0] or "application/octet-stream"
    return FileResponse(found, media_type=kind, headers={"Cache-Control": "private, max-age=300"})


def page_routes(routers: RoleRouters, api: FastAPI) -> None:
    """The pages, the spec and the static files, for signed-in users (viewer and up)."""
    files = static_files()
    viewer = routers.viewer

    @viewer.get("/", include_in_schema=False)
    def index(request: Request):
        principal = Gate.principal(request)
        return render("index.html", base=base_of(request), csrf=principal.csrf or "",
                      user=principal.name, role=principal.role,
                      signed_in=principal.via == "session")

    @viewer.get("/docs", include_in_schema=False)
    def docs(request: Request):
        return render("docs.html", base=base_of(request))

    @viewer.get("/openapi.json", include_in_schema=False)
    def openapi(request: Request):
        spec = api.openapi()
        base = base_of(request)
        # Under a prefix, the spec names it as its server (as FastAPI's own route does).
        return JSONResponse({**spec, "servers": [{"url": base}]} if base else spec)

    @viewer.get("/static/{path:path}", include_in_schema=False)
    def static(path: str):
        return serve_static(files, path)


def public_routes(gate: Gate) -> tuple[APIRouter, Callable[[Request, str, str, str], Response]]:
    """What anyone may reach: health, sign-in, sign-out, the sign-in page's stylesheet;
    and the function that starts a session (OIDC sign-in uses it too).
    tests/integration/test_dashboard_routes.py holds this list and refuses any other open route."""
    router = APIRouter(include_in_schema=False)
    auth = gate.auth
    files = {name: STATIC / name for name in PUBLIC_STATIC}

    @router.get("/healthcheck", include_in_schema=True, tags=["flower"])
    async def healthcheck():
        return Response("OK", media_type="text/plain")

    for name in PUBLIC_STATIC:
        router.get(f"/static/{name}", name=f"public_{name}")(
            lambda name=name: serve_static(files, name))

    def login_page(request: Request, error: str | None = None, status: int = 200,
                   username: str = "", headers: dict | None = None) -> Response:
        return render("login.html", status, headers, base=base_of(request), error=error,
                      oidc=bool(auth.oidc), username=username)

    @router.get("/login")
    def login_form(request: Request):
        return login_page(request)

    @router.post("/login")
    async def login(request: Request):
        gate.same_origin(request)  # login CSRF: no signing a victim in as the attacker
        form = dict(parse_qsl((await request.body()).decode(errors="replace")))
        name, password = form.get("username", ""), form.get("password", "")
        try:
            principal = gate.password_login(request, name, password, via="form")
        except Throttled as exc:
            return login_page(request, f"Too many failed sign-ins: try again in "
                                       f"{exc.wait} s.", 429, name, exc.headers)
        if principal is None:
            return login_page(request, "Wrong user name or password.", 401, name)
        return signed_in(request, principal.name, principal.role, "password")

    @router.post("/logout")
    async def logout(request: Request):
        gate.same_origin(request)
        token = request.cookies.get(SESSION_COOKIE)
        principal = gate.from_session(token) if token else None
        if token:
            gate.sessions.revoke(token)
        if principal is not None:
            gate.svc.store.record_action(user=principal.name, role=principal.role,
                                         action="logout", target=client_address(request),
                                         params={}, outcome="signed out", ok=True)
        base = base_of(request)
        response = RedirectResponse(f"{base}/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=base or "/")
        return response

    def signed_in(request: Request, name: str, role: str, via: str) -> Response:
        """Start a server-side session (form sign-in here, OIDC in oidc.py)."""
        base = base_of(request)
        address = client_address(request)
        token = gate.sessions.create(name, role, via, auth.fingerprint(name, via, role),
                                     address)
        gate.svc.store.record_action(user=name[:255], role=role, action="login",
                                     target=address, params={"via": via},
                                     outcome="signed in", ok=True)
        response = RedirectResponse(f"{base}/", status_code=303)
        # Strict for a form sign-in; Lax after single sign-on, whose redirects come
        # from the provider's site (a Strict cookie would not be sent on the way back).
        response.set_cookie(SESSION_COOKIE, token, max_age=int(MAX_AGE), httponly=True,
                            samesite="lax" if via == "oidc" else "strict",
                            secure=request.url.scheme == "https", path=base or "/")
        return response

    return router, signed_in
