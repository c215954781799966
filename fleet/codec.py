"""The one JSON codec for values that travel: task arguments, results, job state.

kombu's JSON, as Celery uses for messages: datetime, UUID, Decimal and bytes are
tagged and come back as themselves, so a value means the same inline, in the payload
store and in a job's record.
"""

from __future__ import annotations

from typing import Any

from kombu.utils import json as kombu_json


def dumps(value: Any) -> str:
    return kombu_json.dumps(value, separators=(",", ":"))


def dumpb(value: Any) -> bytes:
    return dumps(value).encode()


def loads(data: str | bytes) -> Any:
    return kombu_json.loads(data)
