"""Each worker publishes its own figures: what it runs, its CPU and memory (psutil).

The autoscaler reads them (fleet.observe.metrics), and ``fleet probe`` reads this worker's
own entry for Kubernetes liveness. One HSET every ``worker_metrics_interval`` into
one hash for the whole fleet; readers ignore and remove entries older than
``stale_after``, so a dead worker drops out by itself.

Each beat also writes the worker's health to a local file (fleet.health), Redis or
not, for the liveness probe, which must not depend on the broker.

``loop_at`` proves more than the thread being alive: the thread asks the worker's
event loop to stamp it (a kombu Hub ready-callback), so a stuck event loop shows as a
stale ``loop_at`` while ``at`` stays fresh.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict

import psutil
import redis
from celery.worker import state as worker_state

from fleet.cgroup import memory_available
from fleet.config import FleetConfig
from fleet.health import Health, health_path, write_health
from fleet.keys import workers_key
from fleet.observe.model import WorkerSample
from fleet.periodic import Periodic

logger = logging.getLogger("fleet.heartbeat")


def stale_after(config: FleetConfig) -> float:
    """A sample older than this means its worker is gone."""
    return 3 * config.autoscaler.worker_metrics_interval + 5


def held_job_tasks() -> tuple[str, ...]:
    """Job task ids this worker runs or holds (prefetched, ETA): bounded by its
    concurrency x prefetch. The event loop may change the sets while we copy them."""
    for _ in range(3):
        try:
            ids = {r.id for r in worker_state.reserved_requests}
            ids.update(r.id for r in worker_state.active_requests)
            break
        except RuntimeError:
            continue
    else:
        return ()
    return tuple(sorted(i for i in ids if i and i.startswith("job-")))


class Heartbeat:
    """A daemon thread in the worker's main process that publishes a WorkerSample."""

    def __init__(self, worker, config: FleetConfig, queue: str | None, client: redis.Redis):
        self.worker = worker
        self.config = config
        self.queue = queue
        self.client = client
        self.interval = config.autoscaler.worker_metrics_interval
        self.pod = socket.gethostname()
        self.loop_at: float | None = None
        self._procs: dict[int, psutil.Process] = {}
        self._health = health_path(worker.hostname)
        self._broker_ok, self._broker_since = True, time.time()
        # The first report goes out at once: the dashboard maps this worker's task
        # events to its queue from it, and the first task may arrive within a second.
        self._thread = Periodic("fleet-heartbeat", self._beat, self.interval, first_after=0,
                                what="worker metrics", logger=logger)

    def start(self) -> None:
        self._thread.start()

    def _beat(self) -> None:
        try:
            self.publish()
            ok = True
        except redis.RedisError as exc:
            logger.warning("could not publish worker metrics: %s", exc)
            ok = False
        now = time.time()
        if ok != self._broker_ok:
            self._broker_ok, self._broker_since = ok, now
        try:
            write_health(self._health, Health(os.getpid(), self.worker.hostname, now,
                                              self.loop_at, ok, self._broker_since))
        except OSError as exc:
            logger.warning("could not write the health file %s: %s", self._health, exc)

    def _mark_loop(self) -> None:
        self.loop_at = time.time()

    def _cpu_and_rss(self) -> tuple[float, int, int]:
        main = self._procs.setdefault(os.getpid(), psutil.Process())
        cpu = main.cpu_percent(None)
        rss_main = main.memory_info().rss
        rss_children = 0
        seen = {os.getpid()}
        for child in main.children(recursive=True):
            proc = self._procs.setdefault(child.pid, child)
            seen.add(child.pid)
            try:
                cpu += proc.cpu_percent(None)
                rss_children += proc.memory_info().rss
            except psutil.Error:
                pass
        for pid in list(self._procs):
            if pid not in seen:
                del self._procs[pid]
        return cpu, rss_main, rss_children

    def sample(self) -> WorkerSample:
        hub = getattr(self.worker, "hub", None)
        if hub is not None:
            hub.call_soon(self._mark_loop)  # runs on the event loop's next iteration
        cpu, rss_main, rss_children = self._cpu_and_rss()
        active = len(worker_state.active_requests)
        # Celery sets these to the exit code (0 for a warm stop: compare with None and
        # False as celery.worker.state does) when asked to stop; the pool finishes its
        # tasks meanwhile, and the reports go on until the worker_shutdown signal.
        stopping = any(flag is not None and flag is not False for flag in
                       (worker_state.should_stop, worker_state.should_terminate))
        return WorkerSample(
            held=held_job_tasks(),
            hostname=self.worker.hostname, queue=self.queue, pod=self.pod, pid=os.getpid(),
            concurrency=int(self.worker.concurrency or 1), active=active,
            reserved=max(0, len(worker_state.reserved_requests) - active),
            processed=int(worker_state.all_total_count[0]), cpu_percent=round(cpu, 1),
            rss_main=rss_main, rss_children=rss_children,
            memory_available=memory_available(), at=time.time(), loop_at=self.loop_at,
            draining=active if stopping else 0)

    def publish(self) -> WorkerSample:
        sample = self.sample()
        self.client.hset(workers_key(self.config), sample.hostname,
                         json.dumps(asdict(sample)))
        return sample

    def withdraw(self) -> None:
        """Remove this worker's entry (a clean shutdown need not wait for staleness)."""
        self._thread.stop(timeout=0)  # as before: no wait for a beat in progress
        self._health.unlink(missing_ok=True)
        try:
            self.client.hdel(workers_key(self.config), self.worker.hostname)
        except redis.RedisError:
            pass
