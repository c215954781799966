"""The shape of every JSON answer, as pydantic models: each route declares one, so the
OpenAPI spec (the API page, /openapi.json) documents what it returns and schemathesis
checks the answers against it (tests/integration/test_dashboard_fuzz.py).

Two kinds of shape. Fixed ones (a task, a queue row, a job) list their fields exactly.
Open ones (a worker row: the stored worker merged with its newest sample; an inspect
reply, whatever the worker's Celery version says) declare the fields the pages read and
allow the rest (``extra="allow"``), because a response model filters the answer to its
fields and a dropped key is a page that silently shows nothing.

Flower's paths answer with Flower's keys, spelled as Flower does (``task-id``,
``task-types``: aliases), no key more or fewer: where Flower leaves a key out until it
has a value (a result not ready yet, an inspect reply not asked yet) the field has a
default and the route drops unset fields (``response_model_exclude_unset``).

Numbers: ``int | float`` where either occurs (Celery's default ``freq`` is the int 60, a
heartbeat's is a float; Flower's scripts see the type they saw before), since a ``float``
field would turn 60 into 60.0.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

Number = int | float


class Open(BaseModel):
    """A shape with more keys than the ones named: all of them are kept."""

    model_config = ConfigDict(extra="allow")


# -- common -------------------------------------------------------------------------------


class ActionResult(BaseModel):
    """What every control action answers (Flower's too): what was done."""

    message: str


class Error(BaseModel):
    """Every refusal and failure: 4xx and 5xx answer ``{"error": message}``."""

    error: str


# -- the fleet's own API (/api/fleet/...) -------------------------------------------------


class Me(BaseModel):
    name: str
    role: str
    #: How they signed in: session, basic, token or none (auth off).
    via: str
    #: The roles this caller has (viewer, operator, admin, up to their own).
    may: list[str]


class EventGap(BaseModel):
    """A stretch of events the dashboard could not recover (fleet.dashboard.gaps)."""

    id: int
    at: float
    since: float | None
    until: float | None
    reason: str | None
    detail: str | None
    #: What ``reason`` means, in a sentence.
    meaning: str


class Overview(BaseModel):
    workers_online: int
    workers_offline: int
    tasks_stored: int
    #: Events ingested since the dashboard started.
    events: int
    events_connected: bool
    #: Where events come from: stream, pubsub or receiver.
    events_source: str
    #: The newest few gaps of the last day (/api/fleet/events/gaps has them all).
    event_gaps: list[EventGap]
    queues: int
    sampled_at: float
    broker_error: str | None


class Worker(Open):
    """A stored worker (from its events), merged while it is live with its newest sample
    from Redis: the sample's keys (queue ... pod) are there only when it has one."""

    hostname: str
    #: online or offline (no heartbeat for dashboard.offline_after).
    status: str | None
    first_seen: float | None
    seen: float | None
    offline_since: float | None
    freq: float | None
    sw_ident: str | None
    sw_ver: str | None
    sw_sys: str | None
    pid: int | None
    loadavg: list[Number] | None
    active: int | None
    processed: int | None
    succeeded: int | None
    failed: int | None
    retried: int | None
    memory_kills: int | None
    clock: int | None
    #: The newest heartbeat times heard (as Flower keeps them).
    heartbeats: list[float]
    queue: str | None = None
    concurrency: int | None = None
    cpu_percent: Number | None = None
    #: Bytes: the main process and its pool children.
    rss: int | None = None
    memory_available: int | None = None
    reserved: int | None = None
    pod: str | None = None


class WorkerDetail(Worker):
    #: The worker's inspect replies by method (stats, active_queues, registered, conf,
    #: the task lists, timestamp): {} while it has not answered.
    inspect: dict[str, Any]


class QueueRow(BaseModel):
    name: str
    waiting: int
    reserved: int
    running: int
    oldest_age: float | None
    arrival_rate: Number
    completion_rate: Number
    service_time: float | None
    workers: int
    slots: int
    replicas_desired: int | None
    replicas_actual: int | None
    reason: str | None
    paused: bool
    min_replicas: int
    max_replicas: int
    pool: str
    concurrency: int
    memory_limit: int | None


class Task(BaseModel):
    """A stored task: Flower's fields plus its queue, its timeline and whether the memory
    guard killed it; ``seq`` is the paging cursor (``before``)."""

    uuid: str
    name: str | None
    state: str | None
    queue: str | None
    worker: str | None
    #: As Celery's events carry them: repr text, truncated by the worker.
    args: str | None
    kwargs: str | None
    result: str | None
    exception: str | None
    traceback: str | None
    retries: int | None
    received: float | None
    started: float | None
    succeeded: float | None
    failed: float | None
    retried: float | None
    revoked: float | None
    runtime: float | None
    eta: str | None
    expires: str | None
    parent_id: str | None
    root_id: str | None
    memory_kill: bool
    timestamp: float | None
    seq: int


class TaskPage(BaseModel):
    tasks: list[Task]
    #: The ``before`` of the next page, None on the last.
    next: int | None


class FailureGroup(BaseModel):
    """Failures of one exception type (the text before its first parenthesis)."""

    exception: str
    count: int
    #: Failures by task name.
    tasks: dict[str, int]
    newest_seq: int
    #: The newest failure's exception text.
    example: str | None


class JobRow(BaseModel):
    id: str
    task: str | None
    aggregate: str | None
    state: str | None
    total: int | None
    done: int | None
    failed: int | None
    created: float | None
    finished: float | None
    result_url: str | None
    error: str | None


class FailedChunk(BaseModel):
    index: int
    error: str | None


class JobDetail(Open):
    """The job ledger's status of a job (fleet.jobs.state.JobStatus, every field), its
    first failed chunks and its first stored chunk tasks."""

    id: str
    task: str
    aggregate: str | None
    state: str
    total: int
    done: int
    failed: int
    pending: int
    created: float
    finished: float | None
    result_url: str | None
    error: str | None
    failed_chunks: list[FailedChunk]
    tasks: list[Task]


class QueueOverride(BaseModel):
    """An operator's override of a queue's autoscaling (pause, bounds)."""

    min_replicas: int | None
    max_replicas: int | None
    paused: bool


class Decision(BaseModel):
    id: int
    at: float
    queue: str
    current: int | None
    desired: int | None
    reason: str | None
    dry_run: bool | None


class Autoscaler(BaseModel):
    #: Per queue: the autoscaler's newest decision as it wrote it (current, desired,
    #: reason, at, ...).
    latest: dict[str, dict[str, Any]]
    overrides: dict[str, QueueOverride]
    decisions: list[Decision]


class BrokerQueue(BaseModel):
    name: str
    messages: int
    unacked: int
    oldest_age: float | None


class RabbitQueue(BaseModel):
    name: str
    messages: int | None
    consumers: int | None
    exists: bool


class RabbitBroker(BaseModel):
    url: str
    queues: list[RabbitQueue]
    error: str | None


class Broker(BaseModel):
    #: Without its password.
    url: str
    transport: str
    queues: list[BrokerQueue]
    #: Only when dashboard.rabbitmq is configured.
    rabbitmq: RabbitBroker | None = None


class Series(BaseModel):
    name: str
    #: One value per bucket of ``t`` (None: no sample in it).
    values: list[Number | None]


class Figure(BaseModel):
    #: How a bucket's samples are combined: max or avg.
    aggregate: str
    series: list[Series]
    #: Names seen in the window, and how many of them are not drawn (``top``).
    names: int
    more: int


class Plots(BaseModel):
    #: The window's name (15m, 1h, 24h), None for since..until.
    window: str | None
    since: float
    until: float
    step: float
    #: The buckets' start times.
    t: list[Number]
    #: Figures by name (waiting, completion_rate, actual; rss): {} when not asked.
    queues: dict[str, Figure]
    workers: dict[str, Figure]


class WhatIfFigures(BaseModel):
    """One queue's (or the total's) figures in one replay (docs/tuning.md, "The
    figures"): seconds, counts."""

    queue: str
    tasks: int
    worker_seconds: float
    wait_p50: float
    wait_p95: float
    wait_p99: float
    slo_violation_seconds: float
    scale_events: int
    max_replicas: int
    max_backlog: int


class WhatIfSide(BaseModel):
    #: current or candidate; where the settings came from (queues.yaml, tuner, given).
    label: str
    source: str
    total: WhatIfFigures
    #: The queues that had tasks in the window.
    queues: list[WhatIfFigures]
    #: Path (under the dashboard's base) of the replay's SVG plot; None: not drawn.
    plot: str | None


class WhatIfChange(BaseModel):
    """A setting the candidate has otherwise: its dotted key in queues.yaml."""

    setting: str
    current: Any
    candidate: Any


class WhatIf(BaseModel):
    """A window replayed under the current settings and the candidate's."""

    #: ok, or empty: no tasks in the window (``message`` says so; no sides).
    status: Literal["ok", "empty"]
    message: str
    #: The answer's id (its plots' paths hold it), epoch seconds of the window.
    run: str
    since: float
    until: float
    queues: list[str]
    tasks: int
    current: WhatIfSide | None
    candidate: WhatIfSide | None
    #: candidate / current of the totals' figures (None: the current one is 0).
    ratios: dict[str, float | None]
    changes: list[WhatIfChange]
    #: Simulated seconds; tasks without a service time (not replayed).
    simulated: float
    skipped: int
    notes: list[str]
    #: When it was computed, in how many seconds, and whether this answer was kept.
    computed_at: float
    seconds: float
    cached: bool


class AuditEntry(BaseModel):
    id: int
    at: float
    user: str | None
    role: str | None
    action: str | None
    target: str | None
    params: Any
    outcome: str | None
    ok: bool | None


# -- Flower's paths, Flower's shapes -------------------------------------------------------


class FlowerTask(BaseModel):
    """celery.events.state.Task as Flower's /api/tasks and /api/task/info show it."""

    uuid: str
    name: str | None
    state: str | None
    received: float | None
    sent: float | None
    started: float | None
    rejected: float | None
    succeeded: float | None
    failed: float | None
    retried: float | None
    revoked: float | None
    args: str | None
    kwargs: str | None
    eta: str | None
    expires: str | None
    retries: int | None
    worker: str | None
    result: str | None
    exception: str | None
    timestamp: float | None
    runtime: float | None
    traceback: str | None
    exchange: str | None
    routing_key: str | None
    clock: int | None
    client: str | None
    root: str | None
    root_id: str | None
    parent: str | None
    parent_id: str | None
    children: list[Any]


class FlowerTasks(RootModel[dict[str, FlowerTask]]):
    """Tasks by id, in the order asked for (``sort_by``)."""


class InspectReplies(Open):
    """A worker's inspect replies, each key only once the worker answered it (as Flower:
    the task lists only after the worker was refreshed on its own)."""

    stats: dict[str, Any] | None = None
    active_queues: list[dict[str, Any]] | None = None
    registered: list[Any] | None = None
    conf: dict[str, Any] | None = None
    scheduled: list[Any] | None = None
    active: list[Any] | None = None
    reserved: list[Any] | None = None
    revoked: list[Any] | None = None
    #: When the newest reply came (epoch seconds).
    timestamp: float | None = None


class FlowerWorkers(RootModel[dict[str, InspectReplies] | dict[str, bool]]):
    """By worker name: its inspect replies, or with ``status`` whether it is online."""


class FlowerWorkerRow(Open):
    """One of Flower's /workers?json=1 rows: celery's Worker fields, ``status``, and the
    count of each event type heard from it (``worker-heartbeat``, ``task-received``...)."""

    hostname: str
    pid: int | None
    freq: Number
    heartbeats: list[float]
    clock: int
    active: int | None
    processed: int | None
    loadavg: list[Number] | None
    sw_ident: str | None
    sw_ver: str | None
    sw_sys: str | None
    status: bool


class FlowerWorkerPage(BaseModel):
    data: list[FlowerWorkerRow]


class TaskTypes(BaseModel):
    task_types: list[str] = Field(alias="task-types")


class TaskSent(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    task_id: str = Field(alias="task-id")
    state: str


class TaskResult(BaseModel):
    """A task's state; ``result`` (and for a failure ``traceback``) once it is ready."""

    model_config = ConfigDict(populate_by_name=True)

    task_id: str = Field(alias="task-id")
    state: str
    result: Any = None
    traceback: str | None = None


class QueueLength(BaseModel):
    name: str
    messages: int


class QueuesLength(BaseModel):
    active_queues: list[QueueLength]
