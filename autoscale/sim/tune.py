"""``fleet tune``: search the autoscaling settings for a trace and an SLO.

Each trial is one simulation (engine.py) of the trace under a point of the search
space (space.py): a pure function of (trace, config, start-up, seed), so a trial needs
no repeats and a seeded sampler makes a whole study reproducible. optuna's TPE sampler
minimises two objectives, total worker-seconds (cost) and total wait p95, with the SLO
(wait p95 <= the SLO on every queue) as constraints (``Trial.set_constraint``, one
per queue): feasible trials dominate infeasible ones, so the search spends its trials
where the SLO holds. The recommendation is the cheapest trial that meets the SLO,
which is on the Pareto front of those trials by definition. The source settings are
the first trial, so a source that meets the SLO is never beaten by a dearer trial.

``recommend(header, tasks, config, ...)`` is what the CLI and the dashboard call.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import optuna

from autoscale.sim.baselines import KedaController
from autoscale.sim.engine import Simulation
from autoscale.sim.errors import SimulationError
from autoscale.sim.report import Report
from autoscale.sim.space import Settings, search_space, source_settings
from autoscale.sim.startup import STARTUP
from fleet.config import FleetConfig, parse_config
from fleet.errors import FleetError
from fleet.trace.model import Header, Task
from fleet.units import format_duration

#: Trials when not told: about 10 s on a one-hour trace of a few queues (0.15 s each).
DEFAULT_TRIALS = 60


class SloNotMet(FleetError):
    """No trial met the SLO on every queue: the closest is named, nothing recommended."""

    exit_code = 1


@dataclass(frozen=True)
class QueueFigures:
    """One queue's figures in one run, and its SLO."""

    worker_seconds: float
    wait_p95: float
    slo_wait_p95: float
    tasks: int
    #: Tasks that never started (the run hit its drain limit: the settings could not
    #: keep up). Such a run's p95 leaves them out, so it never meets the SLO.
    unstarted: int = 0

    @property
    def meets_slo(self) -> bool:
        return not self.unstarted and self.wait_p95 <= self.slo_wait_p95


@dataclass(frozen=True)
class Candidate:
    """One run of the trace: the source config (``current``), KEDA, or a trial."""

    label: str
    #: The trial's number (None for current and keda).
    trial: int | None
    #: What ran (None for keda, whose settings are KEDA's defaults, not the config's).
    settings: Settings | None
    worker_seconds: float
    wait_p95: float
    queues: dict[str, QueueFigures]

    @property
    def meets_slo(self) -> bool:
        return all(q.meets_slo for q in self.queues.values())

    @property
    def violation(self) -> float:
        """How far from the SLO: the sum of each queue's p95 over its SLO, relative
        (0 when met); a run with unstarted tasks is further than any that finished."""
        return sum(max(0.0, q.wait_p95 / q.slo_wait_p95 - 1) + (1e6 if q.unstarted else 0)
                   for q in self.queues.values())

    def as_dict(self) -> dict:
        return {
            "label": self.label, "trial": self.trial,
            "worker_seconds": round(self.worker_seconds, 3),
            "wait_p95": round(self.wait_p95, 6), "meets_slo": self.meets_slo,
            "queues": {q: {"worker_seconds": round(f.worker_seconds, 3),
                           "wait_p95": round(f.wait_p95, 6), "slo_wait_p95": f.slo_wait_p95,
                           "meets_slo": f.meets_slo}
                       for q, f in self.queues.items()},
            "settings": None if self.settings is None else self.settings.fragment(),
        }


@dataclass
class TuneResult:
    """A study's outcome: the Pareto front, the recommendation and the two references."""

    #: The source config with ``best``'s settings applied (validated); the source
    #: config itself when no trial met the SLO.
    config: FleetConfig
    #: Trials on the Pareto front of (worker-seconds, wait p95), cheapest first; among
    #: the trials that met the SLO if any did, else among all.
    front: list[Candidate]
    #: The cheapest trial that met the SLO on every queue, or None.
    best: Candidate | None
    #: ``best``, or the trial closest to the SLO when none met it.
    closest: Candidate
    current: Candidate
    keda: Candidate
    slo: dict[str, float]
    trials: int
    seed: int
    startup: float
    #: Every trial, in the order run.
    history: list[Candidate] = field(default_factory=list)

    def fragment(self) -> dict:
        """The recommendation as plain data of a queues.yaml: the poll interval and
        every queue's autoscaling (a queue the trace did not use as it was), with the
        source's ``imports`` and ``default_queue``. Alone it is a valid queues.yaml
        (what ``fleet validate`` checks: the keys left out take their defaults);
        merged into the source file (each key replacing the one at its path; the
        copied keys change nothing) it gives ``config``. Raises SloNotMet when there
        is no recommendation."""
        if self.best is None:
            raise SloNotMet(no_recommendation(self))
        c = self.config
        return {"version": 1, "imports": list(c.imports), "default_queue": c.default_queue,
                "autoscaler": {"interval": format_duration(c.autoscaler.interval)},
                "queues": {q: {"autoscaling": cls.autoscaling.model_dump(mode="json")}
                           for q, cls in c.queues.items()}}

    def as_dict(self) -> dict:
        return {
            "slo_wait_p95": self.slo, "trials": self.trials, "seed": self.seed,
            "startup": self.startup, "current": self.current.as_dict(),
            "keda": self.keda.as_dict(), "front": [c.as_dict() for c in self.front],
            "recommendation": None if self.best is None else self.best.trial,
            "closest": self.closest.trial,
            "fragment": None if self.best is None else self.fragment(),
        }


def no_recommendation(result: TuneResult) -> str:
    c = result.closest
    worst = ", ".join(f"{q} {f.wait_p95:.1f}s > {f.slo_wait_p95:g}s"
                      if not f.unstarted else f"{q} {f.unstarted} tasks never started"
                      for q, f in c.queues.items() if not f.meets_slo)
    return (f"no trial of {result.trials} met the SLO (wait p95) on every queue; the "
            f"closest, {c.label}: {worst}")


def merged(data: dict, patch: dict) -> dict:
    """``data`` with ``patch`` laid over it, mapping by mapping (a key of the patch
    replaces the one at its path; lists and values are replaced whole)."""
    out = dict(data)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def figures(label: str, trial: int | None, settings: Settings | None, report: Report,
            slo: dict[str, float]) -> Candidate:
    queues = {q: QueueFigures(r.worker_seconds, r.waits.quantile(0.95), slo[q], r.tasks,
                              r.tasks - r.started)
              for q, r in report.queues.items() if q in slo}
    total = report.total
    return Candidate(label, trial, settings, total.worker_seconds,
                     total.waits.quantile(0.95), queues)


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both cost and wait p95 (equal on one, better
    on the other), cheapest first; of equal figures, the first run is kept."""
    front: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.worker_seconds, c.wait_p95,
                                               c.trial if c.trial is not None else -1)):
        if not front or c.wait_p95 < front[-1].wait_p95:
            front.append(c)
    return front


def choose(candidates: Sequence[Candidate]) -> tuple[list[Candidate], Candidate | None,
                                                     Candidate]:
    """(front, best, closest): the front of those that met the SLO (of all when none
    did), the cheapest that met it, and the closest to it."""
    met = [c for c in candidates if c.meets_slo]
    front = pareto_front(met or candidates)
    if met:
        return front, front[0], front[0]
    closest = min(candidates, key=lambda c: (c.violation, c.worker_seconds))
    return front, None, closest


def slo_per_queue(config: FleetConfig, queues: Sequence[str],
                  slo_wait_p95: float | Mapping[str, float] | None) -> dict[str, float]:
    """The SLO of each queue: ``slo_wait_p95`` for all (or, a mapping, for those it
    names), else the queue's target_wait (what the team already said a task may wait)."""
    given = (dict(slo_wait_p95) if isinstance(slo_wait_p95, Mapping)
             else {} if slo_wait_p95 is None else dict.fromkeys(queues, slo_wait_p95))
    for queue, seconds in given.items():
        if queue not in config.queues:
            raise SimulationError(f"SLO of queue {queue!r}: no such queue in {config.source}")
        if not 0 < seconds < float("inf"):
            raise SimulationError(f"SLO wait p95 {seconds!r} of {queue}: seconds must be "
                                  "more than 0")
    return {q: given.get(q, config.queues[q].autoscaling.target_wait) for q in queues}


def recommend(header: Header, tasks: Sequence[Task], config: FleetConfig, *,
              slo_wait_p95: float | Mapping[str, float] | None = None,
              trials: int = DEFAULT_TRIALS,
              seed: int = 0, startup: float = STARTUP["local"],
              progress: Callable[[int, int], None] | None = None) -> TuneResult:
    """Tune the autoscaling of the trace's queues (and the poll interval) for ``tasks``
    (a sequence in order of ``sent``: it is replayed once per trial).

    ``slo_wait_p95``: seconds, for every queue; a mapping queue -> seconds for those it
    names; None (and a queue the mapping leaves out): the queue's target_wait.
    ``progress(done, total)`` is called after every run (the two references and each
    trial). The same arguments give the same result (the sampler is seeded by
    ``seed``, which also seeds the simulation)."""
    if trials < 1:
        raise SimulationError(f"trials {trials}: must be at least 1")
    unknown = [q for q in header.queues if q not in config.queues]
    if unknown:
        raise SimulationError(f"the trace's queue {unknown[0]!r} is not in {config.source}")
    # A queue without tasks in the trace says nothing of its settings: left as it is.
    used = {t.queue for t in tasks}
    queues = [q for q in header.queues if q in used]
    if not queues:
        raise SimulationError("the trace has no tasks: nothing to tune for")
    slo = slo_per_queue(config, queues, slo_wait_p95)
    space = search_space(config, queues, slo)
    total = trials + 2
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    options = {"startup": startup, "seed": seed}
    current = figures("current", None, source_settings(config, queues),
                      Simulation(header, tasks, config, **options).run(), slo)
    step()
    keda = figures("keda", None, None, Simulation(header, tasks, config,
                                                   controller=KedaController(config),
                                                   **options).run(), slo)
    step()
    # A trial that cannot keep up would otherwise simulate a whole day past the trace
    # (engine.DRAIN_LIMIT) to drain its backlog; it fails the SLO anyway.
    drain = max(600.0, header.duration)
    history: list[Candidate] = []

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        settings = space.suggest(trial)
        report = Simulation(header, tasks, settings.apply(config), drain_limit=drain,
                            **options).run()
        c = figures(f"trial {trial.number}", trial.number, settings, report, slo)
        history.append(c)
        for queue, value in constraints(c).items():
            trial.set_constraint(queue, value)
        step()
        return c.worker_seconds, c.wait_p95

    study = _study(seed, trials)
    study.enqueue_trial(source_settings(config, queues).params())
    with _quiet():
        study.optimize(objective, n_trials=trials)
    front, best, closest = choose(history)
    tuned = config if best is None else _validated(config, best.settings)
    return TuneResult(tuned, front, best, closest, current, keda, slo, trials, seed,
                      startup, history)


def constraints(c: Candidate) -> dict[str, float]:
    """Per queue, optuna's convention: a trial is feasible when every value is <= 0
    (relative to the SLO, so queues of 10 s and of 5 min weigh alike)."""
    return {q: (f.wait_p95 - f.slo_wait_p95) / f.slo_wait_p95 + (1e6 if f.unstarted else 0)
            for q, f in c.queues.items()}


def _study(seed: int, trials: int) -> optuna.Study:
    """TPE, multivariate (it models the fields of a queue together: a short
    stabilization window is cheap only with a matching step), seeded. Its random
    start-up trials are a sixth of the budget (at least 2, at most 10), so a short
    study still gets a model to follow."""
    with _quiet():
        sampler = optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=max(2, min(10, trials // 6)))
        return optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """optuna logs every trial at INFO and warns that multivariate TPE is experimental:
    noise on a CLI's stderr. Both are process-wide state (a dashboard calling this
    shares them), so they are restored after; ``warnings.catch_warnings`` is not
    thread-safe, so two studies at once in one process may briefly see each other's
    filters (harmless: only ExperimentalWarning is touched)."""
    logger = logging.getLogger("optuna")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        logger.setLevel(level)


def _validated(config: FleetConfig, settings: Settings | None) -> FleetConfig:
    """The source config with ``settings``, through the same validation as a file
    (``parse_config``), so what is recommended is what ``fleet validate`` accepts."""
    assert settings is not None
    data = merged(config.model_dump(mode="json"), settings.fragment())
    return parse_config(data, config.source)


__all__ = ["Candidate", "QueueFigures", "Settings", "SloNotMet", "TuneResult", "choose",
           "merged", "no_recommendation", "pareto_front", "recommend"]
