"""Operator overrides of queues.yaml's autoscaling bounds, set from the dashboard.

Kept in one Redis hash (queue -> JSON) that the loop reads every poll, so a change takes
effect within one interval on every autoscaler replica and survives their restarts.
Pausing a queue is bounds of zero: the loop scales its workers in (warm shutdown), and
its messages wait in Redis untouched until it is resumed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

from fleet.config import FleetConfig
from fleet.keys import overrides_key


@dataclass(frozen=True)
class Override:
    min_replicas: int | None = None
    max_replicas: int | None = None
    paused: bool = False


def read(client: redis.Redis, config: FleetConfig) -> dict[str, Override]:
    return parse(client.hgetall(overrides_key(config)))


def parse(entries: dict) -> dict[str, Override]:
    """The hash as Redis returns it (the metrics poll reads it in its own round trip)."""
    out = {}
    for name, raw in entries.items():
        name = name.decode() if isinstance(name, bytes) else name
        try:
            out[name] = Override(**json.loads(raw))
        except (TypeError, ValueError):
            continue  # a hand-edited bad entry must not stop the loop
    return out


def write(client: redis.Redis, config: FleetConfig, queue: str, override: Override) -> None:
    if override == Override():
        client.hdel(overrides_key(config), queue)
    else:
        client.hset(overrides_key(config), queue, json.dumps(override.__dict__))


def apply(config: FleetConfig, overrides: dict[str, Override]) -> FleetConfig:
    """``config`` with each overridden queue's bounds replaced (pure)."""
    if not overrides:
        return config
    queues = dict(config.queues)
    for name, o in overrides.items():
        q = queues.get(name)
        if q is None:
            continue
        a = q.autoscaling
        lo = a.min_replicas if o.min_replicas is None else o.min_replicas
        hi = a.max_replicas if o.max_replicas is None else o.max_replicas
        if o.paused:
            lo = hi = 0
        a = a.model_copy(update={"min_replicas": min(lo, hi), "max_replicas": hi})
        queues[name] = q.model_copy(update={"autoscaling": a})
    return config.model_copy(update={"queues": queues})
