"""Rates from successive observations (pure: no Redis)."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest

from fleet.config import parse_config
from fleet.observe.model import (
    Observation,
    QueueMetrics,
    QueueSample,
    ScaleDecision,
    WorkerSample,
)
from fleet.observe.rates import (
    RATE_TIME_CONSTANT,
    WINDOW_POLLS,
    RateTracker,
    completed_between,
)
from tests.conftest import shipped_config

CONFIG = parse_config(shipped_config(), "test")


def worker(name, processed, active=1, pid=1, queue="default"):
    return WorkerSample(name, queue, "pod", pid, 2, active, 0, processed, 50.0, 100, 200,
                        10**9, 0.0)


def obs(at, waiting, unacked, workers):
    queues = {q: QueueSample(q, 0, 0, None) for q in CONFIG.queues}
    queues["default"] = QueueSample("default", waiting, unacked, 3.0)
    return Observation(at, queues, workers)


def test_rates_from_two_polls():
    tracker = RateTracker(CONFIG)
    tracker.update(obs(100.0, 50, 4, [worker("a", 10), worker("b", 20)]))
    m = tracker.update(obs(102.0, 56, 4, [worker("a", 14), worker("b", 24)]))["default"]
    # 8 done in 2 s; the queue grew by 6: 14 arrived.
    assert m.completion_rate == pytest.approx(4.0)
    assert m.arrival_rate == pytest.approx(7.0)
    # Little's law: 2 running / 4 per second = 0.5 s a task.
    assert m.service_time == pytest.approx(0.5)
    assert (m.running, m.workers, m.slots, m.backlog) == (2, 2, 4, 58)
    assert m.cpu_per_slot == pytest.approx(25.0)


def test_rates_are_smoothed_over_polls():
    tracker = RateTracker(CONFIG)
    tracker.update(obs(0.0, 0, 0, [worker("a", 0)]))
    tracker.update(obs(1.0, 0, 0, [worker("a", 10)]))
    m = tracker.update(obs(2.0, 0, 0, [worker("a", 10)]))["default"]
    # A second at 10/s, then a second at 0/s: their mean, the newer weighing more
    # (exp(-1/20) to 1), so a little under 5/s; not 10/s decaying.
    q = math.exp(-1 / RATE_TIME_CONSTANT)
    assert m.completion_rate == pytest.approx(10.0 * q / (1 + q))
    assert 4.8 < m.completion_rate < 5.0


def test_a_task_in_the_first_poll_is_not_read_as_a_rate_for_a_minute():
    """The first interval primes nothing: one arrival in the first 0.5 s, then 5.5 s
    of none, is one task in six seconds (it read 1.5/s when the first interval's 2/s
    was the starting value of the average)."""
    tracker = RateTracker(CONFIG)
    tracker.update(obs(0.0, 0, 0, []))
    tracker.update(obs(0.5, 1, 0, []))
    at = 0.5
    while at < 6.0:
        at += 0.5
        m = tracker.update(obs(at, 1, 0, []))["default"]
    # About 1/6 s (a little less: the oldest second weighs exp(-5.5/20) of the newest).
    assert 0.12 < m.arrival_rate < 1 / 6


def test_after_a_long_span_the_average_is_the_plain_moving_average():
    tracker = RateTracker(CONFIG)
    tracker.update(obs(0.0, 0, 0, [worker("a", 0)]))
    done, at = 0, 0.0
    while at < 40 * RATE_TIME_CONSTANT:  # a steady 3/s for long
        at += 2.0
        done += 6
        tracker.update(obs(at, 0, 0, [worker("a", done)]))
    at += 2.0
    m = tracker.update(obs(at, 0, 0, [worker("a", done)]))["default"]  # then 2 s of none
    assert m.completion_rate == pytest.approx(3.0 * math.exp(-2 / RATE_TIME_CONSTANT))


def test_the_smoothing_does_not_depend_on_the_poll_interval():
    """Ten polls of 1 s and two of 5 s over the same 10 s of silence end equal."""
    ends = []
    for step in (1.0, 5.0):
        tracker = RateTracker(CONFIG)
        tracker.update(obs(0.0, 0, 0, [worker("a", 0)]))
        tracker.update(obs(1.0, 0, 0, [worker("a", 10)]))
        at = 1.0
        while at < 11.0:
            at += step
            m = tracker.update(obs(at, 0, 0, [worker("a", 10)]))["default"]
        ends.append(m.completion_rate)
    # 10/s for the first of 11 seconds, weighed exp(-10/20) against the newest.
    tau = RATE_TIME_CONSTANT
    mean = 10.0 * -math.expm1(-1 / tau) * math.exp(-10 / tau) / -math.expm1(-11 / tau)
    assert ends[0] == pytest.approx(ends[1]) == pytest.approx(mean)


def test_a_restarted_or_vanished_worker_never_makes_a_negative_rate():
    before = obs(0.0, 0, 0, [worker("a", 100, pid=1), worker("b", 50)])
    after = obs(1.0, 0, 0, [worker("a", 3, pid=2)])  # a restarted, b is gone
    assert completed_between(before, after, "default") == 3


def test_no_service_time_until_something_completes():
    tracker = RateTracker(CONFIG)
    tracker.update(obs(0.0, 5, 0, []))
    m = tracker.update(obs(1.0, 5, 0, []))["default"]
    assert m.service_time is None and m.completion_rate == 0.0 and m.arrival_rate == 0.0


def test_no_running_task_seen_keeps_the_last_service_time_instead_of_zero():
    """Short tasks finish between samples: running is 0 while completions are not."""
    tracker = RateTracker(CONFIG)
    tracker.update(obs(0.0, 0, 0, [worker("a", 0, active=0)]))
    m = tracker.update(obs(1.0, 0, 0, [worker("a", 10, active=0)]))["default"]
    assert m.completion_rate == pytest.approx(10.0) and m.service_time is None
    m = tracker.update(obs(2.0, 0, 0, [worker("a", 20, active=2)]))["default"]
    # 1 busy slot-second (0 then 2 running over 1 s) over the window's last ten done.
    assert m.service_time == pytest.approx(1.0 / 10)
    for at in (3.0, 4.0, 5.0):
        m = tracker.update(obs(at, 0, 0, [worker("a", 20, active=0)]))["default"]
    # Nothing more completed: no new estimate, the last one holds (never zero).
    assert m.service_time == pytest.approx(1.0 / 10)
    m = tracker.update(obs(6.0, 0, 0, [worker("a", 30, active=0)]))["default"]
    # Ten more done, with one busy slot-second (2 then 0 running from 2 s to 3 s).
    assert m.service_time == pytest.approx(1.0 / 10)


def run_one_slot(tracker, service: float, start: float, until: float, done: int,
                 poll: float = 2.0):
    """One slot busy with back-to-back tasks of ``service`` seconds, polled every
    ``poll`` seconds; returns the service times the tracker reported, and the count."""
    seen = []
    at = start
    while at < until:
        at += poll
        done_now = done + int((at - start) / service)
        m = tracker.update(obs(at, 5, 1, [worker("a", done_now, active=1)]))["default"]
        seen.append(m.service_time)
    return seen, done + int((at - start) / service), at


def test_sparse_completions_do_not_inflate_the_service_time():
    """A 20 s task on one slot completes once every ten 2 s polls. The ratio of two
    EWMAs this replaced read 3,535 s here (the smoothed completion rate halves at every
    poll without one) and sent the queue to max_replicas."""
    tracker = RateTracker(CONFIG)
    tracker.update(obs(0.0, 5, 1, [worker("a", 0, active=1)]))
    seen, _, _ = run_one_slot(tracker, 20.0, 0.0, 400.0, 0)
    known = [s for s in seen if s is not None]
    assert seen[8] is None and known  # nothing known before the first completion
    assert all(10.0 <= s <= 22.0 for s in known), max(known)
    assert known[-1] == pytest.approx(20.0, rel=0.05)


def test_the_service_time_follows_a_change_of_workload_within_the_window():
    tracker = RateTracker(CONFIG)
    tracker.update(obs(0.0, 5, 1, [worker("a", 0, active=1)]))
    _, done, at = run_one_slot(tracker, 20.0, 0.0, 400.0, 0)
    # Now 1 s tasks: WINDOW_COMPLETIONS of them take 10 s, five polls.
    seen, _, _ = run_one_slot(tracker, 1.0, at, at + 30.0, done)
    assert seen[-1] == pytest.approx(1.0, rel=0.1)


def test_the_window_stays_bounded_when_nothing_completes():
    tracker = RateTracker(CONFIG)
    for i in range(WINDOW_POLLS + 500):
        tracker.update(obs(float(i), 5, 1, [worker("a", 7, active=1)]))
    assert len(tracker.smoothed["default"].window.marks) <= WINDOW_POLLS


def test_the_window_stays_bounded_when_everything_completes():
    tracker = RateTracker(CONFIG)
    for i in range(500):
        tracker.update(obs(float(i), 5, 1, [worker("a", 3 * i, active=1)]))
    # Three a poll: the shortest span with ten is four intervals, five marks.
    assert len(tracker.smoothed["default"].window.marks) == 5


def test_tasks_of_workers_in_warm_shutdown_are_counted_as_draining():
    stopping = WorkerSample("b", "default", "pod", 2, 2, 2, 0, 5, 50.0, 100, 200, 10**9, 0.0,
                            draining=2)
    tracker = RateTracker(CONFIG)
    m = tracker.update(obs(0.0, 0, 3, [worker("a", 0), stopping]))["default"]
    assert (m.running, m.draining) == (3, 2)


def test_the_models_filled_at_once_are_the_frozen_dataclasses_they_were():
    # fleet/observe/model.py replaces their generated __init__: same parameters,
    # defaults, keywords, equality, hash and immutability.
    w = WorkerSample("h", "q", "pod", 1, 2, 3, 4, 5, 0.5, 6, 7, 8, 9.0)
    assert w.loop_at is None and w.held == ()
    assert w == WorkerSample(hostname="h", queue="q", pod="pod", pid=1, concurrency=2,
                             active=3, reserved=4, processed=5, cpu_percent=0.5,
                             rss_main=6, rss_children=7, memory_available=8, at=9.0)
    assert hash(w) == hash(dataclasses.replace(w))
    assert [p.name for p in inspect.signature(WorkerSample).parameters.values()] == \
        [f.name for f in dataclasses.fields(WorkerSample)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.pid = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        ScaleDecision("q", 1, 2)  # type: ignore[call-arg]
    m = QueueMetrics("q", 1, 2, 3, None, 0.1, 0.2, None, 1, 2, 0.0, None)
    assert dataclasses.asdict(m)["unacked"] == 2 and m.backlog == 1
    assert w.draining == 0 and m.draining == 0
