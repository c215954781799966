"""Reads that join the stored rows (views.py) with what only Redis and the workers know
now: the sampler's newest poll, the inspect cache, the job ledger, the broker. Shaped
here, not in the request handlers, so a handler is its arguments and one call, and these
shapes are built the same way for the pages, the API and a test without HTTP.
"""

from __future__ import annotations

import time
from typing import Any

from amqp.exceptions import AMQPError
from celery import Celery

from fleet.config import FleetConfig
from fleet.dashboard.downsample import DEFAULT_WINDOW, TOP, plan
from fleet.dashboard.ingest import Ingester
from fleet.dashboard.inspect import WorkerInspector
from fleet.dashboard.rabbitmq import queue_depths
from fleet.dashboard.sampler import Sampler
from fleet.dashboard.views import Views

#: The overview names the gaps of the last day (the newest few; the API has them all).
GAPS_SHOWN = 5
GAPS_RECENT = 86400.0
#: A job's page lists its first failed chunks and stored chunk tasks, not thousands.
JOB_CHUNKS_SHOWN = 200
JOB_TASKS_SHOWN = 50
#: /api/task/result?timeout= waits at most this long (a request must not hang a client).
RESULT_WAIT_MAX = 10.0


class LiveViews:
    def __init__(self, config: FleetConfig, app: Celery, views: Views, sampler: Sampler,
                 inspector: WorkerInspector, ingester: Ingester):
        self.config = config
        self.app = app
        self.views = views
        self.sampler = sampler
        self.inspector = inspector
        self.ingester = ingester

    # -- the fleet's own shapes ----------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        snap = self.sampler.snapshot
        ws = self.views.workers()
        return {"workers_online": sum(w["status"] == "online" for w in ws),
                "workers_offline": sum(w["status"] != "online" for w in ws),
                "tasks_stored": self.views.task_count(), "events": self.ingester.events,
                "events_connected": self.ingester.connected,
                "events_source": self.ingester.source,
                "event_gaps": self.views.gaps(GAPS_SHOWN, since=time.time() - GAPS_RECENT),
                "queues": len(self.config.queues), "sampled_at": snap.at,
                "broker_error": snap.error}

    def samples(self) -> dict[str, dict[str, Any]]:
        """Each live worker's newest sample (what its heartbeat hash in Redis says)."""
        obs = self.sampler.snapshot.observation
        return {w.hostname: {"queue": w.queue, "concurrency": w.concurrency,
                             "cpu_percent": w.cpu_percent,
                             "rss": w.rss_main + w.rss_children,
                             "memory_available": w.memory_available,
                             "reserved": w.reserved, "pod": w.pod}
                for w in (obs.workers if obs else [])}

    def workers(self, include_offline: bool = True) -> list[dict[str, Any]]:
        samples = self.samples()
        return [{**w, **samples.get(w["hostname"], {})}
                for w in self.views.workers(include_offline)]

    def worker(self, name: str, refresh: bool = False) -> dict[str, Any] | None:
        """A stored worker with its sample and inspect replies (asked now when
        ``refresh``, or when an online worker has not answered yet); None if unknown."""
        stored = self.views.worker(name)
        if stored is None:
            return None
        info = self.inspector.refresh(name) if refresh else self.inspector.cached(name)
        if name not in info and stored["status"] == "online":
            info = self.inspector.refresh(name)
        return {**stored, **self.samples().get(name, {}), "inspect": info.get(name, {})}

    def queues(self) -> list[dict[str, Any]]:
        """Every queue's figures now, the autoscaler's newest decision and the bounds in
        force (an operator's override, else queues.yaml's)."""
        snap = self.sampler.poll()
        paused = snap.observation.overrides if snap.observation else {}
        out = []
        for name, m in snap.queues.items():
            q = self.config.queues[name]
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

    def jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        """Live from Redis, and from the store the jobs whose state Redis has let expire."""
        live = {j["id"]: j for j in self.sampler.live_jobs(limit)}
        stored = [j for j in self.views.jobs(limit) if j["id"] not in live]
        rows = [*live.values(), *stored]
        return sorted(rows, key=lambda j: -(j["created"] or 0))[:limit]

    def job(self, job_id: str) -> dict[str, Any]:
        """The ledger's status (UnknownJobError when it has none), failed chunks, tasks."""
        from fleet.jobs.state import JobStore

        ledger = JobStore(self.config)
        status = ledger.status(job_id)
        failed = ledger.failed_chunks(job_id)
        return {**{k: v for k, v in status.__dict__.items() if k != "extra"},
                "pending": status.pending,
                "failed_chunks": [{"index": c.index, "error": c.error}
                                  for c in failed[:JOB_CHUNKS_SHOWN]],
                "tasks": self.views.job_tasks(job_id, JOB_TASKS_SHOWN)}

    def autoscaler(self, queue: str | None = None, limit: int = 100) -> dict[str, Any]:
        snap = self.sampler.poll()
        return {"latest": snap.replicas,
                "overrides": {q: o.__dict__ for q, o in (
                    snap.observation.overrides if snap.observation else {}).items()},
                "decisions": self.views.decisions(limit, queue)}

    def broker(self) -> dict[str, Any]:
        """The broker's queues (and RabbitMQ's, when dashboard.rabbitmq names one); URLs
        without their passwords."""
        snap = self.sampler.poll()
        out: dict[str, Any] = {
            "url": redact(self.config.broker.url), "transport": "redis",
            "queues": [{"name": q, "messages": m.waiting, "unacked": m.unacked,
                        "oldest_age": m.oldest_age} for q, m in snap.queues.items()]}
        rabbit = self.config.dashboard.rabbitmq
        if rabbit is not None:
            try:
                queues, error = queue_depths(rabbit, list(self.config.queues)), None
            except (OSError, ConnectionError, AMQPError) as exc:
                queues, error = [], f"RabbitMQ unreachable: {exc}"
            out["rabbitmq"] = {"url": redact(rabbit.url), "queues": queues, "error": error}
        return out

    def plots(self, window: str | None = None, since: float | None = None,
              until: float | None = None, queue: str | None = None, what: str = "all",
              top: int = TOP) -> dict[str, Any]:
        """Series over ``window`` (ending now) or ``since``..``until`` (default: the last
        hour); WindowError when that cannot be plotted."""
        span = plan(time.time(), window, since, until, self.config.dashboard.sample_interval)
        kinds = ("queues", "workers") if what == "all" else (what,)
        named = window or (DEFAULT_WINDOW if since is None else None)
        return {"window": named, **self.views.series(span, queue, kinds, top)}

    # -- Flower's shapes -------------------------------------------------------------------

    def inspect_replies(self, refresh: bool = False, workername: str | None = None,
                        status: bool = False) -> dict[str, Any]:
        """Flower's ListWorkers: the inspect cache per worker (stats, active_queues,
        registered, conf, timestamp; the task lists once the worker was refreshed on its
        own), or with ``status`` every stored worker's liveness (``workername`` aside)."""
        stored = {w["hostname"]: w for w in self.views.workers()}
        self.inspector.forget(set(stored))
        if refresh:
            self.inspector.refresh(workername)
        if status:
            return {h: w["status"] == "online" for h, w in stored.items()}
        info = self.inspector.cached(workername)
        if not refresh and not info and (workername in stored or not workername):
            # Nothing asked yet: what Flower's own inspection at its start would have
            info = self.inspector.refresh(workername, tasks=False)
        return info

    def task_result(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Flower's /api/task/result: the state, and the result once ready (waiting up to
        ``timeout``, at most RESULT_WAIT_MAX); a failure's exception as its repr."""
        result = self.app.AsyncResult(task_id)
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


def redact(url: str) -> str:
    """No secrets in pages: a URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
