"""HTTP: one FastAPI app from the route modules (pages.py, flower_api.py, fleet_api.py,
deadletters.py), with every error turned into JSON with a clear message and the right
status. Each module's routers are module-level, one per role; this function only sets
``api.state.svc`` and ``api.state.gate`` (what deps.py hands the handlers) and includes
them. Every JSON route declares its response model (schemas.py), so the spec shows it.

FastAPI (on Starlette) because it turns the routes into an OpenAPI spec for free and
runs on uvicorn; request handlers stay thin: the gate (gate.py) checks the caller and
the arguments, the service's views read, its control acts, the gate records the action.
"""

from __future__ import annotations

import redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse

from fleet.dashboard import deadletters, fleet_api, flower_api, pages
from fleet.dashboard.control import ControlError
from fleet.dashboard.gate import Denied, Gate
from fleet.dashboard.pages import PAGES, base_of
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

    # The route modules' routers are module-level: their handlers get the service and
    # the gate from here, per request (deps.py), and nothing is bound to this app.
    api.state.gate = Gate(svc)
    api.include_router(pages.public)
    if svc.auth.oidc:
        from fleet.dashboard.oidc import oidc_routes

        api.include_router(oidc_routes(api, svc.auth, pages.signed_in))
    for module in (pages, flower_api, fleet_api, deadletters):
        for router in module.routers:
            api.include_router(router)
    return api
