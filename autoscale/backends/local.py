"""The local backend: ``fleet worker`` processes on this machine, supervised.

Scale-up starts processes; scale-down stops idle workers first, warm (SIGTERM: Celery
stops taking messages, running tasks finish, prefetched ones go back to the queue) and
SIGKILLs the process group only after the queue's grace period (its hard time limit
and soft shutdown timeout, plus a margin). A worker that exits without being asked
is restarted.

Every worker is told who supervises it (fleet.watchdog: pid, create time, its queue's
grace period, in its environment), so a SIGKILLed supervisor's workers stop warm by
themselves; with a registry (fleet.registry) each start and exit is recorded in the
workdir, so the next supervisor there can find and stop what a killed one left.
"""

from __future__ import annotations

import itertools
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from autoscale.backends.base import BackendContext, BackendError, BackendPlugin
from fleet.config import FleetConfig
from fleet.observe.model import WorkerSample
from fleet.processes import WorkerProcess, stop_all
from fleet.registry import ProcessRecord, Registry
from fleet.watchdog import ENV_SUPERVISOR, SupervisorRef

logger = logging.getLogger("autoscale.local")

#: Grace for a queue without a hard time limit.
DEFAULT_GRACE = 300.0


def grace_period(config: FleetConfig, queue: str) -> float:
    """How long a warm shutdown of ``queue``'s worker may take before SIGKILL."""
    q = config.queues[queue]
    return (q.time_limit.hard or DEFAULT_GRACE) + q.soft_shutdown_timeout + 10.0


@dataclass
class _Draining:
    worker: WorkerProcess
    deadline: float


class LocalBackend:
    name = "local"

    def __init__(self, config: FleetConfig, config_path: str, env: dict[str, str],
                 logdir: Path, node: str | None = None, *,
                 supervisor: SupervisorRef | None = None, registry: Registry | None = None):
        self.config = config
        self.config_path = config_path
        self.env = env
        self.logdir = logdir
        self.node = node or socket.gethostname()
        #: Whoever drives this backend supervises its workers: by default this process.
        self.supervisor = supervisor or SupervisorRef.of_this_process()
        self.registry = registry
        self.running: dict[str, list[WorkerProcess]] = {q: [] for q in config.queues}
        self.draining: list[_Draining] = []
        self.restarts = 0
        self.closed = False
        self._seq = itertools.count(1)
        # The loop thread scales and reaps while the main thread may be closing.
        self._lock = threading.RLock()

    def grace(self, queue: str) -> float:
        return grace_period(self.config, queue)

    def _start(self, queue: str) -> WorkerProcess:
        if self.closed:
            raise BackendError("the local backend is closed: no worker is started")
        name = f"{queue}-{next(self._seq)}@{self.node}"
        log = self.logdir / f"{name.replace('@', '_')}.log"
        ref = replace(self.supervisor, grace=self.grace(queue))
        worker = WorkerProcess(queue, self.config_path, log,
                               {**self.env, ENV_SUPERVISOR: ref.encode()}, hostname=name)
        self.running[queue].append(worker)
        if self.registry is not None:
            self.registry.add(ProcessRecord.of(worker.pid, worker.argv, "worker", name,
                                               grace=ref.grace))
        logger.info("started worker %s (pid %d)", name, worker.pid)
        return worker

    def _forget(self, worker: WorkerProcess) -> None:
        if self.registry is not None:
            self.registry.remove(worker.pid)

    def replicas(self) -> dict[str, int]:
        with self._lock:
            self._reap()
            return {q: len(ws) for q, ws in self.running.items()}

    def _reap(self) -> None:
        for queue, workers in self.running.items():
            for worker in list(workers):
                if not worker.alive():
                    workers.remove(worker)
                    self._forget(worker)
                    self.restarts += 1
                    logger.warning("worker %s exited (code %s) without being asked: "
                                   "restarting", worker.hostname, worker.proc.returncode)
                    worker.signal(signal.SIGKILL)  # its pool, if any child outlived it
                    self._start(queue)
        now = time.monotonic()
        for entry in list(self.draining):
            if not entry.worker.alive():
                entry.worker.signal(signal.SIGKILL)
                self.draining.remove(entry)
                self._forget(entry.worker)
            elif now > entry.deadline:
                logger.warning("worker %s still running after its grace period: SIGKILL",
                               entry.worker.hostname)
                entry.worker.kill()
                self.draining.remove(entry)
                self._forget(entry.worker)

    def scale(self, queue: str, replicas: int, workers: list[WorkerSample]) -> None:
        with self._lock:
            self._scale(queue, replicas, workers)

    def _scale(self, queue: str, replicas: int, workers: list[WorkerSample]) -> None:
        running = self.running[queue]
        while len(running) < replicas:
            self._start(queue)
        if len(running) <= replicas:
            return
        busy = {w.hostname: w.active + w.reserved for w in workers}
        # Idle first; among equals the youngest (it holds the least).
        order = sorted(enumerate(running), key=lambda iw: (busy.get(iw[1].hostname, 0),
                                                           -iw[0]))
        for _, worker in order[: len(running) - replicas]:
            running.remove(worker)
            worker.proc.send_signal(signal.SIGTERM)
            self.draining.append(_Draining(worker, time.monotonic() +
                                           grace_period(self.config, queue)))
            logger.info("stopping worker %s (warm; %s busy)", worker.hostname,
                        busy.get(worker.hostname, 0))

    def wait_drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.draining and time.monotonic() < deadline:
            with self._lock:
                self._reap()
            time.sleep(0.1)
        return not self.draining

    def workers(self) -> list[WorkerProcess]:
        """Every worker this backend runs, draining ones included."""
        with self._lock:
            return ([w for ws in self.running.values() for w in ws]
                    + [d.worker for d in self.draining])

    def close(self, grace: float | None = None, *, hurry: Callable[[], bool] | None = None,
              on_hurry: Callable[[list[WorkerProcess]], None] | None = None) -> None:
        """Stop every worker warm, each within its queue's grace period (or ``grace``),
        then SIGKILL its group; ``hurry`` (a second signal) kills them at once. No
        worker is started after this, even by a loop thread still finishing a pass."""
        with self._lock:
            self.closed = True
            everyone = self.workers()
            for ws in self.running.values():
                ws.clear()
            self.draining.clear()

        def late(worker: WorkerProcess) -> None:
            logger.warning("worker %s still running after its grace period: SIGKILL",
                           worker.hostname)

        stop_all(everyone, grace if grace is not None else (lambda w: self.grace(w.queue)),
                 hurry=hurry, on_hurry=on_hurry, on_late=late)
        for worker in everyone:
            self._forget(worker)


def create(ctx: BackendContext) -> LocalBackend:
    """The ``local`` entry point: workers under ``ctx.workdir/logs``, recorded in the
    workdir's registry (claimed here unless this is a dry run)."""
    from fleet.imports import import_modules

    import_modules(ctx.config)  # the workers it starts would die of a bad one
    return LocalBackend(ctx.config, ctx.config.source, dict(ctx.env), ctx.workdir / "logs",
                        supervisor=ctx.supervisor, registry=ctx.claimed_registry())


PLUGIN = BackendPlugin(create, workers_live_here=True)
