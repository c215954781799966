"""The plots' decisions, without a database: bucket widths, windows, which series."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.dashboard.downsample import (
    MAX_POINTS,
    STEPS,
    WINDOWS,
    Window,
    WindowError,
    bucket_step,
    dense,
    plan,
    top,
)

NOW = 1_767_225_600.0  # 2026-01-01 00:00 UTC


def test_the_named_windows_get_clock_friendly_buckets():
    widths = {name: bucket_step(span) for name, span in WINDOWS.items()}
    assert widths == {"15m": 5.0, "1h": 15.0, "24h": 300.0}
    # ... but never narrower than two sampling intervals (no false gaps in a line)
    assert bucket_step(900, sample_interval=5) == 10.0
    assert bucket_step(900, sample_interval=60) == 120.0


@given(span=st.floats(1e-3, 3e8), interval=st.floats(0, 600), max_points=st.integers(3, 2000),
       end=st.floats(1e6, 5e9))
def test_no_window_is_cut_into_more_buckets_than_the_bound(span, interval, max_points, end):
    step = bucket_step(span, interval, max_points)
    assert step in STEPS or step % 86400 == 0
    assert step >= 2 * interval
    w = Window(end - span, end, step)
    starts = w.starts()
    assert len(starts) <= max_points
    # the buckets cover the window: the first holds since, the last holds until
    assert starts[0] <= w.since < starts[0] + step
    assert starts[-1] <= w.until < starts[-1] + step


def test_a_named_window_ends_now_and_since_until_is_taken_as_given():
    w = plan(NOW, "15m")
    assert (w.since, w.until, w.step) == (NOW - 900, NOW, 5.0)
    assert plan(NOW).since == NOW - 3600  # neither: the last hour
    w = plan(NOW, since=NOW - 7200, until=NOW - 3600, sample_interval=5)
    assert (w.since, w.until, w.step) == (NOW - 7200, NOW - 3600, 15.0)
    assert plan(NOW, "24h", until=NOW - 86400).since == NOW - 2 * 86400


@pytest.mark.parametrize("kw, problem", [
    ({"window": "7d"}, "window must be one of 15m, 1h, 24h"),
    ({"window": "1h", "since": NOW - 60}, "not both"),
    ({"since": NOW + 1}, "must be before until"),
    ({"since": math.nan}, "since must be a time"),
    ({"since": -1.0}, "since must be a time"),
    ({"until": math.inf}, "until must be a time"),
])
def test_a_window_that_cannot_be_plotted_says_why(kw, problem):
    with pytest.raises(WindowError, match=problem):
        plan(NOW, **kw)


def test_top_names_are_the_largest_ties_by_name_none_as_zero():
    ranking = {"b": 5.0, "a": 5.0, "c": None, "d": 9.0, "e": 0.0}
    assert top(ranking, 3) == ["d", "a", "b"]
    assert top(ranking, 10) == ["d", "a", "b", "c", "e"]


def test_dense_puts_each_value_in_its_bucket_and_none_where_nothing_was_sampled():
    w = Window(100.0, 130.0, 10.0)  # buckets 10, 11, 12, 13
    assert w.starts() == [100.0, 110.0, 120.0, 130.0]
    assert dense(w, [(11, 2.123456), (13, 4), (12, None), (99, 1)]) == [None, 2.1235, None, 4.0]
    assert len(dense(plan(NOW, "24h"), [])) <= MAX_POINTS
