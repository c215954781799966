"""How long a new replica takes from the scale call to taking messages, per backend kind.

Parameters with defaults, not facts: a fleet measures its own and passes seconds.

- ``local``: a ``fleet worker`` process. Importing Celery and the worker path alone took
  1.6 s on the 2-core CI machine (``python -c "import celery.bin.worker, fleet.worker,
  fleet.factory"``, median of 3); forking the pool, connecting to Redis and the first
  self-report add about a second more: 3 s.
- ``container``: the same process in a container whose image is already on the host.
  Measured on overlay2 (``bench/container_start.py``, 20 starts each, alternating): to
  the first task 0.83 s p50 / 0.98 s p95 in a container, 1.04 s / 1.25 s as a bare
  process from the development venv. A container is no slower: 3 s, as ``local``.
- ``kubernetes``: a pod. Kubernetes' own pod start-up SLO is "99th percentile per
  cluster-day <= 5s", from pod creation to all containers started, *excluding image
  pulls and init containers* (kubernetes/community,
  sig-scalability/slos/pod_startup_latency.md); the worker's own start follows: 5 s + 3 s
  = 8 s. A node that must pull the image, or a cluster autoscaler that must add a node,
  takes far longer (minutes): pass the seconds you see.

Shut-down is the other end of a replica's cost: from the warm stop of an idle worker
(SIGTERM; a busy one first finishes its tasks) to its exit. ``SHUTDOWN`` is what the
local backend's workers took here, 2.0 s (2.0-2.5 s over 17 stops in the validation
run, tests/live_replay.py: Celery closes its consumer, joins the pool and its event
dispatcher). A container or a pod adds the engine's teardown to that, which the
fleet's worker-seconds do not count: pass more if your bill does.
"""

from __future__ import annotations

from autoscale.sim.errors import SimulationError

STARTUP: dict[str, float] = {"local": 3.0, "container": 3.0, "kubernetes": 8.0}
SHUTDOWN = 2.0


def startup_delay(spec: str | float) -> float:
    """``local``, ``container``, ``kubernetes`` or a number of seconds (>= 0)."""
    if isinstance(spec, int | float):
        seconds = float(spec)
    elif spec in STARTUP:
        return STARTUP[spec]
    else:
        try:
            seconds = float(spec)
        except ValueError:
            raise SimulationError(f"start-up delay {spec!r}: expected one of "
                             f"{', '.join(STARTUP)} or a number of seconds") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise SimulationError(f"start-up delay {spec!r}: seconds must be finite and >= 0")
    return seconds
