"""Rates from successive observations (pure: no Redis)."""

from __future__ import annotations

import pytest

from fleet.config import parse_config
from fleet.observe.model import Observation, QueueSample, WorkerSample
from fleet.observe.rates import RateTracker, completed_between
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
    assert m.completion_rate == pytest.approx(5.0)  # half way from 10/s towards 0/s


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
    assert m.service_time == pytest.approx(1.0 / 10.0)  # smoothed: 1 running / 10 per s
    m = tracker.update(obs(3.0, 0, 0, [worker("a", 30, active=0)]))["default"]
    assert m.service_time == pytest.approx(0.5 / 10.0)  # running decays, still positive
