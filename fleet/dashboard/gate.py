"""The checks every request goes through: who is asking and may they (roles, CSRF for
browsers), Flower-style arguments, bounded numbers, and the audit record of an action.
Route modules get one ``Gate`` and stay free of these concerns."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request

from fleet.dashboard.auth import SESSION_COOKIE, Principal
from fleet.dashboard.service import DashboardService
from fleet.errors import FleetError

#: Integers the database (SQLite: 64-bit) can take, and what a control argument may be.
MAX_INT = 2**62
MAX_NUMBER = 10**6


class Denied(FleetError):
    """A request refused: ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def missing(name: str):
    raise Denied(400, f"missing argument '{name}'")


class Gate:
    def __init__(self, svc: DashboardService):
        self.svc = svc
        self.auth = svc.auth

    def who(self, request: Request, role: str = "viewer") -> Principal:
        principal = self.auth.from_headers(request.headers.get("authorization"),
                                           request.cookies.get(SESSION_COOKIE))
        if principal is None:
            raise Denied(401, "authentication required: sign in, or send "
                              "Authorization: Basic or Bearer")
        if not principal.may(role):
            raise Denied(403, f"{principal.name} is {principal.role}; this needs {role}")
        return principal

    def acting(self, request: Request, role: str) -> Principal:
        """A state-changing request: the role, and CSRF checks for browsers."""
        principal = self.who(request, role)
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1] != request.headers.get("host"):
            raise Denied(403, f"cross-origin request from {origin} refused")
        site = request.headers.get("sec-fetch-site")
        if site and site not in ("same-origin", "none"):
            raise Denied(403, "cross-site request refused")
        if principal.via == "session":
            sent = request.headers.get("x-csrf-token", "")
            if not principal.csrf or sent != principal.csrf:
                raise Denied(403, "missing or wrong X-CSRF-Token")
        return principal

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

    def act(self, principal: Principal, action: str, target: str, args: dict,
            call: Callable[[], str]) -> dict:
        """Run an action and record it in the audit log, failed or not."""
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
