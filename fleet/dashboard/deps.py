"""What a handler is given by FastAPI's dependencies: the running service, the gate and
the caller; and the routers of each role, whose router-level dependency checks the role.

The route modules define their routers at import, before any dashboard runs, so nothing
here is captured then: the service and the gate are read per request from the app that
serves it (``create_api`` sets ``app.state.svc`` and ``app.state.gate``). One process may
run several dashboards (the tests do) on the same module-level routers; each request
finds its own. A test can also swap them (``app.dependency_overrides``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from fleet.dashboard.auth import Principal
from fleet.dashboard.gate import Gate
from fleet.dashboard.schemas import Error
from fleet.dashboard.service import DashboardService


def get_service(request: Request) -> DashboardService:
    return request.app.state.svc


def get_gate(request: Request) -> Gate:
    return request.app.state.gate


def get_caller(request: Request) -> Principal:
    """Who called: the role router's check (``requires``) put it on the request."""
    return request.state.principal


ServiceDep = Annotated[DashboardService, Depends(get_service)]
GateDep = Annotated[Gate, Depends(get_gate)]
CallerDep = Annotated[Principal, Depends(get_caller)]

#: Every refusal and failure is ``{"error": message}`` (api.py's exception handlers).
ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": Error, "description": "refused: the message says why"},
    "5XX": {"model": Error, "description": "the broker or a worker is unreachable"},
}


def requires(role: str) -> Callable[[Request], Principal]:
    """The router-level dependency of ``role``'s router (tests/integration/
    test_dashboard_routes.py finds a route's role by this function's name)."""

    def check(request: Request) -> Principal:
        return get_gate(request).admit(request, role)

    check.__name__ = f"requires_{role}"
    return check


def role_router(role: str, **options) -> APIRouter:
    """A router every route of which needs ``role`` (and for actions, CSRF checks): a
    route's role is where it is declared (``operator.post(...)``), not a call inside it."""
    options.setdefault("responses", ERRORS)
    return APIRouter(dependencies=[Depends(requires(role))], **options)
