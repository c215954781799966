"""Redis key names for fleet's own state, under the broker's global key prefix.

kombu puts ``broker.key_prefix`` in front of its keys; fleet's keys follow the same
rule so that one prefix isolates a whole fleet (or one test) inside a shared Redis.
"""

from __future__ import annotations

import os

import redis

from fleet.config import FleetConfig


def prefixed(global_prefix: str, *parts: str) -> str:
    """A fleet key under a raw global key prefix: for code that has kombu's transport
    options rather than a config (fleet.transport)."""
    return global_prefix + "fleet:" + ":".join(parts)


def key(config: FleetConfig, *parts: str) -> str:
    return prefixed(config.broker.key_prefix, *parts)


def workers_key(config: FleetConfig) -> str:
    """The hash of worker reports (fleet.heartbeat writes, fleet.observe reads)."""
    return key(config, "workers")


def overrides_key(config: FleetConfig) -> str:
    """Operator overrides per queue: paused, min/max replicas (fleet.observe.overrides)."""
    return key(config, "autoscaler", "overrides")


def latest_decisions_key(config: FleetConfig) -> str:
    """The autoscaler's newest decision per queue (it writes, the dashboard reads)."""
    return key(config, "autoscaler", "latest")


def changes_key(config: FleetConfig) -> str:
    """The autoscaler's recent replica changes, newest first (capped list)."""
    return key(config, "autoscaler", "changes")


def events_stream_key(config: FleetConfig) -> str:
    """The Redis Stream workers write their events to (fleet.eventlog)."""
    return key(config, "events")


def delivery_counter_key(config: FleetConfig, delivery_tag: str) -> str:
    """How often one message was delivered (fleet.deliveries)."""
    return key(config, "deliveries", delivery_tag)


def dead_letter_prefix(config: FleetConfig) -> str:
    """Each queue's dead-letter list is this plus the queue's name (fleet.deadletter)."""
    return dead_letter_prefix_for(config.broker.key_prefix)


def dead_letter_prefix_for(global_prefix: str) -> str:
    """``dead_letter_prefix`` from kombu's ``global_keyprefix`` (the transport's view)."""
    return prefixed(global_prefix, "dead", "")


def rate_bucket_key(config: FleetConfig, kind: str, name: str) -> str:
    """A fleet-wide token bucket: ``kind`` is "task" or "queue" (fleet.ratelimit)."""
    return key(config, "rate", kind, name)


def kombu_key(config: FleetConfig, name: str) -> str:
    """A key kombu itself names (``unacked_index``, a queue list), with the prefix."""
    return config.broker.key_prefix + name


#: kombu's priority steps: a queue Q with priorities is the lists Q, Q\x06\x163,
#: Q\x06\x166 and Q\x06\x169 (LLEN of Q alone undercounts).
PRIORITY_STEPS = [0, 3, 6, 9]
PRIORITY_SEP = "\x06\x16"


def list_keys(config: FleetConfig, queue: str) -> list[str]:
    """Every Redis list a queue's messages wait in, with the global key prefix."""
    return [kombu_key(config, queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}")
            for step in PRIORITY_STEPS]


_clients: dict[tuple[str, int], redis.Redis] = {}


def client(url: str) -> redis.Redis:
    """One client (and connection pool) per URL and process: pools must not cross a fork."""
    found = _clients.get((url, os.getpid()))
    if found is None:
        found = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                     health_check_interval=25)
        _clients[(url, os.getpid())] = found
    return found


def broker_client(config: FleetConfig) -> redis.Redis:
    return client(config.broker.url)
