"""Sign-in with any OpenID Connect provider that publishes discovery metadata.

Authlib does the protocol (discovery, the authorization-code flow with state and nonce,
ID-token signature and claim checks against the provider's JWKS); this module only maps
the signed-in user's groups to a role and starts a dashboard session.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.middleware.sessions import SessionMiddleware

from fleet.dashboard.auth import Authenticator

#: The short-lived cookie that carries the flow's state and nonce between the redirects.
FLOW_COOKIE = "fleet_oidc_flow"


def oidc_routes(api: FastAPI, auth: Authenticator,
                signed_in: Callable[[Request, str, str, str], object]) -> APIRouter:
    """The two public routes of the code flow (and the flow cookie's middleware)."""
    from authlib.integrations.starlette_client import OAuth, OAuthError

    settings = auth.oidc
    assert settings is not None
    api.add_middleware(SessionMiddleware, secret_key=auth.session_secret,
                       session_cookie=FLOW_COOKIE, max_age=600, same_site="lax")
    oauth = OAuth()
    oauth.register(
        "oidc", client_id=settings.client_id, client_secret=auth.oidc_secret,
        server_metadata_url=settings.issuer.rstrip("/") + "/.well-known/openid-configuration",
        client_kwargs={"scope": "openid email profile"})

    router = APIRouter(include_in_schema=False)

    @router.get("/login/oidc")
    async def login_oidc(request: Request):
        try:
            return await oauth.oidc.authorize_redirect(request,
                                                       str(request.url_for("oidc_callback")))
        except Exception as exc:  # provider unreachable or its metadata is wrong
            return JSONResponse({"error": f"single sign-on is unavailable: cannot read "
                                          f"{settings.issuer}'s discovery document ({exc})"},
                                status_code=502)

    @router.get("/auth/oidc", name="oidc_callback")
    async def oidc_callback(request: Request):
        try:
            token = await oauth.oidc.authorize_access_token(request)
        except OAuthError as exc:
            return JSONResponse({"error": f"sign-in failed: {exc.error} "
                                          f"{exc.description or ''}".strip()}, status_code=401)
        claims = token.get("userinfo") or {}
        name = (claims.get("preferred_username") or claims.get("email")
                or claims.get("sub") or "unknown")
        role = auth.oidc_role(claims)
        if role is None:
            return JSONResponse({"error": f"{name} signed in but has no dashboard role "
                                          f"(groups: {claims.get(settings.groups_claim)})"},
                                status_code=403)
        return signed_in(request, name, role, "oidc")

    return router
