"""A queue's recent recommendations, and their lowest and highest within each window.

The policy's stabilization (autoscale/policy.py, ``stabilize``) keeps the (time,
recommendation) pairs of the last ``max(up, down)`` seconds and reads the lowest of the
last ``scale_up_stabilization`` and the highest of the last ``scale_down_stabilization``:
a window of 300 s at a 2 s interval is 150 pairs per queue per poll. Filtering them
whole at every poll was the policy's largest cost in a simulation (100 queues, 43,200
polls a day). Here the pairs are a suffix of an append-only list, and the two extremes
are monotonic deques (the classic sliding-window minimum): amortised O(1) per poll.

A ``Recommendations`` is immutable as seen from outside (``History`` is returned anew,
never mutated): extending the newest one of a queue appends to the list they share, and
any other (an older history passed again, or a window whose settings changed, or a
clock that went back) is extended the slow way, by the same filters as before, into a
new shared list. Either way the pairs kept, and the lowest and highest read, are those
of the filters: ``t >= now - window`` over every pair, in order.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import compress, islice, repeat
from operator import itemgetter, le

_TIME, _N = itemgetter(0), itemgetter(1)
#: Dropped pairs at the front of a shared list before it is copied without them.
_COMPACT = 512


class _Track:
    """What the successive Recommendations of one queue share."""

    __slots__ = ("down", "highs", "last", "latest", "longest", "lows", "pairs", "up")

    def __init__(self, pairs: list, up: float, down: float) -> None:
        self.pairs = pairs
        self.up, self.down, self.longest = up, down, max(up, down)
        #: The newest pair's time.
        self.last = pairs[-1][0]
        #: (time, n) of the up window, n rising (its front the lowest, the earliest of
        #: equals first, as min() picks), and of the down window, n falling.
        self.lows: deque = deque()
        self.highs: deque = deque()
        self.latest: Recommendations | None = None


class Recommendations(Sequence):
    """(time, recommendation) pairs, oldest first; a read-only sequence of tuples."""

    __slots__ = ("_hi", "_high", "_lo", "_low", "_pairs", "_track")

    def __init__(self, pairs: Iterable[tuple[float, int]] = ()) -> None:
        self._pairs = list(pairs)
        self._lo, self._hi = 0, len(self._pairs)
        self._track: _Track | None = None
        self._low = self._high = None

    # -- a sequence of pairs ------------------------------------------------------

    def __len__(self) -> int:
        return self._hi - self._lo

    def __iter__(self) -> Iterator[tuple[float, int]]:
        return islice(self._pairs, self._lo, self._hi)

    def __getitem__(self, index):
        return tuple(self)[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Recommendations | tuple | list):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Recommendations({tuple(self)!r})"

    # -- the policy's step --------------------------------------------------------

    def add(self, now: float, n: int, up: float, down: float) -> Recommendations:
        """The pairs of the last ``max(up, down)`` seconds and ``(now, n)``; its
        ``lowest()`` is of the last ``up`` seconds, its ``highest()`` of ``down``."""
        track = self._track
        if track is None or track.latest is not self or track.up != up \
                or track.down != down or not now >= track.last:
            return self._add_slowly(now, n, up, down)
        pairs, lo, hi = self._pairs, self._lo, self._hi
        horizon = now - track.longest
        while lo < hi and not pairs[lo][0] >= horizon:
            lo += 1
        pair = (now, n)
        pairs.append(pair)
        track.last = now
        lows, highs = track.lows, track.highs
        while lows and lows[-1][1] > n:
            lows.pop()
        lows.append(pair)
        start = now - up
        while not lows[0][0] >= start:
            lows.popleft()
        while highs and highs[-1][1] < n:
            highs.pop()
        highs.append(pair)
        start = now - down
        while not highs[0][0] >= start:
            highs.popleft()
        if lo >= _COMPACT and lo * 2 >= len(pairs):
            # A new list for the newest and what follows it; older Recommendations
            # keep the one they were made with.
            track.pairs = pairs = pairs[lo:]
            lo = 0
        out = Recommendations.__new__(Recommendations)
        out._pairs, out._lo, out._hi = pairs, lo, len(pairs)
        out._track, out._low, out._high = track, lows[0][1], highs[0][1]
        track.latest = out
        return out

    def _add_slowly(self, now: float, n: int, up: float, down: float) -> Recommendations:
        """As the policy filtered before: every pair, whatever its order."""
        recs = (*_since(self, now - max(up, down)), (now, n))
        out = Recommendations(recs)
        # The extremes as the filters give them, read only when asked (a window that
        # holds no pair has none, and asking is the error it always was).
        out._low = lambda: min(map(_N, recs if up >= down else _since(recs, now - up)))
        out._high = lambda: max(map(_N, recs if down >= up else _since(recs, now - down)))
        times = list(map(_TIME, recs))
        if 0 <= up < math.inf and 0 <= down < math.inf \
                and all(map(le, times, islice(times, 1, None))):
            # In order (no NaN) and finite windows: the next poll extends this quickly.
            track = _Track(out._pairs, up, down)
            for pair in recs:
                _push(track, pair)
            track.latest = out
            out._track = track
        return out

    def lowest(self) -> int:
        """The lowest recommendation of the up window (the last ``add``'s)."""
        low = self._low
        return low() if callable(low) else low

    def highest(self) -> int:
        """The highest recommendation of the down window (the last ``add``'s)."""
        high = self._high
        return high() if callable(high) else high


def _push(track: _Track, pair: tuple[float, int]) -> None:
    """``pair`` onto the track's deques, with nothing trimmed (a rebuild from pairs
    that are all inside their windows but for those trimmed at the next add)."""
    n = pair[1]
    while track.lows and track.lows[-1][1] > n:
        track.lows.pop()
    track.lows.append(pair)
    while track.highs and track.highs[-1][1] < n:
        track.highs.pop()
    track.highs.append(pair)


def _since(recs: Iterable[tuple[float, int]], start: float):
    """The (time, n) pairs of ``recs`` at or after ``start``, in order."""
    recs = tuple(recs)
    return compress(recs, map(le, repeat(start), map(_TIME, recs)))
