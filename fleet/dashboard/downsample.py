"""Which time buckets and which series a plot gets: pure decisions, no database.

The sampler stores one row per queue (and per worker) every ``sample_interval``: 1,000
queues at 5 s are 17M rows a day. A plot is a few hundred pixels wide, so the series API
answers with at most ``MAX_POINTS`` time buckets per series, whatever the window, the
number of queues or the number of samples; and draws only the ``top`` series of each
plot (the others are counted, not sent), so 1,000 queues stay readable.

Buckets are aligned to multiples of their width since the epoch (not to the window's
start): a page asking again two seconds later gets the same bucket edges, so the lines
do not shift under the reader's cursor on every refresh.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

#: The windows the pages offer, in seconds.
WINDOWS: dict[str, float] = {"15m": 900.0, "1h": 3600.0, "24h": 86400.0}
DEFAULT_WINDOW = "1h"

#: Time buckets per series at most: about one per two pixels of a plot.
MAX_POINTS = 300

#: Series drawn per plot unless asked otherwise (more lines than this are a blur).
TOP = 10

#: Bucket widths in seconds: clock-friendly steps, so bucket edges fall on :00, :05,
#: :15... and a tooltip's time reads as the reader expects. Past a day: whole days.
STEPS: tuple[float, ...] = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600,
                            7200, 10800, 21600, 43200, 86400)

#: Timestamps outside this range are not a plot window (epoch seconds, year 2286).
LATEST = 1e10


class WindowError(ValueError):
    """A window that cannot be plotted; the message says why (the API answers 400)."""


@dataclass(frozen=True)
class Window:
    """A span of time cut into equal buckets: samples with ``since <= at <= until``,
    bucket ``k`` holding those with ``floor(at / step) == k``."""

    since: float
    until: float
    step: float

    @property
    def first(self) -> int:
        return math.floor(self.since / self.step)

    @property
    def last(self) -> int:
        return math.floor(self.until / self.step)

    def starts(self) -> list[float]:
        """Every bucket's start time, oldest first: the plot's shared x values."""
        return [k * self.step for k in range(self.first, self.last + 1)]


def bucket_step(span: float, sample_interval: float = 0.0,
                max_points: int = MAX_POINTS) -> float:
    """The narrowest clock-friendly bucket that cuts ``span`` into at most
    ``max_points`` buckets, and holds at least two sampling intervals.

    Two intervals: samples are taken every ``sample_interval`` plus the time a poll
    takes, so a bucket exactly one interval wide is now and then empty, and the line
    would show a gap that is no gap. At two, an empty bucket means no samples were taken
    (the dashboard was down), which the plot rightly shows as a break in the line.

    ``max_points - 2``: a span cut at aligned edges touches one more bucket than it
    covers, and the bucket holding ``until`` is counted too.
    """
    if max_points < 3:
        raise ValueError("max_points must be 3 or more")
    least = max(span / (max_points - 2), 2 * sample_interval)
    for step in STEPS:
        if step >= least:
            return float(step)
    return math.ceil(least / 86400) * 86400.0


def plan(now: float, window: str | None = None, since: float | None = None,
         until: float | None = None, sample_interval: float = 0.0,
         max_points: int = MAX_POINTS) -> Window:
    """The window a request means: a named one (``15m``, ``1h``, ``24h``) ending now,
    or ``since``..``until`` (``until`` defaults to now); neither: the last hour."""
    if window is not None and since is not None:
        raise WindowError("give either window or since (and until), not both")
    end = now if until is None else until
    _epoch("until", end)
    if window is not None:
        if window not in WINDOWS:
            raise WindowError(f"window must be one of {', '.join(WINDOWS)} (got {window!r})")
        start = end - WINDOWS[window]
    else:
        start = end - WINDOWS[DEFAULT_WINDOW] if since is None else since
    _epoch("since", start)
    if start >= end:
        raise WindowError(f"since ({start}) must be before until ({end})")
    return Window(start, end, bucket_step(end - start, sample_interval, max_points))


def _epoch(name: str, value: float) -> None:
    if not (math.isfinite(value) and 0 <= value <= LATEST):
        raise WindowError(f"{name} must be a time in epoch seconds (got {value})")


def top(ranking: Mapping[str, float | None], n: int) -> list[str]:
    """The ``n`` names with the largest figure (none counts as zero), ties by name, so
    the same data always draws the same lines in the same order."""
    return sorted(ranking, key=lambda name: (-(ranking[name] or 0.0), name))[:n]


def dense(window: Window, values: Iterable[tuple[int, float | None]],
          digits: int = 4) -> list[float | None]:
    """One value per bucket of ``window`` from (bucket, value) pairs; None where no
    sample fell (the plot shows a gap, not a zero it never measured)."""
    out: list[float | None] = [None] * (window.last - window.first + 1)
    for bucket, value in values:
        i = int(bucket) - window.first
        if 0 <= i < len(out) and value is not None:
            out[i] = round(float(value), digits)
    return out


def chosen(rankings: Mapping[str, Mapping[str, float | None]], n: int
           ) -> dict[str, list[str]]:
    """Per plot (a metric), its top ``n`` names: one query then reads only these."""
    return {metric: top(ranking, n) for metric, ranking in rankings.items()}


def union(choice: Mapping[str, Sequence[str]]) -> list[str]:
    """Every name some plot draws, once."""
    return sorted({name for names in choice.values() for name in names})
