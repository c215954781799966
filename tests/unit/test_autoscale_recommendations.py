"""Recommendations keep and read what the policy's filters did, step by step."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from autoscale.recommendations import Recommendations


def filtered(recs: tuple, now: float, n: int, up: float, down: float):
    """The policy's stabilization windows as plain filters over every pair."""
    kept = (*(p for p in recs if p[0] >= now - max(up, down)), (now, n))
    low = min(p[1] for p in (kept if up >= down else [p for p in kept if p[0] >= now - up]))
    high = max(p[1] for p in (kept if down >= up else [p for p in kept if p[0] >= now - down]))
    return kept, low, high


windows = st.sampled_from([0.0, 2.0, 7.5, 60.0, 300.0])
steps = st.lists(st.tuples(st.floats(-5, 30), st.integers(0, 9), windows, windows,
                           st.integers(0, 3)), min_size=1, max_size=120)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_each_step_keeps_and_reads_what_the_filters_do(steps):
    # Time mostly goes forward (the fast path), sometimes back; now and then an older
    # history is extended again, or the windows change.
    now, mine, theirs = 1000.0, [Recommendations()], [()]
    for dt, n, up, down, back in steps:
        now += dt
        if back and len(mine) > back:
            mine, theirs = mine[:-back], theirs[:-back]
        kept, low, high = filtered(theirs[-1], now, n, up, down)
        got = mine[-1].add(now, n, up, down)
        assert tuple(got) == kept and len(got) == len(kept)
        assert (got.lowest(), got.highest()) == (low, high)
        mine.append(got)
        theirs.append(kept)
    for got, kept in zip(mine, theirs, strict=True):
        assert tuple(got) == kept  # an older one is never changed by a newer one


def test_a_long_run_at_one_interval_keeps_one_window_of_pairs():
    recs = Recommendations()
    for i in range(5000):
        recs = recs.add(2.0 * i, i % 7, 0.0, 300.0)
        assert recs.lowest() == i % 7
    assert len(recs) == 151 and recs.highest() == 6
    assert recs == tuple((2.0 * i, i % 7) for i in range(4849, 5000))
