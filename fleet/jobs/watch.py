"""A live progress display of jobs (rich), polling their state in the ledger.

It waits out an outage: while the ledger does not answer it says so once, keeps
polling with a growing interval, and resumes the bars when it is back. (A Redis
outage does not touch it at all: job state is not in Redis.)
"""

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
from fleet.jobs.ledger import LedgerUnavailableError
from fleet.jobs.state import JobStatus, JobStore


def _label(status: JobStatus) -> str:
    failed = f" [red]{status.failed} failed[/red]" if status.failed else ""
    return f"{status.id} {status.task} [dim]{status.state}[/dim]{failed}"


def watch(config: FleetConfig, job_ids: list[str], interval: float = 0.5,
          console: Console | None = None) -> list[JobStatus]:
    """Show one bar per job until every job has ended; return their final statuses."""
    store = JobStore(config)
    out = console or Console(stderr=True)
    statuses = _poll(store, job_ids, out.print)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("chunks"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=out, transient=False,
    ) as progress:
        bars = {s.id: progress.add_task(_label(s), total=s.total, completed=s.done)
                for s in statuses}
        while True:
            statuses = _poll(store, job_ids, progress.console.print)
            for s in statuses:
                progress.update(bars[s.id], completed=s.done, description=_label(s))
            if all(s.is_terminal for s in statuses):
                return statuses
            time.sleep(interval)


def _poll(store: JobStore, job_ids: list[str], say, max_wait: float = 10.0
          ) -> list[JobStatus]:
    """The jobs' statuses, waiting as long as it takes for the ledger to answer."""
    wait, since = 1.0, None
    while True:
        try:
            statuses = store.statuses(job_ids)
        except LedgerUnavailableError as exc:
            if since is None:
                since = time.monotonic()
                say(f"[yellow]waiting: {exc}; retrying[/yellow]")
            time.sleep(wait)
            wait = min(max_wait, wait * 2)
            continue
        if since is not None:
            say(f"[green]the job ledger answers again (after "
                f"{time.monotonic() - since:.0f}s)[/green]")
        return statuses
