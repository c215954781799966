"""The reconciler: job chunks that nobody has are found and sent again.

The ledger (fleet.jobs.ledger) says which chunks of each running job are pending.
Each of them should have a message somewhere: waiting in a queue's lists, held in
``unacked`` by a worker (running, prefetched, ETA, or left by a dead worker until its
lease lapses), or at least in a live worker's hands (its heartbeat lists the job tasks
it holds, which matters when Redis restarted empty under a running task). A pending
chunk with none of these is lost: Redis lost it (restarted empty, failed over, popped
a message and died before the worker read it), or its task ended without the ledger
taking note. Nothing else would ever run it again, so its job would hang.

Reading every message is not free, so each pass first compares counts (pending chunks
per queue in the ledger with messages per queue in Redis, one round trip) and reads
the lists only when they do not add up, when chunks were suspected last time, or every
``full_scan_every``. A chunk is sent again only when passes found it missing for
``confirm_after`` seconds in a row (two passes at least, and longer than the workers'
report interval), so neither a message moving between a list and ``unacked`` while a
pass reads them nor a running task whose worker has not reported since Redis came
back empty is mistaken for a lost one. The same goes for a job's collect step (and its
aggregate): an aggregating job with neither in flight gets its collect step again.

The decision (``confirm_lost``) is a pure function; the pass reads and acts.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from celery import Celery

from autoscale.passes import Passes
from fleet.config import FleetConfig
from fleet.errors import FleetError
from fleet.jobs.ids import aggregate_task_id, chunk_task_id, collect_task_id
from fleet.jobs.inflight import InFlight
from fleet.jobs.lifecycle import send_collect
from fleet.jobs.resend import resend
from fleet.jobs.state import JobStore
from fleet.keys import broker_client
from fleet.observe.metrics import RedisMetrics
from fleet.supervision import ThreadUnit

logger = logging.getLogger("autoscale.reconcile")

#: Short: after an outage the reconciler should look again soon, not in a minute.
MAX_BACKOFF = 15.0
#: A submission that made no progress for this many graces (a minute by default; a
#: submitter writes its manifest every batch of 500 chunks) lost its submitter
#: (killed, or its machine gone): the reconciler sends the rest.
STALLED_SUBMIT_GRACES = 6
PRUNE_EVERY = 3600.0


@dataclass(frozen=True)
class Unit:
    """Something that must have a message somewhere: a chunk, or a job's collect step
    (alive while its collect or its aggregate task is in flight)."""

    job_id: str
    #: The chunk's index, or None for the collect step.
    index: int | None
    task_ids: frozenset[str]

    @property
    def key(self) -> str:
        return min(self.task_ids) if self.index is not None else collect_task_id(self.job_id)


@dataclass(frozen=True)
class Findings:
    #: Missing in this pass and for ``confirm_after`` before it: send again now.
    lost: tuple[Unit, ...]
    #: Missing, not for long enough yet: key -> when first seen missing.
    suspected: dict[str, float]


def confirm_lost(units: list[Unit], present: set[str], suspected_before: dict[str, float],
                 now: float, confirm_after: float) -> Findings:
    """Which units are lost, given the task ids found in flight (pure). A unit found in
    flight, or gone from ``units`` (done, failed), is no longer suspected."""
    lost, suspected = [], {}
    for u in units:
        if u.task_ids & present:
            continue
        since = suspected_before.get(u.key, now)
        if u.key in suspected_before and now - since >= confirm_after:
            lost.append(u)
        else:
            suspected[u.key] = since
    return Findings(tuple(lost), suspected)


def should_scan(suspects: dict[str, int], messages: dict[str, int], collects: int,
                suspected_before: dict[str, float], since_full_scan: float,
                full_scan_every: float) -> str | None:
    """Why this pass must read the queues' lists (None: the counts say all is there)."""
    if suspected_before:
        return "confirming what the last pass missed"
    if collects:
        return "collect steps to check"
    short = sorted(q for q, n in suspects.items() if n > messages.get(q, 0))
    if short:
        return f"fewer messages than pending chunks in {', '.join(short)}"
    if suspects and since_full_scan >= full_scan_every:
        return "periodic check"
    return None


@dataclass
class Pass:
    """What one pass saw and did (for tests, logs and ``fleet jobs status``)."""

    scanned: str | None = None
    suspected: int = 0
    resent: dict[str, int] = field(default_factory=dict)
    collects: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Reconciler(Passes):
    def __init__(self, config: FleetConfig, app: Celery, client: redis.Redis | None = None,
                 report: Callable[[str], None] = logger.info):
        self.config = config
        self.app = app
        self.client = client or broker_client(config)
        self.report = report
        self.settings = config.jobs.reconciler
        self.metrics = RedisMetrics(config, self.client)
        self.inflight = InFlight(config, self.client)
        self.suspected: dict[str, float] = {}
        #: Two passes at least, and more than a worker's report interval: a worker
        #: running a chunk says so within that time, even to a Redis that came back empty.
        self.confirm_after = max(self.settings.interval,
                                 2 * config.autoscaler.worker_metrics_interval + 1)
        self.last_full_scan = -math.inf
        self.last_prune = -math.inf
        self._start_passes()

    @property
    def store(self) -> JobStore:
        return JobStore(self.config)

    def run_once(self) -> Pass:
        done = Pass()
        now = time.time()
        store = self.store
        before = now - self.settings.grace
        self._prune(store, now)
        by_queue = store.suspects_by_queue(before)
        collects = store.stalled_collects(before)
        stalled = store.stalled_submissions(now - STALLED_SUBMIT_GRACES * self.settings.grace)
        for job_id in stalled:
            self._finish_submission(store, job_id, done)
        if not (by_queue or collects or self.suspected):
            return done
        obs = self.metrics.poll()
        messages = {q: s.waiting + s.unacked for q, s in obs.queues.items()}
        done.scanned = should_scan(by_queue, messages, len(collects), self.suspected,
                                   time.monotonic() - self.last_full_scan,
                                   self.settings.full_scan_every)
        if done.scanned is None:
            return done
        # Redis first, the ledger after: a chunk that completes in between is then seen
        # done in the ledger, never missing from Redis.
        present = self.inflight.all_ids()
        for worker in obs.workers:
            present.update(worker.held)
        self.last_full_scan = time.monotonic()
        units = [Unit(job_id, idx, frozenset({chunk_task_id(job_id, idx)}))
                 for job_id, idx in store.suspects(before)]
        units += [Unit(job_id, None, frozenset({collect_task_id(job_id),
                                                aggregate_task_id(job_id)}))
                  for job_id in store.stalled_collects(before)]
        findings = confirm_lost(units, present, self.suspected, time.monotonic(),
                                self.confirm_after)
        self.suspected = findings.suspected
        done.suspected = len(findings.suspected)
        self._act(store, findings.lost, done)
        return done

    def _act(self, store: JobStore, lost: tuple[Unit, ...], done: Pass) -> None:
        chunks: dict[str, list[int]] = defaultdict(list)
        for unit in lost:
            if unit.index is None:
                store.collect_sent(unit.job_id, reconciled=True)
                if send_collect(self.app, unit.job_id):
                    done.collects.append(unit.job_id)
                    self.report(f"job {unit.job_id}: its collect step was lost in flight "
                                "(neither it nor the aggregate is queued, held or "
                                "running): sent again")
            else:
                chunks[unit.job_id].append(unit.index)
        for job_id, indices in chunks.items():
            try:
                status = store.status(job_id)
                done.resent[job_id] = resend(self.app, status, indices, reconciled=True)
            except FleetError as exc:  # its input copy is gone: the chunks cannot be cut
                for index in indices:
                    store.record_failure(job_id, index, f"lost in flight and not "
                                         f"rebuilt: {exc}", "LostInFlight")
                done.errors.append(f"{job_id}: {exc}")
                self.report(f"job {job_id}: {len(indices)} chunks lost in flight cannot "
                            f"be sent again: {exc}")
                continue
            self.report(f"job {job_id}: re-sent {len(indices)} chunks lost in flight "
                        f"(not queued, held or running): {_ranges(sorted(indices))}")

    def _finish_submission(self, store: JobStore, job_id: str, done: Pass) -> None:
        """Its submitter stopped mid-way (killed): send what it did not, from the copy."""
        status = store.status(job_id)
        missing = store.missing(job_id, status.total)
        try:
            sent = resend(self.app, status, missing, reconciled=True) if missing else 0
        except FleetError as exc:
            store.set_state(job_id, "failed", error=f"submission stopped after "
                            f"{status.total - len(missing)} of {status.total} chunks and the "
                            f"rest cannot be cut: {exc}")
            done.errors.append(f"{job_id}: {exc}")
            return
        store.submitted(job_id)
        done.resent[job_id] = done.resent.get(job_id, 0) + sent
        self.report(f"job {job_id}: its submission stopped after "
                    f"{status.total - len(missing)} of {status.total} chunks; sent the "
                    f"other {sent}")

    def _prune(self, store: JobStore, now: float) -> None:
        if time.monotonic() - self.last_prune < PRUNE_EVERY:
            return
        self.last_prune = time.monotonic()
        from fleet.payloads import open_store

        for url in store.prune(now - self.config.jobs.ttl):
            try:
                open_store(self.config.payloads).delete(url)
            except Exception as exc:  # best effort: the job is gone either way
                logger.warning("could not delete a pruned job's input %s: %s", url, exc)

    def run(self, stop: threading.Event, interval: float | None = None) -> None:
        """Pass after pass until ``stop``; no error ends the loop (autoscale.passes)."""
        self.run_passes(stop, interval or self.settings.interval, MAX_BACKOFF, self.report,
                        _describe)


def _describe(exc: Exception) -> tuple[str, bool]:
    bug = not isinstance(exc, redis.RedisError | FleetError)
    return f"pass failed ({type(exc).__name__}: {exc})", bug


def _ranges(indices: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7' (a log line must stay short)."""
    out, start = [], None
    for i, n in enumerate(indices):
        if start is None:
            start = n
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out[:20]) + (f" and {len(out) - 20} more" if len(out) > 20 else "")


def supervised_reconciler(reconciler: Reconciler) -> ThreadUnit:
    """The reconciler as a unit its supervisor (fleet up, fleet autoscale) watches:
    alive, and still passing (a pass waits at most MAX_BACKOFF, plus Redis and database
    calls that time out on their own)."""
    interval = reconciler.settings.interval
    return ThreadUnit("reconciler", reconciler.run, beat=lambda: reconciler.last_pass,
                      stall_after=MAX_BACKOFF + 3 * interval + 90, join_timeout=interval + 30)
