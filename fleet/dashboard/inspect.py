"""Worker details only a worker can tell (pool, registered tasks, conf, stats), asked
with Celery's inspect broadcasts, all at once, and cached per worker.

Flower asks the same questions; it asks them one after another on a page load. Here they
go out together and the page shows the cache, refreshed on demand. As Flower 2.2, the
task lists (scheduled, active, reserved, revoked: possibly thousands of entries) are
asked only of one worker at a time (``refresh(worker)``); a refresh of all workers asks
the other four. The cache keeps what each worker last answered to each question, so a
worker's entry holds the task lists once it was refreshed on its own, as in Flower.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from celery import Celery

#: Flower's Inspector.inspect_methods, and the ones asked only of a single worker.
METHODS = ("stats", "active_queues", "registered", "scheduled", "active", "reserved",
           "revoked", "conf")
TASK_METHODS = ("scheduled", "active", "reserved", "revoked")


def methods_for(worker: str | None, tasks: bool | None = None) -> tuple[str, ...]:
    if tasks is None:
        tasks = worker is not None
    return METHODS if tasks else tuple(m for m in METHODS if m not in TASK_METHODS)


class WorkerInspector:
    def __init__(self, app: Celery, timeout: float = 1.0):
        self.app = app
        self.timeout = timeout
        self.cache: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(len(METHODS), thread_name_prefix="inspect")
        #: refresh_soon's one inspection at a time (not on _pool: it waits for _pool).
        self._background = ThreadPoolExecutor(1, thread_name_prefix="inspect-soon")
        self._soon: Future | None = None

    def refresh(self, worker: str | None = None, tasks: bool | None = None
                ) -> dict[str, dict]:
        """Ask ``worker`` (or all): the task lists too when ``tasks`` (by default, when
        one worker is asked, as Flower)."""
        destination = [worker] if worker else None

        def ask(method: str):
            inspector = self.app.control.inspect(timeout=self.timeout, destination=destination)
            try:
                call = getattr(inspector, method)
                return method, (call(safe=True) if method == "active" else call()) or {}
            except Exception:  # broker hiccup: keep what we had
                return method, {}

        answers = list(self._pool.map(ask, methods_for(worker, tasks)))
        now = time.time()
        with self._lock:
            for method, replies in answers:
                for hostname, value in replies.items():
                    if value is None:
                        continue
                    if method == "stats" and isinstance(value, dict):
                        # Flower drops it too (its issue #1512: not serialisable)
                        broker = (value.get("consumer") or value).get("broker")
                        if isinstance(broker, dict):
                            broker.pop("alternates", None)
                    self.cache.setdefault(hostname, {})[method] = value
                    self.cache[hostname]["timestamp"] = now
            return {h: dict(v) for h, v in self.cache.items()
                    if worker is None or h == worker}

    def refresh_soon(self) -> None:
        """Start refreshing all workers and return at once (Flower's /workers?refresh):
        one such inspection at a time, a call while one runs is folded into it."""
        with self._lock:
            if self._soon is None or self._soon.done():
                self._soon = self._background.submit(self.refresh)

    def cached(self, worker: str | None = None) -> dict[str, dict]:
        with self._lock:
            return {h: dict(v) for h, v in self.cache.items()
                    if worker is None or h == worker}

    def forget(self, keep: set[str]) -> None:
        """Drop workers the store no longer has (purged): the cache stays bounded."""
        with self._lock:
            for hostname in [h for h in self.cache if h not in keep]:
                del self.cache[hostname]

    def close(self) -> None:
        self._background.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
