"""The worker's own health, on its local disk, for a liveness probe that needs no Redis.

Readiness asks Redis for the worker's report (``fleet probe``): a worker that cannot
reach its broker is not ready, and saying so is right. Liveness must not: during a
broker outage of a few minutes every worker would fail it at once and the kubelet
would restart the whole fleet, which gains nothing (the workers reconnect by
themselves) and loses what they held. So the heartbeat thread also writes this file at
every beat, whether or not Redis answered, and ``fleet probe --live`` reads only it:

- the worker process is alive (its pid);
- its heartbeat thread still runs (``at`` fresh);
- its event loop still turns (``loop_at`` fresh), except while the broker is
  unreachable: then Celery's consumer sits in its reconnect loop, which does not turn
  the event loop, and that is expected; after the broker is back the loop has
  ``max_age`` again to resume.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

#: Where the files go: the pod's /tmp (an emptyDir), or the machine's temp directory.
DIR_ENV = "FLEET_HEALTH_DIR"


@dataclass(frozen=True)
class Health:
    pid: int
    hostname: str
    #: The heartbeat thread's last beat (epoch seconds).
    at: float
    #: The event loop's last stamp (None: no event loop to watch, e.g. before the hub).
    loop_at: float | None
    #: Whether the last beat reached Redis, and since when that has been so.
    broker_ok: bool
    broker_since: float


def health_path(hostname: str) -> Path:
    directory = Path(os.environ.get(DIR_ENV) or Path(tempfile.gettempdir()) / "fleet-health")
    return directory / (re.sub(r"[^A-Za-z0-9_.-]", "_", hostname) + ".json")


def write_health(path: Path, health: Health) -> None:
    """Replace the file whole (a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(health)))
    os.replace(tmp, path)


def read_health(path: Path) -> Health | None:
    """The file's contents; None if there is none. A malformed file is a ValueError."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return Health(**json.loads(raw))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def liveness(health: Health, now: float, max_age: float, pid_alive: bool) -> str | None:
    """Why the worker is not alive, or None if it is (a pure decision: tested alone)."""
    name = health.hostname
    if not pid_alive:
        return f"worker {name}'s process {health.pid} is gone"
    if now - health.at > max_age:
        return f"worker {name}'s heartbeat last ran {now - health.at:.0f}s ago"
    if health.loop_at is None or not health.broker_ok:
        return None  # no loop to watch, or it waits for the broker, as it should
    since = max(health.loop_at, health.broker_since)
    if now - since > max_age:
        return f"worker {name}'s event loop last ran {now - health.loop_at:.0f}s ago"
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # there, but another user's
    return True
