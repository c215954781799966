"""The pages: the single-page app, the API page, sign-in and sign-out, and static files.

The app itself (static/app.js) renders every page from the JSON API and re-reads it
every two seconds; the server only fills in the base path, the CSRF token and the user,
through Jinja2 with autoescaping on (a user name from an identity provider is text, never
markup). Pages sit on the viewer router like the API; an anonymous browser asking for
one is sent to sign in (api.py). The only open routes are those of ``public``.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from urllib.parse import parse_qsl

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
)
from starlette.responses import Response

from fleet.dashboard.auth import SESSION_COOKIE
from fleet.dashboard.deps import CallerDep, GateDep, get_gate, role_router
from fleet.dashboard.gate import Denied, Throttled, client_address
from fleet.dashboard.sessions import MAX_AGE

HERE = Path(__file__).parent
STATIC = HERE / "static"
TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                               autoescape=True, undefined=jinja2.StrictUndefined)
#: Paths (under the prefix) a signed-out browser is redirected from to sign in.
PAGES = ("/", "/docs")
#: The one static file the sign-in page needs before anyone is signed in.
PUBLIC_STATIC = ("app.css",)
PUBLIC_FILES = {name: STATIC / name for name in PUBLIC_STATIC}


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


#: Every file under static/, read once at import: the table ``serve_static`` looks in.
FILES = static_files()

# -- for signed-in users (viewer and up) ---------------------------------------------------

viewer = role_router("viewer", include_in_schema=False)
routers = (viewer,)


@viewer.get("/", response_class=HTMLResponse)
def index(request: Request, principal: CallerDep):
    return render("index.html", base=base_of(request), csrf=principal.csrf or "",
                  user=principal.name, role=principal.role,
                  signed_in=principal.via == "session")


@viewer.get("/docs", response_class=HTMLResponse)
def docs(request: Request):
    return render("docs.html", base=base_of(request))


@viewer.get("/openapi.json")
def openapi(request: Request):
    spec = request.app.openapi()
    base = base_of(request)
    # Under a prefix, the spec names it as its server (as FastAPI's own route does).
    return JSONResponse({**spec, "servers": [{"url": base}]} if base else spec)


@viewer.get("/static/{path:path}", response_class=FileResponse)
def static(path: str):
    return serve_static(FILES, path)


# -- open to anyone -------------------------------------------------------------------------
# Health, sign-in, sign-out, the sign-in page's stylesheet.
# tests/integration/test_dashboard_routes.py holds this list and refuses any other open route.

public = APIRouter(include_in_schema=False)


@public.get("/healthcheck", response_class=PlainTextResponse, tags=["flower"])
async def healthcheck():
    return Response("OK", media_type="text/plain")


for _name in PUBLIC_STATIC:
    public.get(f"/static/{_name}", name=f"public_{_name}", response_class=FileResponse)(
        lambda name=_name: serve_static(PUBLIC_FILES, name))


def login_page(request: Request, error: str | None = None, status: int = 200,
               username: str = "", headers: dict | None = None) -> Response:
    return render("login.html", status, headers, base=base_of(request), error=error,
                  oidc=bool(get_gate(request).auth.oidc), username=username)


@public.get("/login", response_class=HTMLResponse)
def login_form(request: Request):
    return login_page(request)


@public.post("/login", response_class=HTMLResponse)
async def login(request: Request, gate: GateDep):
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


@public.post("/logout", response_class=RedirectResponse)
async def logout(request: Request, gate: GateDep):
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
    gate = get_gate(request)
    base = base_of(request)
    address = client_address(request)
    token = gate.sessions.create(name, role, via, gate.auth.fingerprint(name, via, role),
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
