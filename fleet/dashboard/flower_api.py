"""Flower's API paths, with Flower's response shapes, so scripts written for Flower keep
working (tests/integration/test_dashboard_flower_compat.py runs the same calls against both)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse

from fleet.dashboard.gate import MAX_INT, Denied, Gate, missing
from fleet.dashboard.service import DashboardService
from fleet.dashboard.views import TaskFilter, flower_task
from fleet.errors import JobInputError
from fleet.jobs.submit import registered_task

#: /api/task/result?timeout= waits at most this long (a request must not hang a client).
RESULT_WAIT_MAX = 10.0


def flower_routes(svc: DashboardService, gate: Gate) -> APIRouter:
    routers = gate.routers(tags=["flower"])

    @routers.viewer.get("/api/workers")
    def workers(request: Request, refresh: bool = False, workername: str | None = None,
                status: bool = False):
        """Flower's ListWorkers: the inspect cache per worker (stats, active_queues,
        registered, conf, timestamp; the task lists once the worker was refreshed on its
        own), or with ``status`` every stored worker's liveness (``workername`` aside)."""
        stored = {w["hostname"]: w for w in svc.views.workers()}
        svc.inspector.forget(set(stored))
        if refresh:
            svc.inspector.refresh(workername)
        if status:
            return {h: w["status"] == "online" for h, w in stored.items()}
        info = svc.inspector.cached(workername)
        if not refresh and not info and (workername in stored or not workername):
            # Nothing asked yet: what Flower's own inspection at its start would have
            info = svc.inspector.refresh(workername, tasks=False)
        if workername and workername not in info:
            raise Denied(404, f"Unknown worker '{workername}'")
        return info

    @routers.viewer.get("/workers", response_model=None)
    def workers_page(request: Request, as_json: bool = Query(False, alias="json"),
                     refresh: bool = False):
        """Flower's WorkersView: with ``json`` its ``{"data": [...]}`` (counts of events
        by type, the worker's fields, ``status``); without, the dashboard's workers page."""
        if refresh:
            svc.inspector.refresh_soon()
        if not as_json:
            return RedirectResponse(f"{request.scope.get('root_path', '')}/#/workers",
                                    status_code=303)
        return {"data": svc.views.flower_workers()}

    # Flower's worker controls: (path, role, arguments, call). One handler shape for all:
    # role and CSRF, Flower-style arguments, a known worker, the audited call.
    def n_arg(args: dict) -> dict:
        return {"n": gate.number(args, "n", 1)}

    def bounds_arg(args: dict) -> dict:
        return {"min": gate.number(args, "min", 0), "max": gate.number(args, "max", 0)}

    def queue_arg(args: dict) -> dict:
        return {"queue": args.get("queue") or missing("queue")}

    c = svc.control
    worker_actions = [
        ("shutdown", "admin", None, lambda w, a: c.shutdown(w)),
        ("pool/restart", "operator", None, lambda w, a: c.pool_restart(w)),
        ("pool/grow", "operator", n_arg, lambda w, a: c.pool_grow(w, a["n"])),
        ("pool/shrink", "operator", n_arg, lambda w, a: c.pool_shrink(w, a["n"])),
        ("pool/autoscale", "operator", bounds_arg,
         lambda w, a: c.pool_autoscale(w, a["min"], a["max"])),
        ("queue/add-consumer", "operator", queue_arg, lambda w, a: c.add_consumer(w, a["queue"])),
        ("queue/cancel-consumer", "operator", queue_arg,
         lambda w, a: c.cancel_consumer(w, a["queue"])),
    ]

    def worker_route(path: str, role: str, parse, call) -> None:
        action = "worker." + path.removeprefix("queue/").replace("/", "_").replace("-", "_")

        async def handler(request: Request, name: str):
            args = parse(await gate.params(request)) if parse else {}
            gate.known_worker(name)
            return gate.act(request, action, name, args, lambda: call(name, args))

        routers[role].post(f"/api/worker/{path}/{{name}}", name=action,
                           operation_id=action.replace(".", "_"))(handler)

    for path, role, parse, call in worker_actions:
        worker_route(path, role, parse, call)

    @routers.viewer.get("/api/tasks")
    def flower_tasks(request: Request, limit: int | None = Query(None, ge=1, le=MAX_INT),
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

    @routers.viewer.get("/api/task/types")
    def task_types(request: Request):
        return {"task-types": svc.views.task_names()}

    @routers.viewer.get("/api/task/info/{task_id}")
    def task_info(request: Request, task_id: str):
        task = svc.views.task(task_id)
        if task is None:
            raise Denied(404, f"Unknown task '{task_id}'")
        return flower_task(task)

    @routers.viewer.get("/api/task/result/{task_id}")
    def task_result(request: Request, task_id: str, timeout: float | None = None):
        result = svc.app.AsyncResult(task_id)
        if timeout:
            try:
                result.get(timeout=min(timeout, RESULT_WAIT_MAX), propagate=False)
            except Exception:
                pass  # Flower answers with the state it has
        body: dict[str, Any] = {"task-id": task_id, "state": result.state}
        if result.ready():
            value = result.result
            body["result"] = repr(value) if isinstance(value, BaseException) else value
            if result.state == "FAILURE":
                body["traceback"] = result.traceback
        return body

    async def send(request: Request, name: str, action: str, known_only: bool) -> dict:
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

    @routers.operator.post("/api/task/async-apply/{name}")
    async def async_apply(request: Request, name: str):
        return await send(request, name, "task.apply", known_only=True)

    @routers.operator.post("/api/task/send-task/{name}")
    async def send_task(request: Request, name: str):
        return await send(request, name, "task.send", known_only=False)

    @routers.operator.post("/api/task/revoke/{task_id}")
    async def revoke(request: Request, task_id: str):
        args = await gate.params(request)
        terminate = str(args.get("terminate", "false")).lower() in ("1", "true", "yes")
        signal = args.get("signal", "SIGTERM")
        action = "task.terminate" if terminate else "task.revoke"
        return gate.act(request, action, task_id, {"terminate": terminate, "signal": signal},
                        lambda: svc.control.revoke(task_id, terminate, signal))

    @routers.operator.post("/api/task/timeout/{name}")
    async def time_limit(request: Request, name: str):
        args = await gate.params(request)
        worker = args.get("workername") or missing("workername")
        gate.known_worker(worker)
        soft, hard = gate.number(args, "soft", None, float), gate.number(args, "hard", None, float)
        return gate.act(request, "task.time_limit", name,
                        {"workername": worker, "soft": soft, "hard": hard},
                        lambda: svc.control.time_limit(worker, name, soft, hard))

    @routers.operator.post("/api/task/rate-limit/{name}")
    async def rate_limit(request: Request, name: str):
        args = await gate.params(request)
        worker = args.get("workername") or missing("workername")
        gate.known_worker(worker)
        rate = args.get("ratelimit") or missing("ratelimit")
        return gate.act(request, "task.rate_limit", name, {"workername": worker, "rate": rate},
                        lambda: svc.control.rate_limit(worker, name, rate))

    @routers.viewer.get("/api/queues/length")
    def queues_length(request: Request):
        snap = svc.sampler.poll()
        return {"active_queues": [{"name": q, "messages": m.waiting}
                                  for q, m in snap.queues.items()]}

    return routers.merged()


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
