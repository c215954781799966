"""The periodic thread under the memory guard, the lease and the heartbeat: real threads,
short intervals, no Redis."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from fleet.periodic import Periodic
from tests.conftest import wait_for


class Ticks:
    """A tick that records when it ran and can be told to raise or to block."""

    def __init__(self, fail: int = 0):
        self.at: list[float] = []
        self.fail = fail
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def __call__(self) -> None:
        self.at.append(time.monotonic())
        self.entered.set()
        self.release.wait()
        if self.fail:
            self.fail -= 1
            raise ValueError("a bad tick")


@pytest.fixture
def stopping():
    started: list[Periodic] = []
    yield started.append
    for periodic in started:
        periodic.stop()


def test_it_ticks_every_interval_the_first_time_after_one_interval(stopping):
    ticks = Ticks()
    periodic = Periodic("test-periodic", ticks, 0.05)
    began = time.monotonic()
    periodic.start()
    stopping(periodic)
    wait_for(lambda: len(ticks.at) >= 3, 5, interval=0.01, what="three ticks")
    assert ticks.at[0] - began >= 0.045  # Event.wait may wake a hair early
    assert all(b - a >= 0.045 for a, b in zip(ticks.at, ticks.at[1:], strict=False))
    assert periodic.thread.name == "test-periodic"
    assert periodic.thread.daemon


def test_first_after_zero_ticks_at_once(stopping):
    ticks = Ticks()
    periodic = Periodic("test-periodic", ticks, 60, first_after=0)
    periodic.start()
    stopping(periodic)
    assert ticks.entered.wait(2)
    assert len(ticks.at) == 1  # then the interval


def test_stop_wakes_the_sleeping_loop_at_once():
    periodic = Periodic("test-periodic", Ticks(), 60)
    periodic.start()
    began = time.monotonic()
    periodic.stop()
    assert time.monotonic() - began < 1
    assert not periodic.is_alive()


def test_a_failing_tick_is_logged_with_the_thread_name_and_the_next_tick_runs(
        stopping, caplog):
    ticks = Ticks(fail=1)
    owner = logging.getLogger("fleet.test-owner")
    periodic = Periodic("test-periodic", ticks, 0.02, what="testing", logger=owner)
    with caplog.at_level(logging.ERROR, logger="fleet.test-owner"):
        periodic.start()
        stopping(periodic)
        wait_for(lambda: len(ticks.at) >= 2, 5, interval=0.01, what="a tick after the failure")
    assert periodic.is_alive()
    assert periodic.problem() is None
    [record] = [r for r in caplog.records if r.name == "fleet.test-owner"]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "testing failed (thread test-periodic); next try in 0.02s"
    assert record.exc_info[0] is ValueError


def test_stop_is_idempotent_and_harmless_before_start():
    periodic = Periodic("test-periodic", Ticks(), 60)
    periodic.stop()
    periodic.start()
    periodic.stop()
    periodic.stop()
    assert not periodic.is_alive()


def test_a_second_start_while_running_is_an_error_but_after_stop_it_starts_afresh():
    ticks = Ticks()
    periodic = Periodic("test-periodic", ticks, 0.02)
    periodic.start()
    try:
        with pytest.raises(RuntimeError, match="test-periodic is already running"):
            periodic.start()
    finally:
        periodic.stop()
    count = len(ticks.at)
    periodic.start()
    try:
        wait_for(lambda: len(ticks.at) > count, 5, interval=0.01, what="a tick after restart")
    finally:
        periodic.stop()
    assert not periodic.is_alive()


def test_stop_waits_for_a_tick_in_progress_unless_told_not_to():
    ticks = Ticks()
    ticks.release.clear()  # the first tick blocks until released
    periodic = Periodic("test-periodic", ticks, 0.01, join_timeout=0.2)
    periodic.start()
    assert ticks.entered.wait(2)
    began = time.monotonic()
    periodic.stop(timeout=0)
    assert time.monotonic() - began < 0.1
    assert periodic.is_alive()  # still in its tick
    periodic.stop()  # waits join_timeout, the tick still blocks
    assert time.monotonic() - began >= 0.19
    ticks.release.set()
    periodic.stop()
    assert not periodic.is_alive()
    assert len(ticks.at) == 1  # no tick after the stop
