"""The simulator's one error: what the user gave it does not fit (exit 2)."""

from fleet.errors import FleetError


class SimulationError(FleetError):
    """The trace does not fit the config (an unknown queue, tasks out of order), or a
    parameter is out of range (a start-up delay), or a trace line is malformed."""

    exit_code = 2
