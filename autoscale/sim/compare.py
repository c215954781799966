"""One trace through the fleet's policy and through baselines (baselines.py), with the
same simulator and options: ``compare(header, tasks, config, ["keda", "fixed"])``.

The fleet's run comes first: the fixed fleet's default size per queue is the most
replicas the fleet's policy ran that queue at (what a team would provision for the
peak). Ratios are baseline / fleet, per queue and in total.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from autoscale.sim.baselines import BASELINES, FixedController, KedaController
from autoscale.sim.engine import Simulation
from autoscale.sim.errors import SimulationError
from autoscale.sim.report import QueueReport, Report
from fleet.config import FleetConfig
from fleet.trace.model import Header, Task

#: The figures a comparison gives ratios of: name -> the figure of a QueueReport.
RATIO_FIGURES = {
    "worker_seconds": lambda q: q.worker_seconds,
    "wait_p50": lambda q: q.waits.quantile(0.50),
    "wait_p95": lambda q: q.waits.quantile(0.95),
    "wait_p99": lambda q: q.waits.quantile(0.99),
    "max_backlog": lambda q: q.max_backlog,
    "slo_violation_seconds": lambda q: q.slo_violation_seconds,
    "scale_events": lambda q: q.scale_events,
}


def ratio(baseline: float, fleet: float) -> float | None:
    """baseline / fleet; 1.0 when both are 0, None (no ratio) when only the fleet's is."""
    if fleet:
        return baseline / fleet
    return 1.0 if not baseline else None


def ratios(baseline: QueueReport, fleet: QueueReport) -> dict[str, float | None]:
    return {k: None if (r := ratio(f(baseline), f(fleet))) is None else round(r, 4)
            for k, f in RATIO_FIGURES.items()}


@dataclass
class Comparison:
    fleet: Report
    #: name -> its report, in the order asked.
    baselines: dict[str, Report] = field(default_factory=dict)
    #: The fixed fleet's replicas per queue (when "fixed" ran).
    fixed: dict[str, int] = field(default_factory=dict)

    def ratios(self, name: str) -> dict:
        b = self.baselines[name]
        return {"queues": {q: ratios(b.queues[q], self.fleet.queues[q]) for q in b.queues},
                "total": ratios(b.total, self.fleet.total)}

    def as_dict(self) -> dict:
        out = {}
        for name, report in self.baselines.items():
            out[name] = {**report.as_dict(), "ratios": self.ratios(name)}
            if name == "fixed":
                out[name]["replicas"] = dict(self.fixed)
        return out


def parse_fixed(text: str | None, queues: Sequence[str]) -> tuple[int | None, dict[str, int]]:
    """``--fixed-replicas``: ``N`` (every queue) or ``queue=N,...`` (those queues);
    (N or None, per-queue). Raises ValueError with what is wrong."""
    if not text:
        return None, {}
    text = text.strip()
    if "=" not in text:
        n = int(text)
        if n < 0:
            raise ValueError(f"{text}: replicas must be >= 0")
        return n, {}
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in queues:
            raise ValueError(f"{part!r}: expected QUEUE=N with QUEUE one of "
                             f"{', '.join(queues)}")
        n = int(value)
        if n < 0:
            raise ValueError(f"{part!r}: replicas must be >= 0")
        out[name] = n
    return None, out


def compare(header: Header, tasks: Sequence[Task], config: FleetConfig,
            names: Sequence[str], *, fixed_all: int | None = None,
            fixed: Mapping[str, int] | None = None, fleet: Report | None = None,
            **options) -> Comparison:
    """The fleet's run and each baseline's of ``names`` on the same ``tasks`` (a
    sequence: it is replayed once per run) and simulator ``options``; ``fleet`` is the
    fleet's report when the caller has run it already (recording its plots)."""
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise SimulationError(f"unknown baseline {unknown[0]!r}: expected one of "
                              f"{', '.join(BASELINES)}")
    result = Comparison(fleet or Simulation(header, tasks, config, **options).run())
    for name in names:
        if name == "keda":
            controller = KedaController(config)
        else:
            sizes = {q: result.fleet.queues[q].max_replicas if fixed_all is None else fixed_all
                     for q in config.queues}
            sizes.update(fixed or {})
            result.fixed = sizes
            controller = FixedController(config, sizes)
        result.baselines[name] = Simulation(header, tasks, config, controller=controller,
                                            **options).run()
    return result
