"""A live progress display of jobs (rich), polling their state in one pipeline."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fleet.config import FleetConfig
from fleet.jobs.state import JobStatus, JobStore


def _label(status: JobStatus) -> str:
    failed = f" [red]{status.failed} failed[/red]" if status.failed else ""
    return f"{status.id} {status.task} [dim]{status.state}[/dim]{failed}"


def watch(config: FleetConfig, job_ids: list[str], interval: float = 0.5,
          console: Console | None = None) -> list[JobStatus]:
    """Show one bar per job until every job has ended; return their final statuses."""
    store = JobStore(config)
    statuses = store.statuses(job_ids)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("chunks"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console or Console(stderr=True), transient=False,
    ) as progress:
        bars = {s.id: progress.add_task(_label(s), total=s.total, completed=s.done)
                for s in statuses}
        while True:
            statuses = store.statuses(job_ids)
            for s in statuses:
                progress.update(bars[s.id], completed=s.done, description=_label(s))
            if all(s.is_terminal for s in statuses):
                return statuses
            time.sleep(interval)
