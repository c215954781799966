"""The fleet's own API under /api/fleet/: what the pages show and the fleet's actions
(jobs, queues, autoscaler bounds), plus /metrics.

Routes sit on their role's router (``viewer``, ``operator``, ``admin``); a handler is
its arguments, one call to the service (``live`` and ``views`` shape the answer) and the
declared response model (schemas.py) that puts the answer's shape in the spec.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Query, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from fleet.dashboard import schemas
from fleet.dashboard.auth import LEVEL
from fleet.dashboard.deps import ERRORS, CallerDep, GateDep, ServiceDep, role_router
from fleet.dashboard.downsample import TOP, WindowError
from fleet.dashboard.gate import MAX_INT, Denied
from fleet.dashboard.views import TaskFilter
from fleet.dashboard.whatif import (
    MAX_CANDIDATE,
    TTL,
    CandidateError,
    WhatIfBusy,
    WhatIfWindowError,
)
from fleet.whatif import WhatIfUnavailable

viewer = role_router("viewer", tags=["fleet"])
operator = role_router("operator", tags=["fleet"])
admin = role_router("admin", tags=["fleet"])
routers = (viewer, operator, admin)


class SVGResponse(Response):
    """A what-if plot; shown by the page as an image (no script runs in an <img>)."""

    media_type = "image/svg+xml"


#: Its refusals are JSON still; FastAPI would document them in the route's media type.
JSON_REFUSALS = {status: {"description": answer["description"], "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for status, answer in ERRORS.items()}


@viewer.get("/metrics", response_class=PlainTextResponse)
def metrics(svc: ServiceDep):
    return Response(generate_latest(svc.registry), media_type=CONTENT_TYPE_LATEST)


@viewer.get("/api/fleet/me", response_model=schemas.Me)
def me(principal: CallerDep):
    return {"name": principal.name, "role": principal.role, "via": principal.via,
            "may": [r for r in LEVEL if principal.may(r)]}


@viewer.get("/api/fleet/overview", response_model=schemas.Overview)
def overview(svc: ServiceDep):
    return svc.live.overview()


@viewer.get("/api/fleet/events/gaps", response_model=list[schemas.EventGap])
def event_gaps(svc: ServiceDep, limit: int = Query(100, ge=1, le=1000),
               since: float | None = None):
    """Stretches of events the dashboard could not recover (Redis restarted empty,
    the stream trimmed past it, a worker's offline buffer full), newest first."""
    return svc.views.gaps(limit, since)


# exclude_unset: a worker's sample keys are there only while it has a sample.
@viewer.get("/api/fleet/workers", response_model=list[schemas.Worker],
            response_model_exclude_unset=True)
def fleet_workers(svc: ServiceDep, include_offline: bool = True):
    return svc.live.workers(include_offline)


@viewer.get("/api/fleet/workers/{name}", response_model=schemas.WorkerDetail,
            response_model_exclude_unset=True)
def fleet_worker(svc: ServiceDep, name: str, refresh: bool = False):
    worker = svc.live.worker(name, refresh)
    if worker is None:
        raise Denied(404, f"Unknown worker '{name}'")
    return worker


@viewer.get("/api/fleet/queues", response_model=list[schemas.QueueRow])
def fleet_queues(svc: ServiceDep):
    return svc.live.queues()


@admin.post("/api/fleet/queues/{queue}/pause", response_model=schemas.ActionResult)
async def pause(request: Request, svc: ServiceDep, gate: GateDep, queue: str):
    gate.known_queue(queue)
    return gate.act(request, "queue.pause", queue, {}, lambda: svc.control.pause(queue, True))


@admin.post("/api/fleet/queues/{queue}/resume", response_model=schemas.ActionResult)
async def resume(request: Request, svc: ServiceDep, gate: GateDep, queue: str):
    gate.known_queue(queue)
    return gate.act(request, "queue.resume", queue, {},
                    lambda: svc.control.pause(queue, False))


@admin.post("/api/fleet/queues/{queue}/bounds", response_model=schemas.ActionResult)
async def bounds(request: Request, svc: ServiceDep, gate: GateDep, queue: str):
    gate.known_queue(queue)
    args = await gate.params(request)
    lo, hi = gate.number(args, "min_replicas"), gate.number(args, "max_replicas")
    for name, value in (("min_replicas", lo), ("max_replicas", hi)):
        if value is not None and value < 0:
            raise Denied(400, f"{name} must be 0 or more (got {value})")
    return gate.act(request, "autoscaler.bounds", queue,
                    {"min_replicas": lo, "max_replicas": hi},
                    lambda: svc.control.set_bounds(queue, lo, hi))


@viewer.get("/api/fleet/tasks", response_model=schemas.TaskPage)
def fleet_tasks(svc: ServiceDep, state: Annotated[list[str] | None, Query()] = None,
                name: str | None = None, worker: str | None = None,
                queue: str | None = None, since: float | None = None,
                until: float | None = None, search: str | None = None,
                memory_kill: bool | None = None,
                before: int | None = Query(None, ge=0, le=MAX_INT),
                limit: int = Query(50, ge=1, le=500)):
    states = tuple(s for part in state or () for s in part.split(",") if s)
    f = TaskFilter(states=states, name=name, worker=worker, queue=queue,
                   received_from=since, received_to=until, search=search,
                   memory_kill=memory_kill)
    rows = svc.views.tasks(f, limit=limit, before=before)
    return {"tasks": rows, "next": rows[-1]["seq"] if len(rows) == limit else None}


@viewer.get("/api/fleet/tasks/{task_id}", response_model=schemas.Task)
def fleet_task(svc: ServiceDep, task_id: str):
    task = svc.views.task(task_id)
    if task is None:
        raise Denied(404, f"Unknown task '{task_id}'")
    return task


@viewer.get("/api/fleet/failures", response_model=list[schemas.FailureGroup])
def failures(svc: ServiceDep):
    return svc.views.failures()


@viewer.get("/api/fleet/jobs", response_model=list[schemas.JobRow])
def fleet_jobs(svc: ServiceDep, limit: int = Query(100, ge=1, le=1000)):
    """Live from Redis, and from the store the jobs whose state Redis has let expire."""
    return svc.live.jobs(limit)


@viewer.get("/api/fleet/jobs/{job_id}", response_model=schemas.JobDetail)
def fleet_job(svc: ServiceDep, job_id: str):
    return svc.live.job(job_id)


@operator.post("/api/fleet/jobs/{job_id}/retry", response_model=schemas.ActionResult)
async def retry_job(request: Request, svc: ServiceDep, gate: GateDep, job_id: str):
    return gate.act(request, "job.retry", job_id, {}, lambda: svc.control.retry_job(job_id))


@operator.post("/api/fleet/jobs/{job_id}/revoke", response_model=schemas.ActionResult)
async def revoke_job(request: Request, svc: ServiceDep, gate: GateDep, principal: CallerDep,
                     job_id: str):
    return gate.act(request, "job.revoke", job_id, {},
                    lambda: svc.control.revoke_job(job_id, principal.name))


@viewer.get("/api/fleet/autoscaler", response_model=schemas.Autoscaler)
def autoscaler(svc: ServiceDep, queue: str | None = None,
               limit: int = Query(100, ge=1, le=1000)):
    return svc.live.autoscaler(queue, limit)


# exclude_unset: "rabbitmq" is there only when dashboard.rabbitmq is configured.
@viewer.get("/api/fleet/broker", response_model=schemas.Broker,
            response_model_exclude_unset=True)
def broker(svc: ServiceDep):
    return svc.live.broker()


@viewer.get("/api/fleet/series", response_model=schemas.Plots)
def series(svc: ServiceDep, window: Literal["15m", "1h", "24h"] | None = None,
           since: float | None = None, until: float | None = None,
           queue: str | None = None,
           what: Literal["queues", "workers", "all"] = "all",
           top: int = Query(TOP, ge=1, le=50)):
    """Queue depth, throughput, replicas and worker memory over ``window`` (ending
    now) or ``since``..``until`` (default: the last hour), in at most 300 time
    buckets per series, the ``top`` series per plot (``more``: the names not drawn)."""
    try:
        return svc.live.plots(window, since, until, queue, what, top)
    except WindowError as exc:
        raise Denied(400, str(exc)) from None


@viewer.get("/api/fleet/whatif", response_model=schemas.WhatIf,
            responses={429: {"model": schemas.Error, "description": "another what-if runs"},
                       501: {"model": schemas.Error,
                             "description": "what-if is not available here"}})
def whatif(svc: ServiceDep, since: str | None = None, until: str | None = None,
           queue: Annotated[list[str] | None, Query()] = None,
           candidate: str | None = Query(None, max_length=MAX_CANDIDATE)):
    """The window ``since``..``until`` (durations ago, ``1h``, or ISO times; default the
    last hour) replayed by the simulator under the current settings and the tuner's, or
    ``candidate``'s (a queues.yaml fragment: ``queues``, ``autoscaler``): cost, waits,
    SLO seconds per side. A GET: it changes nothing, so a viewer may ask (every POST is
    an action). A def, not async: FastAPI runs it in its thread pool, and the seconds
    of simulation leave the event loop serving every other page."""
    try:
        return svc.whatif.answer(since, until, queue or (), candidate)
    except (WhatIfWindowError, CandidateError) as exc:
        raise Denied(400, str(exc)) from None
    except WhatIfBusy as exc:
        raise Denied(429, str(exc), {"Retry-After": str(exc.retry_after)}) from None
    except WhatIfUnavailable as exc:
        raise Denied(501, str(exc)) from None


@viewer.get("/api/fleet/whatif/{run}/{side}.svg", response_class=SVGResponse,
            responses={200: {"content": {"image/svg+xml": {}},
                             "description": "the replay's plot"},
                       **JSON_REFUSALS})
def whatif_plot(svc: ServiceDep, run: str, side: Literal["current", "candidate"]):
    """The plot of one side of a what-if answer, while the answer is kept (a minute)."""
    svg = svc.whatif.plot(run, side)
    if svg is None:
        raise Denied(404, f"no what-if {run!r} kept (answers are kept {TTL:g} s): "
                          "ask /api/fleet/whatif again")
    return SVGResponse(svg)


@operator.get("/api/fleet/audit", response_model=list[schemas.AuditEntry])
def audit_log(svc: ServiceDep, limit: int = Query(200, ge=1, le=1000)):
    return svc.views.audit(limit)
