"""What decides at each of the simulator's polls: a controller.

The engine (engine.py) polls every ``controller.interval`` seconds, builds an
``Observation`` of the simulated fleet and applies the ``ScaleDecision``s that
``controller.decide(now, obs, current)`` returns. ``FleetController`` is the fleet's own
policy, the live loop's very calls (``RateTracker.update``, then
``autoscale.policy.decide_poll`` with the history and the capacity budget); the
baselines it is compared with (baselines.py) are other controllers.
"""

from __future__ import annotations

from typing import Protocol

from autoscale.policy import History, budget_from, decide_poll
from fleet.config import FleetConfig
from fleet.observe.model import Observation, ScaleDecision
from fleet.observe.rates import RateTracker


class Controller(Protocol):
    #: Seconds between polls (the first is at t=0).
    interval: float

    def decide(self, now: float, obs: Observation, current: dict[str, int]
               ) -> list[ScaleDecision]:
        """Desired replicas per queue, given this poll's observation and the replicas
        the backend counts; only decisions whose ``changes`` is true are applied."""
        ...


class FleetController:
    """The fleet's policy, as ``Autoscaler.run_once`` runs it (capacity budget included)."""

    name = "fleet"

    def __init__(self, config: FleetConfig):
        self.config = config
        self.interval = config.autoscaler.interval
        self.tracker = RateTracker(config)
        self.history = History()
        self.budget = budget_from(config)

    def decide(self, now: float, obs: Observation, current: dict[str, int]
               ) -> list[ScaleDecision]:
        figures = self.tracker.update(obs)
        decisions, self.history = decide_poll(obs, figures, current, self.config,
                                              self.history, self.budget)
        return decisions
