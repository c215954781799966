"""The Celery app factory: queues.yaml in, a configured Celery app out.

``fleet.app`` holds the module-level instance for the plain Celery CLI and Flower; the
``fleet`` CLI and the tests build their own apps here from the config they loaded.
"""

from __future__ import annotations

import socket

from kombu import Exchange, Queue

from fleet.config import FleetConfig
from fleet.fleetapp import FleetApp
from fleet.keys import PRIORITY_STEPS, dead_letter_prefix
from fleet.routing import FleetRouter, RoutingTable
from fleet.transport import DEAD_LETTER_OPTION
from fleet.worker import queue_conf, worker_settings

#: Dead-peer detection in about 30 s, idle or not (Linux; other systems get keepalive).
TCP_KEEPALIVE = {
    option: value
    for option, value in (
        (getattr(socket, "TCP_KEEPIDLE", None), 10),
        (getattr(socket, "TCP_KEEPINTVL", None), 5),
        (getattr(socket, "TCP_KEEPCNT", None), 3),
        (getattr(socket, "TCP_USER_TIMEOUT", None), 30_000),
    )
    if option is not None
}

#: Lowest restore sweep period: every poll may move messages whose lease lapsed back.
RESTORE_INTERVAL_MAX = 10.0


def broker_transport_options(config: FleetConfig) -> dict:
    """kombu Redis options: short visibility timeout made safe by lease renewal."""
    vt = config.broker.visibility_timeout
    restore_interval = max(1.0, min(RESTORE_INTERVAL_MAX, vt / 4))
    options = {
        "visibility_timeout": vt,
        "priority_steps": PRIORITY_STEPS,
        "queue_order_strategy": "priority",
        # kombu sweeps expired unacked messages every interval * throttle seconds
        # (100 s by default): far too slow for a 60 s lease.
        "unacked_restore_interval": restore_interval,
        "unacked_restore_throttle": 1,
        # Each sweep holds a lock that expires after 300 s by default: a worker killed
        # mid-sweep would stop every restore for 5 visibility timeouts. A sweep takes
        # milliseconds, and two overlapping ones are safe (kombu restores each message
        # in a WATCH transaction), so let a dead sweeper's lock go quickly.
        "unacked_mutex_expire": 2 * restore_interval,
        # A Redis that vanished without closing the socket (node loss, NAT timeout)
        # must be noticed. TCP keepalive and a TCP user timeout do it in the kernel;
        # a socket_timeout would too, but costs a poll() per socket call: about 5% of
        # a no-op task's throughput with task events on (bench/throughput.py).
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "socket_keepalive_options": TCP_KEEPALIVE,
    }
    if config.broker.key_prefix:
        options["global_keyprefix"] = config.broker.key_prefix
    # Where fleet.transport keeps messages it cannot deliver (fleet.deadletter).
    options[DEAD_LETTER_OPTION] = dead_letter_prefix(config)
    return options


def celery_settings(config: FleetConfig) -> dict:
    """Everything Celery needs that does not depend on which queue a worker serves."""
    queues = [Queue(name, Exchange(name, type="direct"), routing_key=name)
              for name in config.queues]
    result_options = {}
    if config.broker.key_prefix:
        result_options["global_keyprefix"] = config.broker.key_prefix
    default = config.queues[config.default_queue]
    settings = {
        "broker_url": config.broker.url,
        # Results go through the claim-check backend: large results travel by reference.
        "result_backend": f"fleet.claimcheck:ClaimCheckRedisBackend+{config.result_url}",
        "broker_transport_options": broker_transport_options(config),
        "result_backend_transport_options": result_options,
        "broker_connection_retry_on_startup": True,
        # JSON only: pickle would let anyone who can write to Redis run code on workers.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": int(config.results.expires),
        "result_extended": True,
        "task_queues": queues,
        "task_default_queue": config.default_queue,
        "task_default_exchange": config.default_queue,
        "task_default_routing_key": config.default_queue,
        "task_create_missing_queues": False,
        "task_routes": [FleetRouter(RoutingTable.from_config(config))],
        "task_default_priority": default.priority,
        "task_track_started": True,
        "worker_send_task_events": config.events,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": True,
        "imports": list(config.imports),
        "broker_channel_error_retry": True,
        # The poison bound on receipt and malformed messages kept (fleet.consumer).
        "worker_consumer": "fleet.consumer:FleetConsumer",
    }
    if config.broker.url.split("://", 1)[0] in ("redis", "rediss"):
        # kombu's Redis transport, made to survive a Redis restart (see fleet.transport).
        settings["broker_transport"] = "fleet.transport:Transport"
    return settings


def create_app(config: FleetConfig, queue: str | None = None, main: str = "fleet") -> FleetApp:
    """A Celery app wired to ``config``; with ``queue``, tuned as that queue's worker."""
    app = FleetApp(
        main,
        config,
        task_cls="fleet.task:FleetTask",
        amqp="fleet.amqp:FleetAMQP",
        # Events also go to a capped Redis Stream the dashboard resumes from (fleet.eventlog).
        events="fleet.eventlog:StreamEvents",
        set_as_current=True,
    )
    app.conf.update(celery_settings(config))
    if queue is not None:
        app.conf.update(queue_conf(worker_settings(config, queue)))
        app.fleet_queue = queue
    from fleet.workerstep import FleetWorkerStep

    app.steps["worker"].add(FleetWorkerStep)
    from fleet.jobs import hooks

    hooks.connect()
    import fleet.jobs.lifecycle  # noqa: F401 (registers fleet.jobs.collect)

    return app
