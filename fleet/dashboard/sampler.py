"""Fleet state the events do not carry: queue depth and rates, worker CPU/RSS, replicas,
autoscaler decisions and jobs, read from Redis on an interval and kept for plots.

The queue figures come from the autoscaler's own metrics adapter (one pipelined round
trip for every queue, priority sub-lists and prefetched messages counted), so the
dashboard and the autoscaler never disagree on what a queue holds.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass, field

import redis

from fleet.config import FleetConfig
from fleet.dashboard.store import Store
from fleet.errors import UnknownJobError
from fleet.jobs.state import JobStore
from fleet.keys import changes_key, latest_decisions_key
from fleet.observe.metrics import RedisMetrics
from fleet.observe.model import Observation, QueueMetrics
from fleet.observe.rates import RateTracker

logger = logging.getLogger("fleet.dashboard")

JOBS_KEPT = 200


@dataclass
class Snapshot:
    """The newest poll, for live pages and /metrics (no database read needed)."""

    at: float = 0.0
    queues: dict[str, QueueMetrics] = field(default_factory=dict)
    observation: Observation | None = None
    #: Per queue: the autoscaler's newest decision (current, desired, reason, at).
    replicas: dict[str, dict] = field(default_factory=dict)
    error: str | None = None


class Sampler:
    def __init__(self, config: FleetConfig, client: redis.Redis, store: Store,
                 worker_queues: dict[str, str | None] | None = None):
        self.config = config
        self.client = client
        self.store = store
        self.metrics = RedisMetrics(config, client)
        self.tracker = RateTracker(config)
        self.jobs = JobStore(config)
        self.snapshot = Snapshot()
        self._lock = threading.Lock()
        self._last_decision = store.last_decision_at()
        #: Shared with the ingester: which queue each live worker serves.
        self.worker_queues = worker_queues if worker_queues is not None else {}

    def poll(self) -> Snapshot:
        """A fresh look at queues and workers (one round trip), rates from the tracker."""
        with self._lock:
            obs = self.metrics.poll()
            figures = self.tracker.update(obs)
            latest = {_text(k): json.loads(v)
                      for k, v in self.client.hgetall(latest_decisions_key(self.config)).items()}
            self.snapshot = Snapshot(obs.at, figures, obs, latest)
            self.worker_queues.update({w.hostname: w.queue for w in obs.workers})
            return self.snapshot

    def sample(self) -> None:
        snap = self.poll()
        qrows = [{**_queue_row(m), "at": snap.at,
                  "desired": snap.replicas.get(q, {}).get("desired"),
                  "actual": snap.replicas.get(q, {}).get("current")}
                 for q, m in snap.queues.items()]
        wrows = [{"at": snap.at, "hostname": w.hostname, "queue": w.queue,
                  "cpu_percent": w.cpu_percent, "rss": w.rss_main + w.rss_children,
                  "active": w.active, "concurrency": w.concurrency}
                 for w in (snap.observation.workers if snap.observation else [])]
        self.store.add_samples(qrows, wrows)
        self._decisions()
        self._jobs()

    def _decisions(self) -> None:
        """New entries of the autoscaler's change list (newest first in Redis)."""
        raw = self.client.lrange(changes_key(self.config), 0, 199)
        rows = []
        for item in raw:
            d = json.loads(item)
            if d["at"] <= self._last_decision:
                break
            rows.append({"at": d["at"], "queue": d["queue"], "current": d["current"],
                         "desired": d["desired"], "reason": d["reason"],
                         "dry_run": bool(d.get("dry_run"))})
        if rows:
            self.store.add_decisions(rows[::-1])
            self._last_decision = rows[0]["at"]

    def live_jobs(self, limit: int = JOBS_KEPT) -> list[dict]:
        """The newest jobs as the job ledger has them now (one query)."""
        ids = self.jobs.recent_ids(limit)
        try:
            statuses = self.jobs.statuses(ids)
        except UnknownJobError:  # one expired meanwhile: ask one by one
            statuses = []
            for job_id in ids:
                try:
                    statuses.extend(self.jobs.statuses([job_id]))
                except UnknownJobError:
                    continue
        return [{"id": s.id, "task": s.task, "aggregate": s.aggregate, "state": s.state,
                 "total": s.total, "done": s.done, "failed": s.failed, "created": s.created,
                 "finished": s.finished, "result_url": s.result_url, "error": s.error}
                for s in statuses]

    def _jobs(self) -> None:
        self.store.put_jobs(self.live_jobs())

    def run(self, stop: threading.Event) -> None:
        interval = self.config.dashboard.sample_interval
        wait = interval
        while not stop.is_set():
            try:
                self.sample()
                self.snapshot.error = None
                wait = interval
            except redis.RedisError as exc:
                self.snapshot.error = f"Redis unreachable: {exc}"
                wait = min(60.0, wait * 2)
                logger.warning("dashboard: %s; retrying in %.0fs", self.snapshot.error, wait)
            except Exception:
                logger.exception("dashboard: sampling failed")
            stop.wait(wait)


def _queue_row(m: QueueMetrics) -> dict:
    d = asdict(m)
    return {"queue": d["name"], "waiting": d["waiting"], "unacked": d["unacked"],
            "running": d["running"], "oldest_age": d["oldest_age"],
            "arrival_rate": d["arrival_rate"], "completion_rate": d["completion_rate"],
            "service_time": d["service_time"], "workers": d["workers"]}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value

