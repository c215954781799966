"""Which job tasks have a message in Redis: waiting in a queue, or held by a worker.

Redis cannot be asked "is task X queued?": a queue is a list of whole messages. So the
lists (every priority sub-list of every fleet queue) and the ``unacked`` hash are read
page by page by a Lua script that returns only the job task ids it finds, so what
crosses the network is ids, not chunks of records, and Redis is never blocked for
more than one page. The id sits in the message's headers, near the end of kombu's
envelope (after the body): the script looks in the last ``TAIL`` bytes first and reads
the whole message only when it is not there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis

from fleet.config import FleetConfig
from fleet.keys import kombu_key, list_keys

#: Messages (or hash entries) per script call: a page of chunk messages is a few MB.
PAGE = 200
#: Bytes at the end of a message where its headers (and so its id) usually are.
TAIL = 4096

# KEYS[1]: a list or the unacked hash. ARGV: 'list' | 'hash', start index or HSCAN
# cursor, page size, tail bytes, id prefix ('job-' or one job's 'job-abc.').
# Returns {next ('' when done), id, tag, id, tag, ...}; tag is '' for lists.
_SCAN = """
local kind, page, tail, prefix = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local needle = '"id": "' .. prefix
local function id_of(raw)
  local from = #raw - tail
  if from < 1 then from = 1 end
  local s, e = string.find(raw, needle, from, true)
  if not s and from > 1 then s, e = string.find(raw, needle, 1, true) end
  if not s then return nil end
  local start = s + 7
  local stop = string.find(raw, '"', start, true)
  if not stop then return nil end
  return string.sub(raw, start, stop - 1)
end
local out = {''}
if kind == 'list' then
  local first = tonumber(ARGV[2])
  local items = redis.call('LRANGE', KEYS[1], first, first + page - 1)
  for _, raw in ipairs(items) do
    local id = id_of(raw)
    if id then table.insert(out, id); table.insert(out, '') end
  end
  if #items == page then out[1] = tostring(first + page) end
else
  local reply = redis.call('HSCAN', KEYS[1], ARGV[2], 'COUNT', page)
  local entries = reply[2]
  for i = 1, #entries, 2 do
    local id = id_of(entries[i + 1])
    if id then table.insert(out, id); table.insert(out, entries[i]) end
  end
  if reply[1] ~= '0' then out[1] = reply[1] end
end
return out
"""


@dataclass(frozen=True)
class Held:
    """A message a worker took and has not acked: whose lease is how old."""

    task_id: str
    tag: str
    #: Seconds since the holder last renewed its lease (fleet.lease); None if unknown.
    lease_age: float | None


class InFlight:
    """Scans one fleet's queues and ``unacked`` hash for job task ids."""

    def __init__(self, config: FleetConfig, client: redis.Redis):
        self.config = config
        self.client = client
        self._script = client.register_script(_SCAN)

    def _pages(self, key: str, kind: str, prefix: str) -> Iterable[tuple[str, str]]:
        position = "0"
        while True:
            reply = self._script(keys=[key], args=[kind, position, PAGE, TAIL, prefix])
            found = [_text(x) for x in reply]
            yield from zip(found[1::2], found[2::2], strict=True)
            if not found[0]:
                return
            position = found[0]

    def waiting(self, prefix: str = "job-", queues: Iterable[str] | None = None) -> set[str]:
        """Ids of job tasks waiting in the queues' lists (priority sub-lists included)."""
        ids: set[str] = set()
        for queue in queues if queues is not None else self.config.queues:
            for key in list_keys(self.config, queue):
                ids.update(task_id for task_id, _ in self._pages(key, "list", prefix))
        return ids

    def held(self, prefix: str = "job-") -> list[Held]:
        """Job task messages in ``unacked`` (taken by a worker, not acked), with the age
        of their lease: a live worker renews it every ``broker.lease.interval``."""
        found = list(self._pages(kombu_key(self.config, "unacked"), "hash", prefix))
        if not found:
            return []
        scores = self.client.zmscore(kombu_key(self.config, "unacked_index"),
                                     [tag for _, tag in found])
        # Scores are worker clocks (kombu's QoS.append, fleet.lease), and kombu's own
        # restore compares them with the local clock too.
        now = time.time()
        return [Held(task_id, tag, None if score is None else max(0.0, now - score))
                for (task_id, tag), score in zip(found, scores, strict=True)]

    def all_ids(self, prefix: str = "job-") -> set[str]:
        """Every job task id with a message in Redis. Lists first, then ``unacked``: a
        message taken from a list meanwhile is then found in ``unacked``."""
        ids = self.waiting(prefix)
        ids.update(h.task_id for h in self.held(prefix))
        return ids


def held_by_live_workers(config: FleetConfig, client: redis.Redis,
                         other_than: str | None = None) -> set[str]:
    """Job task ids that live workers (but ``other_than``) say they run or hold."""
    from fleet.heartbeat import stale_after
    from fleet.keys import workers_key
    from fleet.observe.model import parse_report

    now = time.time()
    held: set[str] = set()
    for raw in client.hvals(workers_key(config)):
        try:
            report = parse_report(raw)
        except ValueError:
            continue
        if now - report.at <= stale_after(config) and report.hostname != other_than:
            held.update(report.held or ())
    return held


@dataclass(frozen=True)
class Whereabouts:
    """Where a job's pending chunks are, for ``fleet jobs status``."""

    waiting: int
    #: Run or held by a live worker (it renews their leases, or reports them).
    live: int
    #: (index, seconds until the message is back in its queue) of chunks held by a
    #: worker that stopped renewing its lease: it died, or is cut off from Redis.
    orphaned: list[tuple[int, float]]
    #: Nowhere: lost in flight; the reconciler sends them again.
    lost: list[int]


def locate(config: FleetConfig, client: redis.Redis, job_id: str,
           pending: Callable[[], list[int]]) -> Whereabouts:
    """Where each of the job's pending chunks is now (a full scan of the queues: an
    operator's command). ``pending`` is asked after Redis was read: a chunk that
    completes meanwhile is then not pending, rather than nowhere."""
    from fleet.jobs.ids import chunk_task_id

    scan = InFlight(config, client)
    waiting = scan.waiting(f"{job_id}.")
    held = {h.task_id: h for h in scan.held(f"{job_id}.")}
    live = held_by_live_workers(config, client)
    lease = config.broker.lease
    # A live worker renews every interval: two missed renewals mean it is gone.
    fresh = 2 * lease.interval + 1 if lease.enabled else config.broker.visibility_timeout
    counts = {"waiting": 0, "live": 0}
    orphaned, lost = [], []
    for index in pending():
        task_id = chunk_task_id(job_id, index)
        entry = held.get(task_id)
        if task_id in live or (entry is not None and (entry.lease_age or 0.0) <= fresh):
            counts["live"] += 1
        elif entry is not None:
            back = max(0.0, config.broker.visibility_timeout - (entry.lease_age or 0.0))
            orphaned.append((index, back))
        elif task_id in waiting:
            counts["waiting"] += 1
        else:
            lost.append(index)
    return Whereabouts(counts["waiting"], counts["live"], orphaned, lost)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
