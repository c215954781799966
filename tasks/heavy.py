"""A heavy task: CPU and memory of a tunable size; and one that outgrows its class.

``crunch`` is the heavy batch step the benchmarks mix with short tasks. ``grow``
allocates step by step (as a runaway join or a bad pandas merge does) and is how the
tests drive the memory guard.
"""

from __future__ import annotations

import hashlib
import time

from celery import shared_task

MiB = 1024 * 1024


@shared_task(name="tasks.heavy.crunch")
def crunch(records: list | None = None, mb: int = 64, rounds: int = 20) -> dict:
    """Hold ``mb`` MiB and hash over it ``rounds`` times (CPU ~ mb * rounds)."""
    block = bytearray(mb * MiB)
    for i in range(0, len(block), 4096):
        block[i] = i & 0xFF  # touch every page so the memory is really resident
    digest = hashlib.sha256()
    view = memoryview(block)
    for r in range(rounds):
        digest.update(view[(r * 4096) % len(block):])
    return {"mb": mb, "rounds": rounds, "records": len(records or []),
            "digest": digest.hexdigest()[:16]}


@shared_task(name="tasks.heavy.grow")
def grow(target_mb: int = 512, step_mb: int = 16, pause: float = 0.02) -> dict:
    """Allocate ``step_mb`` at a time up to ``target_mb``; returns if never stopped."""
    held = []
    started = time.monotonic()
    while len(held) * step_mb < target_mb:
        chunk = bytearray(step_mb * MiB)
        for i in range(0, len(chunk), 4096):
            chunk[i] = 1
        held.append(chunk)
        time.sleep(pause)
    return {"allocated_mb": len(held) * step_mb, "seconds": round(time.monotonic() - started, 2)}


@shared_task(name="tasks.heavy.sleep")
def sleep(seconds: float = 1.0, tag: str = "") -> dict:
    """Occupy a slot for ``seconds`` (lease and scale-down tests, and trace replays on
    any queue). ``started`` is this worker's clock as the task began: a replay's wait
    (started - sent) needs it, and a result is delivered where an event may be lost."""
    started = time.time()
    time.sleep(seconds)
    return {"slept": seconds, "tag": tag, "started": started}
