"""Probe tasks for the fault suite: every run is written down outside Redis.

A fault test must count runs across a Redis that restarts empty, so each run appends
``start``/``end`` lines (task id, hostname, pid, time) to ``runs.log`` beside the test's
payload directory, with O_APPEND (one write per line: lines never interleave).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from celery import shared_task


def runs_log(config) -> Path:
    return Path(config.payloads.path).resolve().parent / "runs.log"


def _note(task, what: str) -> None:
    line = f"{what} {task.request.id} {task.request.hostname} {os.getpid()} {time.time():.3f}\n"
    fd = os.open(runs_log(task.app.config), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@shared_task(name="tests.faults.work", bind=True)
def work(self, records: list[dict], seconds: float = 0.0) -> int:
    """Sum of ``n`` after ``seconds`` of 'work'."""
    _note(self, "start")
    time.sleep(seconds)
    _note(self, "end")
    return sum(r["n"] for r in records)


@shared_task(name="tests.faults.total")
def total(results: list[int]) -> int:
    return sum(results)


@dataclass(frozen=True)
class Runs:
    started: Counter
    ended: Counter

    def duplicated(self, excused: set[str] = frozenset()) -> int:
        """Task ids that completed more than once (``excused``: whose first worker
        died, so running them again was the point)."""
        return sum(1 for task_id, n in self.ended.items() if n > 1 and task_id not in excused)


def read_runs(config) -> Runs:
    started, ended = Counter(), Counter()
    path = runs_log(config)
    if path.exists():
        for line in path.read_text().splitlines():
            what, task_id, *_ = line.split()
            (started if what == "start" else ended)[task_id] += 1
    return Runs(started, ended)
