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

from fleet.config import FleetConfig

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
        globs.sort(key=lambda pq: (-_specificity(pq[0]), pq[0]))
        by_size = sorted(
            (SizeRoute(r.over, r.queue, tuple(r.tasks)) for r in config.size_rules),
            key=lambda r: -r.over,
        )
        priorities = {name: q.priority for name, q in config.queues.items()
                      if q.priority is not None}
        return cls(exact, tuple(globs), tuple(by_size), config.default_queue, priorities)


def _specificity(pattern: str) -> int:
    """Characters that are not wildcards: ``tasks.heavy.*`` beats ``tasks.*``."""
    return sum(1 for ch in pattern if ch not in "*?[]")


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
