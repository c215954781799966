"""Plots over time, downsampled in SQL: per series at most one row per time bucket.

Two queries per kind of sample, both on the ``at`` index and both GROUP BY in the
database (the rows never come to Python): one ranks every name in the window (a row per
queue), the other buckets only the names drawn (``top`` per plot). What to draw and how
buckets are cut is decided in fleet.dashboard.downsample.

How a bucket's samples become one value, per figure:

- depth (``waiting``), replicas (``actual``), worker memory (``rss``): the **max**. A
  backlog, a scale-up or a memory peak that lasted one sample is what a reader looks
  for (and what a memory limit kills on); an average over five minutes would hide it.
- throughput (``completion_rate``): the **avg**. It is already a rate over the
  sampler's window; the mean over a bucket is the bucket's rate, and sums of tasks
  (rate x time) stay right when buckets are merged.

A plot's names are ranked by the same figure over the whole window: peak depth, mean
throughput, peak replicas, peak memory.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import BigInteger, Table, cast, func, literal_column, select
from sqlalchemy.engine import Connection

from fleet.dashboard.downsample import Window, chosen, dense, union
from fleet.dashboard.store import queue_samples, worker_samples

#: Column -> how a bucket aggregates it (see above).
QUEUE_FIGURES = {"waiting": "max", "completion_rate": "avg", "actual": "max"}
WORKER_FIGURES = {"rss": "max"}

KINDS: dict[str, tuple[Table, str, dict[str, str]]] = {
    "queues": (queue_samples, "queue", QUEUE_FIGURES),
    "workers": (worker_samples, "hostname", WORKER_FIGURES),
}


def bucket_of(at: Any, step: float, dialect: str) -> Any:
    """``floor(at / step)`` on both databases.

    SQLite has floor() only when built with its math functions, so there it is a CAST
    (which truncates; ``at`` is epoch seconds, never negative). PostgreSQL's CAST to an
    integer rounds to nearest instead, so there it is floor(). The step is written into
    the SQL, not bound: PostgreSQL compares SELECT and GROUP BY expressions as text, and
    two bound parameters ($1, $2) would make them differ.
    """
    ratio = at / literal_column(repr(float(step)))
    return func.floor(ratio) if dialect == "postgresql" else cast(ratio, BigInteger)


def read(conn: Connection, kind: str, window: Window, top: int,
         queue: str | None = None) -> dict[str, dict]:
    """Per figure of ``kind``: its ``top`` series, one value per bucket of ``window``,
    and how many names in the window were not drawn."""
    table, name_column, figures = KINDS[kind]
    name = table.c[name_column]
    agg = {f: (func.max if how == "max" else func.avg)(table.c[f]).label(f)
           for f, how in figures.items()}
    where = [table.c.at >= window.since, table.c.at <= window.until]
    if queue is not None:
        where.append(table.c.queue == queue)
    ranked = conn.execute(select(name, *agg.values()).where(*where).group_by(name)).all()
    rankings = {f: {row[0]: row._mapping[f] for row in ranked} for f in figures}
    choice = chosen(rankings, top)
    drawn = union(choice)
    points: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    if drawn:
        bucket = bucket_of(table.c.at, window.step, conn.dialect.name)
        rows = conn.execute(select(name, bucket.label("bucket"), *agg.values())
                            .where(*where, name.in_(drawn)).group_by(name, bucket))
        for row in rows:
            m = row._mapping
            for f in figures:
                points[row[0]][f].append((m["bucket"], m[f]))
    return {f: {"aggregate": how,
                "series": [{"name": n, "values": dense(window, points[n][f])}
                           for n in choice[f]],
                "names": len(ranked), "more": len(ranked) - len(choice[f])}
            for f, how in figures.items()}
