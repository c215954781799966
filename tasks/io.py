"""An I/O-bound task: each record waits on a (simulated) remote call.

Runs in the ``io`` queue's thread pool, where waiting costs a thread, not a process.
"""

from __future__ import annotations

import time

from celery import shared_task


@shared_task(name="tasks.io.fetch")
def fetch(records: list | None = None, latency: float = 0.05) -> dict:
    """Pretend to enrich each record from a remote API that answers in ``latency`` s."""
    records = records or [None]
    for _ in records:
        time.sleep(latency)
    return {"fetched": len(records), "latency": latency}
