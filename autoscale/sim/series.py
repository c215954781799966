"""Per-queue time series of a simulation, for plots: bounded, whatever the run's length.

At each poll the engine adds one point per queue: time, messages waiting, messages held
by workers, ready and starting replicas, and the oldest waiting message's age. A day of
100 queues at a 2 s poll is 4.3 million points, so each queue keeps at most ``capacity``
of them: when the buffer fills, neighbours merge in pairs (halving it), and from then
on each stored point covers twice as many polls. A merged point keeps the maxima of the
backlog and the age (a peak is what a plot must not lose) and the last replica counts
of its span (a step function's value at its end), at the time of its span's end.

Optionally (``RecordedWaits``), the 95th percentile of the waits of the tasks that
started between two polls; a merged point keeps the larger, so a point's figure is the
worst poll interval's p95 of its span (an interval's histogram is not kept: 2,000 of
them per queue would be megabytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autoscale.sim.report import WaitHistogram

#: Points kept per queue at most: enough for a plot's width several times over.
CAPACITY = 2000

#: Field order of a point.
FIELDS = ("time", "waiting", "held", "ready", "starting", "oldest", "wait_p95")


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


@dataclass
class QueueSeries:
    """One queue's points, oldest first; ``oldest`` is None when nothing waited."""

    name: str
    capacity: int = CAPACITY
    time: list[float] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    held: list[int] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)
    starting: list[int] = field(default_factory=list)
    oldest: list[float | None] = field(default_factory=list)
    #: p95 of the waits started since the previous poll (None: none started; see top).
    wait_p95: list[float | None] = field(default_factory=list)
    #: Polls per stored point (doubles with each merge) and polls in the open point.
    span: int = 1
    _open: int = 0
    _waits: WaitHistogram = field(default_factory=WaitHistogram)

    def __post_init__(self) -> None:
        if self.capacity < 2:
            raise ValueError("a series keeps at least 2 points")

    def add(self, t: float, waiting: int, held: int, ready: int, starting: int,
            oldest: float | None) -> None:
        """One poll's figures."""
        p95 = None
        if self._waits.count:
            p95, self._waits = self._waits.quantile(0.95), WaitHistogram()
        if self._open:  # fold into the open point (it covers fewer than ``span`` polls)
            self._fold(-1, t, waiting, held, ready, starting, oldest, p95)
        else:
            self.time.append(t)
            self.waiting.append(waiting)
            self.held.append(held)
            self.ready.append(ready)
            self.starting.append(starting)
            self.oldest.append(oldest)
            self.wait_p95.append(p95)
        self._open += 1
        if self._open >= self.span:
            self._open = 0
            if len(self.time) >= self.capacity:
                self._halve()

    def add_wait(self, wait: float) -> None:
        """A task started after ``wait`` seconds: into the next point's p95."""
        self._waits.add(wait)

    def _fold(self, i: int, t, waiting, held, ready, starting, oldest, p95) -> None:
        self.time[i] = t
        self.waiting[i] = max(self.waiting[i], waiting)
        self.held[i] = max(self.held[i], held)
        self.ready[i] = ready
        self.starting[i] = starting
        self.oldest[i] = _max(self.oldest[i], oldest)
        self.wait_p95[i] = _max(self.wait_p95[i], p95)

    def _halve(self) -> None:
        """Merge neighbours in pairs: (0, 1), (2, 3), ...; an odd last point stays."""
        n = len(self.time)
        keep = (n + 1) // 2
        for j in range(keep):
            a, b = 2 * j, 2 * j + 1
            self.time[j], self.waiting[j], self.held[j] = (
                self.time[a], self.waiting[a], self.held[a])
            self.ready[j], self.starting[j], self.oldest[j], self.wait_p95[j] = (
                self.ready[a], self.starting[a], self.oldest[a], self.wait_p95[a])
            if b < n:
                self._fold(j, self.time[b], self.waiting[b], self.held[b], self.ready[b],
                           self.starting[b], self.oldest[b], self.wait_p95[b])
        for column in (self.time, self.waiting, self.held, self.ready, self.starting,
                       self.oldest, self.wait_p95):
            del column[keep:]
        # An odd last point covers one old span: it stays open until it has a new one.
        self._open = self.span if n % 2 else 0
        self.span *= 2

    def __len__(self) -> int:
        return len(self.time)


@dataclass
class RecordedWaits(WaitHistogram):
    """A queue report's wait histogram that also feeds its series' per-poll p95: what
    ``Simulation(record=True)`` puts in place of the plain one (a run without plots
    keeps the plain one and its speed)."""

    series: QueueSeries | None = field(default=None, repr=False, compare=False)

    def add(self, wait: float) -> None:
        super().add(wait)
        self.series.add_wait(wait)


class Series:
    """Every queue's series: ``series[name]``; what ``Simulation(record=True)`` fills."""

    def __init__(self, names, capacity: int = CAPACITY):
        self.queues: dict[str, QueueSeries] = {n: QueueSeries(n, capacity) for n in names}

    def watch(self, reports) -> None:
        """Feed each queue's per-poll p95 from its QueueReport's waits (still empty)."""
        for r in reports:
            r.waits = RecordedWaits(series=self.queues[r.name])

    def __getitem__(self, name: str) -> QueueSeries:
        return self.queues[name]

    def __iter__(self):
        return iter(self.queues.values())
