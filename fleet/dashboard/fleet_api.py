"""The fleet's own API under /api/fleet/: what the pages show and the fleet's actions
(jobs, queues, autoscaler bounds), plus /metrics."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from amqp.exceptions import AMQPError
from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from fleet.dashboard.auth import LEVEL
from fleet.dashboard.downsample import DEFAULT_WINDOW, TOP, WindowError, plan
from fleet.dashboard.gate import MAX_INT, Denied, Gate
from fleet.dashboard.rabbitmq import queue_depths
from fleet.dashboard.service import DashboardService
from fleet.dashboard.views import TaskFilter

#: The overview names the gaps of the last day (the newest few; the API has them all).
GAPS_SHOWN = 5
GAPS_RECENT = 86400.0


def fleet_routes(svc: DashboardService, gate: Gate) -> APIRouter:
    routers = gate.routers(tags=["fleet"])

    @routers.viewer.get("/metrics", response_class=PlainTextResponse)
    def metrics(request: Request):
        return Response(generate_latest(svc.registry), media_type=CONTENT_TYPE_LATEST)

    @routers.viewer.get("/api/fleet/me")
    def me(request: Request):
        p = gate.principal(request)
        return {"name": p.name, "role": p.role, "via": p.via,
                "may": [r for r in LEVEL if p.may(r)]}

    @routers.viewer.get("/api/fleet/overview")
    def overview(request: Request):
        snap = svc.sampler.snapshot
        ws = svc.views.workers()
        return {"workers_online": sum(w["status"] == "online" for w in ws),
                "workers_offline": sum(w["status"] != "online" for w in ws),
                "tasks_stored": svc.views.task_count(), "events": svc.ingester.events,
                "events_connected": svc.ingester.connected,
                "events_source": svc.ingester.source,
                "event_gaps": svc.views.gaps(GAPS_SHOWN, since=time.time() - GAPS_RECENT),
                "queues": len(svc.config.queues), "sampled_at": snap.at,
                "broker_error": snap.error}

    @routers.viewer.get("/api/fleet/events/gaps")
    def event_gaps(request: Request, limit: int = Query(100, ge=1, le=1000),
                   since: float | None = None):
        """Stretches of events the dashboard could not recover (Redis restarted empty,
        the stream trimmed past it, a worker's offline buffer full), newest first."""
        return svc.views.gaps(limit, since)

    @routers.viewer.get("/api/fleet/workers")
    def fleet_workers(request: Request, include_offline: bool = True):
        samples = _samples()
        return [{**w, **samples.get(w["hostname"], {})}
                for w in svc.views.workers(include_offline)]

    @routers.viewer.get("/api/fleet/workers/{name}")
    def fleet_worker(request: Request, name: str, refresh: bool = False):
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

    @routers.viewer.get("/api/fleet/queues")
    def fleet_queues(request: Request):
        snap = svc.sampler.poll()
        paused = snap.observation.overrides if snap.observation else {}
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

    @routers.admin.post("/api/fleet/queues/{queue}/pause")
    async def pause(request: Request, queue: str):
        _queue(queue)
        return gate.act(request, "queue.pause", queue, {}, lambda: svc.control.pause(queue, True))

    @routers.admin.post("/api/fleet/queues/{queue}/resume")
    async def resume(request: Request, queue: str):
        _queue(queue)
        return gate.act(request, "queue.resume", queue, {},
                        lambda: svc.control.pause(queue, False))

    @routers.admin.post("/api/fleet/queues/{queue}/bounds")
    async def bounds(request: Request, queue: str):
        _queue(queue)
        args = await gate.params(request)
        lo, hi = gate.number(args, "min_replicas"), gate.number(args, "max_replicas")
        for name, value in (("min_replicas", lo), ("max_replicas", hi)):
            if value is not None and value < 0:
                raise Denied(400, f"{name} must be 0 or more (got {value})")
        return gate.act(request, "autoscaler.bounds", queue,
                        {"min_replicas": lo, "max_replicas": hi},
                        lambda: svc.control.set_bounds(queue, lo, hi))

    def _queue(name: str) -> None:
        if name not in svc.config.queues:
            raise Denied(404, f"Unknown queue '{name}' (known: "
                              f"{', '.join(svc.config.queues)})")

    @routers.viewer.get("/api/fleet/tasks")
    def fleet_tasks(request: Request, state: Annotated[list[str] | None, Query()] = None,
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
        return {"tasks": rows,
                "next": rows[-1]["seq"] if len(rows) == limit else None}

    @routers.viewer.get("/api/fleet/tasks/{task_id}")
    def fleet_task(request: Request, task_id: str):
        task = svc.views.task(task_id)
        if task is None:
            raise Denied(404, f"Unknown task '{task_id}'")
        return task

    @routers.viewer.get("/api/fleet/failures")
    def failures(request: Request):
        return svc.views.failures()

    @routers.viewer.get("/api/fleet/jobs")
    def fleet_jobs(request: Request, limit: int = Query(100, ge=1, le=1000)):
        """Live from Redis, and from the store the jobs whose state Redis has let expire."""
        live = {j["id"]: j for j in svc.sampler.live_jobs(limit)}
        stored = [j for j in svc.views.jobs(limit) if j["id"] not in live]
        rows = [*live.values(), *stored]
        return sorted(rows, key=lambda j: -(j["created"] or 0))[:limit]

    @routers.viewer.get("/api/fleet/jobs/{job_id}")
    def fleet_job(request: Request, job_id: str):
        from fleet.jobs.state import JobStore

        status = JobStore(svc.config).status(job_id)
        failed = JobStore(svc.config).failed_chunks(job_id)
        return {**{k: v for k, v in status.__dict__.items() if k != "extra"},
                "pending": status.pending,
                "failed_chunks": [{"index": c.index, "error": c.error} for c in failed[:200]],
                "tasks": svc.views.job_tasks(job_id, 50)}

    @routers.operator.post("/api/fleet/jobs/{job_id}/retry")
    async def retry_job(request: Request, job_id: str):
        return gate.act(request, "job.retry", job_id, {}, lambda: svc.control.retry_job(job_id))

    @routers.operator.post("/api/fleet/jobs/{job_id}/revoke")
    async def revoke_job(request: Request, job_id: str):
        principal = gate.principal(request)
        return gate.act(request, "job.revoke", job_id, {},
                        lambda: svc.control.revoke_job(job_id, principal.name))

    @routers.viewer.get("/api/fleet/autoscaler")
    def autoscaler(request: Request, queue: str | None = None,
                   limit: int = Query(100, ge=1, le=1000)):
        snap = svc.sampler.poll()
        return {"latest": snap.replicas,
                "overrides": {q: o.__dict__ for q, o in (
                    snap.observation.overrides if snap.observation else {}).items()},
                "decisions": svc.views.decisions(limit, queue)}

    @routers.viewer.get("/api/fleet/broker")
    def broker(request: Request):
        snap = svc.sampler.poll()
        out = {"url": _redact(svc.config.broker.url), "transport": "redis",
               "queues": [{"name": q, "messages": m.waiting, "unacked": m.unacked,
                           "oldest_age": m.oldest_age} for q, m in snap.queues.items()]}
        rabbit = svc.config.dashboard.rabbitmq
        if rabbit is not None:
            try:
                queues, error = queue_depths(rabbit, list(svc.config.queues)), None
            except (OSError, ConnectionError, AMQPError) as exc:
                queues, error = [], f"RabbitMQ unreachable: {exc}"
            out["rabbitmq"] = {"url": _redact(rabbit.url), "queues": queues, "error": error}
        return out

    @routers.viewer.get("/api/fleet/series")
    def series(request: Request, window: Literal["15m", "1h", "24h"] | None = None,
               since: float | None = None, until: float | None = None,
               queue: str | None = None,
               what: Literal["queues", "workers", "all"] = "all",
               top: int = Query(TOP, ge=1, le=50)):
        """Queue depth, throughput, replicas and worker memory over ``window`` (ending
        now) or ``since``..``until`` (default: the last hour), in at most 300 time
        buckets per series, the ``top`` series per plot (``more``: the names not drawn)."""
        try:
            span = plan(time.time(), window, since, until,
                        svc.config.dashboard.sample_interval)
        except WindowError as exc:
            raise Denied(400, str(exc)) from None
        kinds = ("queues", "workers") if what == "all" else (what,)
        named = window or (DEFAULT_WINDOW if since is None else None)
        return {"window": named, **svc.views.series(span, queue, kinds, top)}

    @routers.operator.get("/api/fleet/audit")
    def audit_log(request: Request, limit: int = Query(200, ge=1, le=1000)):
        return svc.views.audit(limit)

    return routers.merged()


def _redact(url: str) -> str:
    """No secrets in pages: the broker URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
