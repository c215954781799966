"""Celery events straight off Redis pub/sub, decoded without kombu's consumer machinery.

On Redis, Celery's event exchange is pub/sub: every event is a PUBLISH to
``<global prefix>/<db>.celeryev/<routing key>`` of a kombu JSON envelope whose body is
base64 JSON. kombu's consumer path (channel polling, Message objects, the Receiver's
clock bookkeeping) costs more per event than the dashboard's own work, so on Redis the
dashboard subscribes with redis-py (hiredis parser) and decodes the envelope itself:
what Celery's ``EventReceiver.event_from_message`` would hand over, minus its clock.
Other brokers go through Celery's Receiver (ingest.py).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable

import redis

from fleet.config import FleetConfig

_HERE = -time.timezone / 3600 if not time.daylight else -time.altzone / 3600


def channel_pattern(config: FleetConfig, client: redis.Redis) -> str:
    db = client.connection_pool.connection_kwargs.get("db", 0)
    return f"{config.broker.key_prefix}/{db}.celeryev/*"


def decode(payload: bytes) -> list[dict]:
    """One kombu envelope to its events: one, or several when the worker buffered them
    (Celery workers send task events in groups, routing key ``task.multi``, a JSON list)."""
    try:
        envelope = json.loads(payload)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
    except (ValueError, KeyError, TypeError):
        return []
    events = decoded if isinstance(decoded, list) else [decoded]
    out = []
    for event in events:
        if not isinstance(event, dict) or "type" not in event:
            continue
        offset = event.get("utcoffset")
        stamp = event.get("timestamp")
        if offset is not None and stamp is not None and offset != _HERE:
            # Celery's adjust_timestamp: a worker in another zone reports local seconds
            event["timestamp"] = stamp - (offset - _HERE) * 3600
        out.append(event)
    return out


def consume(config: FleetConfig, client: redis.Redis, feed: Callable[[dict], None],
            stop: threading.Event, connected: Callable[[bool], None]) -> None:
    """Feed every event until ``stop``; raises redis errors for the caller to retry."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.psubscribe(channel_pattern(config, client))
        connected(True)
        get = pubsub.get_message
        while not stop.is_set():
            message = get(timeout=1.0)
            while message is not None:
                for event in decode(message["data"]):
                    feed(event)
                message = get(timeout=0)
    finally:
        connected(False)
        pubsub.close()
