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
  measured, per worker, from its creation to Celery's "ready." line in its log, and
  the simulator is given the mean the run saw.
"""

from __future__ import annotations

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
ARRIVALS = 30.0
DURATION = 44.0

#: shape name -> (synth shape, its parameters, the queues it uses, its offset in the
#: live run). The shapes run one after the other, each on queues of its own, in one
#: ``fleet up`` (one start-up of the supervisor, and no state shared: the policy decides
#: each queue alone, no capacity budget links them). Not at once: several workers
#: importing Celery together on two cores start in 4-8 s instead of 1, and a
#: simulator's start-up is one figure.
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


def trace_of(name: str, seed: int = 1) -> tuple[Header, list[Task]]:
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
    #: (at, queue, current, desired) of every change the autoscaler made
    changes: list[tuple[float, str, int, int]] = field(default_factory=list)

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
    """Send each task at ``t0 + sent`` to its queue, as a sleep of its service time."""
    out = []
    for task in sorted(tasks, key=lambda t: t.sent):
        delay = t0 + task.sent - time.time()
        if delay > 0:
            time.sleep(delay)
        at = time.time()
        result = app.send_task("tasks.heavy.sleep", kwargs={"seconds": task.service},
                               queue=task.queue)
        out.append(Sent(task.queue, at, result))
    return out


def run_live(fleet, tasks: list[Task], duration: float, workdir: Path,
             ready_timeout: float = 60.0) -> LiveRun:
    """The tasks through a fresh ``fleet up``; returns once the window has passed and
    the fleet has stopped."""
    import json

    from fleet.keys import broker_client, changes_key

    proc, out = start_fleet_up(fleet, workdir)
    try:
        deadline = time.monotonic() + ready_timeout
        while "the fleet is running" not in out.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"fleet up did not start:\n{out.read_text()}")
            time.sleep(0.1)
        watch = WorkerWatch(proc.pid).start()
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
        client = broker_client(fleet.config)
        changes = []
        for raw in client.lrange(changes_key(fleet.config), 0, -1):
            d = json.loads(raw)
            if not d.get("dry_run"):
                changes.append((d["at"] - t0, d["queue"], d["current"], d["desired"]))
        client.close()
    finally:
        stop_fleet_up(proc)
    run = LiveRun(t0, duration, list(watch.seen.values()), waits, sends=sends,
                  changes=sorted(changes))
    for life in run.lifetimes:
        ready = ready_at(workdir / "logs" / f"{life.hostname.replace('@', '_')}.log")
        if ready is not None:
            run.startups.setdefault(life.queue, []).append(ready - life.created)
    return run


def p95(waits: list[float]) -> float:
    """The simulator's own estimator (a 1%-bucket histogram), for a like comparison."""
    from autoscale.sim.report import WaitHistogram

    h = WaitHistogram()
    for w in waits:
        h.add(max(0.0, w))
    return h.quantile(0.95)


def simulate(header: Header, tasks: list[Task], config: FleetConfig, startup: float):
    """The simulator on the same trace and config. ``cpu_per_task=0``: the live tasks
    sleep, and the simulator's default (a busy slot is a busy core) would make the
    policy see saturated workers that the live fleet's psutil never reports."""
    from autoscale.sim.engine import Simulation

    return Simulation(header, sorted(tasks, key=lambda t: t.sent), config, startup=startup,
                      cpu_per_task=0.0).run()


@dataclass
class Comparison:
    shape: str
    live_worker_seconds: float
    sim_worker_seconds: float
    live_p95: float
    sim_p95: float
    startup: float
    tasks: int

    @staticmethod
    def error(live: float, sim: float) -> float:
        return abs(sim - live) / live if live else (0.0 if not sim else float("inf"))

    @property
    def worker_seconds_error(self) -> float:
        return self.error(self.live_worker_seconds, self.sim_worker_seconds)

    @property
    def p95_error(self) -> float:
        return self.error(self.live_p95, self.sim_p95)


def compare(shape: str, run: LiveRun, config: FleetConfig) -> Comparison:
    header, tasks = trace_of(shape)
    _, _, queues, offset = SHAPES[shape]
    startups = [s for q in queues for s in run.startups.get(q, [])]
    startup = sum(startups) / len(startups) if startups else 3.0
    report = simulate(header, tasks, config, startup)
    live_waits = [w for q in queues for w in run.waits.get(q, [])]
    sim_waits = report.total.waits
    return Comparison(
        shape,
        sum(run.worker_seconds(q, offset, header.duration) for q in queues),
        sum(report.queues[q].worker_seconds for q in queues),
        p95(live_waits), sim_waits.quantile(0.95), startup, len(tasks))


def all_tasks() -> list[Task]:
    """Every shape's tasks, each shape shifted by its offset: what the live run sends."""
    return [t.model_copy(update={"sent": t.sent + SHAPES[name][3]})
            for name in SHAPES for t in trace_of(name)[1]]


def describe(c: Comparison) -> str:
    """One line of the side-by-side table (the test's failure message, the bench)."""
    return (f"{c.shape:<7} {c.tasks:>5}  worker-s live {c.live_worker_seconds:7.1f} sim "
            f"{c.sim_worker_seconds:7.1f} ({c.worker_seconds_error:5.1%})  wait p95 live "
            f"{c.live_p95:5.2f}s sim {c.sim_p95:5.2f}s ({c.p95_error:5.1%}, "
            f"{c.sim_p95 - c.live_p95:+.2f}s)  start-up {c.startup:.2f}s")
