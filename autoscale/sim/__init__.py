"""A discrete-event simulation of the fleet that drives the real policy and rates.

``simulate(header, tasks, config)`` replays a trace (fleet.trace.model) against simulated
replicas (backend.py) and returns a Report (report.py); see docs/tuning.md, "Simulation".
"""

from autoscale.sim.engine import simulate
from autoscale.sim.report import QueueReport, Report
from autoscale.sim.startup import STARTUP, startup_delay

__all__ = ["STARTUP", "QueueReport", "Report", "simulate", "startup_delay"]
