"""HTTP: one FastAPI app from the route modules (pages.py, flower_api.py, fleet_api.py),
with every error turned into JSON with a clear message and the right status.

FastAPI (on Starlette) because it turns the routes into an OpenAPI spec for free and
runs on uvicorn; request handlers stay thin: the gate (gate.py) checks the caller and
the arguments, the service's views read, its control acts, the gate records the action.
"""

from __future__ import annotations

import redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse

from fleet.dashboard.control import ControlError
from fleet.dashboard.deadletters import dead_letter_routes
from fleet.dashboard.fleet_api import fleet_routes
from fleet.dashboard.flower_api import flower_routes
from fleet.dashboard.gate import Denied, Gate
from fleet.dashboard.pages import PAGES, base_of, page_routes, public_routes
from fleet.dashboard.service import DashboardService
from fleet.errors import FleetError, UnknownJobError


def create_api(svc: DashboardService) -> FastAPI:
    # FastAPI's own /docs and /openapi.json are off: ours sit behind sign-in and the
    # API page loads Swagger UI from /static (FastAPI's loads it from a CDN, inline).
    api = FastAPI(title="fleet dashboard", version="1", docs_url=None, redoc_url=None,
                  openapi_url=None,
                  description="Flower's API paths and shapes, plus the fleet's own "
                              "(/api/fleet/...). Errors are JSON: {\"error\": message}.")
    api.state.svc = svc

    # -- errors: JSON with a clear message and the right status ----------------------

    @api.exception_handler(Denied)
    async def _denied(request: Request, exc: Denied):
        base = base_of(request)
        if (exc.status == 401 and request.method == "GET"
                and request.url.path.removeprefix(base) in PAGES):
            return RedirectResponse(f"{base}/login", status_code=303)
        return JSONResponse({"error": exc.message}, status_code=exc.status,
                            headers=exc.headers)

    @api.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    @api.exception_handler(ControlError)
    async def _control(_request: Request, exc: ControlError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @api.exception_handler(UnknownJobError)
    async def _unknown_job(_request: Request, exc: UnknownJobError):
        return JSONResponse({"error": str(exc)}, status_code=404)

    @api.exception_handler(redis.RedisError)
    async def _broker(_request: Request, exc: redis.RedisError):
        return JSONResponse({"error": f"the broker (Redis) is unreachable: {exc}"},
                            status_code=503)

    @api.exception_handler(FleetError)
    async def _fleet(_request: Request, exc: FleetError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    from fastapi.exceptions import RequestValidationError

    @api.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        return JSONResponse({"error": f"bad request: {problems}"}, status_code=400)

    gate = Gate(svc)
    public, signed_in = public_routes(gate)
    api.include_router(public)
    if svc.auth.oidc:
        from fleet.dashboard.oidc import oidc_routes

        api.include_router(oidc_routes(api, svc.auth, signed_in))
    pages = gate.routers()
    page_routes(pages, api)
    api.include_router(pages.merged())
    api.include_router(flower_routes(svc, gate))
    api.include_router(fleet_routes(svc, gate))
    api.include_router(dead_letter_routes(svc, gate))
    return api
