"""Flower's API paths, with Flower's response shapes, so scripts written for Flower keep
working (tests/integration/test_dashboard_flower_compat.py runs the same calls against both).

Flower reads arguments from the query or a form/JSON body (``Gate.params``), so the
control routes parse their own; the response models (schemas.py) keep Flower's keys,
no more and no fewer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Query, Request
from fastapi.responses import RedirectResponse

from fleet.dashboard import schemas
from fleet.dashboard.control import Control
from fleet.dashboard.deps import GateDep, ServiceDep, role_router
from fleet.dashboard.gate import MAX_INT, Denied, Gate, missing
from fleet.dashboard.service import DashboardService
from fleet.dashboard.views import TaskFilter, flower_task
from fleet.errors import JobInputError
from fleet.jobs.submit import registered_task

viewer = role_router("viewer", tags=["flower"])
operator = role_router("operator", tags=["flower"])
admin = role_router("admin", tags=["flower"])
routers = (viewer, operator, admin)
by_role = {"viewer": viewer, "operator": operator, "admin": admin}


# exclude_unset: a worker's entry has a key only once the worker answered it (Flower's).
@viewer.get("/api/workers", response_model=schemas.FlowerWorkers,
            response_model_exclude_unset=True)
def workers(svc: ServiceDep, refresh: bool = False, workername: str | None = None,
            status: bool = False):
    """Flower's ListWorkers: the inspect cache per worker (stats, active_queues,
    registered, conf, timestamp; the task lists once the worker was refreshed on its
    own), or with ``status`` every stored worker's liveness (``workername`` aside)."""
    info = svc.live.inspect_replies(refresh, workername, status)
    if workername and not status and workername not in info:
        raise Denied(404, f"Unknown worker '{workername}'")
    return info


@viewer.get("/workers", response_model=schemas.FlowerWorkerPage,
            responses={303: {"description": "without json: to the dashboard's workers page"}})
def workers_page(request: Request, svc: ServiceDep,
                 as_json: bool = Query(False, alias="json"), refresh: bool = False):
    """Flower's WorkersView: with ``json`` its ``{"data": [...]}`` (counts of events
    by type, the worker's fields, ``status``); without, the dashboard's workers page."""
    if refresh:
        svc.inspector.refresh_soon()
    if not as_json:
        return RedirectResponse(f"{request.scope.get('root_path', '')}/#/workers",
                                status_code=303)
    return {"data": svc.views.flower_workers()}


# -- Flower's worker controls --------------------------------------------------------------
# (path, role, arguments, call). One handler shape for all: role and CSRF (the router),
# Flower-style arguments, a known worker, the audited call.

Arguments = Callable[[Gate, dict], dict]
Call = Callable[[Control, str, dict], str]


def n_arg(gate: Gate, args: dict) -> dict:
    return {"n": gate.number(args, "n", 1)}


def bounds_arg(gate: Gate, args: dict) -> dict:
    return {"min": gate.number(args, "min", 0), "max": gate.number(args, "max", 0)}


def queue_arg(_gate: Gate, args: dict) -> dict:
    return {"queue": args.get("queue") or missing("queue")}


WORKER_ACTIONS: list[tuple[str, str, Arguments | None, Call]] = [
    ("shutdown", "admin", None, lambda c, w, a: c.shutdown(w)),
    ("pool/restart", "operator", None, lambda c, w, a: c.pool_restart(w)),
    ("pool/grow", "operator", n_arg, lambda c, w, a: c.pool_grow(w, a["n"])),
    ("pool/shrink", "operator", n_arg, lambda c, w, a: c.pool_shrink(w, a["n"])),
    ("pool/autoscale", "operator", bounds_arg,
     lambda c, w, a: c.pool_autoscale(w, a["min"], a["max"])),
    ("queue/add-consumer", "operator", queue_arg,
     lambda c, w, a: c.add_consumer(w, a["queue"])),
    ("queue/cancel-consumer", "operator", queue_arg,
     lambda c, w, a: c.cancel_consumer(w, a["queue"])),
]


def worker_route(path: str, role: str, parse: Arguments | None, call: Call) -> None:
    action = "worker." + path.removeprefix("queue/").replace("/", "_").replace("-", "_")

    async def handler(request: Request, svc: ServiceDep, gate: GateDep, name: str):
        args = parse(gate, await gate.params(request)) if parse else {}
        gate.known_worker(name)
        return gate.act(request, action, name, args, lambda: call(svc.control, name, args))

    by_role[role].post(f"/api/worker/{path}/{{name}}", name=action,
                       operation_id=action.replace(".", "_"),
                       response_model=schemas.ActionResult)(handler)


for _path, _role, _parse, _call in WORKER_ACTIONS:
    worker_route(_path, _role, _parse, _call)


# -- tasks ---------------------------------------------------------------------------------


@viewer.get("/api/tasks", response_model=schemas.FlowerTasks)
def flower_tasks(svc: ServiceDep, limit: int | None = Query(None, ge=1, le=MAX_INT),
                 offset: int = Query(0, ge=0, le=MAX_INT), sort_by: str | None = None,
                 workername: str | None = None, taskname: str | None = None,
                 state: str | None = None, received_start: str | None = None,
                 received_end: str | None = None, search: str | None = None):
    f = TaskFilter(states=tuple(state.split(",")) if state else (), name=taskname,
                   worker=workername, search=search,
                   received_from=_when(received_start, "received_start"),
                   received_to=_when(received_end, "received_end"))
    rows = svc.views.tasks(f, limit=limit or 500, offset=offset,
                           oldest_first=sort_by in ("received", "started"))
    return {t["uuid"]: flower_task(t) for t in rows}


@viewer.get("/api/task/types", response_model=schemas.TaskTypes)
def task_types(svc: ServiceDep):
    return {"task-types": svc.views.task_names()}


@viewer.get("/api/task/info/{task_id}", response_model=schemas.FlowerTask)
def task_info(svc: ServiceDep, task_id: str):
    task = svc.views.task(task_id)
    if task is None:
        raise Denied(404, f"Unknown task '{task_id}'")
    return flower_task(task)


# exclude_unset: "result" (and "traceback") only once the task is ready, as Flower.
@viewer.get("/api/task/result/{task_id}", response_model=schemas.TaskResult,
            response_model_exclude_unset=True)
def task_result(svc: ServiceDep, task_id: str, timeout: float | None = None):
    return svc.live.task_result(task_id, timeout)


async def send(request: Request, svc: DashboardService, gate: Gate, name: str, action: str,
               known_only: bool) -> dict[str, Any]:
    """async-apply (a task this app registers) and send-task (any name, as Flower)."""
    body = await gate.params(request)
    if known_only:
        try:
            registered_task(svc.app, name)
        except JobInputError as exc:
            raise Denied(404, f"Unknown task '{name}' ({exc})") from None
    args, kwargs = body.get("args", []), body.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise Denied(400, "args must be a list and kwargs an object")
    options = {k: v for k, v in (body.get("options") or {}).items()
               if k in ("countdown", "queue", "priority", "expires")}
    sent: list = []

    def call() -> str:
        sent.append(svc.app.send_task(name, args=args, kwargs=kwargs, **options))
        return f"sent {name} as {sent[0].id}"

    gate.act(request, action, name, {"args": args, "kwargs": kwargs}, call)
    return {"task-id": sent[0].id, "state": "PENDING"}


@operator.post("/api/task/async-apply/{name}", response_model=schemas.TaskSent)
async def async_apply(request: Request, svc: ServiceDep, gate: GateDep, name: str):
    return await send(request, svc, gate, name, "task.apply", known_only=True)


@operator.post("/api/task/send-task/{name}", response_model=schemas.TaskSent)
async def send_task(request: Request, svc: ServiceDep, gate: GateDep, name: str):
    return await send(request, svc, gate, name, "task.send", known_only=False)


@operator.post("/api/task/revoke/{task_id}", response_model=schemas.ActionResult)
async def revoke(request: Request, svc: ServiceDep, gate: GateDep, task_id: str):
    args = await gate.params(request)
    terminate = str(args.get("terminate", "false")).lower() in ("1", "true", "yes")
    signal = args.get("signal", "SIGTERM")
    action = "task.terminate" if terminate else "task.revoke"
    return gate.act(request, action, task_id, {"terminate": terminate, "signal": signal},
                    lambda: svc.control.revoke(task_id, terminate, signal))


@operator.post("/api/task/timeout/{name}", response_model=schemas.ActionResult)
async def time_limit(request: Request, svc: ServiceDep, gate: GateDep, name: str):
    args = await gate.params(request)
    worker = args.get("workername") or missing("workername")
    gate.known_worker(worker)
    soft, hard = gate.number(args, "soft", None, float), gate.number(args, "hard", None, float)
    return gate.act(request, "task.time_limit", name,
                    {"workername": worker, "soft": soft, "hard": hard},
                    lambda: svc.control.time_limit(worker, name, soft, hard))


@operator.post("/api/task/rate-limit/{name}", response_model=schemas.ActionResult)
async def rate_limit(request: Request, svc: ServiceDep, gate: GateDep, name: str):
    args = await gate.params(request)
    worker = args.get("workername") or missing("workername")
    gate.known_worker(worker)
    rate = args.get("ratelimit") or missing("ratelimit")
    return gate.act(request, "task.rate_limit", name, {"workername": worker, "rate": rate},
                    lambda: svc.control.rate_limit(worker, name, rate))


@viewer.get("/api/queues/length", response_model=schemas.QueuesLength)
def queues_length(svc: ServiceDep):
    snap = svc.sampler.poll()
    return {"active_queues": [{"name": q, "messages": m.waiting}
                              for q, m in snap.queues.items()]}


def _when(value: str | None, name: str) -> float | None:
    """Flower's received_start/end: 'YYYY-MM-DD HH:MM' (or epoch seconds)."""
    if not value:
        return None
    from datetime import datetime

    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.strptime(value, "%Y-%m-%d %H:%M").timestamp()
    except ValueError:
        raise Denied(400, f"{name} must be 'YYYY-MM-DD HH:MM' (got {value!r})") from None
