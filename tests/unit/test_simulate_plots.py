"""`fleet simulate --plot`'s recorded series: bounded, maxima kept, what the backend
had at each poll. No services."""

from __future__ import annotations

from autoscale.sim.engine import Simulation
from autoscale.sim.series import QueueSeries, Series
from tests.unit.test_simulate import SCALING, bursty, config, header


def test_a_series_stays_bounded_and_keeps_the_maxima_and_the_last_replicas():
    s = QueueSeries("a", capacity=100)
    peaks = {1234: 900, 20_000: 700, 43_199: 500}
    for i in range(43_200):
        waiting = peaks.get(i, i % 7)
        s.add(2.0 * i, waiting, i % 5, ready=i // 1000, starting=i % 3,
              oldest=None if i % 2 else float(waiting))
        assert len(s) <= 100
    assert len(s) >= 50
    assert max(s.waiting) == 900 and max(s.held) == 4
    assert max(a for a in s.oldest if a is not None) == 900.0
    for at, value in peaks.items():
        # The point whose span holds the peak carries it.
        j = next(j for j, t in enumerate(s.time) if t >= 2.0 * at)
        assert s.waiting[j] == value
    # Times stay in order, each point at its span's end; replicas are the span's last.
    assert s.time == sorted(s.time) and s.time[-1] == 2.0 * 43_199
    assert (s.ready[-1], s.starting[-1]) == (43, 43_199 % 3)


def test_a_series_short_of_its_capacity_is_every_poll_as_given():
    s = QueueSeries("a", capacity=10)
    for i in range(7):
        s.add(float(i), i, 0, 1, 0, None if i == 3 else float(i))
    assert s.time == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert s.oldest[3] is None and s.waiting == list(range(7))
    # One more than fits: pairs merge, an odd count's last point fills up later.
    for i in range(7, 11):
        s.add(float(i), 0, 0, 2, 0, None)
    assert s.time == [1.0, 3.0, 5.0, 7.0, 9.0, 10.0]
    assert s.waiting == [1, 3, 5, 6, 0, 0] and s.oldest[1] == 2.0
    assert s.span == 2


def test_a_day_of_100_queues_at_a_2s_poll_is_bounded():
    series = Series([f"q{i}" for i in range(100)])
    q = series["q0"]
    for i in range(43_200):
        q.add(2.0 * i, i, 0, 1, 0, None)
    assert len(q) <= 2000 and q.waiting[-1] == 43_199


def test_recorded_replicas_are_the_backends_at_each_poll():
    sim = Simulation(header(3600), bursty(), config(SCALING), startup=5.0, record=True)
    sim.series = Series(sim.queues, capacity=10**6)  # every poll, to compare each
    seen = []
    poll = sim._poll

    def spy():
        poll()
        seen.append((sim.now, sim.backend.replicas()["a"],
                     sum(1 for r in sim.queues["a"].replicas if r.ready)))

    sim._poll = spy
    report = sim.run()
    s = sim.series["a"]
    assert len(s) == len(seen) == report.polls
    assert [(t, r + st) for t, r, st in zip(s.time, s.ready, s.starting, strict=True)] \
        == [(t, n) for t, n, _ in seen]
    assert s.ready == [ready for _, _, ready in seen]
    assert max(s.ready) + max(s.starting) >= 3 and max(s.waiting) > 0


def test_without_record_nothing_is_recorded():
    sim = Simulation(header(3600), bursty(), config(SCALING), startup=5.0)
    sim.run()
    assert sim.series is None
