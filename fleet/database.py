"""SQLAlchemy engines for the fleet's two databases: the job ledger and the dashboard.

Both take any SQLAlchemy URL for SQLite (the embedded default: a file, no server) or
PostgreSQL (a team's shared server). SQLite gets WAL, so readers never block the one
writer, and a busy timeout, so many worker processes writing at once wait their turn
instead of failing with "database is locked". A write transaction on SQLite starts with
``BEGIN IMMEDIATE`` (``write=True``): a deferred one that reads first and then writes can
fail to upgrade its lock when another writer got in between, which pysqlite reports as
an immediate "database is locked" without waiting.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError

from fleet.errors import FleetError

#: Seconds a SQLite writer waits for another one before giving up.
SQLITE_BUSY_TIMEOUT = 30


class DatabaseUrlError(FleetError):
    exit_code = 2


def safe_url(url: str) -> str:
    """``url`` without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def open_engine(url: str, what: str, *, durable: bool = False) -> Engine:
    """An engine for ``url`` (``what`` names the database in errors).

    ``durable``: SQLite syncs every commit to disk (``synchronous=FULL``), so a power
    loss cannot take back a committed write; the default (NORMAL) survives a crash of
    the process but may lose the last commits on a power loss.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseUrlError(f"{what} URL {url!r} is not a SQLAlchemy URL (e.g. "
                               "sqlite:///.fleet/NAME.sqlite or "
                               "postgresql://user@host/db)") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"check_same_thread": False,
                                                      "timeout": SQLITE_BUSY_TIMEOUT})
        sync = "FULL" if durable else "NORMAL"

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            # Driver-level autocommit: the "begin" hook below issues BEGIN itself.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={sync}")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT * 1000}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get("fleet_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":  # psycopg 3 is the driver we ship
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, pool_pre_ping=True)
    raise DatabaseUrlError(f"{what} {safe_url(url)!r}: only sqlite and postgresql are "
                           "supported")


@contextmanager
def transaction(engine: Engine, *, write: bool = False) -> Iterator[Connection]:
    """One transaction; ``write`` takes SQLite's write lock at BEGIN (see above)."""
    with engine.connect() as conn:
        if write:
            conn.execution_options(fleet_write=True)
        with conn.begin():
            yield conn


_engines: dict[tuple[str, bool, int], Engine] = {}


def shared_engine(url: str, what: str, *, durable: bool = False) -> Engine:
    """One engine (and pool) per URL and process: pooled connections must not cross a
    fork, and prefork pool children each write the ledger."""
    found = _engines.get((url, durable, os.getpid()))
    if found is None:
        found = open_engine(url, what, durable=durable)
        _engines[(url, durable, os.getpid())] = found
    return found
