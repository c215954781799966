"""What each fault case measured: submitted, completed, lost, duplicated, recovery time.

Every case prints one line (``-s`` shows it; pytest's ``-ra`` summary does not) and, when
``FLEET_FAULT_REPORT`` names a file, appends the same figures as a JSON line to it, so
docs/reliability.md can quote the figures of one run of the whole suite.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Figures:
    case: str
    submitted: int = 0
    completed: int = 0
    lost: int = 0
    #: Units of work that ran twice while the worker that first took them was alive.
    duplicated: int = 0
    #: Seconds from the fault (or its end) until the job ended by itself.
    recovery_s: float | None = None
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        rec = "-" if self.recovery_s is None else f"{self.recovery_s:.1f}s"
        more = "".join(f" {k}={v}" for k, v in self.extra.items())
        return (f"FAULT {self.case}: submitted={self.submitted} completed={self.completed} "
                f"lost={self.lost} duplicated={self.duplicated} recovery={rec}{more}")


def report(figures: Figures) -> Figures:
    print(figures.line(), flush=True)
    path = os.environ.get("FLEET_FAULT_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({**asdict(figures), "at": time.time()}) + "\n")
    return figures
