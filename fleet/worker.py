"""A queue class turned into a Celery worker: its settings, conf and command line.

``fleet worker --queue Q`` and ``celery -A fleet.app worker -Q Q`` end up with the same
settings: both go through ``queue_conf`` (Celery reads worker defaults from the conf),
and ``fleet worker`` also passes them as explicit flags so ``ps`` shows what runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fleet.config import FleetConfig
from fleet.units import format_duration, format_size


@dataclass(frozen=True)
class WorkerSettings:
    queue: str
    pool: str
    concurrency: int
    prefetch_multiplier: int
    disable_prefetch: bool
    acks_late: bool
    reject_on_worker_lost: bool
    soft_time_limit: float | None
    time_limit: float | None
    max_tasks_per_child: int | None
    #: Celery's own check, after a task ends: recycles a child that grew between tasks.
    max_memory_per_child_kib: int | None
    #: The guard's limit, enforced during a task.
    memory_limit: int | None
    soft_shutdown_timeout: float
    visibility_timeout: float
    lease_interval: float | None
    rate_limit: str | None
    events: bool


def worker_settings(config: FleetConfig, queue: str) -> WorkerSettings:
    q = config.queue(queue)
    lease = config.broker.lease
    return WorkerSettings(
        queue=queue,
        pool=q.pool,
        concurrency=q.concurrency,
        prefetch_multiplier=q.prefetch_multiplier,
        disable_prefetch=q.disable_prefetch,
        acks_late=q.acks_late,
        reject_on_worker_lost=q.reject_on_worker_lost,
        soft_time_limit=q.time_limit.soft,
        time_limit=q.time_limit.hard,
        max_tasks_per_child=q.max_tasks_per_child,
        max_memory_per_child_kib=q.memory_limit // 1024 if q.memory_limit else None,
        memory_limit=q.memory_limit,
        soft_shutdown_timeout=q.soft_shutdown_timeout,
        visibility_timeout=config.broker.visibility_timeout,
        lease_interval=lease.interval if lease.enabled else None,
        rate_limit=str(q.rate_limit) if q.rate_limit else None,
        events=config.events,
    )


def queue_conf(settings: WorkerSettings) -> dict:
    """Celery conf keys for a worker serving only ``settings.queue``."""
    conf = {
        "worker_pool": settings.pool,
        "worker_concurrency": settings.concurrency,
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        "worker_disable_prefetch": settings.disable_prefetch,
        "task_acks_late": settings.acks_late,
        "task_reject_on_worker_lost": settings.reject_on_worker_lost,
        "task_soft_time_limit": settings.soft_time_limit,
        "task_time_limit": settings.time_limit,
        "worker_max_tasks_per_child": settings.max_tasks_per_child,
        "worker_max_memory_per_child": settings.max_memory_per_child_kib,
        "worker_soft_shutdown_timeout": settings.soft_shutdown_timeout,
        "worker_enable_soft_shutdown_on_idle": settings.soft_shutdown_timeout > 0,
        # A redelivered message whose task already succeeded is not run again.
        "worker_deduplicate_successful_tasks": settings.acks_late,
    }
    return conf


def celery_argv(settings: WorkerSettings, *, loglevel: str = "INFO",
                hostname: str | None = None) -> list[str]:
    """``celery worker`` arguments equivalent to ``settings``."""
    argv = [
        "worker",
        "--queues", settings.queue,
        "--hostname", hostname or f"{settings.queue}@%h",
        "--pool", settings.pool,
        "--concurrency", str(settings.concurrency),
        "--prefetch-multiplier", str(settings.prefetch_multiplier),
        "--loglevel", loglevel,
        # One queue per worker: gossip and mingle only add start-up latency and chatter.
        "--without-gossip",
        "--without-mingle",
    ]
    if settings.events:
        argv.append("--task-events")
    if settings.disable_prefetch:
        argv.append("--disable-prefetch")
    if settings.time_limit is not None:
        argv += ["--time-limit", f"{settings.time_limit:g}"]
    if settings.soft_time_limit is not None:
        argv += ["--soft-time-limit", f"{settings.soft_time_limit:g}"]
    if settings.max_tasks_per_child is not None:
        argv += ["--max-tasks-per-child", str(settings.max_tasks_per_child)]
    if settings.max_memory_per_child_kib is not None:
        argv += ["--max-memory-per-child", str(settings.max_memory_per_child_kib)]
    return argv


#: Options a pass-through (``fleet worker -q Q -- ...``) may not set: what the worker
#: serves and how comes from queues.yaml, or from fleet worker's own options.
FIXED_OPTIONS = {
    "-Q": "the queue is --queue's", "--queues": "the queue is --queue's",
    "-X": "a fleet worker serves one queue", "--exclude-queues": "a fleet worker serves one queue",
    "--include-queues": "a fleet worker serves one queue",
    "-A": "the app is fleet's", "--app": "the app is fleet's",
    "-P": "the pool is the queue's (queues.yaml pool)",
    "--pool": "the pool is the queue's (queues.yaml pool)",
    "-c": "use fleet worker --concurrency", "--concurrency": "use fleet worker --concurrency",
    "-n": "use fleet worker --hostname", "--hostname": "use fleet worker --hostname",
    "-l": "use fleet worker --loglevel", "--loglevel": "use fleet worker --loglevel",
}


def passthrough_problem(args: tuple[str, ...] | list[str]) -> str | None:
    """Why ``args`` cannot be handed to ``celery worker`` as they are, or None."""
    for arg in args:
        option = arg.split("=", 1)[0]
        if option in FIXED_OPTIONS:
            return f"{option} cannot be passed through: {FIXED_OPTIONS[option]}"
    return None


def describe(settings: WorkerSettings) -> list[tuple[str, str]]:
    """Readable (name, value) pairs for ``fleet worker --print-config``."""
    rows = []
    for key, value in asdict(settings).items():
        if value is None:
            shown = "-"
        elif key in ("memory_limit",):
            shown = format_size(value)
        elif key in ("soft_time_limit", "time_limit", "soft_shutdown_timeout",
                     "visibility_timeout", "lease_interval"):
            shown = format_duration(value)
        else:
            shown = str(value).lower() if isinstance(value, bool) else str(value)
        rows.append((key, shown))
    return rows


def queue_from_argv(argv: list[str]) -> str | None:
    """The single queue of a ``celery ... worker -Q name`` command line, else None.

    Lets ``celery -A fleet.app worker -Q heavy`` pick up heavy's settings before Celery
    parses its options (its option defaults are read from the conf at parse time).
    """
    if "worker" not in argv:
        return None
    queues = None
    for i, arg in enumerate(argv):
        if arg in ("-Q", "--queues") and i + 1 < len(argv):
            queues = argv[i + 1]
        elif arg.startswith("--queues="):
            queues = arg.split("=", 1)[1]
        elif arg.startswith("-Q") and len(arg) > 2:
            queues = arg[2:]
    if not queues or "," in queues:
        return None
    return queues
