"""The worker bootstep that makes a Celery worker a fleet worker.

Added to every fleet app, so it runs under ``fleet worker`` and the plain
``celery -A fleet.app worker -Q <queue>`` alike. For a worker that serves exactly one
fleet queue it applies that queue's task-level settings and starts the memory guard
(fleet.guard); every fleet worker renews its leases (fleet.lease) and publishes its
figures (fleet.heartbeat); a worker started by a supervisor watches it (fleet.watchdog)
and stops warm when it is gone. All are threads of the worker's main process.
"""

from __future__ import annotations

import logging

from celery import bootsteps, signals

from fleet import keys
from fleet.guard import MemoryGuard, watch_kernel_oom_kills
from fleet.heartbeat import Heartbeat
from fleet.lease import LeaseRenewer, held_by_consumer
from fleet.retry import retry_attributes
from fleet.watchdog import Watchdog
from fleet.worker import worker_settings

logger = logging.getLogger("fleet.worker")


def served_queue(worker) -> str | None:
    """The one fleet queue this worker consumes, or None."""
    config = worker.app.config
    consumed = [q for q in worker.app.amqp.queues.consume_from or {} if q in config.queues]
    named = worker.app.fleet_queue
    if named is not None:
        return named
    return consumed[0] if len(consumed) == 1 else None


class FleetWorkerStep(bootsteps.StartStopStep):
    """Starts the fleet's threads once the pool has forked its processes.

    A fork copies a lock some other thread holds, held forever in the child. Started
    before the pool, the heartbeat's first connect (getaddrinfo encodes the host name
    with the idna codec, imported on first use) held ``encodings.idna``'s import lock
    while the pool forked: the child hung in its first ``store_result``, the task
    received and never run (three tries of 20 container starts each hung within their
    first three). Hence ``requires`` Pool, and the codec imported here, before any
    thread runs, for the pool's later forks (a replaced child)."""

    label = "fleet"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        "localhost".encode("idna")
        # Before any task runs: kills already counted are not this worker's.
        watch_kernel_oom_kills()
        self.guard: MemoryGuard | None = None
        self.lease: LeaseRenewer | None = None
        self.watchdog: Watchdog | None = None
        self.queue = served_queue(worker)
        if self.queue is None:
            logger.warning("worker serves several queues or none of queues.yaml: "
                           "fleet queue settings and memory guard are off")
            return
        config = worker.app.config
        self.settings = worker_settings(config, self.queue)
        self._configure_tasks(worker.app, config.queues[self.queue])

    def _configure_tasks(self, app, queue) -> None:
        """Task attributes are fixed when tasks bind; make them the queue's."""
        from celery.app.autoretry import add_autoretry_behaviour

        for name, task in app.tasks.items():
            if name.startswith("celery."):
                continue
            task.acks_late = queue.acks_late
            task.reject_on_worker_lost = queue.reject_on_worker_lost
            if queue.retry is not None and not hasattr(task, "_orig_run"):
                attrs = retry_attributes(queue.retry)
                for attr, value in attrs.items():
                    setattr(task, attr, value)
                add_autoretry_behaviour(task, **attrs)

    def start(self, worker) -> None:
        config = worker.app.config
        # The lease does not depend on the queue: every fleet app has the short
        # visibility_timeout, so a worker on several queues (or all) needs it as much.
        if (self.queue is not None and self.settings.memory_limit is not None
                and self.settings.pool == "prefork"):
            self.guard = MemoryGuard(self.queue, self.settings.memory_limit)
            self.guard.start()
        self.heartbeat = Heartbeat(worker, config, self.queue, keys.broker_client(config))
        self.heartbeat.start()
        signals.worker_shutdown.connect(self._withdraw, weak=False)
        if config.broker.lease.enabled:
            self.lease = LeaseRenewer(
                keys.broker_client(config),
                keys.kombu_key(config, "unacked_index"),
                config.broker.lease.interval,
                held_by_consumer(worker),
            )
            self.lease.start()
        supervisor = worker.app.fleet_supervisor
        if supervisor is not None:
            self.watchdog = Watchdog(supervisor).start()
        logger.info("fleet worker for queue %r: memory guard %s, lease renewal %s, "
                    "supervisor %s", self.queue, "on" if self.guard else "off",
                    "on" if self.lease else "off",
                    f"pid {supervisor.pid}" if supervisor else "none")

    def _withdraw(self, **_kwargs) -> None:
        self.heartbeat.withdraw()

    # No stop(): the threads are daemons and must outlive the pool's warm shutdown,
    # while running tasks finish. A lease that stopped first would let a long task of
    # this still-living worker be delivered again elsewhere.
