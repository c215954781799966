"""Which queue a task goes to: by name (exact, then glob) and by input size.

Pure decisions over a table built once from the config; ``FleetRouter`` is the thin
Celery adapter (``task_routes``). A publisher states a task's input size in the
``fleet-input-size`` header (``fleet submit`` does it per chunk); without it only the
name counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from fleet.config_models import FleetConfig

SIZE_HEADER = "fleet-input-size"


@dataclass(frozen=True)
class SizeRoute:
    over: int
    queue: str
    patterns: tuple[str, ...]


@dataclass(frozen=True)
class RoutingTable:
    exact: dict[str, str]
    #: (pattern, queue), most specific pattern first.
    globs: tuple[tuple[str, str], ...]
    #: Largest threshold first, so the biggest class that applies wins.
    by_size: tuple[SizeRoute, ...]
    default: str
    #: Default message priority per queue (absent: Celery's default).
    priorities: dict[str, int]

    @classmethod
    def from_config(cls, config: FleetConfig) -> RoutingTable:
        exact: dict[str, str] = {}
        globs: list[tuple[str, str]] = []
        for name, queue in config.queues.items():
            for pattern in queue.tasks:
                if any(ch in pattern for ch in "*?["):
                    globs.append((pattern, name))
                else:
                    exact[pattern] = name
        globs.sort(key=lambda pq: (-specificity(pq[0]), pq[0]))
        by_size = sorted(
            (SizeRoute(r.over, r.queue, tuple(r.tasks)) for r in config.size_rules),
            key=lambda r: -r.over,
        )
        priorities = {name: q.priority for name, q in config.queues.items()
                      if q.priority is not None}
        return cls(exact, tuple(globs), tuple(by_size), config.default_queue, priorities)


def specificity(pattern: str) -> int:
    """Characters that are not wildcards: ``tasks.heavy.*`` beats ``tasks.*``."""
    return sum(1 for ch in pattern if ch not in "*?[]")


def _tokens(pattern: str) -> tuple[str, ...]:
    """``*``, ``?``, a ``[...]`` class or one literal character each."""
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            out.append(pattern[i:end + 1])
            i = end + 1
        else:
            out.append(pattern[i])
            i += 1
    return tuple(out)


_PRINTABLE = [chr(code) for code in range(33, 127)]


def _one_char_overlap(a: str, b: str) -> bool:
    if a == "?" or b == "?":
        return True
    if a.startswith("[") and b.startswith("["):  # task names are printable ASCII
        return any(fnmatchcase(ch, a) and fnmatchcase(ch, b) for ch in _PRINTABLE)
    if a.startswith("["):
        return fnmatchcase(b, a)
    if b.startswith("["):
        return fnmatchcase(a, b)
    return a == b


def globs_overlap(a: str, b: str) -> bool:
    """Whether some task name matches both globs (fnmatch's ``*``, ``?``, ``[...]``).

    The two patterns are walked together: a ``*`` may match nothing, or one more
    character matched by the other side's token (memoized: O(len(a) x len(b)))."""
    p, q = _tokens(a), _tokens(b)
    seen: dict[tuple[int, int], bool] = {}

    def both(i: int, j: int) -> bool:
        if (i, j) in seen:
            return seen[(i, j)]
        if i == len(p) and j == len(q):
            found = True
        elif i < len(p) and p[i] == "*":
            found = both(i + 1, j) or (j < len(q) and both(i, j + 1))
        elif j < len(q) and q[j] == "*":
            found = both(i, j + 1) or (i < len(p) and both(i + 1, j))
        elif i == len(p) or j == len(q):
            found = False
        else:
            found = _one_char_overlap(p[i], q[j]) and both(i + 1, j + 1)
        seen[(i, j)] = found
        return found

    return both(0, 0)


def queue_for_name(table: RoutingTable, task_name: str) -> str:
    if task_name in table.exact:
        return table.exact[task_name]
    for pattern, queue in table.globs:
        if fnmatchcase(task_name, pattern):
            return queue
    return table.default


def route(table: RoutingTable, task_name: str, input_size: int | None = None) -> str:
    """The queue for ``task_name`` with an input of ``input_size`` bytes (None: unknown)."""
    if input_size is not None:
        for rule in table.by_size:
            if input_size > rule.over and any(fnmatchcase(task_name, p) for p in rule.patterns):
                return rule.queue
    return queue_for_name(table, task_name)


class FleetRouter:
    """Celery router (an entry of ``task_routes``) backed by a RoutingTable.

    Celery merges the answer under the caller's options, so an explicit ``queue=`` or
    ``priority=`` in apply_async still wins.
    """

    def __init__(self, table: RoutingTable):
        self.table = table

    def __call__(
        self, name: str, args: Any, kwargs: Any, options: dict, task: Any = None, **kw: Any
    ) -> dict[str, Any]:
        headers = options.get("headers") or {}
        size = headers.get(SIZE_HEADER)
        queue = route(self.table, name, int(size) if size is not None else None)
        if queue in self.table.priorities:
            return {"queue": queue, "priority": self.table.priorities[queue]}
        return {"queue": queue}
