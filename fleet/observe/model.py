"""The autoscaler's plain data: what was observed, and what was decided.

Metrics adapters produce these, the policy (a pure function) consumes them and
returns decisions, backends apply decisions. Nothing here does I/O.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, field, fields


def _filled_at_once(cls):
    """A frozen dataclass whose ``__init__`` fills the instance's ``__dict__`` in one
    step: the generated one sets each field through ``object.__setattr__`` (frozen
    forbids plain assignment), about 0.2 us a field, and the simulator makes a
    QueueSample, a WorkerSample and a QueueMetrics per queue per poll (4.3 million of
    each in a simulated day of 100 queues). Same parameters, defaults and instances."""
    names, params, defaults = [], [], {}
    for f in fields(cls):
        if f.default_factory is not MISSING or f.kw_only or not f.init:
            raise TypeError(f"{cls.__name__}.{f.name}: only plain fields are filled at once")
        names.append(f.name)
        if f.default is MISSING:
            params.append(f.name)
        else:
            defaults[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
    source = (f"def __init__(self, {', '.join(params)}):\n"
              f"    self.__dict__.update({', '.join(f'{n}={n}' for n in names)})\n")
    namespace = dict(defaults)
    exec(source, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    cls.__init__ = init
    return cls


@_filled_at_once
@dataclass(frozen=True)
class WorkerSample:
    """One worker's self-report (published by its main process every few seconds)."""

    hostname: str
    queue: str | None
    #: The pod (Kubernetes) or host the worker runs on, for pod-deletion-cost.
    pod: str
    pid: int
    concurrency: int
    #: Tasks running now, and held (prefetched, ETA) but not running.
    active: int
    reserved: int
    #: Tasks finished since the worker started.
    processed: int
    #: CPU of the worker and its pool, in percent of one core.
    cpu_percent: float
    rss_main: int
    rss_children: int
    #: Memory available on the host (or pod cgroup), bytes.
    memory_available: int
    #: When the sample was taken, and when the worker's event loop last ran a
    #: callback (worker clock, seconds since the epoch; None without an event loop).
    at: float
    loop_at: float | None = None
    #: Ids of the job tasks (fleet.jobs.ids) this worker runs or holds: what the
    #: reconciler must not send again, even when Redis lost its record of them.
    held: tuple[str, ...] = ()
    #: Of ``active``, the tasks of a worker in warm shutdown (asked to stop: it finishes
    #: them and takes no more). The backend no longer counts it as a replica, so its
    #: tasks must not make the policy ask for one in its place.
    draining: int = 0


#: The JSON type each report field must have (bool is not a number here).
_REPORT_TYPES = {
    "hostname": (str,), "queue": (str, type(None)), "pod": (str,), "pid": (int,),
    "concurrency": (int,), "active": (int,), "reserved": (int,), "processed": (int,),
    "cpu_percent": (int, float), "rss_main": (int,), "rss_children": (int,),
    "memory_available": (int,), "at": (int, float), "loop_at": (int, float, type(None)),
    "held": (list,), "draining": (int,),
}
_REQUIRED = {f.name for f in fields(WorkerSample)} - {"loop_at", "held", "draining"}
#: More held ids than any worker holds (concurrency x prefetch) means a broken report.
MAX_HELD = 10_000


def parse_report(raw: bytes | str) -> WorkerSample:
    """A worker's JSON self-report, checked field by field; ValueError says what is wrong.

    Reports come from any process that can write to Redis (an older or newer worker, a
    script, a hand edit): one with ``at`` as a string once killed the autoscaler loop
    with a TypeError. Nothing is trusted until it has the right type and range.
    """
    try:
        data = json.loads(raw)
    except (TypeError, ValueError, UnicodeDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_REPORT_TYPES))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    missing = sorted(_REQUIRED - set(data))
    if missing:
        raise ValueError(f"missing field {missing[0]!r}")
    for name, value in data.items():
        allowed = _REPORT_TYPES[name]
        if isinstance(value, bool) or not isinstance(value, allowed):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"field {name!r} must be {want}, got {value!r}")
        if isinstance(value, int | float) and (not math.isfinite(value) or value < 0):
            raise ValueError(f"field {name!r} must be a finite number >= 0, got {value!r}")
    held = data.pop("held", [])
    if len(held) > MAX_HELD or not all(isinstance(i, str) for i in held):
        raise ValueError(f"field 'held' must be a list of at most {MAX_HELD} task ids")
    return WorkerSample(**data, held=tuple(held))


@_filled_at_once
@dataclass(frozen=True)
class QueueSample:
    """One queue as Redis shows it at one instant."""

    name: str
    #: Messages in the queue's list and its priority sub-lists.
    waiting: int
    #: Messages delivered to workers and not yet acked (running, prefetched or ETA).
    unacked: int
    #: Age in seconds of the oldest waiting message (None: empty or unknown).
    oldest_age: float | None


@dataclass(frozen=True)
class Observation:
    """Everything one poll saw: queues and live workers, at ``at`` (poller clock)."""

    at: float
    queues: dict[str, QueueSample]
    workers: list[WorkerSample] = field(default_factory=list)
    #: Operator overrides of the autoscaling bounds (fleet.observe.overrides.Override).
    overrides: dict = field(default_factory=dict)

    def workers_of(self, queue: str) -> list[WorkerSample]:
        return [w for w in self.workers if w.queue == queue]


@_filled_at_once
@dataclass(frozen=True)
class QueueMetrics:
    """A queue's figures over the last interval: a sample plus rates from history."""

    name: str
    waiting: int
    unacked: int
    running: int
    oldest_age: float | None
    #: Messages per second arriving and completing, over the last interval(s).
    arrival_rate: float
    completion_rate: float
    #: Mean seconds per task (None until a task has completed).
    service_time: float | None
    #: Live workers serving the queue, and their pool slots in all.
    workers: int
    slots: int
    #: Mean CPU % per pool slot, and the highest memory use as a fraction of the
    #: queue's per-replica limit (None when unknown).
    cpu_per_slot: float
    memory_fraction: float | None
    #: Of ``running``, the tasks of workers in warm shutdown (WorkerSample.draining).
    draining: int = 0

    @property
    def backlog(self) -> int:
        """Messages no worker is running yet (waiting, or held by a busy worker)."""
        return self.waiting + max(0, self.unacked - self.running)


@_filled_at_once
@dataclass(frozen=True)
class ScaleDecision:
    queue: str
    current: int
    desired: int
    reason: str

    @property
    def changes(self) -> bool:
        return self.current != self.desired
