"""What the simulator takes from a trace: its tasks, in the order they were sent.

A synthetic trace is written in that order; an export is in the order the dashboard
stored its tasks, with the chunks' send times taken from the job ledger, so a task can
come before one sent earlier. The tasks are therefore held and sorted once (Timsort is
linear on a trace already in order); a trace of a million tasks holds about half a
gigabyte of records. The file itself is read by fleet.trace.io.
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import attrgetter

from fleet.trace.model import Replicas, Task


def tasks_in_send_order(records: Iterable[Task | Replicas]) -> list[Task]:
    """The Task records of ``records`` by ``sent`` (stable: ties keep file order)."""
    tasks = [r for r in records if isinstance(r, Task)]
    tasks.sort(key=attrgetter("sent"))
    return tasks
