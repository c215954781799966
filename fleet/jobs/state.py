"""Job state in Redis: one hash per job, one hash of finished chunks, one of failed ones.

Chunk completion is idempotent: a chunk is a field of the ``done`` hash, so a message
redelivered after its worker died (at-least-once delivery) writes the same field again
and is not counted twice. The transition to aggregating is taken exactly once, inside
the same Lua script that records the last chunk, so two workers finishing the last two
chunks at the same moment cannot both (or neither) start the aggregate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from fleet import codec
from fleet.config import FleetConfig
from fleet.errors import UnknownJobError
from fleet.keys import broker_client, key

# States a job goes through.
RUNNING = "running"
AGGREGATING = "aggregating"
SUCCEEDED = "succeeded"
FAILED = "failed"
TERMINAL = (SUCCEEDED, FAILED)

# KEYS: job, done, failed. ARGV: index, value, now. Returns the job's state after the
# write, or "" for an unknown job, and "collect" when this write completed the last
# chunk, or when the job is complete but its collect step never started (the first
# completion could not send it: a redelivered or retried chunk sends it again).
_RECORD_SUCCESS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return '' end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[1])
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
local done = redis.call('HLEN', KEYS[2])
local failed = redis.call('HLEN', KEYS[3])
if done >= total then
  if redis.call('HSETNX', KEYS[1], 'collecting', '1') == 1 then
    redis.call('HSET', KEYS[1], 'state', 'aggregating')
    return 'collect'
  end
  local state = redis.call('HGET', KEYS[1], 'state')
  if state == 'aggregating' and redis.call('HEXISTS', KEYS[1], 'collect_started') == 0 then
    return 'collect'
  end
  return state
end
if done + failed >= total then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'finished', ARGV[3])
  return 'failed'
end
return redis.call('HGET', KEYS[1], 'state')
"""

# KEYS: job, done, failed. ARGV: index, failure record, now.
_RECORD_FAILURE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return '' end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return redis.call('HGET', KEYS[1], 'state')
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
local done = redis.call('HLEN', KEYS[2])
local failed = redis.call('HLEN', KEYS[3])
if done + failed >= total then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'finished', ARGV[3])
  return 'failed'
end
return redis.call('HGET', KEYS[1], 'state')
"""

# KEYS: job, failed, retrying. Moves every failed chunk (and any left in ``retrying`` by
# an interrupted retry) to ``retrying`` and reopens the job; returns index, record pairs.
# A chunk in ``retrying`` counts as pending until its new run records done or failed.
_TAKE_FAILED = """
local taken = {}
local seen = {}
for _, source in ipairs({KEYS[2], KEYS[3]}) do
  local entries = redis.call('HGETALL', source)
  for i = 1, #entries, 2 do
    if not seen[entries[i]] then
      seen[entries[i]] = true
      redis.call('HSET', KEYS[3], entries[i], entries[i + 1])
      table.insert(taken, entries[i])
      table.insert(taken, entries[i + 1])
    end
  end
end
redis.call('DEL', KEYS[2])
if #taken > 0 then
  redis.call('HSET', KEYS[1], 'state', 'running')
  redis.call('HDEL', KEYS[1], 'finished')
end
return taken
"""


@dataclass(frozen=True)
class JobStatus:
    id: str
    task: str
    aggregate: str | None
    state: str
    total: int
    done: int
    failed: int
    records: int
    created: float
    finished: float | None
    input: str
    result_url: str | None
    error: str | None
    extra: dict = field(default_factory=dict)

    @property
    def pending(self) -> int:
        return max(0, self.total - self.done - self.failed)

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class FailedChunk:
    index: int
    error: str
    args: list
    kwargs: dict
    raw: str


class JobStore:
    """Reads and writes job state; every method is one Redis round trip or a pipeline."""

    def __init__(self, config: FleetConfig, client: redis.Redis | None = None):
        self.config = config
        self.client = client or broker_client(config)
        self._success = self.client.register_script(_RECORD_SUCCESS)
        self._failure = self.client.register_script(_RECORD_FAILURE)
        self._take = self.client.register_script(_TAKE_FAILED)

    def _keys(self, job_id: str) -> tuple[str, str, str]:
        base = key(self.config, "job", job_id)
        return base, base + ":done", base + ":failed"

    def _retrying_key(self, job_id: str) -> str:
        return key(self.config, "job", job_id) + ":retrying"

    @property
    def _index(self) -> str:
        return key(self.config, "jobs")

    def create(self, job_id: str, *, task: str, aggregate: str | None, total: int,
               records: int, input_desc: str, chunk_size: int, kwargs: dict,
               aggregate_kwargs: dict, result_url: str, source: str | None = None,
               fingerprint: str | None = None) -> None:
        now = time.time()
        job, _, _ = self._keys(job_id)
        fields = {
            "id": job_id, "task": task, "aggregate": aggregate or "", "state": RUNNING,
            "total": total, "records": records, "created": now, "input": input_desc,
            "chunk_size": chunk_size, "kwargs": codec.dumps(kwargs),
            "aggregate_kwargs": codec.dumps(aggregate_kwargs), "result_url": result_url,
            "source": source or "", "fingerprint": fingerprint or "",
        }
        pipe = self.client.pipeline()
        pipe.hset(job, mapping=fields)
        pipe.zadd(self._index, {job_id: now})
        self._expire(pipe, job_id)  # an abandoned job must not stay forever
        pipe.execute()

    def record_success(self, job_id: str, index: int, value: Any) -> str:
        job, done, failed = self._keys(job_id)
        return _text(self._success(keys=[job, done, failed],
                                   args=[index, codec.dumps(value), time.time()]))

    def record_failure(self, job_id: str, index: int, error: str, args: Any,
                       kwargs: Any) -> str:
        job, done, failed = self._keys(job_id)
        record = codec.dumps({"error": error, "args": list(args or ()),
                             "kwargs": dict(kwargs or {}), "at": time.time()})
        return _text(self._failure(keys=[job, done, failed], args=[index, record, time.time()]))

    def finish(self, job_id: str, *, result_url: str | None = None,
               error: str | None = None) -> None:
        job, _, _ = self._keys(job_id)
        fields: dict[str, Any] = {"state": FAILED if error else SUCCEEDED,
                                  "finished": time.time()}
        if error:
            fields["error"] = error
        if result_url:
            fields["result_url"] = result_url
        pipe = self.client.pipeline()
        pipe.hset(job, mapping=fields)
        self._expire(pipe, job_id)
        pipe.execute()

    def _expire(self, pipe, job_id: str) -> None:
        ttl = int(self.config.jobs.ttl)
        for k in (*self._keys(job_id), self._retrying_key(job_id)):
            pipe.expire(k, ttl)

    def status(self, job_id: str) -> JobStatus:
        return self.statuses([job_id])[0]

    def statuses(self, job_ids: list[str]) -> list[JobStatus]:
        """Status of many jobs in one pipeline; UnknownJobError for any missing one."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            job, done, failed = self._keys(job_id)
            pipe.hgetall(job)
            pipe.hlen(done)
            pipe.hlen(failed)
        replies = pipe.execute()
        out = []
        for i, job_id in enumerate(job_ids):
            fields, done, failed = replies[3 * i: 3 * i + 3]
            if not fields:
                raise UnknownJobError(f"no job {job_id!r} in Redis (mistyped, expired after "
                                      f"{self.config.jobs.ttl / 86400:g} days, or another "
                                      "broker/key prefix)")
            out.append(_status(fields, done, failed))
        return out

    def recent_ids(self, limit: int = 20) -> list[str]:
        return [_text(i) for i in self.client.zrevrange(self._index, 0, limit - 1)]

    def recent(self, limit: int = 20) -> list[JobStatus]:
        ids = self.recent_ids(limit)
        statuses = []
        for job_id in ids:
            try:
                statuses.extend(self.statuses([job_id]))
            except UnknownJobError:
                self.client.zrem(self._index, job_id)  # expired: drop it from the index
        return statuses

    def results(self, job_id: str) -> Iterator[tuple[int, Any]]:
        """(index, value) of every finished chunk, by HSCAN: bounded memory per batch."""
        _, done, _ = self._keys(job_id)
        for index, value in self.client.hscan_iter(done, count=1000):
            yield int(index), codec.loads(value)

    def accounted(self, job_id: str) -> set[int]:
        """Chunks that are done, failed, or being retried: all but those in flight."""
        _, done, failed = self._keys(job_id)
        pipe = self.client.pipeline(transaction=False)
        for k in (done, failed, self._retrying_key(job_id)):
            pipe.hkeys(k)
        return {int(i) for keys in pipe.execute() for i in keys}

    def failed_chunks(self, job_id: str) -> list[FailedChunk]:
        _, _, failed = self._keys(job_id)
        return _failed_chunks(self.client.hgetall(failed).items())

    def take_failed(self, job_id: str) -> list[FailedChunk]:
        """Move the failed chunks to ``retrying`` (atomically) for a retry to re-send."""
        job, _, failed = self._keys(job_id)
        flat = self._take(keys=[job, failed, self._retrying_key(job_id)])
        return _failed_chunks(zip(flat[0::2], flat[1::2], strict=True))

    def retried(self, job_id: str, chunks: list[FailedChunk]) -> None:
        """The re-sent chunks are in the queue: they no longer need a retry."""
        if chunks:
            self.client.hdel(self._retrying_key(job_id), *[c.index for c in chunks])

    def collect_started(self, job_id: str) -> None:
        job, _, _ = self._keys(job_id)
        self.client.hset(job, "collect_started", time.time())

    def reopen_aggregate(self, job_id: str) -> None:
        """Let the collect and aggregate steps run again (after they failed or stuck)."""
        job, _, _ = self._keys(job_id)
        pipe = self.client.pipeline()
        pipe.hdel(job, "collecting", "collect_started", "error", "finished")
        pipe.hset(job, "state", RUNNING)
        pipe.execute()

    def set_state(self, job_id: str, state: str, **fields: Any) -> None:
        job, _, _ = self._keys(job_id)
        self.client.hset(job, mapping={"state": state, **fields})


def _failed_chunks(entries) -> list[FailedChunk]:
    out = []
    for index, raw in entries:
        record = codec.loads(raw)
        out.append(FailedChunk(int(index), record["error"], record["args"], record["kwargs"],
                               _text(raw)))
    return sorted(out, key=lambda c: c.index)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _status(fields: dict, done: int, failed: int) -> JobStatus:
    f = {_text(k): _text(v) for k, v in fields.items()}
    known = {"id", "task", "aggregate", "state", "total", "records", "created", "finished",
             "input", "result_url", "error"}
    return JobStatus(
        id=f["id"], task=f["task"], aggregate=f.get("aggregate") or None, state=f["state"],
        total=int(f["total"]), done=done, failed=failed, records=int(f.get("records", 0)),
        created=float(f["created"]),
        finished=float(f["finished"]) if f.get("finished") else None,
        input=f.get("input", ""), result_url=f.get("result_url") or None,
        error=f.get("error") or None,
        extra={k: v for k, v in f.items() if k not in known},
    )
