"""The dead-letter list: where a message goes that must not be delivered again.

kombu's Redis transport has no dead-lettering (RabbitMQ's dead-letter exchange has no
Redis counterpart): a message Celery rejects is deleted from ``unacked`` and gone, and
one whose task kills its pool process is restored and delivered again forever. Fleet
keeps such messages here instead, with the reason, for an operator to look at, re-send
(``fleet dead requeue``) or drop (``fleet dead purge``).

One capped Redis list per queue at ``fleet.keys.dead_letter_prefix(config) + queue``, newest
first. An entry is one JSON object that holds the message exactly as kombu stored it
(its envelope: headers, properties, body), so a requeue re-sends the original; bytes that
were not JSON at all are kept as text, truncated, and cannot be requeued.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import uuid
from bisect import bisect
from dataclasses import asdict, dataclass, replace
from typing import Any

import redis

from fleet import keys
from fleet.config import FleetConfig
from fleet.errors import NotRequeueableError, UnknownDeadLetterError

#: Entries kept per queue (the oldest go first): memory stays bounded whatever floods in.
MAX_ENTRIES = 1000
#: Characters kept of a message that is not a usable envelope (the rest is cut).
MAX_RAW = 64 * 1024

# Why a message was dead-lettered (``DeadLetter.reason``); ``detail`` says more.
WORKER_LOST = "worker-lost"          # its worker (or pool process) died, cause unknown
SIGNAL = "signal"                    # its pool process was killed by a signal
EXIT_CODE = "exit-code"              # its pool process exited (os._exit, SystemExit)
MEMORY_LIMIT = "memory-limit"        # the memory guard stopped it for good
MALFORMED = "malformed"              # not JSON, no kombu envelope, body cannot be decoded
UNKNOWN_TASK = "unknown-task"        # no task of that name on the worker
INVALID_TASK = "invalid-task"        # a task message Celery cannot take (headers, body)
WRONG_ARGUMENTS = "wrong-arguments"  # its arguments do not bind to the task's signature
REDELIVERED = "redelivered"          # delivered again and again (e.g. Reject(requeue=True))


@dataclass(frozen=True)
class Reason:
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"

    def to_json(self) -> str:
        return json.dumps([self.kind, self.detail])

    @classmethod
    def from_json(cls, text: str | bytes | None) -> Reason | None:
        try:
            kind, detail = json.loads(text)
        except (TypeError, ValueError):
            return None
        return cls(str(kind), str(detail))


@dataclass(frozen=True)
class DeadLetter:
    id: str
    queue: str
    reason: str
    detail: str
    at: float
    #: Deliveries that ran (or were refused), this last one included.
    deliveries: int = 1
    task: str | None = None
    task_id: str | None = None
    #: The Celery node (or host) that dead-lettered it.
    worker: str | None = None
    #: The message as kombu delivered it (JSON envelope), when it was JSON.
    message: Any = None
    #: The message's text when it was not JSON (truncated to MAX_RAW).
    raw: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), default=repr)

    @classmethod
    def from_json(cls, text: str | bytes) -> DeadLetter:
        try:
            data = json.loads(text)
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (TypeError, ValueError, KeyError) as exc:
            # Not written by fleet (someone pushed onto the list): shown, never requeued.
            raw = text.decode(errors="backslashreplace") if isinstance(text, bytes) else text
            return cls(id=hashlib.sha1(raw.encode()).hexdigest()[:12], queue="?",
                       reason=MALFORMED, detail=f"unreadable dead-letter entry: {exc}",
                       at=0.0, raw=raw[:MAX_RAW])

    @property
    def requeue_problem(self) -> str | None:
        return requeue_problem(self.message)


def new_entry(queue: str, reason: Reason, *, message: Any = None, raw: bytes | str | None = None,
              deliveries: int = 1, worker: str | None = None) -> DeadLetter:
    """An entry for ``message`` (a decoded envelope) or ``raw`` (bytes that were not JSON)."""
    headers = message.get("headers") if isinstance(message, dict) else None
    headers = headers if isinstance(headers, dict) else {}
    if message is not None and requeue_problem(message) is not None:
        # Not a task message: keep it for reading, bounded like raw bytes.
        text = json.dumps(message, default=repr)
        if len(text) > MAX_RAW:
            message, raw = None, text
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="backslashreplace")
    if raw is not None and len(raw) > MAX_RAW:
        raw = raw[:MAX_RAW] + f"... ({len(raw) - MAX_RAW} more characters cut)"
    task, task_id = headers.get("task"), headers.get("id")
    return DeadLetter(
        id=uuid.uuid4().hex[:12], queue=queue, reason=reason.kind, detail=reason.detail,
        at=time.time(), deliveries=deliveries,
        task=task if isinstance(task, str) else None,
        task_id=task_id if isinstance(task_id, str) else None,
        worker=worker, message=message, raw=raw)


def requeue_problem(message: Any) -> str | None:
    """Why ``message`` cannot be sent again as a task, or None if it can."""
    if not isinstance(message, dict):
        return "not a task message (not a kombu envelope)"
    properties = message.get("properties")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_info"),
                                                          dict):
        return "not a task message (no properties/delivery_info)"
    headers = message.get("headers")
    if not isinstance(headers, dict) or not headers.get("task") or not headers.get("id"):
        return "not a task message (no task/id header)"
    if "body" not in message:
        return "not a task message (no body)"
    return None


def message_for_requeue(message: dict, delivery_tag: str) -> dict:
    """The original message as new: not marked redelivered, with a delivery tag (and so a
    delivery count, fleet.deliveries) of its own."""
    fresh = copy.deepcopy(message)
    fresh["headers"].pop("redelivered", None)
    properties = fresh["properties"]
    properties["delivery_info"].pop("redelivered", None)
    properties["delivery_tag"] = delivery_tag
    return fresh


def priority_list(config: FleetConfig, queue: str, priority: Any) -> str:
    """The Redis list kombu would push a message of ``priority`` onto (kombu's
    ``_q_for_pri``: the step at or below the priority, clamped to 0..9)."""
    try:
        value = max(0, min(int(priority), 9))
    except (TypeError, ValueError):
        value = 0
    step = keys.PRIORITY_STEPS[bisect(keys.PRIORITY_STEPS, value) - 1]
    return keys.list_keys(config, queue)[keys.PRIORITY_STEPS.index(step)]


# Take the entry out of the dead-letter list and push its message onto the queue in one
# step: two operators requeueing the same entry send it once.
_REQUEUE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  redis.call('DEL', KEYS[3])
  return 1
end
return 0
"""


class DeadLetterList:
    """The dead-letter lists of one fleet: an adapter over Redis, no decisions."""

    def __init__(self, client: redis.Redis, base: str, max_entries: int = MAX_ENTRIES):
        self.client = client
        #: Key of queue Q's list is base + Q.
        self.base = base
        self.max_entries = max_entries
        self._requeue = client.register_script(_REQUEUE)

    @classmethod
    def for_config(cls, config: FleetConfig) -> DeadLetterList:
        return cls(keys.broker_client(config), keys.dead_letter_prefix(config))

    def key(self, queue: str) -> str:
        return self.base + queue

    def add(self, entry: DeadLetter) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.lpush(self.key(entry.queue), entry.to_json())
        pipe.ltrim(self.key(entry.queue), 0, self.max_entries - 1)
        pipe.execute()

    def counts(self, queues: list[str]) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(self.key(queue))
        return dict(zip(queues, pipe.execute(), strict=True))

    def entries(self, queue: str, limit: int | None = None) -> list[DeadLetter]:
        return [entry for _, entry in self.stored(queue, limit)]

    def stored(self, queue: str, limit: int | None = None) -> list[tuple[bytes, DeadLetter]]:
        """Newest first: (the stored text, the entry)."""
        end = -1 if limit is None else limit - 1
        out = []
        for raw in self.client.lrange(self.key(queue), 0, end):
            entry = DeadLetter.from_json(raw)
            out.append((raw, entry if entry.queue != "?" else replace(entry, queue=queue)))
        return out

    def find(self, entry_id: str, queues: list[str]) -> tuple[bytes, DeadLetter]:
        """The stored text and the entry of ``entry_id``, in whichever queue's list."""
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            pipe.lrange(self.key(queue), 0, -1)
        needle = f'"id":"{entry_id}"'.encode()
        for stored in pipe.execute():
            for raw in stored:
                if needle in raw:
                    entry = DeadLetter.from_json(raw)
                    if entry.id == entry_id:
                        return raw, entry
        raise UnknownDeadLetterError(
            f"no dead-letter entry {entry_id!r} in {', '.join(queues)} "
            "(requeued, purged, or pushed out by newer ones; see: fleet dead list)")

    def move(self, stored: bytes, entry: DeadLetter, target: str, message: dict,
             counter_key: str) -> bool:
        """Remove ``stored`` from its list and push ``message`` onto ``target``, atomically;
        False if another caller took the entry first."""
        return bool(self._requeue(keys=[self.key(entry.queue), target, counter_key],
                                  args=[stored, json.dumps(message)]))

    def discard_tasks(self, task_ids: set[str], queues: list[str]) -> list[DeadLetter]:
        """Remove the entries of the tasks ``task_ids`` from the lists of ``queues``, and
        return them: what a job retry sends again must not also be requeued from here
        (it would run twice). One round trip to read the lists, one to remove."""
        if not task_ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            pipe.lrange(self.key(queue), 0, -1)
        found = []
        for queue, stored in zip(queues, pipe.execute(), strict=True):
            for raw in stored:
                entry = DeadLetter.from_json(raw)
                if entry.task_id in task_ids:
                    found.append((queue, raw, entry))
        if not found:
            return []
        pipe = self.client.pipeline(transaction=False)
        for queue, raw, _ in found:
            pipe.lrem(self.key(queue), 1, raw)
        removed = pipe.execute()
        # One taken meanwhile (a requeue, a purge) is not this call's to report.
        return [entry for (_, _, entry), n in zip(found, removed, strict=True) if n]

    def purge(self, queue: str) -> int:
        pipe = self.client.pipeline(transaction=True)
        pipe.llen(self.key(queue))
        pipe.delete(self.key(queue))
        return int(pipe.execute()[0])


def requeue(config: FleetConfig, entry_id: str) -> DeadLetter:
    """Send the original message of ``entry_id`` again, onto the queue it came from."""
    dead = DeadLetterList.for_config(config)
    stored, entry = dead.find(entry_id, list(config.queues))
    problem = entry.requeue_problem
    if problem is not None:
        raise NotRequeueableError(
            f"dead-letter entry {entry_id} cannot be requeued: {problem} "
            f"(reason {entry.reason}: {entry.detail}); see: fleet dead show {entry_id}")
    if not _requeue(config, dead, stored, entry):
        raise UnknownDeadLetterError(f"dead-letter entry {entry_id} was just taken by "
                                     "another requeue or purge")
    return entry


def requeue_all(config: FleetConfig, queue: str | None = None
                ) -> tuple[list[DeadLetter], list[DeadLetter]]:
    """Requeue every requeueable entry of ``queue`` (or of every queue), oldest first as
    they failed; the others stay. Returns (requeued, left)."""
    dead = DeadLetterList.for_config(config)
    if queue is not None:
        config.queue(queue)  # ConfigError for a queue queues.yaml does not define
    requeued, left = [], []
    for name in [queue] if queue else list(config.queues):
        for stored, entry in reversed(dead.stored(name)):
            if entry.requeue_problem is not None:
                left.append(entry)
            elif _requeue(config, dead, stored, entry):
                requeued.append(entry)
    return requeued, left


def _requeue(config: FleetConfig, dead: DeadLetterList, stored: bytes,
             entry: DeadLetter) -> bool:

    message = entry.message
    fresh = message_for_requeue(message, str(uuid.uuid4()))
    target = priority_list(config, entry.queue, message["properties"].get("priority"))
    old_tag = str(message["properties"].get("delivery_tag", ""))
    return dead.move(stored, entry, target, fresh, keys.delivery_counter_key(config, old_tag))


def decoded_body(message: Any) -> Any:
    """A task message's [args, kwargs, embed] for reading, or None if it cannot be read."""
    import base64

    if requeue_problem(message) is not None:
        return None
    body = message.get("body")
    try:
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        return json.loads(body)
    except (TypeError, ValueError):
        return None
