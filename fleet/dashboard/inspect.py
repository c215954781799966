"""Worker details only a worker can tell (pool, registered tasks, conf, stats), asked
with Celery's inspect broadcasts, all at once, and cached per worker.

Flower asks the same eight questions; it asks them one after another on a page load.
Here they go out together and the page shows the cache, refreshed on demand.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from celery import Celery

METHODS = ("stats", "active_queues", "registered", "scheduled", "active", "reserved",
           "revoked", "conf")


class WorkerInspector:
    def __init__(self, app: Celery, timeout: float = 1.0):
        self.app = app
        self.timeout = timeout
        self.cache: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(len(METHODS), thread_name_prefix="inspect")

    def refresh(self, worker: str | None = None) -> dict[str, dict]:
        destination = [worker] if worker else None

        def ask(method: str):
            inspector = self.app.control.inspect(timeout=self.timeout, destination=destination)
            try:
                return method, getattr(inspector, method)() or {}
            except Exception:  # broker hiccup: keep what we had
                return method, {}

        answers = list(self._pool.map(ask, METHODS))
        now = time.time()
        with self._lock:
            for method, replies in answers:
                for hostname, value in replies.items():
                    self.cache.setdefault(hostname, {})[method] = value
                    self.cache[hostname]["timestamp"] = now
            return {h: dict(v) for h, v in self.cache.items()
                    if worker is None or h == worker}

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
        self._pool.shutdown(wait=False, cancel_futures=True)
