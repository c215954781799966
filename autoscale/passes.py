"""Pass after pass until stopped, and no error ends it: the shape of every control loop.

A loop thread that dies takes its work with it, silently (seen here: the autoscaler died
of a zero service time, then of a malformed worker report, and nothing scaled again
while ``fleet up`` looked alive). So every error of a pass is reported, the next pass
comes after a backoff (doubling, capped), and ``passes`` and ``last_pass`` let a
supervisor see that the loop still turns (fleet.supervision).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("autoscale")


class Passes:
    """Mixed into a loop that has ``run_once()``; ``describe`` words an error for its
    report and says whether it is a bug (logged with its traceback) or an outage."""

    passes: int = 0
    failures: int = 0
    last_pass: float = 0.0

    def _start_passes(self) -> None:
        self.passes, self.failures, self.last_pass = 0, 0, time.monotonic()

    def run_once(self) -> object:
        raise NotImplementedError

    def run_passes(self, stop: threading.Event, interval: float, max_backoff: float,
                   report: Callable[[str], None],
                   describe: Callable[[Exception], tuple[str, bool]]) -> None:
        wait = interval
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.run_once()
                wait = max(0.0, interval - (time.monotonic() - started))
                self.failures = 0
            except Exception as exc:
                what, bug = describe(exc)
                if bug:
                    logger.error("%s", what, exc_info=exc)
                self.failures += 1
                wait = min(max_backoff, max(interval, wait * 2))
                report(f"{what}; retrying in {wait:.0f}s")
            self.passes += 1
            self.last_pass = time.monotonic()
            stop.wait(wait)
