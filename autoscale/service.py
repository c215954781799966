"""``fleet autoscale`` as a supervisor: the loop in a watched thread, stopped by a signal.

Before, only Ctrl-C stopped it cleanly: SIGTERM (what systemd, Kubernetes and ``kill``
send) and SIGHUP ended the process at once, and with the local backend every worker it
had started ran on, orphaned, consuming. Now SIGTERM, SIGINT and SIGHUP all stop the
loop, then the backend: the local backend stops each worker warm within its queue's
grace period (a second signal kills them now); the Kubernetes backend only lets go of
its API client (the Deployments keep their replicas). With the local backend the workdir
is registered (fleet.registry) like ``fleet up``'s: a second local autoscaler on it is
refused, and what a killed one left is stopped first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from autoscale.backends.local import LocalBackend
from autoscale.loop import Autoscaler, supervised
from fleet.errors import SupervisionError
from fleet.registry import Registry, stop_leftovers
from fleet.supervision import Outcome, StopSignals, Supervisor, Unit


def claim_workdir(workdir: Path, signals: StopSignals, report: Callable[[str], None],
                  role: str) -> Registry:
    """Take ``workdir`` for this supervisor, after stopping what a killed one left."""
    registry = Registry(workdir)
    previous = registry.acquire(role)
    if previous is not None:
        stop_leftovers(previous, report, hurry=lambda: signals.requested)
        registry.forget(previous.processes)
    return registry


def run_supervised(scaler: Autoscaler, signals: StopSignals, report: Callable[[str], None],
                   interval: float | None = None, registry: Registry | None = None,
                   units: Sequence[Unit] = ()) -> None:
    """The loop, and any other background ``units`` (e.g. a reconciler), watched until a
    stop signal or a failure; then the units, then the backend, are stopped."""
    supervisor = Supervisor(signals, report)
    outcome = Outcome(0, "")
    try:
        supervisor.add(supervised(scaler, interval))
        for unit in units:
            supervisor.add(unit)
        outcome = supervisor.run()
    finally:
        supervisor.stop_all()
        backend = scaler.backend
        if isinstance(backend, LocalBackend):  # processes of ours, to stop warm
            running = backend.workers()
            if running:
                report(f"stopping ({outcome.reason or 'exiting'}): {len(running)} worker(s) "
                       "warm, their running tasks finish first; a second signal kills "
                       "them now")

            def killing(pending: list) -> None:
                report(f"second signal: killing {len(pending)} worker(s) now; their running "
                       "tasks go back to their queues (acks_late) within the visibility "
                       "timeout once a worker runs again")

            backend.close(hurry=lambda: signals.hurry, on_hurry=killing)
        else:
            backend.close()
        if registry is not None:
            registry.release()
    if outcome.code:
        raise SupervisionError(f"stopped because {outcome.reason}")
