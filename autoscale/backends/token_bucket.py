"""A client-side request rate limit: a token bucket, as client-go's flowcontrol has.

The official Python client has none, and an autoscaler that retries hard against a busy
API server (service-account traffic sits in its lowest priority level) makes it busier.
Hand-written because the bucket is a dozen lines with the exact client-go semantics
(QPS refilled continuously, ``burst`` at most, a caller waits for its token); the
rate-limit libraries on PyPI shape calls by key and window, which is not this.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    """``qps`` tokens a second, at most ``burst`` saved; ``acquire`` waits for one."""

    def __init__(self, qps: float, burst: int, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if qps <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs qps > 0 and burst >= 1, not {qps}, "
                             f"{burst}")
        self.qps, self.burst = qps, burst
        self._clock, self._sleep = clock, sleep
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()
        #: Seconds callers have waited in all: what the limit has cost (for the bench).
        self.waited = 0.0

    def acquire(self) -> float:
        """Take a token, waiting until one is there; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.qps)
            self._at = now
            self._tokens -= 1.0
            wait = -self._tokens / self.qps if self._tokens < 0 else 0.0
        if wait > 0:
            self.waited += wait
            self._sleep(wait)
        return wait
