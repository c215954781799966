"""The job ledger's tables: what a job is, its chunk manifest, and what completed.

"Don't keep important data in the queue": Redis is a transport, and one that restarts
empty, fails over and drops acknowledged writes, or evicts keys must not lose a data
team's job. So a job's spec, one row per chunk (its state, where it was sent, its
result) and the job's counters live in a real database: SQLite by default (one file,
no server; fine while every worker runs on one machine) or PostgreSQL by URL. Redis
only carries the messages, and the reconciler (autoscale.reconcile) can rebuild any
of them from here and from the job's input, which is kept in the payload store.

Writes that must be atomic per job (a chunk done, the last one starting the collect
step exactly once) take the job's row first (``UPDATE ... WHERE id = ?``): a row lock
on PostgreSQL, and SQLite's write lock (``BEGIN IMMEDIATE``, fleet.database) there.
"""

from __future__ import annotations

import os
import threading
import time

from sqlalchemy import Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from fleet.config import FleetConfig
from fleet.database import safe_url, shared_engine, transaction
from fleet.errors import FleetError

metadata = MetaData()

jobs = Table(
    "fleet_jobs", metadata,
    Column("id", String(40), primary_key=True),
    #: The broker key prefix: one database can hold the ledgers of several fleets.
    Column("namespace", String(200), nullable=False),
    Column("task", String(255), nullable=False),
    Column("aggregate", String(255)),
    Column("state", String(16), nullable=False),
    Column("total", Integer, nullable=False),
    Column("done", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("records", Integer, nullable=False),
    Column("chunk_size", Integer, nullable=False),
    Column("kwargs", Text, nullable=False),
    Column("aggregate_kwargs", Text, nullable=False),
    #: What the user gave as input, for messages; and where it can be read again to
    #: rebuild a chunk: a copy in the payload store, or the s3:// object itself.
    Column("input", Text, nullable=False),
    Column("input_url", Text),
    Column("input_format", String(8)),
    Column("fingerprint", Text),
    Column("result_url", Text),
    Column("error", Text),
    Column("created", Float, nullable=False),
    Column("updated", Float, nullable=False),
    Column("finished", Float),
    Column("collecting", Boolean, nullable=False, default=False),
    Column("collect_sent", Float),
    Column("collect_started", Float),
    #: Chunks (and collect steps) the reconciler sent again.
    Column("reconciled", Integer, nullable=False, default=0),
)
Index("fleet_jobs_recent", jobs.c.namespace, jobs.c.created)
Index("fleet_jobs_state", jobs.c.state)

chunks = Table(
    "fleet_chunks", metadata,
    Column("job_id", String(40), primary_key=True),
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("state", String(8), nullable=False),  # pending | done | failed
    #: Where it was last sent (routed by size), and when.
    Column("queue", String(200)),
    Column("size", Integer),
    Column("sent_at", Float),
    Column("sends", Integer, nullable=False, default=1),
    Column("reconciled", Integer, nullable=False, default=0),
    #: The chunk's result (JSON, or a claim-check reference), or why it failed.
    Column("value", Text),
    Column("error", Text),
    Column("error_kind", String(100)),
    Column("updated", Float),
)
# The reconciler asks for pending chunks sent before some time, across running jobs.
Index("fleet_chunks_pending", chunks.c.state, chunks.c.sent_at)


class LedgerUnavailableError(FleetError):
    """The job ledger's database could not be reached or written."""

    exit_code = 3


_created: set[tuple[str, int]] = set()
_creating = threading.Lock()


def engine(config: FleetConfig) -> Engine:
    """The ledger's engine for this process, tables created on first use.

    Creating them is a write that starts with reads (does the table exist?): in a
    deferred transaction, two threads or processes doing it at once on a new SQLite
    file make one fail at once with "database is locked" (its read snapshot cannot be
    upgraded). So it takes the write lock first, and one thread per process does it.
    """
    url = config.jobs.ledger
    eng = shared_engine(url, "job ledger (jobs.ledger)", durable=True)
    if (url, os.getpid()) not in _created:
        with _creating:
            if (url, os.getpid()) not in _created:
                _create_tables(config, eng)
                _created.add((url, os.getpid()))
    return eng


def _create_tables(config: FleetConfig, eng: Engine, attempts: int = 3) -> None:
    # On PostgreSQL two processes creating the same table at once make one fail (a
    # unique violation in the catalog); the tables exist then: look again.
    for attempt in range(attempts):
        try:
            with transaction(eng, write=True) as conn:
                metadata.create_all(conn)
            return
        except SQLAlchemyError as exc:
            if attempt + 1 == attempts:
                raise unavailable(config, exc) from None
            time.sleep(0.2 * (attempt + 1))


def unavailable(config: FleetConfig, exc: BaseException) -> LedgerUnavailableError:
    reason = " ".join(str(getattr(exc, "orig", None) or exc).split())  # one line
    return LedgerUnavailableError(
        f"the job ledger at {safe_url(config.jobs.ledger)} is not answering: {reason}")
