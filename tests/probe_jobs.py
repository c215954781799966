"""Probe tasks for the batch-job tests: they count their runs and fail on demand."""

from __future__ import annotations

import time

import redis
from celery import shared_task

from fleet.keys import broker_client, key

MiB = 1024 * 1024


def _redis_and_key(task, *parts):
    config = task.app.config
    return broker_client(config), key(config, "probe", *parts)


def _outlasting_an_outage(call, *args, patience: float = 60.0):
    """The probe's own bookkeeping waits out a broker restart, so a test of the fleet's
    recovery does not fail on the probe's Redis call instead (a user task that calls Redis
    during an outage fails, as it should; that is not what those tests measure)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return call(*args)
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@shared_task(name="tests.probe.flaky", bind=True)
def flaky(self, records: list[dict]) -> int:
    """Sum of ``n``; fails on records marked ``fail`` while the ``failing`` flag is set."""
    client, runs = _redis_and_key(self, "runs")
    _outlasting_an_outage(client.hincrby, runs, self.request.id, 1)
    _, flag = _redis_and_key(self, "failing")
    if any(r.get("fail") for r in records) and _outlasting_an_outage(client.exists, flag):
        raise ValueError(f"refusing records {[r['n'] for r in records if r.get('fail')]}")
    return sum(r["n"] for r in records)


@shared_task(name="tests.probe.total")
def total(results: list[int]) -> int:
    return sum(results)


@shared_task(name="tests.probe.hog", bind=True)
def hog(self, records: list[dict]) -> int:
    """Hold ``mb`` MiB per record, touched page by page (the memory guard's prey)."""
    held = []
    for record in records:
        block = bytearray(record.get("mb", 1) * MiB)
        for i in range(0, len(block), 4096):
            block[i] = 1
        held.append(block)
    return len(held)


@shared_task(name="tests.probe.unsteady", bind=True)
def unsteady(self, failures: int) -> int:
    """Raise ConnectionError on the first ``failures`` runs, then succeed."""
    client, runs = _redis_and_key(self, "unsteady", self.request.id)
    run = client.incr(runs)
    if run <= failures:
        raise ConnectionError(f"simulated outage, run {run}")
    return run


@shared_task(name="tests.probe.shell_hog", bind=True)
def shell_hog(self, mb: int, seconds: float = 30.0) -> int:
    """Start a subprocess that holds ``mb`` MiB: memory the pool process does not own."""
    import subprocess
    import sys

    code = (f"import time; b = bytearray({mb} * 1024 * 1024); "
            "[b.__setitem__(i, 1) for i in range(0, len(b), 4096)]; "
            f"time.sleep({seconds})")
    client, key_ = _redis_and_key(self, "shell_hog", self.request.id)
    proc = subprocess.Popen([sys.executable, "-c", code])
    client.set(key_, proc.pid)
    return proc.wait()
