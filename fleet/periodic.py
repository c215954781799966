"""A callable run every ``interval`` seconds in a daemon thread that a failed run does not end.

The memory guard, the lease renewer and the heartbeat are such loops in each worker's
main process. A thread that ends on one exception dies unseen: the worker looks healthy
while nothing guards its memory, its leases lapse (so its long tasks run a second time
elsewhere) or it drops out of the autoscaler's view. So a tick that raises is logged
with its traceback, naming the thread, and the next tick comes on time.

The thread itself (named, daemon, a stop Event, a bounded join) is supervision's
``ThreadUnit``, so a periodic loop is also a unit a ``Supervisor`` can watch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from fleet.supervision import ThreadUnit

_logger = logging.getLogger("fleet.periodic")


class Periodic(ThreadUnit):
    """Calls ``tick()`` every ``interval`` seconds, the first time after ``first_after``
    (default: one interval). ``what`` names the work in the failure log line, on the
    owner's ``logger``, so that line reads as the owner's."""

    def __init__(self, name: str, tick: Callable[[], object], interval: float, *,
                 first_after: float | None = None, what: str = "a tick",
                 logger: logging.Logger | None = None, join_timeout: float = 5.0):
        super().__init__(name, self._loop, join_timeout=join_timeout)
        self.tick = tick
        self.interval = interval
        self.first_after = interval if first_after is None else first_after
        self.what = what
        self.logger = logger or _logger

    def start(self) -> None:
        """Start the thread; a second start while it runs is an error, as a second
        ``Thread.start`` is (two loops would tick twice as often). After a stop, it
        starts afresh."""
        if self.is_alive():
            raise RuntimeError(f"{self.name} is already running")
        super().start()

    def stop(self, timeout: float | None = None) -> None:
        """Wake the sleeping loop at once and wait up to ``timeout`` (default
        ``join_timeout``; 0: do not wait) for a tick in progress to end. Idempotent."""
        self._stop.set()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.join_timeout if timeout is None else timeout)

    def is_alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _loop(self, stop: threading.Event) -> None:
        wait = self.first_after
        while not stop.wait(wait):
            wait = self.interval
            try:
                self.tick()
            except Exception:
                self.logger.exception("%s failed (thread %s); next try in %gs",
                                      self.what, self.name, self.interval)
