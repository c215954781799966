"""Worker processes on this machine: start ``fleet worker``, stop it warm, or kill it.

Each worker runs in its own session (process group), so a stop reaches its pool
children too and nothing is left orphaned; Ctrl-C in the terminal reaches only the
supervisor, which then stops the workers in order. (It also keeps the terminal's SIGHUP
away from them: to a Celery worker SIGHUP means "re-exec yourself", not "stop".)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


class WorkerProcess:
    """One ``fleet worker --queue Q`` process and its log file."""

    def __init__(self, queue: str, config_path: str, log: Path, env: dict[str, str] | None = None,
                 hostname: str | None = None, loglevel: str = "INFO",
                 extra: tuple[str, ...] = ()):
        self.queue = queue
        self.hostname = hostname or f"{queue}@%h"
        self.log = log
        self.argv = argv = [
            sys.executable, "-m", "fleet.cli", "worker", "--queue", queue,
            "--config", config_path, "--loglevel", loglevel, "--hostname", self.hostname,
            *extra]
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         env=env if env is not None else dict(os.environ),
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the worker and its pool at once: what an OOM kill or node loss does."""
        self.signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, grace: float = 30.0) -> None:
        """Warm shutdown: running tasks finish; SIGKILL only after ``grace`` seconds."""
        stop_all([self], grace)


def stop_all(workers: list[WorkerProcess],
             grace: float | Callable[[WorkerProcess], float] = 30.0, *,
             hurry: Callable[[], bool] | None = None,
             on_hurry: Callable[[list[WorkerProcess]], None] | None = None,
             on_late: Callable[[WorkerProcess], None] | None = None) -> list[WorkerProcess]:
    """Warm-stop many workers in parallel: SIGTERM to all, then each gets its own grace
    (a number, or one per worker: the queue's), then SIGKILL of its group.

    ``hurry`` (checked five times a second; a supervisor's second signal) SIGKILLs every
    worker still running at once, after ``on_hurry`` was told which. Returns the workers
    that had to be killed."""
    for worker in workers:
        if worker.alive():
            worker.proc.send_signal(signal.SIGTERM)
    now = time.monotonic()
    deadline = {id(w): now + (grace(w) if callable(grace) else grace) for w in workers}
    pending = [w for w in workers if w.alive()]
    killed: list[WorkerProcess] = []
    while pending:
        if hurry is not None and hurry():
            if on_hurry is not None:
                on_hurry(pending)
            killed += pending
            break
        now = time.monotonic()
        for worker in [w for w in pending if now > deadline[id(w)]]:
            if on_late is not None:
                on_late(worker)
            killed.append(worker)
            worker.signal(signal.SIGKILL)
        time.sleep(0.2)
        pending = [w for w in pending if w.alive() and w not in killed]
    for worker in workers:
        worker.signal(signal.SIGKILL)  # the group: no pool child outlives its worker
        worker.proc.wait()
    return killed
