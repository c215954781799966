"""A worker that outlives its supervisor stops by itself, warm.

``fleet up`` and ``fleet autoscale --backend local`` start workers in sessions of their
own (so a terminal's Ctrl-C reaches only the supervisor, which stops them in order).
Nothing then stops them when the supervisor is SIGKILLed: they keep consuming (seen: 20
orphaned workers, some taking later tasks). Linux's parent-death signal
(``PR_SET_PDEATHSIG``) does not fit: it fires when the *thread* that forked the child
exits, and workers are forked from the autoscaler thread, which the supervisor may
restart. So the supervisor names itself in the worker's environment (pid, create time,
and the queue's grace period) and a small thread in the worker's main process checks
every second. When the supervisor is gone it sends the worker SIGTERM, which is
Celery's warm shutdown (no new tasks, running ones finish), the same stop the
supervisor itself would have asked for; past the grace period it SIGKILLs the worker's
process group, as the supervisor would have.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import psutil

logger = logging.getLogger("fleet.watchdog")

#: Set by the supervisor in each worker's environment; read by ``fleet worker``.
ENV_SUPERVISOR = "FLEET_SUPERVISOR"

#: psutil derives create times from the boot time in whole seconds, which a clock step
#: can move; a pid reused within the same second is not a real risk.
CREATE_TIME_TOLERANCE = 1.0


@dataclass(frozen=True)
class SupervisorRef:
    """Who supervises a process: enough to tell it from a later process with its pid."""

    pid: int
    create_time: float
    #: How long the supervised process may take to stop warm before it is SIGKILLed.
    grace: float = 0.0

    def encode(self) -> str:
        return f"{self.pid}:{self.create_time:.2f}:{self.grace:g}"

    @classmethod
    def parse(cls, text: str) -> SupervisorRef:
        """The ``encode`` form back; ValueError says what is wrong."""
        parts = text.strip().split(":")
        if len(parts) != 3:
            raise ValueError(f"expected PID:CREATE_TIME:GRACE, got {text!r}")
        try:
            pid, created, grace = int(parts[0]), float(parts[1]), float(parts[2])
        except ValueError:
            raise ValueError(f"expected PID:CREATE_TIME:GRACE (numbers), got {text!r}") from None
        if pid <= 0 or grace < 0:
            raise ValueError(f"expected a positive pid and grace, got {text!r}")
        return cls(pid, created, grace)

    @classmethod
    def of_this_process(cls, grace: float = 0.0) -> SupervisorRef:
        return cls(os.getpid(), psutil.Process().create_time(), grace)


def same_process(pid: int, create_time: float) -> psutil.Process | None:
    """The live (not zombie) process ``pid`` if it was created at ``create_time``."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > CREATE_TIME_TOLERANCE:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None  # dead; its parent has not reaped it yet
        return proc
    except psutil.Error:
        return None


def supervisor_alive(ref: SupervisorRef) -> bool:
    # Our own parent cannot be a reused pid while we live: the cheap, certain answer.
    if os.getppid() == ref.pid:
        return True
    return same_process(ref.pid, ref.create_time) is not None


class Watchdog:
    """A daemon thread of the worker's main process: warm stop once the supervisor is
    gone, SIGKILL of the worker's group after ``ref.grace``."""

    def __init__(self, ref: SupervisorRef, interval: float = 1.0):
        self.ref = ref
        self.interval = interval
        self.fired_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="fleet-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def _run(self) -> None:
        while supervisor_alive(self.ref):
            time.sleep(self.interval)
        self.fired_at = time.monotonic()
        logger.warning("supervisor (pid %d) is gone: stopping warm (running tasks finish; "
                       "SIGKILL after %gs)", self.ref.pid, self.ref.grace)
        os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown, from the main thread
        time.sleep(self.ref.grace)
        logger.error("still running %gs after the supervisor went: SIGKILL", self.ref.grace)
        own_group = os.getpgrp() == os.getpid()
        if own_group:
            os.killpg(os.getpid(), signal.SIGKILL)  # the pool children too
        os.kill(os.getpid(), signal.SIGKILL)
