"""Fleet-wide rate limits: one token bucket in Redis shared by every worker.

Celery's own ``rate_limit`` is enforced per worker process group, so ten replicas of a
``100/m`` queue run 1000/m against the API it was meant to protect. Here each task
start takes a token from a bucket in Redis, refilled and debited atomically by one Lua
script using the server's clock (workers' clocks may disagree). A task that would wait
briefly reserves its token and sleeps; one that would wait longer is re-queued with a
countdown and takes no token. None is dropped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import redis

# KEYS[1] bucket hash. ARGV: rate (tokens/s), capacity, max_wait (s).
# Numbers are stored with %.17g: Lua's tostring keeps 14 digits, which cuts a Unix time
# to 0.1 ms, and under many takes a second the rounding adds up to extra tokens.
# Returns the wait in seconds as a string: >= 0 granted (a token is reserved, sleep that
# long first), < 0 refused (come back in -wait seconds; nothing was taken).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function fmt(x) return string.format('%.17g', x) end
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens < 1 then
  wait = (1 - tokens) / rate
end
if wait > max_wait then
  redis.call('HSET', KEYS[1], 'tokens', fmt(tokens), 'ts', fmt(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((capacity / rate + wait) * 1000) + 1000)
  return tostring(-wait)
end
tokens = tokens - 1
redis.call('HSET', KEYS[1], 'tokens', fmt(tokens), 'ts', fmt(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity / rate + wait) * 1000) + 1000)
return tostring(wait)
"""


@dataclass(frozen=True)
class Grant:
    """Outcome of one take: sleep ``wait`` then run, or re-queue after ``wait``."""

    granted: bool
    wait: float


def max_wait_for(per_second: float) -> float:
    """How long a task may hold its slot waiting: about two token intervals, 1-5 s."""
    return min(5.0, max(1.0, 2.0 / per_second))


class TokenBucket:
    def __init__(self, client: redis.Redis, key: str, per_second: float,
                 capacity: float = 1.0):
        self.key = key
        self.per_second = per_second
        self.capacity = max(1.0, capacity)
        self._take = client.register_script(_TAKE)

    def take(self, max_wait: float | None = None) -> Grant:
        if max_wait is None:
            max_wait = max_wait_for(self.per_second)
        wait = float(self._take(keys=[self.key],
                                args=[self.per_second, self.capacity, max_wait]))
        if wait < 0:
            return Grant(False, -wait)
        return Grant(True, wait)


def requeue_delay(wait: float) -> float:
    """Countdown for a refused task: the wait plus jitter, so refused tasks spread out."""
    return wait + random.uniform(0, max(0.1, wait * 0.2))
