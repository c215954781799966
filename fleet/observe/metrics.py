"""Queue and worker figures from Redis, for every queue in one round trip.

Depth done right for kombu's Redis transport: a queue is its list plus its priority
sub-lists (``Q``, ``Q\\x06\\x163``, ``Q\\x06\\x166``, ``Q\\x06\\x169``, all under the
global key prefix), and messages that workers hold (running, prefetched, ETA) have left
the lists for the ``unacked`` hash, which all queues of a DB share; each entry there is
``[message, exchange, routing_key]``. One Lua script sums the lists, reads each list's
tail (its oldest message) for the ``fleet-sent`` header, and counts ``unacked`` entries
by routing key; the same pipeline reads the workers' self-reports (fleet.heartbeat)
and the operators' bound overrides (fleet.observe.overrides).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import redis

from fleet.config import FleetConfig
from fleet.heartbeat import stale_after
from fleet.keys import PRIORITY_STEPS, kombu_key, list_keys, overrides_key, workers_key
from fleet.observe import overrides
from fleet.observe.model import Observation, QueueSample, WorkerSample, parse_report

# KEYS: the unacked hash, then STEPS list keys per queue (in queue order).
# ARGV: STEPS, then the queue names.
# Returns per queue: waiting, unacked, oldest fleet-sent as a string ('' if unknown).
_QUEUE_STATS = """
local steps = tonumber(ARGV[1])
local index = {}
local unacked = {}
local names = {}
for q = 2, #ARGV do
  names[q - 1] = ARGV[q]
  index[ARGV[q]] = q - 1
  unacked[q - 1] = 0
end
local held = redis.call('HVALS', KEYS[1])
for _, entry in ipairs(held) do
  local rk = string.match(entry, '"([^"]*)"%s*%]%s*$')
  local q = rk and index[rk]
  if q then unacked[q] = unacked[q] + 1 end
end
local out = {}
for q = 1, #names do
  local waiting = 0
  local oldest = nil
  for s = 1, steps do
    local key = KEYS[1 + (q - 1) * steps + s]
    local n = redis.call('LLEN', key)
    if n > 0 then
      waiting = waiting + n
      local tail = redis.call('LINDEX', key, -1)
      local sent = tail and string.match(tail, '"fleet%-sent":%s*([%d%.]+)')
      if sent then
        sent = tonumber(sent)
        if oldest == nil or sent < oldest then oldest = sent end
      end
    end
  end
  table.insert(out, waiting)
  table.insert(out, unacked[q])
  table.insert(out, oldest and string.format('%.3f', oldest) or '')
end
return out
"""


logger = logging.getLogger("fleet.observe.metrics")

#: The same problem with one worker's report is logged at most this often.
REJECT_LOG_EVERY = 60.0
_rejected_at: dict[str, float] = {}


def parse_worker(raw: bytes | str, hostname: str = "?") -> WorkerSample | None:
    """The report, or None (logged) when it is malformed: it is then never trusted."""
    try:
        return parse_report(raw)
    except ValueError as exc:
        now, seen = time.monotonic(), f"{hostname}: {exc}"
        if now - _rejected_at.get(seen, -REJECT_LOG_EVERY) >= REJECT_LOG_EVERY:
            if len(_rejected_at) > 10_000:  # bounded, whatever writes to the hash
                _rejected_at.clear()
            _rejected_at[seen] = now
            logger.warning("ignoring the malformed report of worker %s: %s", hostname, exc)
        return None


class RedisMetrics:
    """Polls one fleet's queues and workers; every poll is one pipelined round trip."""

    def __init__(self, config: FleetConfig, client: redis.Redis,
                 queues: Iterable[str] | None = None):
        self.config = config
        self.client = client
        self.queues = list(queues if queues is not None else config.queues)
        self._keys = [kombu_key(config, "unacked")]
        for queue in self.queues:
            self._keys += list_keys(config, queue)
        self._args = [len(PRIORITY_STEPS), *self.queues]
        self._sha: str | None = None  # loaded on the first poll: Redis may be down now

    def poll(self) -> Observation:
        if self._sha is None:
            self._sha = self.client.script_load(_QUEUE_STATS)
        pipe = self.client.pipeline(transaction=False)
        pipe.evalsha(self._sha, len(self._keys), *self._keys, *self._args)
        pipe.hgetall(workers_key(self.config))
        pipe.hgetall(overrides_key(self.config))
        try:
            stats, raw_workers, raw_overrides = pipe.execute()
        except redis.exceptions.NoScriptError:  # Redis restarted and forgot the script
            self._sha = self.client.script_load(_QUEUE_STATS)
            return self.poll()
        now = time.time()
        queues = {}
        for i, name in enumerate(self.queues):
            waiting, unacked, sent = stats[3 * i: 3 * i + 3]
            sent = sent.decode() if isinstance(sent, bytes) else sent
            oldest = max(0.0, now - float(sent)) if sent else None
            queues[name] = QueueSample(name, int(waiting), int(unacked), oldest)
        workers, stale = [], []
        limit = stale_after(self.config)
        for hostname, raw in raw_workers.items():
            hostname = hostname.decode(errors="replace") if isinstance(hostname, bytes) \
                else hostname
            sample = parse_worker(raw, hostname)
            if sample is None or now - sample.at > limit:
                stale.append(hostname)
            else:
                workers.append(sample)
        if stale:  # dead workers drop out of pages and metrics
            self.client.hdel(workers_key(self.config), *stale)
        return Observation(now, queues, sorted(workers, key=lambda w: w.hostname),
                           overrides.parse(raw_overrides))
