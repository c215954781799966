"""Claim-check: large task arguments and results travel as references to a payload store.

Redis holds every message in memory, and a 50 MiB argument multiplied by a backlog is
how a broker dies. Arguments above ``payloads.threshold`` are written to the store when
the message is built (``ClaimCheckAMQP``, which every publish path goes through:
apply_async, send_task, retries, canvases) and replaced by one reference kwarg;
``FleetTask`` swaps them back before task code runs. Results above the threshold are
stored by ``ClaimCheckRedisBackend`` and resolved when read, so ``AsyncResult.get()``
returns the real value.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import states
from celery.app.amqp import AMQP
from celery.backends.redis import RedisBackend

from fleet import codec
from fleet.config import Payloads
from fleet.errors import PayloadError
from fleet.fleetapp import fleet_config_of
from fleet.payloads import open_store

#: A kwarg name no Python function can declare, so it cannot clash with a real one.
CLAIM_KEY = "fleet:claim"


def _loads(data: bytes, url: str) -> Any:
    try:
        return codec.loads(data)
    except ValueError as exc:
        raise PayloadError(f"payload {url} is not valid JSON: {exc}") from None


def is_claim(value: Any) -> bool:
    return isinstance(value, dict) and CLAIM_KEY in value and len(value) == 1


def offload_arguments(settings: Payloads, task_id: str, args: Any, kwargs: Any
                      ) -> tuple[Any, Any] | None:
    """(args, kwargs) replaced by a reference when their JSON exceeds the threshold."""
    if not args and not kwargs:
        return None
    data = codec.dumpb([list(args or ()), dict(kwargs or {})])
    if len(data) <= settings.threshold:
        return None
    url = open_store(settings).put(f"args/{task_id}.json", data)
    return (), {CLAIM_KEY: {"url": url, "size": len(data)}}


def resolve_arguments(settings: Payloads, args: tuple, kwargs: dict
                      ) -> tuple[tuple, dict, str | None]:
    """The real (args, kwargs) and the payload URL they came from (None if inline)."""
    if args or not is_claim(kwargs):
        return args, kwargs, None
    url = kwargs[CLAIM_KEY]["url"]
    real_args, real_kwargs = _loads(open_store(settings).get(url), url)
    return tuple(real_args), real_kwargs, url


def offload_value(settings: Payloads, key: str, value: Any) -> Any:
    """``value`` itself when small, else a claim reference to it in the store."""
    data = codec.dumpb(value)
    if len(data) <= settings.threshold:
        return value
    url = open_store(settings).put(key, data)
    return {CLAIM_KEY: {"url": url, "size": len(data)}}


def resolve_value(settings: Payloads, value: Any) -> Any:
    if not is_claim(value):
        return value
    url = value[CLAIM_KEY]["url"]
    return _loads(open_store(settings).get(url), url)


class ClaimCheckAMQP(AMQP):
    """Celery's message builder, offloading large arguments before they reach Redis."""

    def as_task_v2(self, task_id, name, args=None, kwargs=None, *rest, **options):
        config = fleet_config_of(self.app)
        if config is not None:
            swapped = offload_arguments(config.payloads, task_id, args, kwargs)
            if swapped is not None:
                args, kwargs = swapped
                options.setdefault("argsrepr", "()")
                options.setdefault("kwargsrepr", f"{{claim: {kwargs[CLAIM_KEY]['url']}}}")
        return super().as_task_v2(task_id, name, args, kwargs, *rest, **options)


class ClaimCheckRedisBackend(RedisBackend):
    """Redis result backend that keeps large results in the payload store."""

    def encode_result(self, result, state):
        config = fleet_config_of(self.app)
        if config is not None and state == states.SUCCESS:
            result = offload_value(config.payloads, f"results/{uuid.uuid4()}.json", result)
        return super().encode_result(result, state)

    def meta_from_decoded(self, meta):
        meta = super().meta_from_decoded(meta)
        config = fleet_config_of(self.app)
        if config is not None and meta.get("status") == states.SUCCESS:
            meta["result"] = resolve_value(config.payloads, meta.get("result"))
        return meta
