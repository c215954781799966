"""The local backend: ``fleet worker`` processes on this machine, supervised.

Scale-up starts processes; scale-down stops idle workers first, warm (SIGTERM: Celery
stops taking messages, running tasks finish, prefetched ones go back to the queue) and
SIGKILLs the process group only after the queue's grace period (its hard time limit
and soft shutdown timeout, plus a margin). A worker that exits without being asked
is restarted.
"""

from __future__ import annotations

import itertools
import logging
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from autoscale.model import WorkerSample
from fleet.config import FleetConfig
from fleet.processes import WorkerProcess, stop_all

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
                 logdir: Path, node: str | None = None):
        self.config = config
        self.config_path = config_path
        self.env = env
        self.logdir = logdir
        self.node = node or socket.gethostname()
        self.running: dict[str, list[WorkerProcess]] = {q: [] for q in config.queues}
        self.draining: list[_Draining] = []
        self.restarts = 0
        self._seq = itertools.count(1)

    def _start(self, queue: str) -> WorkerProcess:
        name = f"{queue}-{next(self._seq)}@{self.node}"
        log = self.logdir / f"{name.replace('@', '_')}.log"
        worker = WorkerProcess(queue, self.config_path, log, self.env, hostname=name)
        self.running[queue].append(worker)
        logger.info("started worker %s (pid %d)", name, worker.pid)
        return worker

    def replicas(self) -> dict[str, int]:
        self._reap()
        return {q: len(ws) for q, ws in self.running.items()}

    def _reap(self) -> None:
        for queue, workers in self.running.items():
            for worker in list(workers):
                if not worker.alive():
                    workers.remove(worker)
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
            elif now > entry.deadline:
                logger.warning("worker %s still running after its grace period: SIGKILL",
                               entry.worker.hostname)
                entry.worker.kill()
                self.draining.remove(entry)

    def scale(self, queue: str, replicas: int, workers: list[WorkerSample]) -> None:
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
            self._reap()
            time.sleep(0.1)
        return not self.draining

    def close(self, grace: float = 30.0) -> None:
        """Stop every worker warm; SIGKILL what is left after ``grace``."""
        everyone = [w for ws in self.running.values() for w in ws]
        everyone += [d.worker for d in self.draining]
        for ws in self.running.values():
            ws.clear()
        self.draining.clear()
        stop_all(everyone, grace)
