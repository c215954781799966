"""The pages: the single-page app (static files), sign-in and sign-out.

The app itself (static/app.js) renders every page from the JSON API and re-reads it
every two seconds; the server only fills in the base path, the CSRF token and the user.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.responses import Response

from fleet.dashboard.auth import SESSION_COOKIE, SESSION_MAX_AGE, Authenticator

STATIC = Path(__file__).parent / "static"


def page_routes(auth: Authenticator) -> tuple[APIRouter, Callable[[str, str, str], Response]]:
    """The routes, and the function that starts a session (OIDC sign-in uses it too)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/", include_in_schema=False)
    async def index(request: Request):
        principal = auth.from_headers(None, request.cookies.get(SESSION_COOKIE))
        if principal is None:
            return RedirectResponse(f"{request.scope.get('root_path', '')}/login",
                                    status_code=303)
        page = (STATIC / "index.html").read_text()
        page = page.replace("{{BASE}}", request.scope.get("root_path", ""))
        page = page.replace("{{CSRF}}", principal.csrf or "")
        page = page.replace("{{USER}}", f"{principal.name} ({principal.role})")
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @router.get("/login", include_in_schema=False)
    async def login_page(request: Request, error: str | None = None):
        page = (STATIC / "login.html").read_text()
        base = request.scope.get("root_path", "")
        oidc = (f'<p><a id="oidc" href="{base}/login/oidc">Sign in with single sign-on</a></p>'
                if auth.oidc else "")
        note = '<p class="error">Wrong user name or password.</p>' if error else ""
        return HTMLResponse(page.replace("{{BASE}}", base).replace("{{OIDC}}", oidc)
                            .replace("{{ERROR}}", note))

    @router.post("/login", include_in_schema=False)
    async def login(request: Request):
        form = dict(parse_qsl((await request.body()).decode(errors="replace")))
        base = request.scope.get("root_path", "")
        principal = auth.check_password(form.get("username", ""), form.get("password", ""))
        if principal is None:
            return RedirectResponse(f"{base}/login?error=1", status_code=303)
        return signed_in(base, principal.name, principal.role)

    def signed_in(base: str, name: str, role: str) -> Response:
        response = RedirectResponse(f"{base}/", status_code=303)
        response.set_cookie(SESSION_COOKIE, auth.session(name, role), max_age=SESSION_MAX_AGE,
                            httponly=True, samesite="strict", path=base or "/")
        return response

    @router.get("/logout", include_in_schema=False)
    async def logout(request: Request):
        base = request.scope.get("root_path", "")
        response = RedirectResponse(f"{base}/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=base or "/")
        return response

    return router, signed_in
