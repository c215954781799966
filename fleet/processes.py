"""Worker processes on this machine: start ``fleet worker``, stop it warm, or kill it.

Each worker runs in its own session (process group), so a stop reaches its pool
children too and nothing is left orphaned; Ctrl-C in the terminal reaches only the
supervisor, which then stops the workers in order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class WorkerProcess:
    """One ``fleet worker --queue Q`` process and its log file."""

    def __init__(self, queue: str, config_path: str, log: Path, env: dict[str, str] | None = None,
                 hostname: str | None = None, loglevel: str = "INFO"):
        self.queue = queue
        self.hostname = hostname or f"{queue}@%h"
        self.log = log
        argv = [sys.executable, "-m", "fleet.cli", "worker", "--queue", queue,
                "--config", config_path, "--loglevel", loglevel, "--hostname", self.hostname]
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


def stop_all(workers: list[WorkerProcess], grace: float = 30.0) -> None:
    """Warm-stop many workers in parallel (SIGTERM to all, then wait, then SIGKILL)."""
    for worker in workers:
        if worker.alive():
            worker.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for worker in workers:
        try:
            worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for worker in workers:
        worker.signal(signal.SIGKILL)  # the group: no pool child outlives its worker
        worker.proc.wait()
