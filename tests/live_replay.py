"""Replay a trace through a live local fleet (``fleet up``) and through the simulator.

The validation of issue 11 item 5 (tests/integration/test_sim_validation.py and
bench/sim_validation.py both use this): the same tasks, at the same (compressed) send
times and service times, go once to real workers that the real autoscaler starts as
real processes, and once to ``autoscale.sim``; both sides are measured the same way.

- **worker-seconds**: the simulator counts each replica from the scale call that
  created it to its exit (autoscale/sim/report.py). The local backend's scale call is
  the worker's ``Popen``, so the live figure is each worker process's lifetime (its
  kernel creation time to the poll that no longer sees it, every 50 ms), clipped to
  the trace's window as the simulator's run is.
- **wait**: started - sent. ``sent`` is the driver's clock as it sends; ``started`` the
  worker's clock as the task began (``tasks.heavy.sleep`` returns it): a result is
  delivered for sure, where a dashboard event may be dropped. Both quantiles come from
  the simulator's own histogram (``WaitHistogram``), so the estimator is the same.
- **start-up**: not compressible (imports, pool fork, Redis connection), so it is
  measured, per worker, from its creation to Celery's "ready." line in its log; the
  simulator's start-ups share the machine's cores (``startup_cores``), and it is given
  the start-up work that best explains each shape's measured ones under that model.
- **shut-down**: the median from a scale-down to the exit of a worker it stopped.
- **the poll clock**: the live loop's polls fall anywhere against the trace, and come
  a little over ``interval`` apart; the simulator is given the same phase and interval.

What the simulator is given is parameters of the machine and the loop, measured; what
it is compared on (when and how far to scale, which replica stops, who waits how long)
is its own.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil

from autoscale.sim.startup import SHUTDOWN, STARTUP
from fleet.config import FleetConfig
from fleet.trace.model import Header, Task
from fleet.trace.synth import synthesize

ROOT = Path(__file__).resolve().parent.parent

#: The compressed config. Relative to the shipped queues.yaml (interval 2 s, target
#: waits of 10 s to 5 min, stabilization of 5 min), every time setting is divided by
#: about 4 to 50; the worker start-up (about 3 s here) is not, so it weighs relatively
#: more than in a real fleet: the harder case for the simulator.
INTERVAL = 0.5
_SHORT = {"tasks": [], "pool": "prefork", "concurrency": 2, "prefetch_multiplier": 4,
          "acks_late": True, "time_limit": {"soft": "20s", "hard": "25s"},
          "kubernetes": {"resources": {"requests": {"cpu": "1", "memory": "256Mi"},
                                       "limits": {"cpu": "1", "memory": "1Gi"}}},
          "autoscaling": {"min_replicas": 0, "max_replicas": 4, "target_wait": "3s",
                          "scale_down_stabilization": "6s", "cooldown": "2s"}}
_LONG = {**_SHORT, "concurrency": 1, "prefetch_multiplier": 1, "disable_prefetch": True,
         "time_limit": {"soft": "60s", "hard": "70s"},
         "autoscaling": {"min_replicas": 0, "max_replicas": 3, "target_wait": "6s",
                         "scale_down_stabilization": "8s", "cooldown": "2s"}}
QUEUES = {"steady": _SHORT, "bursts": _SHORT, "short": _SHORT, "long": _LONG,
          # the shipped queue that keeps a replica: none here, so every worker is a shape's
          "default": {"autoscaling": {"min_replicas": 0}}}


def overrides() -> dict:
    """queues.yaml for the validation, over the shipped one (tests.conftest.Fleet)."""
    return {
        "autoscaler": {"interval": f"{INTERVAL}s", "worker_metrics_interval": f"{INTERVAL}s",
                       "capacity": {"cpu": None, "memory": None}},
        "jobs": {"reconciler": {"enabled": False}},
        "queues": QUEUES,
    }


#: Arrivals fall in [0, ARRIVALS); the window runs to DURATION, long enough for every
#: queue to drain and scale back to zero, so both sides count the same tail.
ARRIVALS = 60.0
DURATION = 80.0

#: shape name -> (synth shape, its parameters, the queues it uses, its offset in the
#: live run). The shapes run one after the other, each on queues of its own, in one
#: ``fleet up`` (one start-up of the supervisor; the policy decides each queue alone, no
#: capacity budget links them). Not at once: fourteen cold workers starting together on
#: two cores took 15 s each, every shape's waits were that start-up storm, and what
#: else the machine runs changes the start-up from one minute to the next, so it is
#: fitted per shape (``startup_work``).
SHAPES: dict[str, tuple[str, dict, tuple[str, ...], float]] = {
    "steady": ("steady", {"queue": "steady", "rate": 5, "median": 0.4, "sigma": 0.5},
               ("steady",), 0.0),
    "bursts": ("bursts", {"queue": "bursts", "chunks": 30, "every": 12, "spread": 1,
                          "median": 0.5, "sigma": 0.5}, ("bursts",), DURATION),
    "mixed": ("mixed", {"queue": "short", "rate": 3, "median": 0.3, "heavy_queue": "long",
                        "heavy_rate": 0.3, "heavy_scale": 2, "heavy_alpha": 2},
              ("short", "long"), 2 * DURATION),
}
#: The live run's window: every shape's, from the first one's start to the last one's end.
WINDOW = max(offset for *_, offset in SHAPES.values()) + DURATION


#: The traces' seed: with it the heavy-tailed queue's longest task is 9.8 s, and all
#: of them end by 53 s (seed 1 drew a 24.7 s task at 59.7 s, past the window's end).
SEED = 2


def trace_of(name: str, seed: int = SEED) -> tuple[Header, list[Task]]:
    shape, params, _, _ = SHAPES[name]
    header, tasks = synthesize(shape, params, duration=ARRIVALS, seed=seed,
                               queues=list(QUEUES))
    return header.model_copy(update={"duration": DURATION}), list(tasks)


@dataclass
class Lifetime:
    hostname: str
    queue: str
    created: float
    exited: float | None = None
    #: When Celery said "ready." (None: it never did)
    ready: float | None = None


class WorkerWatch:
    """Every worker process ``fleet up`` starts: when it was created and when it went.

    A thread, polling the supervisor's children every 50 ms: the local backend starts
    each worker as a direct child (fleet.processes), so nothing deeper is looked at."""

    def __init__(self, supervisor: int):
        # Creation is when a poll first sees the process, as exit is when one no longer
        # does: psutil's create_time counts from the boot time that /proc/stat gives in
        # whole seconds, an offset of up to a second per worker.
        self.supervisor = psutil.Process(supervisor)
        self.seen: dict[int, Lifetime] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-watch", daemon=True)

    def start(self) -> WorkerWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._look()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._look()

    def _look(self) -> None:
        now = time.time()
        try:
            children = self.supervisor.children()
        except psutil.NoSuchProcess:
            children = []
        alive = set()
        for child in children:
            alive.add(child.pid)
            if child.pid in self.seen:
                continue
            try:
                argv = child.cmdline()
            except psutil.Error:
                continue
            if "worker" not in argv or "--queue" not in argv:
                continue
            self.seen[child.pid] = Lifetime(argv[argv.index("--hostname") + 1],
                                            argv[argv.index("--queue") + 1], now)
        for pid, life in self.seen.items():
            if life.exited is None and pid not in alive:
                life.exited = now


class PollWatch:
    """When each of the autoscaler's polls came: a thread reading the latest decision
    of one queue every 20 ms (each poll rewrites it with the poll's time), for the
    simulator's poll clock (LiveRun.poll_clock)."""

    def __init__(self, client, key: str, queue: str):
        self.client, self.key, self.queue = client, key, queue
        self.times: set[float] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="poll-watch", daemon=True)

    def start(self) -> PollWatch:
        self._thread.start()
        return self

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(timeout=5)
        return sorted(self.times)

    def _run(self) -> None:
        import json

        while not self._stop.wait(0.02):
            raw = self.client.hget(self.key, self.queue)
            if raw:
                self.times.add(json.loads(raw)["at"])


_READY = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): \w+/MainProcess\] "
                    r".* ready\.\s*$")


def ready_at(log: Path) -> float | None:
    """When Celery said "ready." (its consumer is taking messages), in epoch seconds;
    Celery's log stamps are local time to the millisecond."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        m = _READY.match(line)
        if m:
            stamp = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
            return time.mktime(stamp.timetuple()) + int(m.group(2)) / 1000
    return None


@dataclass
class Sent:
    queue: str
    at: float
    result: object


@dataclass
class LiveRun:
    """What the live fleet did, per queue, in epoch seconds from ``t0``."""

    t0: float
    duration: float
    lifetimes: list[Lifetime]
    #: queue -> waits (started - sent)
    waits: dict[str, list[float]] = field(default_factory=dict)
    #: queue -> when each of those tasks was sent, from t0 (the same order)
    sends: dict[str, list[float]] = field(default_factory=dict)
    #: queue -> measured start-ups (created -> ready)
    startups: dict[str, list[float]] = field(default_factory=dict)
    #: (at, queue, current, desired, reason) of every change the autoscaler made
    changes: list[tuple[float, str, int, int, str]] = field(default_factory=list)
    #: Seconds the autoscaler had been polling (an idle fleet) before t0, about.
    polling_before: float = 0.0
    #: When each of its polls came, from t0 (PollWatch).
    polls: list[float] = field(default_factory=list)

    def poll_clock(self, start: float, duration: float) -> tuple[float, float]:
        """When the live polls fell in [start, start + duration): ``(phase, interval)``
        such that poll k came at ``phase + k * interval`` seconds from t0, fitted (least
        squares) to the polls seen. The interval is a little over INTERVAL: the loop
        sleeps for what is left of it, and each wait overshoots by a fraction of a
        millisecond, so over a run the phase drifts by a tenth of a second or more."""
        times = [t for t in self.polls or sorted(at for at, *_ in self.changes)
                 if start - INTERVAL <= t < start + duration]
        if len(times) < 2:
            return (times[0] % INTERVAL if times else 0.0), INTERVAL
        ks = [round((t - times[0]) / INTERVAL) for t in times]
        n = len(ks)
        mk, mt = sum(ks) / n, sum(times) / n
        spread = sum((k - mk) ** 2 for k in ks)
        interval = (sum((k - mk) * (t - mt) for k, t in zip(ks, times, strict=True)) / spread
                    if spread else INTERVAL)
        first = mt - interval * mk  # when poll "0" (the first change's) came
        return first % interval, interval

    def shutdown(self) -> float:
        """The median time from a scale-down to the exit of a worker it stopped: each
        change that lowered a queue by k stopped the next k of its workers to exit.
        The median, as a stopped worker that was busy first finishes its task (which
        the simulator plays out itself)."""
        exits = {}
        for life in self.lifetimes:
            if life.exited is not None:
                exits.setdefault(life.queue, []).append(life.exited - self.t0)
        took = []
        for queue, times in exits.items():
            times.sort()
            for at, q, current, desired, *_ in self.changes:
                if q != queue or desired >= current:
                    continue
                later = [t for t in times if t >= at][: current - desired]
                took += [t - at for t in later]
                for t in later:
                    times.remove(t)
        took.sort()
        return took[len(took) // 2] if took else SHUTDOWN

    def worker_seconds(self, queue: str, start: float, duration: float) -> float:
        """Seconds of ``queue``'s workers in [start, start + duration) of the run."""
        start += self.t0
        end = start + duration
        total = 0.0
        for life in self.lifetimes:
            if life.queue != queue:
                continue
            begin, until = max(life.created, start), min(life.exited or end, end)
            total += max(0.0, until - begin)
        return total


def start_fleet_up(fleet, workdir: Path) -> tuple[subprocess.Popen, Path]:
    """``fleet up`` on the test's config and key prefix, the real Redis, no dashboard
    (nothing here reads it; on two cores its threads would only add noise)."""
    out = workdir / "up.out"
    workdir.mkdir(parents=True, exist_ok=True)
    with out.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.cli", "up", "--workdir", str(workdir),
             "--config", str(fleet.config_path), "--dashboard-port", "0"],
            cwd=ROOT, env={**fleet.env, "PYTHONPATH": str(ROOT)}, stdout=log,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, out


def stop_fleet_up(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def replay(app, tasks: list[Task], t0: float) -> list[Sent]:
    """Send each task at ``t0 + sent`` to its queue, as a sleep of its service time;
    each is stamped when the send returned (LPUSH done: the message is in Redis), and
    that is the time the simulator replays it at (``aligned``): the first send of a
    process opens its connection, which took 0.1 s and more on the loaded machine, and a
    poll in between saw nothing where the simulator saw the trace's task."""
    out = []
    for task in sorted(tasks, key=lambda t: t.sent):
        delay = t0 + task.sent - time.time()
        if delay > 0:
            time.sleep(delay)
        result = app.send_task("tasks.heavy.sleep", kwargs={"seconds": task.service},
                               queue=task.queue)
        out.append(Sent(task.queue, time.time(), result))
    return out


def run_live(fleet, tasks: list[Task], duration: float, workdir: Path,
             ready_timeout: float = 60.0) -> LiveRun:
    """The tasks through a fresh ``fleet up``; returns once the window has passed and
    the fleet has stopped."""
    import json

    from fleet.keys import broker_client, changes_key, latest_decisions_key

    proc, out = start_fleet_up(fleet, workdir)
    try:
        deadline = time.monotonic() + ready_timeout
        while "the fleet is running" not in out.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"fleet up did not start:\n{out.read_text()}")
            time.sleep(0.1)
        running = time.time()
        watch = WorkerWatch(proc.pid).start()
        client = broker_client(fleet.config)
        polls = PollWatch(client, latest_decisions_key(fleet.config), next(iter(QUEUES)))
        polls.start()
        app = fleet.app()
        time.sleep(2 * INTERVAL)  # a few polls of the idle fleet: the rates are primed
        t0 = time.time() + 0.2
        sent = replay(app, tasks, t0)
        waits: dict[str, list[float]] = {}
        sends: dict[str, list[float]] = {}
        for s in sent:
            value = s.result.get(timeout=t0 + duration + 30 - time.time())
            waits.setdefault(s.queue, []).append(value["started"] - s.at)
            sends.setdefault(s.queue, []).append(s.at - t0)
        left = t0 + duration - time.time()
        if left > 0:
            time.sleep(left)
        watch.stop()
        poll_times = polls.stop()
        changes = []
        for raw in client.lrange(changes_key(fleet.config), 0, -1):
            d = json.loads(raw)
            if not d.get("dry_run"):
                changes.append((d["at"] - t0, d["queue"], d["current"], d["desired"],
                                d.get("reason", "")))
        client.close()
    finally:
        stop_fleet_up(proc)
    run = LiveRun(t0, duration, list(watch.seen.values()), waits, sends=sends,
                  changes=sorted(changes), polling_before=t0 - running,
                  polls=[at - t0 for at in poll_times])
    for life in run.lifetimes:
        ready = ready_at(workdir / "logs" / f"{life.hostname.replace('@', '_')}.log")
        if ready is not None:
            life.ready = ready
            run.startups.setdefault(life.queue, []).append(ready - life.created)
    return run


def shared_startups(created: list[float], work: float, cores: int) -> list[float]:
    """Start-up durations of workers created at ``created`` (sorted) when each needs
    ``work`` seconds of a core and the ones starting share ``cores``: the simulator's
    model with ``startup_cores`` (autoscale/sim/engine.py), for fitting ``work``."""
    left = {i: work for i in range(len(created))}
    out = [0.0] * len(created)
    now, nxt, active = 0.0, 0, set()
    while nxt < len(created) or active:
        rate = min(1.0, cores / len(active)) if active else 0.0
        first = min(active, key=lambda i: left[i]) if active else None
        end = now + left[first] / rate if active else math.inf
        arrive = created[nxt] if nxt < len(created) else math.inf
        step_to = min(end, arrive)
        for i in active:
            left[i] -= (step_to - now) * rate
        now = step_to
        if arrive <= end:
            active.add(nxt)
            nxt += 1
        else:
            active.discard(first)
            out[first] = now - created[first]
    return out


def startup_work(run: LiveRun, cores: int, queues: tuple[str, ...]) -> float:
    """The start-up work (seconds of one core) that best explains the measured
    start-ups of ``queues``' workers under the simulator's model (they share the
    machine's cores): least squares over a grid of 10 ms. Per shape, not for the whole
    run: what else the machine runs changes from one minute to the next."""
    lives = sorted((life for life in run.lifetimes
                    if life.ready is not None and life.queue in queues),
                   key=lambda life: life.created)
    if not lives:
        return STARTUP["local"]
    created = [life.created for life in lives]
    measured = [life.ready - life.created for life in lives]

    def error(work: float) -> float:
        return sum((a - b) ** 2 for a, b in
                   zip(shared_startups(created, work, cores), measured, strict=True))

    return min((w / 100 for w in range(10, 1000)), key=error)


def p95(waits: list[float]) -> float:
    """The simulator's own estimator (a 1%-bucket histogram), for a like comparison."""
    from autoscale.sim.report import WaitHistogram

    h = WaitHistogram()
    for w in waits:
        h.add(max(0.0, w))
    return h.quantile(0.95)


def aligned(shape: str, run: LiveRun, config: FleetConfig
            ) -> tuple[Header, list[Task], FleetConfig]:
    """The shape's trace and config as the live autoscaler met them: after the idle
    polls it had made before the shape began (its rates had seen that much of nothing),
    with its polls falling where the live ones fell against the tasks, at the interval
    they came at. The simulator polls at multiples of the interval from 0, so the trace
    moves to the first such multiple after that idle time, less the live phase. An idle
    fleet at min_replicas 0 costs nothing in between."""
    header, tasks = trace_of(shape)
    offset = SHAPES[shape][3]
    # The tasks at the times the live run sent them (replay), queue by queue in order.
    sends = {q: iter(times) for q, times in run.sends.items()}
    tasks = sorted((t.model_copy(update={"sent": next(sends[t.queue]) - offset})
                    for t in sorted(tasks, key=lambda t: t.sent)), key=lambda t: t.sent)
    phase, interval = run.poll_clock(offset, DURATION)
    # Live polls fell at phase + k * interval from t0, so at (phase - offset) mod
    # interval after the shape's start, and each simulated poll n * interval must too.
    psi = (phase - offset) % interval
    lead = (math.floor((run.polling_before + offset) / interval) + 1) * interval - psi
    timed = config.model_copy(update={"autoscaler": config.autoscaler.model_copy(
        update={"interval": interval})})
    return (header.model_copy(update={"duration": header.duration + lead}),
            [t.model_copy(update={"sent": max(0.0, t.sent + lead)}) for t in tasks], timed)


def simulate(header: Header, tasks: list[Task], config: FleetConfig, startup: float,
             shutdown: float, cores: int):
    """The simulator on the same trace and config, its start-ups sharing ``cores`` as
    the live workers share the machine's. ``cpu_per_task=0``: the live tasks sleep,
    and the simulator's default (a busy slot is a busy core) would make the policy see
    saturated workers that the live fleet's psutil never reports."""
    from autoscale.sim.engine import Simulation

    return Simulation(header, sorted(tasks, key=lambda t: t.sent), config, startup=startup,
                      startup_cores=cores, shutdown=shutdown, cpu_per_task=0.0).run()


@dataclass
class Comparison:
    shape: str
    live_worker_seconds: float
    sim_worker_seconds: float
    live_p95: float
    sim_p95: float
    startup: float
    tasks: int
    shutdown: float = SHUTDOWN
    #: Where the simulator's p95 falls among the live waits (their mid-rank, 0..1).
    sim_p95_rank: float = 0.95

    @staticmethod
    def error(live: float, sim: float) -> float:
        return abs(sim - live) / live if live else (0.0 if not sim else float("inf"))

    @property
    def worker_seconds_error(self) -> float:
        return self.error(self.live_worker_seconds, self.sim_worker_seconds)

    @property
    def p95_error(self) -> float:
        return self.error(self.live_p95, self.sim_p95)

    @property
    def p95_rank_tolerance(self) -> float:
        """Two standard errors of an empirical 95th percentile's rank over ``tasks``
        waits: how far the simulator's p95 may sit from the live 95 % by chance alone."""
        return 2 * math.sqrt(0.95 * 0.05 / max(1, self.tasks))


def mid_rank(values: list[float], x: float) -> float:
    """The fraction of ``values`` below ``x``, ties counted half (0..1)."""
    if not values:
        return 0.0
    below = sum(1 for v in values if v < x)
    equal = sum(1 for v in values if v == x)
    return (below + equal / 2) / len(values)


def compare(run: LiveRun, config: FleetConfig) -> list[Comparison]:
    """Each shape, live beside simulated: a simulation of its trace, on its queues, with
    the start-up work fitted to its own workers' start-ups."""
    cores = os.cpu_count() or 1
    shutdown = run.shutdown()
    out = []
    for shape, (_, _, queues, offset) in SHAPES.items():
        startup = startup_work(run, cores, queues)
        report = simulate(*aligned(shape, run, config), startup, shutdown, cores)
        waits = [max(0.0, w) for q in queues for w in run.waits.get(q, [])]
        sim_p95 = report.total.waits.quantile(0.95)
        out.append(Comparison(
            shape,
            sum(run.worker_seconds(q, offset, DURATION) for q in queues),
            sum(report.queues[q].worker_seconds for q in queues),
            p95(waits), sim_p95, startup, len(trace_of(shape)[1]), shutdown,
            mid_rank(waits, sim_p95)))
    return out


def all_tasks() -> list[Task]:
    """Every shape's tasks, each shape shifted by its offset: what the live run sends."""
    return [t.model_copy(update={"sent": t.sent + SHAPES[name][3]})
            for name in SHAPES for t in trace_of(name)[1]]


def describe(c: Comparison) -> str:
    """One line of the side-by-side table (the test's failure message, the bench)."""
    return (f"{c.shape:<7} {c.tasks:>5}  worker-s live {c.live_worker_seconds:7.1f} sim "
            f"{c.sim_worker_seconds:7.1f} ({c.worker_seconds_error:5.1%})  wait p95 live "
            f"{c.live_p95:5.2f}s sim {c.sim_p95:5.2f}s ({c.p95_error:5.1%}, "
            f"{c.sim_p95 - c.live_p95:+.2f}s, live q{c.sim_p95_rank:.3f})  "
            f"start-up {c.startup:.2f}s shut-down {c.shutdown:.2f}s")
