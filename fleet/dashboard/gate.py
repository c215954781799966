"""The checks every request goes through: who is asking and may they (roles, CSRF for
browsers, throttled guessing), Flower-style arguments, bounded numbers, and the audit
record of an action. Route modules get one ``Gate`` and stay free of these concerns.

Auth is declared, not remembered: routes live on a role's router (``deps.role_router``),
whose router-level dependency (``deps.requires``) runs ``Gate.admit`` for the router's
role (and, for anything but a read, the same-origin and CSRF rules) before the handler
runs. A handler gets who called as a dependency (``deps.CallerDep``). Only
``pages.public`` is open.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request

from fleet.dashboard.auth import SESSION_COOKIE, Principal
from fleet.dashboard.service import DashboardService
from fleet.dashboard.throttle import keys_for
from fleet.errors import FleetError

logger = logging.getLogger("fleet.dashboard")

#: Integers the database (SQLite: 64-bit) can take, and what a control argument may be.
MAX_INT = 2**62
MAX_NUMBER = 10**6
READS = ("GET", "HEAD", "OPTIONS")


class Denied(FleetError):
    """A request refused: ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class Throttled(Denied):
    def __init__(self, wait: float):
        self.wait = max(1, round(wait + 0.5))
        super().__init__(429, f"too many failed sign-ins from this address or for this "
                              f"user: try again in {self.wait} s",
                         {"Retry-After": str(self.wait)})


def missing(name: str):
    raise Denied(400, f"missing argument '{name}'")


def client_address(request: Request) -> str:
    """The caller's address: uvicorn has already taken it from X-Forwarded-For when the
    connection comes from a trusted proxy (dashboard.trusted_proxies), and only then."""
    return request.client.host if request.client else ""


class Gate:
    def __init__(self, svc: DashboardService):
        self.svc = svc
        self.auth = svc.auth
        self.sessions = svc.sessions
        self.throttle = svc.throttle

    # -- who is asking -----------------------------------------------------------------

    def identify(self, request: Request) -> Principal | None:
        if not self.auth.enabled:
            return Principal("anonymous", "admin", "none")
        authorization = request.headers.get("authorization")
        if authorization:
            scheme, _, value = authorization.partition(" ")
            scheme, value = scheme.lower(), value.strip()
            if scheme == "bearer":
                return self.token_login(request, value)
            if scheme == "basic":
                credential = self.auth.basic(value)
                if credential is None:
                    return None
                return self.password_login(request, *credential, via="basic")
            return None
        cookie = request.cookies.get(SESSION_COOKIE)
        return self.from_session(cookie) if cookie else None

    def from_session(self, token: str) -> Principal | None:
        session = self.sessions.get(token)
        if session is None:
            return None
        if not self.auth.still_valid(session.user, session.via, session.role,
                                     session.fingerprint):
            self.sessions.revoke_key(session.key)
            logger.warning("dashboard: session of %r ended: the user was removed, or their "
                           "role or password changed", session.user)
            return None
        return Principal(session.user, session.role, "session", session.csrf)

    def password_login(self, request: Request, name: str, password: str,
                       via: str) -> Principal | None:
        """A user name and password (form sign-in or Basic), throttled and audited."""
        keys = keys_for(name, client_address(request))
        now = time.time()
        wait = self.throttle.wait(keys, now)
        if wait > 0:
            raise Throttled(wait)
        principal = self.auth.check_password(name, password)
        if principal is None:
            self.throttle.failed(keys, now)
            self.failed_login(request, name, via, "wrong user name or password",
                              self.throttle.wait(keys, now))
            return None
        self.throttle.succeeded(keys[0])
        return principal

    def token_login(self, request: Request, value: str) -> Principal | None:
        keys = keys_for(None, client_address(request))
        now = time.time()
        wait = self.throttle.wait(keys, now)
        if wait > 0:
            raise Throttled(wait)
        principal = self.auth.check_token(value)
        if principal is None:
            self.throttle.failed(keys, now)
            self.failed_login(request, "", "token", "unknown API token",
                              self.throttle.wait(keys, now))
        return principal

    def failed_login(self, request: Request, name: str, via: str, reason: str,
                     locked_for: float) -> None:
        address = client_address(request)
        outcome = reason + (f"; further attempts refused for {locked_for:.0f} s"
                            if locked_for > 0 else "")
        logger.warning("dashboard: failed sign-in (%s) for %r from %s: %s", via, name,
                       address, outcome)
        self.svc.store.record_action(user=name[:255], role="", action="login.failed",
                                     target=address, params={"via": via}, outcome=outcome,
                                     ok=False)

    # -- may they ------------------------------------------------------------------------

    def who(self, request: Request, role: str = "viewer") -> Principal:
        principal = self.identify(request)
        if principal is None:
            raise Denied(401, "authentication required: sign in, or send "
                              "Authorization: Basic or Bearer")
        if not principal.may(role):
            raise Denied(403, f"{principal.name} is {principal.role}; this needs {role}")
        return principal

    def same_origin(self, request: Request) -> None:
        """Refuse what a page on another site made the browser send (CSRF, login CSRF)."""
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1] != request.headers.get("host"):
            raise Denied(403, f"cross-origin request from {origin} refused")
        site = request.headers.get("sec-fetch-site")
        if site and site not in ("same-origin", "none"):
            raise Denied(403, "cross-site request refused")

    def acting(self, request: Request, role: str) -> Principal:
        """A state-changing request: the role, and CSRF checks for browsers."""
        principal = self.who(request, role)
        self.same_origin(request)
        if principal.via == "session":
            sent = request.headers.get("x-csrf-token", "")
            if not principal.csrf or sent != principal.csrf:
                raise Denied(403, "missing or wrong X-CSRF-Token")
        return principal

    def admit(self, request: Request, role: str) -> Principal:
        """The check on every route of ``role``'s router (``deps.requires``): the role,
        and for anything but a read the same-origin and CSRF rules. The caller is kept
        on the request for the handler (``deps.CallerDep``) and the audit record."""
        principal = (self.who(request, role) if request.method in READS
                     else self.acting(request, role))
        request.state.principal = principal
        return principal

    @staticmethod
    def principal(request: Request) -> Principal:
        return request.state.principal

    async def params(self, request: Request) -> dict[str, Any]:
        """Flower reads arguments from the query or a form/JSON body: so do we."""
        out: dict[str, Any] = dict(request.query_params)
        body = await request.body()
        if body:
            kind = request.headers.get("content-type", "")
            if "json" in kind:
                try:
                    data = json.loads(body)
                except ValueError:
                    raise Denied(400, "request body is not valid JSON") from None
                if isinstance(data, dict):
                    out.update(data)
            else:
                out.update(parse_qsl(body.decode(errors="replace")))
        return out

    def number(self, args: dict, name: str, default: int | None = None,
               kind: type = int) -> Any:
        value = args.get(name, default)
        if value is None:
            return None
        try:
            out = kind(value)
        except (TypeError, ValueError, OverflowError):
            raise Denied(400, f"{name} must be a number (got {value!r})") from None
        if not -MAX_NUMBER <= out <= MAX_NUMBER or out != out:  # NaN is not equal to itself
            raise Denied(400, f"{name} is out of range (got {value!r})")
        return out

    def act(self, request: Request, action: str, target: str, args: dict,
            call: Callable[[], str]) -> dict:
        """Run an action and record it in the audit log, failed or not."""
        principal = self.principal(request)
        try:
            message = call()
        except FleetError as exc:
            self.svc.store.record_action(user=principal.name, role=principal.role,
                                         action=action, target=target, params=args,
                                         outcome=str(exc), ok=False)
            raise
        self.svc.store.record_action(user=principal.name, role=principal.role, action=action,
                                     target=target, params=args, outcome=message, ok=True)
        return {"message": message}

    def known_worker(self, name: str) -> None:
        if self.svc.views.worker(name) is None and name not in self.svc.inspector.cached():
            raise Denied(404, f"Unknown worker '{name}'")

    def known_queue(self, name: str) -> None:
        queues = self.svc.config.queues
        if name not in queues:
            raise Denied(404, f"Unknown queue '{name}' (known: {', '.join(queues)})")
