"""HTTP: the pages, Flower's API paths (unchanged shapes), fleet's own API, /metrics.

FastAPI (on Starlette) because it turns the routes into an OpenAPI spec for free and
runs on uvicorn; request handlers stay thin: parse, check the role, call the service
(views for reads, control for actions), record the action, shape the answer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl

import redis
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from fleet.dashboard.auth import LEVEL, SESSION_COOKIE, SESSION_MAX_AGE, Principal
from fleet.dashboard.control import ControlError
from fleet.dashboard.service import DashboardService
from fleet.dashboard.views import TaskFilter, flower_task
from fleet.errors import FleetError, JobInputError, UnknownJobError
from fleet.jobs.submit import registered_task

STATIC = Path(__file__).parent / "static"
#: Integers the database (SQLite: 64-bit) can take, and what a control argument may be.
MAX_INT = 2**62
MAX_NUMBER = 10**6
#: /api/task/result?timeout= waits at most this long (a request must not hang a client).
RESULT_WAIT_MAX = 10.0


class Denied(Exception):
    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message


def create_api(svc: DashboardService) -> FastAPI:
    api = FastAPI(title="fleet dashboard", version="1",
                  description="Flower's API paths and shapes, plus the fleet's own "
                              "(/api/fleet/...). Errors are JSON: {\"error\": message}.")
    api.state.svc = svc
    auth = svc.auth

    # -- errors: JSON with a clear message and the right status ----------------------

    @api.exception_handler(Denied)
    async def _denied(_request: Request, exc: Denied):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

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

    # -- who is asking ----------------------------------------------------------------

    def who(request: Request, role: str = "viewer") -> Principal:
        principal = auth.from_headers(request.headers.get("authorization"),
                                      request.cookies.get(SESSION_COOKIE))
        if principal is None:
            raise Denied(401, "authentication required: sign in, or send "
                              "Authorization: Basic or Bearer")
        if not principal.may(role):
            raise Denied(403, f"{principal.name} is {principal.role}; this needs {role}")
        return principal

    def acting(request: Request, role: str) -> Principal:
        """A state-changing request: the role, and CSRF checks for browsers."""
        principal = who(request, role)
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

    async def params(request: Request) -> dict[str, Any]:
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

    def number(args: dict, name: str, default: int | None = None,
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

    def act(principal: Principal, action: str, target: str, args: dict, call) -> dict:
        try:
            message = call()
        except (ControlError, FleetError) as exc:
            svc.store.record_action(user=principal.name, role=principal.role, action=action,
                                    target=target, params=args, outcome=str(exc), ok=False)
            raise
        svc.store.record_action(user=principal.name, role=principal.role, action=action,
                                target=target, params=args, outcome=message, ok=True)
        return {"message": message}

    def known_worker(name: str) -> None:
        if svc.views.worker(name) is None and name not in svc.inspector.cached():
            raise Denied(404, f"Unknown worker '{name}'")

    # -- pages ------------------------------------------------------------------------

    api.mount("/static", StaticFiles(directory=STATIC), name="static")

    @api.get("/", include_in_schema=False)
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

    @api.get("/login", include_in_schema=False)
    async def login_page(request: Request, error: str | None = None):
        page = (STATIC / "login.html").read_text()
        base = request.scope.get("root_path", "")
        oidc = (f'<p><a id="oidc" href="{base}/login/oidc">Sign in with single sign-on</a></p>'
                if auth.oidc else "")
        note = '<p class="error">Wrong user name or password.</p>' if error else ""
        return HTMLResponse(page.replace("{{BASE}}", base).replace("{{OIDC}}", oidc)
                            .replace("{{ERROR}}", note))

    @api.post("/login", include_in_schema=False)
    async def login(request: Request):
        form = dict(parse_qsl((await request.body()).decode(errors="replace")))
        base = request.scope.get("root_path", "")
        principal = auth.check_password(form.get("username", ""), form.get("password", ""))
        if principal is None:
            return RedirectResponse(f"{base}/login?error=1", status_code=303)
        return _signed_in(base, principal.name, principal.role)

    def _signed_in(base: str, name: str, role: str) -> Response:
        response = RedirectResponse(f"{base}/", status_code=303)
        response.set_cookie(SESSION_COOKIE, auth.session(name, role), max_age=SESSION_MAX_AGE,
                            httponly=True, samesite="strict", path=base or "/")
        return response

    @api.get("/logout", include_in_schema=False)
    async def logout(request: Request):
        base = request.scope.get("root_path", "")
        response = RedirectResponse(f"{base}/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=base or "/")
        return response

    if auth.oidc:
        from fleet.dashboard.oidc import add_oidc_routes

        add_oidc_routes(api, auth, _signed_in)

    @api.get("/healthcheck", response_class=PlainTextResponse, tags=["flower"])
    async def healthcheck():
        return "OK"

    @api.get("/metrics", tags=["fleet"], response_class=PlainTextResponse)
    def metrics(request: Request):
        who(request)
        return Response(generate_latest(svc.registry), media_type=CONTENT_TYPE_LATEST)

    # -- Flower's API -----------------------------------------------------------------

    @api.get("/api/workers", tags=["flower"])
    def workers(request: Request, refresh: bool = False, workername: str | None = None,
                status: bool = False):
        who(request)
        stored = {w["hostname"]: w for w in svc.views.workers()}
        svc.inspector.forget(set(stored))
        if status:
            return {h: w["status"] == "online" for h, w in stored.items()
                    if not workername or h == workername}
        if refresh or not svc.inspector.cached():
            info = svc.inspector.refresh(workername)
        else:
            info = svc.inspector.cached(workername)
        if workername and workername not in info and workername not in stored:
            raise Denied(404, f"Unknown worker '{workername}'")
        return info

    # Flower's worker controls: (path, role, arguments, call). One handler shape for all:
    # role and CSRF, Flower-style arguments, a known worker, the audited call.
    def n_arg(args: dict) -> dict:
        return {"n": number(args, "n", 1)}

    def bounds_arg(args: dict) -> dict:
        return {"min": number(args, "min", 0), "max": number(args, "max", 0)}

    def queue_arg(args: dict) -> dict:
        return {"queue": args.get("queue") or _missing("queue")}

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
            principal = acting(request, role)
            args = parse(await params(request)) if parse else {}
            known_worker(name)
            return act(principal, action, name, args, lambda: call(name, args))

        api.post(f"/api/worker/{path}/{{name}}", tags=["flower"], name=action,
                 operation_id=action.replace(".", "_"))(handler)

    for path, role, parse, call in worker_actions:
        worker_route(path, role, parse, call)

    @api.get("/api/tasks", tags=["flower"])
    def flower_tasks(request: Request, limit: int | None = Query(None, ge=1, le=MAX_INT),
                     offset: int = Query(0, ge=0, le=MAX_INT), sort_by: str | None = None,
                     workername: str | None = None, taskname: str | None = None,
                     state: str | None = None, received_start: str | None = None,
                     received_end: str | None = None, search: str | None = None):
        who(request)
        f = TaskFilter(states=tuple(state.split(",")) if state else (), name=taskname,
                       worker=workername, search=search,
                       received_from=_when(received_start, "received_start"),
                       received_to=_when(received_end, "received_end"))
        rows = svc.views.tasks(f, limit=limit or 500, offset=offset,
                               oldest_first=sort_by in ("received", "started"))
        return {t["uuid"]: flower_task(t) for t in rows}

    @api.get("/api/task/types", tags=["flower"])
    def task_types(request: Request):
        who(request)
        return {"task-types": svc.views.task_names()}

    @api.get("/api/task/info/{task_id}", tags=["flower"])
    def task_info(request: Request, task_id: str):
        who(request)
        task = svc.views.task(task_id)
        if task is None:
            raise Denied(404, f"Unknown task '{task_id}'")
        return flower_task(task)

    @api.get("/api/task/result/{task_id}", tags=["flower"])
    def task_result(request: Request, task_id: str, timeout: float | None = None):
        who(request)
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

    @api.post("/api/task/async-apply/{name}", tags=["flower"])
    async def async_apply(request: Request, name: str):
        principal = acting(request, "operator")
        body = await params(request)
        try:
            registered_task(svc.app, name)
        except JobInputError as exc:
            raise Denied(404, f"Unknown task '{name}' ({exc})") from None
        args, kwargs = body.get("args", []), body.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise Denied(400, "args must be a list and kwargs an object")
        options = {k: v for k, v in (body.get("options") or {}).items()
                   if k in ("countdown", "queue", "priority", "expires")}
        holder: dict = {}

        def send() -> str:
            holder["r"] = svc.app.send_task(name, args=args, kwargs=kwargs, **options)
            return f"sent {name} as {holder['r'].id}"

        act(principal, "task.apply", name, {"args": args, "kwargs": kwargs}, send)
        return {"task-id": holder["r"].id, "state": "PENDING"}

    @api.post("/api/task/send-task/{name}", tags=["flower"])
    async def send_task(request: Request, name: str):
        principal = acting(request, "operator")
        body = await params(request)
        args, kwargs = body.get("args", []), body.get("kwargs", {})
        holder: dict = {}

        def send() -> str:
            holder["r"] = svc.app.send_task(name, args=args, kwargs=kwargs)
            return f"sent {name} as {holder['r'].id}"

        act(principal, "task.send", name, {"args": args, "kwargs": kwargs}, send)
        return {"task-id": holder["r"].id, "state": "PENDING"}

    @api.post("/api/task/revoke/{task_id}", tags=["flower"])
    async def revoke(request: Request, task_id: str):
        principal = acting(request, "operator")
        args = await params(request)
        terminate = str(args.get("terminate", "false")).lower() in ("1", "true", "yes")
        signal = args.get("signal", "SIGTERM")
        return act(principal, "task.terminate" if terminate else "task.revoke", task_id,
                   {"terminate": terminate, "signal": signal},
                   lambda: svc.control.revoke(task_id, terminate, signal))

    @api.post("/api/task/timeout/{name}", tags=["flower"])
    async def time_limit(request: Request, name: str):
        principal = acting(request, "operator")
        args = await params(request)
        worker = args.get("workername") or _missing("workername")
        known_worker(worker)
        soft, hard = number(args, "soft", None, float), number(args, "hard", None, float)
        return act(principal, "task.time_limit", name,
                   {"workername": worker, "soft": soft, "hard": hard},
                   lambda: svc.control.time_limit(worker, name, soft, hard))

    @api.post("/api/task/rate-limit/{name}", tags=["flower"])
    async def rate_limit(request: Request, name: str):
        principal = acting(request, "operator")
        args = await params(request)
        worker = args.get("workername") or _missing("workername")
        known_worker(worker)
        rate = args.get("ratelimit") or _missing("ratelimit")
        return act(principal, "task.rate_limit", name, {"workername": worker, "rate": rate},
                   lambda: svc.control.rate_limit(worker, name, rate))

    @api.get("/api/queues/length", tags=["flower"])
    def queues_length(request: Request):
        who(request)
        snap = svc.sampler.poll()
        return {"active_queues": [{"name": q, "messages": m.waiting}
                                  for q, m in snap.queues.items()]}

    # -- fleet's own ------------------------------------------------------------------

    @api.get("/api/fleet/me", tags=["fleet"])
    def me(request: Request):
        p = who(request)
        return {"name": p.name, "role": p.role, "via": p.via,
                "may": [r for r in LEVEL if p.may(r)]}

    @api.get("/api/fleet/overview", tags=["fleet"])
    def overview(request: Request):
        who(request)
        snap = svc.sampler.snapshot
        ws = svc.views.workers()
        return {"workers_online": sum(w["status"] == "online" for w in ws),
                "workers_offline": sum(w["status"] != "online" for w in ws),
                "tasks_stored": svc.views.task_count(), "events": svc.ingester.events,
                "events_connected": svc.ingester.connected,
                "queues": len(svc.config.queues), "sampled_at": snap.at,
                "broker_error": snap.error}

    @api.get("/api/fleet/workers", tags=["fleet"])
    def fleet_workers(request: Request, include_offline: bool = True):
        who(request)
        samples = _samples()
        return [{**w, **samples.get(w["hostname"], {})}
                for w in svc.views.workers(include_offline)]

    @api.get("/api/fleet/workers/{name}", tags=["fleet"])
    def fleet_worker(request: Request, name: str, refresh: bool = False):
        who(request)
        stored = svc.views.worker(name)
        if stored is None:
            raise Denied(404, f"Unknown worker '{name}'")
        info = (svc.inspector.refresh(name) if refresh else svc.inspector.cached(name))
        if name not in info and stored["status"] == "online":
            info = svc.inspector.refresh(name)
        return {**stored, **_samples().get(name, {}), "inspect": info.get(name, {})}

    def _samples() -> dict[str, dict]:
        obs = svc.sampler.snapshot.observation
        return {w.hostname: {"queue": w.queue, "concurrency": w.concurrency,
                             "cpu_percent": w.cpu_percent,
                             "rss": w.rss_main + w.rss_children,
                             "memory_available": w.memory_available,
                             "reserved": w.reserved, "pod": w.pod}
                for w in (obs.workers if obs else [])}

    @api.get("/api/fleet/queues", tags=["fleet"])
    def fleet_queues(request: Request):
        who(request)
        snap = svc.sampler.poll()
        paused = svc.control.paused()
        out = []
        for name, m in snap.queues.items():
            q = svc.config.queues[name]
            d = snap.replicas.get(name, {})
            o = paused.get(name)
            out.append({"name": name, "waiting": m.waiting, "reserved": m.unacked,
                        "running": m.running, "oldest_age": m.oldest_age,
                        "arrival_rate": m.arrival_rate, "completion_rate": m.completion_rate,
                        "service_time": m.service_time, "workers": m.workers,
                        "slots": m.slots, "replicas_desired": d.get("desired"),
                        "replicas_actual": d.get("current"), "reason": d.get("reason"),
                        "paused": bool(o and o.paused),
                        "min_replicas": (o.min_replicas if o and o.min_replicas is not None
                                         else q.autoscaling.min_replicas),
                        "max_replicas": (o.max_replicas if o and o.max_replicas is not None
                                         else q.autoscaling.max_replicas),
                        "pool": q.pool, "concurrency": q.concurrency,
                        "memory_limit": q.memory_limit})
        return out

    @api.post("/api/fleet/queues/{queue}/pause", tags=["fleet"])
    async def pause(request: Request, queue: str):
        principal = acting(request, "admin")
        _queue(queue)
        return act(principal, "queue.pause", queue, {}, lambda: svc.control.pause(queue, True))

    @api.post("/api/fleet/queues/{queue}/resume", tags=["fleet"])
    async def resume(request: Request, queue: str):
        principal = acting(request, "admin")
        _queue(queue)
        return act(principal, "queue.resume", queue, {},
                   lambda: svc.control.pause(queue, False))

    @api.post("/api/fleet/queues/{queue}/bounds", tags=["fleet"])
    async def bounds(request: Request, queue: str):
        principal = acting(request, "admin")
        _queue(queue)
        args = await params(request)
        lo, hi = number(args, "min_replicas"), number(args, "max_replicas")
        for name, value in (("min_replicas", lo), ("max_replicas", hi)):
            if value is not None and value < 0:
                raise Denied(400, f"{name} must be 0 or more (got {value})")
        return act(principal, "autoscaler.bounds", queue,
                   {"min_replicas": lo, "max_replicas": hi},
                   lambda: svc.control.set_bounds(queue, lo, hi))

    def _queue(name: str) -> None:
        if name not in svc.config.queues:
            raise Denied(404, f"Unknown queue '{name}' (known: "
                              f"{', '.join(svc.config.queues)})")

    @api.get("/api/fleet/tasks", tags=["fleet"])
    def fleet_tasks(request: Request, state: Annotated[list[str] | None, Query()] = None,
                    name: str | None = None, worker: str | None = None,
                    queue: str | None = None, since: float | None = None,
                    until: float | None = None, search: str | None = None,
                    memory_kill: bool | None = None,
                    before: int | None = Query(None, ge=0, le=MAX_INT),
                    limit: int = Query(50, ge=1, le=500)):
        who(request)
        states = tuple(s for part in state or () for s in part.split(",") if s)
        f = TaskFilter(states=states, name=name, worker=worker, queue=queue,
                       received_from=since, received_to=until, search=search,
                       memory_kill=memory_kill)
        rows = svc.views.tasks(f, limit=limit, before=before)
        return {"tasks": rows,
                "next": rows[-1]["seq"] if len(rows) == limit else None}

    @api.get("/api/fleet/tasks/{task_id}", tags=["fleet"])
    def fleet_task(request: Request, task_id: str):
        who(request)
        task = svc.views.task(task_id)
        if task is None:
            raise Denied(404, f"Unknown task '{task_id}'")
        return task

    @api.get("/api/fleet/failures", tags=["fleet"])
    def failures(request: Request):
        who(request)
        return svc.views.failures()

    @api.get("/api/fleet/jobs", tags=["fleet"])
    def fleet_jobs(request: Request, limit: int = Query(100, ge=1, le=1000)):
        """Live from Redis, and from the store the jobs whose state Redis has let expire."""
        who(request)
        live = {j["id"]: j for j in svc.sampler.live_jobs(limit)}
        stored = [j for j in svc.views.jobs(limit) if j["id"] not in live]
        rows = [*live.values(), *stored]
        return sorted(rows, key=lambda j: -(j["created"] or 0))[:limit]

    @api.get("/api/fleet/jobs/{job_id}", tags=["fleet"])
    def fleet_job(request: Request, job_id: str):
        who(request)
        from fleet.jobs.state import JobStore

        status = JobStore(svc.config).status(job_id)
        failed = JobStore(svc.config).failed_chunks(job_id)
        return {**{k: v for k, v in status.__dict__.items() if k != "extra"},
                "pending": status.pending,
                "failed_chunks": [{"index": c.index, "error": c.error} for c in failed[:200]],
                "tasks": svc.views.job_tasks(job_id, 50)}

    @api.post("/api/fleet/jobs/{job_id}/retry", tags=["fleet"])
    async def retry_job(request: Request, job_id: str):
        principal = acting(request, "operator")
        return act(principal, "job.retry", job_id, {}, lambda: svc.control.retry_job(job_id))

    @api.post("/api/fleet/jobs/{job_id}/revoke", tags=["fleet"])
    async def revoke_job(request: Request, job_id: str):
        principal = acting(request, "operator")
        return act(principal, "job.revoke", job_id, {},
                   lambda: svc.control.revoke_job(job_id, principal.name))

    @api.get("/api/fleet/autoscaler", tags=["fleet"])
    def autoscaler(request: Request, queue: str | None = None,
                   limit: int = Query(100, ge=1, le=1000)):
        who(request)
        snap = svc.sampler.snapshot
        return {"latest": snap.replicas,
                "overrides": {q: o.__dict__ for q, o in svc.control.paused().items()},
                "decisions": svc.views.decisions(limit, queue)}

    @api.get("/api/fleet/broker", tags=["fleet"])
    def broker(request: Request):
        who(request)
        snap = svc.sampler.poll()
        return {"url": _redact(svc.config.broker.url), "transport": "redis",
                "queues": [{"name": q, "messages": m.waiting, "unacked": m.unacked,
                            "oldest_age": m.oldest_age} for q, m in snap.queues.items()]}

    @api.get("/api/fleet/series", tags=["fleet"])
    def series(request: Request, since: float | None = None, queue: str | None = None,
               what: Literal["queues", "workers", "all"] = "all"):
        who(request)
        kinds = ("queues", "workers") if what == "all" else (what,)
        return svc.views.series(since if since is not None else time.time() - 3600, queue,
                                kinds)

    @api.get("/api/fleet/audit", tags=["fleet"])
    def audit_log(request: Request, limit: int = Query(200, ge=1, le=1000)):
        who(request, "operator")
        return svc.views.audit(limit)

    return api


def _missing(name: str):
    raise Denied(400, f"missing argument '{name}'")


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


def _redact(url: str) -> str:
    """No secrets in pages: the broker URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
