"""Per-queue time series of a simulation, for plots: bounded, whatever the run's length.

At each poll the engine adds one point per queue: time, messages waiting, messages held
by workers, ready and starting replicas, and the oldest waiting message's age. A day of
100 queues at a 2 s poll is 4.3 million points, so each queue keeps at most ``capacity``
of them: when the buffer fills, neighbours merge in pairs (halving it), and from then
on each stored point covers twice as many polls. A merged point keeps the maxima of the
backlog and the age (a peak is what a plot must not lose) and the last replica counts
of its span (a step function's value at its end), at the time of its span's end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Points kept per queue at most: enough for a plot's width several times over.
CAPACITY = 2000

#: Field order of a point.
FIELDS = ("time", "waiting", "held", "ready", "starting", "oldest")


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
    #: Polls per stored point (doubles with each merge) and polls in the open point.
    span: int = 1
    _open: int = 0

    def __post_init__(self) -> None:
        if self.capacity < 2:
            raise ValueError("a series keeps at least 2 points")

    def add(self, t: float, waiting: int, held: int, ready: int, starting: int,
            oldest: float | None) -> None:
        """One poll's figures."""
        if self._open:  # fold into the open point (it covers fewer than ``span`` polls)
            self._fold(-1, t, waiting, held, ready, starting, oldest)
        else:
            self.time.append(t)
            self.waiting.append(waiting)
            self.held.append(held)
            self.ready.append(ready)
            self.starting.append(starting)
            self.oldest.append(oldest)
        self._open += 1
        if self._open >= self.span:
            self._open = 0
            if len(self.time) >= self.capacity:
                self._halve()

    def _fold(self, i: int, t, waiting, held, ready, starting, oldest) -> None:
        self.time[i] = t
        self.waiting[i] = max(self.waiting[i], waiting)
        self.held[i] = max(self.held[i], held)
        self.ready[i] = ready
        self.starting[i] = starting
        o = self.oldest[i]
        self.oldest[i] = oldest if o is None else o if oldest is None else max(o, oldest)

    def _halve(self) -> None:
        """Merge neighbours in pairs: (0, 1), (2, 3), ...; an odd last point stays."""
        n = len(self.time)
        keep = (n + 1) // 2
        for j in range(keep):
            a, b = 2 * j, 2 * j + 1
            self.time[j], self.waiting[j], self.held[j] = (
                self.time[a], self.waiting[a], self.held[a])
            self.ready[j], self.starting[j], self.oldest[j] = (
                self.ready[a], self.starting[a], self.oldest[a])
            if b < n:
                self._fold(j, self.time[b], self.waiting[b], self.held[b], self.ready[b],
                           self.starting[b], self.oldest[b])
        for column in (self.time, self.waiting, self.held, self.ready, self.starting,
                       self.oldest):
            del column[keep:]
        # An odd last point covers one old span: it stays open until it has a new one.
        self._open = self.span if n % 2 else 0
        self.span *= 2

    def __len__(self) -> int:
        return len(self.time)


class Series:
    """Every queue's series: ``series[name]``; what ``Simulation(record=True)`` fills."""

    def __init__(self, names, capacity: int = CAPACITY):
        self.queues: dict[str, QueueSeries] = {n: QueueSeries(n, capacity) for n in names}

    def __getitem__(self, name: str) -> QueueSeries:
        return self.queues[name]

    def __iter__(self):
        return iter(self.queues.values())
