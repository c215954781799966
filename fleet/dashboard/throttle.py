"""How fast anyone may guess passwords: per user name and per client address.

The first ``FREE`` failures in a row cost nothing (typos); each one after that doubles
the time before the next attempt is heard, from ``BASE`` up to ``CAP``. Both keys count:
one address trying many names is slowed by its address, many addresses trying one name
by the name. A success clears the name's count (the address keeps its own, so a user
signing in does not lift a block on a guessing neighbour). A locked key is refused
without checking the password at all, so a correct guess during a lock proves nothing.

State is in memory, bounded (the least recently failed keys are forgotten first), and
per dashboard process: with several replicas an attacker gets each one's allowance,
which is still exponential. Decisions take ``now`` so tests need no clock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

FREE = 5
BASE = 1.0
CAP = 900.0
#: Keys remembered at most (each entry is a few dozen bytes).
KEPT = 100_000
#: A key with no failure for this long starts afresh.
FORGET_AFTER = 3600.0


@dataclass
class _Count:
    failures: int
    last: float


def delay(failures: int) -> float:
    """Seconds to wait after ``failures`` failures in a row."""
    if failures < FREE:
        return 0.0
    # The exponent is capped too: a float cannot hold 2**10000 (an attacker's count).
    return min(CAP, BASE * 2 ** min(failures - FREE, 40))


class LoginThrottle:
    def __init__(self, kept: int = KEPT):
        self._counts: OrderedDict[str, _Count] = OrderedDict()
        self._kept = kept

    def _live(self, key: str, now: float) -> _Count | None:
        count = self._counts.get(key)
        if count is not None and now - count.last > max(FORGET_AFTER, delay(count.failures)):
            del self._counts[key]
            return None
        return count

    def wait(self, keys: tuple[str, ...], now: float) -> float:
        """Seconds until any of ``keys`` may try again (0: now)."""
        longest = 0.0
        for key in keys:
            count = self._live(key, now)
            if count is not None:
                longest = max(longest, count.last + delay(count.failures) - now)
        return max(0.0, longest)

    def failed(self, keys: tuple[str, ...], now: float) -> None:
        for key in keys:
            count = self._live(key, now)
            if count is None:
                count = self._counts[key] = _Count(0, now)
            count.failures += 1
            count.last = now
            self._counts.move_to_end(key)
        while len(self._counts) > self._kept:
            self._counts.popitem(last=False)

    def succeeded(self, key: str) -> None:
        self._counts.pop(key, None)


def keys_for(user: str | None, address: str | None) -> tuple[str, ...]:
    """The throttle keys of an attempt: its user name and its client address."""
    out = []
    if user:
        out.append("user:" + user[:255])
    if address:
        out.append("addr:" + address)
    return tuple(out)
