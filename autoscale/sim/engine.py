"""The event loop and the state of the simulated fleet.

Events on a heap (finishes, replicas ready, arrivals, polls), ordered by time and, at
one instant, in that order. Each poll builds a real ``Observation`` from the state,
passes it to the controller (controllers.py; by default the fleet's: ``RateTracker.update``
and ``autoscale.policy.decide_poll``, what the live loop calls; a baseline's otherwise),
and applies the decisions to the simulated backend, as ``Autoscaler.run_once`` does.
Nothing else of the fleet is modelled: no Redis, no Celery, no network.

Delivery follows kombu's Redis transport: a worker holds at most concurrency x
``prefetch_multiplier`` messages (only concurrency with ``disable_prefetch``), running
or reserved; of the workers with room, the one that has waited longest gets the next
message (Redis serves clients blocked on BRPOP first come, first served), so a busy
worker's buffer holds messages that an idle one could run.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Iterable

from autoscale.sim.backend import Replica, SimBackend
from autoscale.sim.controllers import Controller, FleetController
from autoscale.sim.errors import SimulationError
from autoscale.sim.report import QueueReport, Report
from autoscale.sim.series import Series
from autoscale.sim.startup import SHUTDOWN, STARTUP
from fleet.config import FleetConfig, QueueClass
from fleet.observe.model import Observation, QueueSample, WorkerSample
from fleet.trace.model import Header, Task

_FINISH, _READY, _ARRIVAL, _POLL = range(4)
#: How long past the trace's end the simulation runs on to finish what is left.
DRAIN_LIMIT = 86_400.0


class _Observation(Observation):
    """An Observation whose ``workers_of`` is a lookup, not a scan of every worker: the
    rates call it for every queue at every poll (100 queues x 100 samples, 43,200 polls
    a day). Same answers as the base class."""

    def workers_of(self, queue: str) -> list[WorkerSample]:
        index = self.__dict__.get("_index")
        if index is None:
            index = {}
            for w in self.workers:
                index.setdefault(w.queue, []).append(w)
            object.__setattr__(self, "_index", index)
        return index.get(queue, [])


class _Queue:
    __slots__ = (
        "cls",
        "concurrency",
        "incarnation",
        "last_change",
        "last_direction",
        "leaving",
        "name",
        "processed_live",
        "replicas",
        "report",
        "reserved",
        "retired_processed",
        "running",
        "sampled",
        "slo_mark",
        "target",
        "turn",
        "unstarted",
        "waiting",
        "window",
        "window_down",
    )

    def __init__(self, name: str, cls: QueueClass):
        self.name = name
        self.cls = cls
        self.concurrency = cls.concurrency
        self.window = cls.concurrency * (1 if cls.disable_prefetch else cls.prefetch_multiplier)
        self.target = cls.autoscaling.target_wait
        self.window_down = cls.autoscaling.scale_down_stabilization
        #: The queue's list, head first: (sent, service) pairs.
        self.waiting: deque = deque()
        #: Ready replicas with room in their window, in the order they get messages.
        self.turn: deque = deque()
        #: Replicas the backend counts (starting or ready), and those that report
        #: (ready, draining included), by id.
        self.replicas: list[Replica] = []
        self.sampled: dict[int, Replica] = {}
        self.running = 0
        #: Of ``running``, the tasks of stopped (draining) replicas.
        self.leaving = 0
        self.reserved = 0
        self.unstarted = 0
        self.processed_live = 0
        self.retired_processed = 0
        self.incarnation = 0
        self.slo_mark = 0.0
        self.report = QueueReport(name)
        self.last_direction = 0
        self.last_change = -math.inf


class Simulation:
    """One run: ``Simulation(header, tasks, config, ...).run()`` returns a Report."""

    def __init__(self, header: Header, tasks: Iterable[Task], config: FleetConfig, *,
                 startup: float = STARTUP["local"], startup_jitter: float = 0.0,
                 startup_cores: int | None = None, shutdown: float = SHUTDOWN, seed: int = 0,
                 cpu_per_task: float = 0.0, rss: int = 0, aggregate_workers: bool = True,
                 drain_limit: float = DRAIN_LIMIT, controller: Controller | None = None,
                 record: bool = False):
        unknown = [q for q in header.queues if q not in config.queues]
        if unknown:
            raise SimulationError(f"the trace's queue {unknown[0]!r} is not in "
                                  f"{config.source}")
        self.header = header
        self.config = config
        #: What decides at each poll: the fleet's policy unless told (controllers.py).
        self.controller = controller if controller is not None else FleetController(config)
        self.interval = self.controller.interval
        self.startup = startup
        self.jitter = startup_jitter
        if startup_cores is not None and startup_cores < 1:
            raise SimulationError(f"start-up cores {startup_cores}: must be at least 1")
        #: With ``startup_cores``, the replicas starting share that many cores (local
        #: workers on one machine): replica id -> [replica, start-up work left, token].
        self.cores = startup_cores
        self._starting: dict[int, list] = {}
        self._shared_at = 0.0
        self.shutdown = shutdown
        self.random = random.Random(seed)
        self.cpu_per_task = cpu_per_task
        self.rss = rss
        self.aggregate = aggregate_workers
        self.horizon = header.duration + drain_limit
        self.queues = {name: _Queue(name, cls) for name, cls in config.queues.items()}
        self.backend = SimBackend(self)
        # The fleet's rates, for tests that look at what the policy was given.
        self.tracker = getattr(self.controller, "tracker", None)
        self.now = 0.0
        self.epoch = 0
        self.polls = 0
        self.skipped = 0
        self.pending = 0  # tasks arrived and not finished
        self.max_total_replicas = 0
        self.unstarted = 0
        self.max_unstarted = 0
        self._seq = 0
        self._ids = 0
        self._events: list = []
        self._tasks = iter(tasks)
        self._last_sent = 0.0
        self._more = True
        self._started = False
        #: Replicas the backend counts (starting or ready) in all queues, and the most.
        self.counted = 0
        #: With ``record``, each queue's figures at every poll, bounded (series.py).
        self.series = Series(self.queues) if record else None
        if self.series is not None:
            self.series.watch(q.report for q in self.queues.values())

    # -- events -------------------------------------------------------------------

    def _push(self, at: float, kind: int, obj) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, kind, self._seq, obj))

    def _next_arrival(self) -> None:
        for task in self._tasks:
            if task.queue not in self.queues:
                raise SimulationError(f"a task sent at {task.sent} is of queue "
                                      f"{task.queue!r}: no such queue in {self.config.source}")
            if task.sent < self._last_sent:
                raise SimulationError(f"tasks must come in the order they were sent: "
                                      f"{task.sent} after {self._last_sent}")
            self._last_sent = task.sent
            if task.service is None:
                self.skipped += 1
                continue
            self._push(task.sent, _ARRIVAL, task)
            return
        self._more = False

    def run(self) -> Report:
        """Every event to the end: the trace's duration, and then until no work is
        left (or ``drain_limit`` past it); the report."""
        self.advance(math.inf)
        return self._report()

    def advance(self, until: float) -> bool:
        """Handle the events up to ``until``; False once the simulation has ended."""
        if not self._started:
            self._started = True
            self._next_arrival()
            self._push(0.0, _POLL, None)
        events = self._events
        pop = heapq.heappop
        while events and events[0][0] <= until:
            at, kind, _, obj = pop(events)
            self.now = at
            if kind == _FINISH:
                self._finish(obj)
            elif kind == _ARRIVAL:
                self._arrive(obj)
                self._next_arrival()
            elif kind == _READY:
                self._ready(obj)
            else:
                if (at >= self.header.duration and not self.pending and not self._more) \
                        or at > self.horizon:
                    events.clear()
                    return False
                self._poll()
                self._push(at + self.interval, _POLL, None)
        return bool(events)

    # -- messages -----------------------------------------------------------------

    def _slo(self, q: _Queue) -> None:
        """Add the time since the last change of ``q``'s head during which the oldest
        waiting message was older than target_wait (the head is constant in between)."""
        now = self.now
        if q.waiting:
            late_from = max(q.slo_mark, q.waiting[0][0] + q.target)
            if now > late_from:
                q.report.slo_violation_seconds += now - late_from
        q.slo_mark = now

    def _arrive(self, task: Task) -> None:
        q = self.queues[task.queue]
        self._slo(q)
        q.waiting.append((task.sent, task.service))
        q.report.tasks += 1
        q.unstarted += 1
        self.pending += 1
        if q.unstarted > q.report.max_backlog:
            q.report.max_backlog = q.unstarted
        self.unstarted += 1
        if self.unstarted > self.max_unstarted:
            self.max_unstarted = self.unstarted
        self._dispatch(q)

    def _dispatch(self, q: _Queue) -> None:
        waiting, turn, window = q.waiting, q.turn, q.window
        if not waiting or not turn:
            return
        self._slo(q)
        while waiting and turn:
            r = turn.popleft()
            r.in_turn = False
            if r.gone or r.draining or r.held >= window:
                continue
            message = waiting.popleft()
            if r.running < q.concurrency:
                self._start(q, r, message)
            else:
                r.reserved.append(message)
                q.reserved += 1
            if r.held < window:
                r.in_turn = True
                turn.append(r)

    def _start(self, q: _Queue, r: Replica, message: tuple[float, float]) -> None:
        sent, service = message
        q.report.waits.add(self.now - sent)
        q.report.started += 1
        q.unstarted -= 1
        self.unstarted -= 1
        q.running += 1
        r.running += 1
        self._push(self.now + service, _FINISH, r)

    def _finish(self, r: Replica) -> None:
        q = self.queues[r.queue]
        if r.snap_epoch != self.epoch:  # first finish since the last poll
            r.snap, r.snap_epoch = r.processed, self.epoch
        r.processed += 1
        q.processed_live += 1
        r.running -= 1
        q.running -= 1
        q.report.finished += 1
        self.pending -= 1
        if r.reserved:
            q.reserved -= 1
            self._start(q, r, r.reserved.popleft())
        if r.draining:
            q.leaving -= 1
            if not r.running:
                self._retire(q, r)
            return
        if not r.in_turn:
            r.in_turn = True
            q.turn.append(r)
        self._dispatch(q)

    # -- replicas -----------------------------------------------------------------

    def scale(self, name: str, n: int) -> None:
        q = self.queues[name]
        while len(q.replicas) < n:
            self._ids += 1
            r = Replica(self._ids, name, self.now, self.epoch)
            q.replicas.append(r)
            self.counted += 1
            delay = self.startup
            if self.jitter:
                delay *= 1 + self.jitter * (2 * self.random.random() - 1)
            if self.cores is None:
                self._push(self.now + delay, _READY, r)
            else:
                self._share()
                self._starting[r.id] = [r, delay, 0]
                self._reschedule()
        if len(q.replicas) > n:
            # As the local backend: idle first (held messages), among equals the youngest.
            order = sorted(enumerate(q.replicas), key=lambda ir: (ir[1].held, -ir[0]))
            stop = [r for _, r in order[: len(q.replicas) - n]]
            gone = {r.id for r in stop}
            q.replicas = [r for r in q.replicas if r.id not in gone]
            self.counted -= len(stop)
            for r in stop:
                self._stop(q, r)
            self._dispatch(q)
        self.max_total_replicas = max(self.max_total_replicas, self.counted)
        q.report.max_replicas = max(q.report.max_replicas, len(q.replicas))

    # -- start-ups sharing the machine's cores ---------------------------------------

    def _share(self) -> None:
        """Charge the start-ups for the time since the last change: k of them on
        ``cores`` cores each ran at min(1, cores / k) (processor sharing: importing
        Celery is CPU work, and 6-10 workers starting at once on the 2-core machine took
        4-8 s where one took 1-2 s)."""
        starting = self._starting
        if starting:
            done = (self.now - self._shared_at) * min(1.0, self.cores / len(starting))
            for entry in starting.values():
                entry[1] -= done
        self._shared_at = self.now

    def _reschedule(self) -> None:
        """A start-up began or ended: every other one's end moves (the old events are
        left on the heap and ignored: their token is out of date)."""
        starting = self._starting
        if not starting:
            return
        rate = min(1.0, self.cores / len(starting))
        for entry in starting.values():
            entry[2] += 1
            self._push(self.now + max(0.0, entry[1]) / rate, _READY, (entry[0], entry[2]))

    def _stop_sharing(self, r: Replica) -> None:
        """``r`` is no longer starting (ready, or stopped): the others share from now."""
        self._share()
        del self._starting[r.id]
        self._reschedule()

    def _started_sharing(self, event: tuple[Replica, int]) -> Replica | None:
        r, token = event
        entry = self._starting.get(r.id)
        if entry is None or entry[2] != token:
            return None
        self._stop_sharing(r)
        return r

    def _ready(self, r: Replica | tuple[Replica, int]) -> None:
        if isinstance(r, tuple):
            r = self._started_sharing(r)
            if r is None:
                return
        if r.gone:
            return  # stopped while starting
        q = self.queues[r.queue]
        r.ready = True
        q.sampled[r.id] = r
        r.in_turn = True
        q.turn.append(r)
        self._dispatch(q)

    def _stop(self, q: _Queue, r: Replica) -> None:
        if not r.ready:
            if r.id in self._starting:
                self._stop_sharing(r)
            self._gone(q, r)
            return
        r.draining = True
        if r.reserved:
            self._slo(q)
            q.reserved -= len(r.reserved)
            q.waiting.extendleft(reversed(r.reserved))
            r.reserved.clear()
        q.leaving += r.running
        if not r.running:
            self._retire(q, r)

    def _retire(self, q: _Queue, r: Replica) -> None:
        """A reporting replica exits: keep the part of its counter the polls saw."""
        seen = r.snap if r.snap_epoch == self.epoch else r.processed
        q.retired_processed += seen
        q.processed_live -= r.processed
        del q.sampled[r.id]
        if not q.sampled:
            # The next replica is a new worker to the rates, as a real one would be.
            q.retired_processed = 0
            q.incarnation += 1
        self._gone(q, r)

    def _gone(self, q: _Queue, r: Replica) -> None:
        """It takes nothing more; it costs until it has exited: ``shutdown`` seconds
        more for a worker that had started (one stopped while it was still starting
        dies of the signal at once)."""
        r.gone = True
        q.report.worker_seconds += self.now - r.created + (self.shutdown if r.ready else 0.0)

    # -- polls --------------------------------------------------------------------

    def _poll(self) -> None:
        now = self.now
        samples = {}
        for name, q in self.queues.items():
            head = q.waiting[0][0] if q.waiting else None
            samples[name] = QueueSample(name, len(q.waiting), q.running + q.reserved,
                                        None if head is None else now - head)
        index: dict[str, list[WorkerSample]] = {}
        obs = _Observation(now, samples, self._worker_samples(index))
        object.__setattr__(obs, "_index", index)
        self.epoch += 1
        self.polls += 1
        decisions = self.controller.decide(now, obs, self.backend.replicas())
        for d in decisions:
            if d.current == d.desired:  # not d.changes, a property call per queue
                continue
            q = self.queues[d.queue]
            direction = 1 if d.desired > d.current else -1
            q.report.scale_events += 1
            if q.last_direction == -direction and now - q.last_change <= q.window_down:
                q.report.flaps += 1
            q.last_direction, q.last_change = direction, now
            self.backend.scale(d.queue, d.desired, obs.workers_of(d.queue))
        if self.series is not None:
            self._record(now)

    def _record(self, now: float) -> None:
        """Each queue's figures after the poll's decisions (what the plots draw)."""
        for name, q in self.queues.items():
            ready = sum(1 for r in q.replicas if r.ready)
            self.series[name].add(now, len(q.waiting), q.running + q.reserved, ready,
                                  len(q.replicas) - ready,
                                  now - q.waiting[0][0] if q.waiting else None)

    def _worker_samples(self, index: dict[str, list[WorkerSample]] | None = None
                        ) -> list[WorkerSample]:
        """The live workers' self-reports: per replica, or one per queue with the sums;
        ``index`` is filled with them by queue (``_Observation.workers_of``'s lookup).

        One sample per queue is what makes a day of 1,000 replicas fast, and it gives
        ``decide`` the same figures, because the rates and the policy read only sums
        and maxima of the workers: running (sum of active; draining, the sum of the
        stopped replicas' running), slots (sum of concurrency),
        completions (sum of per-worker counter deltas: see below), memory (the largest,
        and every replica's is ``rss``) and CPU, which ``saturation`` reads only as
        ``cpu_per_slot * slots / workers`` = the mean per worker: the one sample
        carries that mean. ``QueueMetrics.workers`` (1) and ``cpu_per_slot`` differ;
        no rule reads them otherwise (tests/unit/test_simulate.py compares both modes).

        Completions: ``completed_between`` counts per worker the growth of its counter
        since the last poll, a new worker's whole counter, and nothing of a worker gone
        since. The sum's counter does the same: live counters plus, for each retired
        replica, its counter as the last poll saw it; a queue left with no reporting
        replica starts a new pid (a "restarted worker"), as a wholly new set would be.
        """
        out = []
        index = {} if index is None else index
        cpu, rss = self.cpu_per_task, self.rss
        for name, q in self.queues.items():
            if not q.sampled:
                continue
            if not self.aggregate:
                mine = index[name] = [
                    WorkerSample(f"{name}-{r.id}@sim", name, "sim", r.id, q.concurrency,
                                 r.running, len(r.reserved), r.processed, cpu * r.running,
                                 rss, 0, 0, self.now,
                                 draining=r.running if r.draining else 0)
                    for r in q.sampled.values()]
                out.extend(mine)
                continue
            n = len(q.sampled)
            sample = WorkerSample(
                f"{name}@sim", name, "sim", q.incarnation, q.concurrency * n, q.running,
                q.reserved, q.processed_live + q.retired_processed, cpu * q.running / n,
                rss, 0, 0, self.now, draining=q.leaving)
            out.append(sample)
            index[name] = [sample]
        return out

    # -- the end ------------------------------------------------------------------

    def _report(self) -> Report:
        for q in self.queues.values():
            self._slo(q)
            for r in [*q.replicas, *q.sampled.values()]:
                if not r.gone:
                    r.gone = True
                    q.report.worker_seconds += self.now - r.created
        return Report({n: q.report for n, q in self.queues.items()}, self.now, self.polls,
                      self.skipped, self.max_total_replicas, self.max_unstarted)


def simulate(header: Header, tasks: Iterable[Task], config: FleetConfig, **options) -> Report:
    """Replay ``tasks`` (in order of ``sent``) against ``config``'s autoscaling; see
    Simulation for the options (start-up delay, seed, CPU per task, ...)."""
    return Simulation(header, tasks, config, **options).run()
