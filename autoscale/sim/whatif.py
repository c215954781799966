"""The simulator behind the dashboard's "what if" view (fleet/whatif.py is the seam).

A window of the fleet's tasks runs twice through the same ``Simulation``, with the
same start-up delay and seed: under the current settings and under a candidate's
(``propose``: the tuner's by default, wired in the composition roots; or settings a
caller passes). Each run is recorded and drawn as ``fleet simulate --plot`` draws it,
as SVG (text stays text, and the page shows it as an image under its CSP).
"""

from __future__ import annotations

from collections.abc import Sequence

from autoscale.sim import plot
from autoscale.sim.engine import Simulation
from autoscale.sim.errors import SimulationError
from autoscale.sim.report import QueueReport, Report
from autoscale.sim.startup import STARTUP
from autoscale.sim.tracefile import tasks_in_send_order
from fleet.config import FleetConfig
from fleet.trace.model import Header, Task
from fleet.whatif import (
    Figures,
    Outcome,
    Proposer,
    Side,
    UnavailableWhatIf,
    WhatIf,
    WhatIfUnavailable,
)

#: The tuner's trials per what-if: a page waits for the answer, so far fewer than
#: ``fleet tune``'s default; a window is replayed once per trial.
TUNER_TRIALS = 12


def tuner_proposal(header: Header, tasks: list[Task], config: FleetConfig) -> FleetConfig:
    """The tuner's settings for these tasks (autoscale.sim.tune, imported when asked: a
    dashboard without it still serves every other page, and a pasted candidate)."""
    try:
        from autoscale.sim.tune import recommend
    except ImportError:
        raise WhatIfUnavailable("the tuner (autoscale.sim.tune) is not installed here: "
                                "give candidate settings instead") from None
    return recommend(header, tasks, config, trials=TUNER_TRIALS, seed=0,
                     startup=startup_for(config)).config


def startup_for(config: FleetConfig) -> float:
    """The start-up delay of the config's backend kind (startup.py), ``local`` for a
    backend it does not know (a plug-in's, the stub). The docker backend's replicas are
    containers."""
    kind = {"docker": "container"}.get(config.autoscaler.backend, config.autoscaler.backend)
    return STARTUP.get(kind, STARTUP["local"])


def figures(q: QueueReport) -> Figures:
    w = q.waits
    return Figures(queue=q.name, tasks=q.tasks, worker_seconds=round(q.worker_seconds, 3),
                   wait_p50=round(w.quantile(0.50), 6), wait_p95=round(w.quantile(0.95), 6),
                   wait_p99=round(w.quantile(0.99), 6),
                   slo_violation_seconds=round(q.slo_violation_seconds, 3),
                   scale_events=q.scale_events, max_replicas=q.max_replicas,
                   max_backlog=q.max_backlog)


class SimulatedWhatIf:
    """``WhatIf`` by simulation. ``propose`` makes the candidate when the caller gives
    none; ``startup`` None: the config's backend kind's delay; ``plots`` False draws
    nothing (no matplotlib needed)."""

    def __init__(self, propose: Proposer | None = tuner_proposal, *,
                 startup: float | None = None, seed: int = 0, plots: bool = True):
        self.propose = propose
        self.startup = startup
        self.seed = seed
        self.plots = plots

    def replay(self, header: Header, tasks: Sequence[Task], config: FleetConfig, *,
               candidate: FleetConfig | None = None) -> Outcome:
        ordered = tasks_in_send_order(tasks)
        source = "given"
        if candidate is None:
            if self.propose is None:
                raise WhatIfUnavailable("no candidate settings given and no tuner wired in")
            candidate = self.propose(header, ordered, config)
            source = "tuner"
        if list(candidate.queues) != list(config.queues):
            raise SimulationError("the candidate settings must have the current queues "
                                  f"({', '.join(config.queues)})")
        current, report = self._side("current", "queues.yaml", header, ordered, config)
        other, _ = self._side("candidate", source, header, ordered, candidate)
        return Outcome(current=current, candidate=other, simulated=report.simulated,
                       skipped=report.skipped)

    def _side(self, label: str, source: str, header: Header, tasks: list[Task],
              config: FleetConfig) -> tuple[Side, Report]:
        startup = startup_for(config) if self.startup is None else self.startup
        sim = Simulation(header, tasks, config, startup=startup, seed=self.seed,
                         record=self.plots)
        report = sim.run()
        svg = None
        if self.plots:
            active = [n for n, q in report.queues.items() if q.tasks]
            fig = plot.figure(sim.series, config, duration=report.simulated, active=active,
                              title=f"{label} settings ({source}), start-up {startup:g}s")
            svg = plot.to_svg(fig)
        used = tuple(figures(q) for q in report.queues.values() if q.tasks)
        return Side(label=label, source=source, config=config, total=figures(report.total),
                    queues=used, svg=svg), report


def build(propose: Proposer | None = tuner_proposal) -> WhatIf:
    """What the composition roots give the dashboard: the simulator, or, without
    matplotlib (the ``tune`` extra), the stub that says so on every replay."""
    try:
        plot.require()
    except plot.PlotError as exc:
        return UnavailableWhatIf(f"what-if needs the simulator's plots: {exc}")
    return SimulatedWhatIf(propose)
