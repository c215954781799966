"""The client-side rate limit's arithmetic, on a clock the test moves."""

from __future__ import annotations

import pytest

from autoscale.backends.token_bucket import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def bucket(qps: float, burst: int) -> tuple[TokenBucket, Clock]:
    clock = Clock()
    return TokenBucket(qps, burst, clock=clock, sleep=clock.sleep), clock


def test_a_burst_goes_at_once_and_the_rest_at_the_rate():
    limiter, clock = bucket(qps=5, burst=3)
    waits = [limiter.acquire() for _ in range(6)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3:] == pytest.approx([0.2, 0.2, 0.2])
    assert clock.now == pytest.approx(100.6)
    assert limiter.waited == pytest.approx(0.6)


def test_a_quiet_spell_refills_at_most_the_burst():
    limiter, clock = bucket(qps=5, burst=2)
    for _ in range(2):
        limiter.acquire()
    clock.now += 60  # a minute without requests saves 2 tokens, not 300
    assert [limiter.acquire() for _ in range(3)] == pytest.approx([0.0, 0.0, 0.2])


def test_callers_that_overlap_queue_behind_each_other():
    """Each caller reserves the next free slot, so two waiting callers do not both take
    the same one (as client-go's limiter)."""
    clock = Clock()
    limiter = TokenBucket(2, 1, clock=clock, sleep=lambda s: None)  # nobody advances time
    assert [limiter.acquire() for _ in range(3)] == pytest.approx([0.0, 0.5, 1.0])


@pytest.mark.parametrize(("qps", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_a_bucket_that_could_never_give_a_token_is_refused(qps, burst):
    with pytest.raises(ValueError, match="qps > 0 and burst >= 1"):
        TokenBucket(qps, burst)
