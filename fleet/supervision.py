"""What a supervisor (``fleet up``, ``fleet autoscale``) watches, and how it stops.

A supervisor runs its parts as *units*: the autoscaler loop (a thread that must stay
alive and keep turning), the dashboard (threads), the embedded Redis (a process), the
demo jobs (a thread that ends), and whatever is added later, e.g. a reconciler thread.
The main thread checks every unit once a second; a unit that died or stalled is
reported and restarted with a backoff, and one that keeps dying, or cannot be restarted,
stops the whole supervisor with a non-zero exit instead of leaving it looking alive.
(Seen: the autoscaler thread died of one bad poll and ``fleet up`` ran on, scaling
nothing and restarting no crashed worker, since the local backend reaps from the loop.)
Adding a unit is one ``Supervisor.add``; a background loop exposes ``last_pass`` (a
``time.monotonic()``) and becomes a ``ThreadUnit`` with ``beat=`` and ``stall_after=``.

Stopping is signal-driven, never an exception thrown into whatever the main thread was
doing: SIGTERM, SIGINT and SIGHUP all set a flag the main thread polls, so a stop can
never interrupt a half-written registry file or a half-started worker. The first signal
means "stop in order, warm"; any later one means "hurry": whoever is waiting on workers
to finish kills them instead, after saying so.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

logger = logging.getLogger("fleet.supervision")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopSignals:
    """SIGTERM/SIGINT/SIGHUP as flags: ``requested`` after the first, ``hurry`` after
    the second. The handler only counts (a signal handler that takes a lock, as
    ``Event.set`` does, can deadlock against the main thread it interrupted)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame) -> None:
        self.received.append(signum)

    @property
    def requested(self) -> bool:
        return bool(self.received)

    @property
    def hurry(self) -> bool:
        return len(self.received) > 1

    @property
    def name(self) -> str:
        return signal.Signals(self.received[0]).name if self.received else ""

    def install(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def sleep(self, seconds: float, step: float = 0.1) -> bool:
        """Sleep up to ``seconds``; True (early) once a stop is requested."""
        deadline = time.monotonic() + seconds
        while not self.requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(step, left))
        return True

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


class CannotRestart(Exception):
    """A unit that is unhealthy but cannot be restarted from outside (a stuck thread)."""


class Unit(Protocol):
    name: str

    def start(self) -> None: ...

    def problem(self) -> str | None:
        """What is wrong (``"died: ..."``, ``"stalled: ..."``), or None when healthy."""

    def restart(self) -> None:
        """Start again after a problem; raise CannotRestart if that is impossible."""

    def stop(self) -> None: ...


class ThreadUnit:
    """A background thread running ``target(stop_event)``.

    It died if the thread ended without being asked (its exception is kept); with
    ``beat`` (the loop's ``last_pass``, a monotonic time) it stalled when that is older
    than ``stall_after``. A ``oneshot`` unit (the demo jobs) is *done* when its target
    returns; it is never restarted.
    """

    def __init__(self, name: str, target: Callable[[threading.Event], object], *,
                 beat: Callable[[], float] | None = None, stall_after: float | None = None,
                 oneshot: bool = False, join_timeout: float = 30.0):
        self.name = name
        self.target = target
        self.beat = beat
        self.stall_after = stall_after
        self.oneshot = oneshot
        self.join_timeout = join_timeout
        self.done = False
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._started_at = 0.0

    def start(self) -> None:
        self._stop = threading.Event()
        self.error = None
        self.done = False
        self._started_at = time.monotonic()
        self.thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            self.target(self._stop)
            self.done = True
        except BaseException as exc:  # kept for problem(): the supervisor says it
            self.error = exc
            if not self._stop.is_set():
                logger.error("%s thread died", self.name, exc_info=exc)

    def problem(self) -> str | None:
        thread = self.thread
        if thread is None or self._stop.is_set():
            return None
        if thread.is_alive():
            if self.beat is None or self.stall_after is None:
                return None
            last = max(self.beat(), self._started_at)
            age = time.monotonic() - last
            return f"stalled: no pass for {age:.0f}s" if age > self.stall_after else None
        if self.error is not None:
            return f"died: {type(self.error).__name__}: {self.error}"
        if self.oneshot and self.done:
            return None
        return "ended without being asked to"

    def restart(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            raise CannotRestart("a running Python thread cannot be stopped from outside")
        self.start()

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=self.join_timeout)


@dataclass(frozen=True)
class RestartPolicy:
    #: Restarts allowed within ``window`` seconds before the supervisor gives up.
    max_restarts: int = 5
    window: float = 600.0
    #: First wait before a restart, doubled for each recent one.
    backoff: float = 1.0
    #: How long a unit may stay stuck (unhealthy, not restartable) before giving up.
    stuck_for: float = 300.0


def restart_delay(recent: list[float], now: float, policy: RestartPolicy) -> float | None:
    """Seconds to wait before the next restart, or None to give up (pure).

    ``recent``: when the unit was restarted before (monotonic times)."""
    within = [t for t in recent if now - t < policy.window]
    if len(within) >= policy.max_restarts:
        return None
    return policy.backoff * 2 ** len(within)


@dataclass
class Outcome:
    code: int
    reason: str
    #: What ended a unit that is not restarted (the demo's own FleetError, say).
    error: BaseException | None = None


@dataclass
class _Watched:
    unit: Unit
    restart: bool
    restarts: list[float] = field(default_factory=list)
    failing_since: float | None = None
    retry_at: float = 0.0
    stuck: bool = False


class Supervisor:
    """Checks its units from the main thread until a stop signal, a failure it cannot
    heal, or (``run(done=...)``) the given oneshot units are done."""

    def __init__(self, signals: StopSignals, report: Callable[[str], None],
                 policy: RestartPolicy = RestartPolicy(), check_every: float = 1.0):
        self.signals = signals
        self.report = report
        self.policy = policy
        self.check_every = check_every
        self.watched: list[_Watched] = []

    def add(self, unit: Unit, *, restart: bool = True, started: bool = False) -> Unit:
        """Watch ``unit`` (starting it unless ``started``)."""
        if not started:
            unit.start()
        self.watched.append(_Watched(unit, restart))
        return unit

    def run(self, done: list[ThreadUnit] | None = None) -> Outcome:
        while True:
            if self.signals.requested:
                return Outcome(0, f"{self.signals.name} received")
            for entry in self.watched:
                try:
                    outcome = self._check(entry, time.monotonic())
                except Exception as exc:  # a bug in one check must not end the others
                    logger.exception("checking %s failed", entry.unit.name)
                    self.report(f"could not check {entry.unit.name}: {exc}")
                    outcome = None
                if outcome is not None:
                    return outcome
            if done and all(unit.done for unit in done):
                return Outcome(0, "done")
            self.signals.sleep(self.check_every)

    def _check(self, entry: _Watched, now: float) -> Outcome | None:
        unit = entry.unit
        problem = unit.problem()
        if problem is None:
            if entry.stuck:
                self.report(f"{unit.name} runs again")
            entry.failing_since, entry.stuck = None, False
            return None
        if entry.failing_since is None:
            entry.failing_since = now
            self.report(f"{unit.name} {problem}")
            if not entry.restart:
                return Outcome(1, f"{unit.name} {problem}", getattr(unit, "error", None))
            outcome = self._schedule(entry, now, problem)
            if outcome is not None:
                return outcome
        if entry.stuck:
            if now - entry.failing_since > self.policy.stuck_for:
                return Outcome(1, f"{unit.name} {problem}, and cannot be restarted")
            return None
        if now < entry.retry_at:
            return None  # a unit that dies at once must not spin
        try:
            unit.restart()
        except CannotRestart as exc:
            entry.stuck = True
            self.report(f"{unit.name} cannot be restarted ({exc}); stopping if it does not "
                        f"recover within {self.policy.stuck_for:g}s")
            return None
        except Exception as exc:
            entry.restarts.append(now)
            self.report(f"could not restart {unit.name}: {type(exc).__name__}: {exc}")
            return self._schedule(entry, now, problem)
        entry.restarts.append(now)
        entry.failing_since = None
        self.report(f"restarted {unit.name} (restart {len(entry.restarts)} within "
                    f"{self.policy.window:g}s)")
        return None

    def _schedule(self, entry: _Watched, now: float, problem: str) -> Outcome | None:
        delay = restart_delay(entry.restarts, now, self.policy)
        if delay is None:
            return Outcome(1, f"{entry.unit.name} {problem}; restarted "
                              f"{len(entry.restarts)} times within {self.policy.window:g}s: "
                              "giving up")
        entry.retry_at = now + delay
        return None

    def stop_all(self) -> None:
        """Stop every unit, last added first."""
        for entry in reversed(self.watched):
            try:
                entry.unit.stop()
            except Exception as exc:
                self.report(f"stopping {entry.unit.name} failed: {exc}")
