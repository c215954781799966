"""Rules that span several keys of queues.yaml: config in, list of problems out.

Each rule is one small function so that a test can aim at exactly one of them. The ones
about time and memory exist because Celery on Redis fails silently when they are broken:
a hard limit past ``visibility_timeout`` runs a task twice, and a per-child memory limit
past the pod's limit lets the kernel OOM-kill the whole pod before the guard can act.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from fleet.config_models import FleetConfig, QueueClass
from fleet.errors import Problem
from fleet.plugins import BACKENDS, PAYLOAD_STORES
from fleet.retry import resolve_exception
from fleet.routing import globs_overlap, specificity
from fleet.shutdown import GRACE_MARGIN_SECONDS, grace_period
from fleet.units import cpu_cores, format_duration, format_size
from fleet.yamlfile import line_of

Lines = dict[tuple, int]
Found = tuple[tuple, str]  # (key path, reason)


def check(config: FleetConfig, lines: Lines | None = None) -> list[Problem]:
    """Every cross-key problem in ``config``, in file order."""
    lines = lines or {}
    found: list[Found] = []
    for rule in RULES:
        found.extend(rule(config))
    problems = [
        Problem(config.source, ".".join(str(p) for p in path), reason, line_of(path, lines))
        for path, reason in found
    ]
    return sorted(problems, key=lambda p: (p.line or 0, p.path))


def _queues(config: FleetConfig) -> Iterator[tuple[str, QueueClass]]:
    yield from config.queues.items()


def routes_to_known_queues(config: FleetConfig) -> Iterator[Found]:
    known = set(config.queues)
    names = ", ".join(sorted(known))
    if config.default_queue not in known:
        yield ("default_queue",), f"routes to undefined queue {config.default_queue!r} ({names})"
    for index, rule in enumerate(config.size_rules):
        if rule.queue not in known:
            yield ("size_rules", index, "queue"), (
                f"routes to undefined queue {rule.queue!r} (defined: {names})"
            )
    for name, queue in _queues(config):
        target = queue.on_memory_exceeded.retry_on
        if target is not None and target not in known:
            yield ("queues", name, "on_memory_exceeded", "retry_on"), (
                f"routes to undefined queue {target!r} (defined: {names})"
            )


def time_limits_ordered(config: FleetConfig) -> Iterator[Found]:
    for name, queue in _queues(config):
        soft, hard = queue.time_limit.soft, queue.time_limit.hard
        if soft is not None and hard is not None and soft >= hard:
            yield ("queues", name, "time_limit", "soft"), (
                f"soft limit ({format_duration(soft)}) must be below the hard limit "
                f"({format_duration(hard)}), or SoftTimeLimitExceeded never fires"
            )


def hard_limit_below_visibility(config: FleetConfig) -> Iterator[Found]:
    """Without lease renewal, Redis redelivers any acks_late task older than the timeout."""
    broker = config.broker
    if broker.lease.enabled:
        return
    vt = broker.visibility_timeout
    for name, queue in _queues(config):
        if not queue.acks_late:
            continue
        hard = queue.time_limit.hard
        if hard is None:
            yield ("queues", name, "time_limit"), (
                "acks_late with no hard time limit while broker.lease is off: a task running "
                f"past broker.visibility_timeout ({format_duration(vt)}) is delivered twice; "
                "set time_limit.hard below it or turn broker.lease on"
            )
        elif hard >= vt:
            yield ("queues", name, "time_limit", "hard"), (
                f"hard limit ({format_duration(hard)}) must be below broker.visibility_timeout "
                f"({format_duration(vt)}) while broker.lease is off, or Redis delivers the "
                "task again to another worker while it still runs"
            )


def lease_renews_in_time(config: FleetConfig) -> Iterator[Found]:
    broker = config.broker
    if broker.lease.enabled and broker.lease.interval * 2 > broker.visibility_timeout:
        yield ("broker", "lease", "interval"), (
            f"must be at most half of broker.visibility_timeout "
            f"({format_duration(broker.visibility_timeout)}) so a live worker's lease "
            "never lapses between two renewals"
        )


#: What a worker's main process holds beside its pool (Celery, the fleet's threads, the
#: imported task modules): measured in the image, 75 MiB RSS (85 MiB as a bare process;
#: bench/container_start.py, docs/docker.md).
WORKER_MAIN_SHARE = 128 << 20


def memory_within_pod(config: FleetConfig) -> Iterator[Found]:
    """The guard acts at memory_limit per pool process; the kernel at the container's
    limit for all of them and the main process together. Unless every child can reach
    memory_limit at once within the container, the kernel strikes first."""
    for name, queue in _queues(config):
        pod_limit = queue.kubernetes.resources.limits.memory
        limit = queue.memory_limit
        if limit is None or pod_limit is None:
            continue
        path = ("queues", name, "memory_limit")
        if limit > pod_limit:
            yield path, (
                f"{format_size(limit)} is above kubernetes.resources.limits.memory "
                f"({format_size(pod_limit)}): the kernel kills the pod before the guard acts"
            )
        elif queue.pool == "prefork" and limit * queue.concurrency + WORKER_MAIN_SHARE > pod_limit:
            yield path, (
                f"{format_size(limit)} x concurrency {queue.concurrency} + "
                f"{format_size(WORKER_MAIN_SHARE)} for the worker's main process = "
                f"{format_size(limit * queue.concurrency + WORKER_MAIN_SHARE)} is above "
                f"kubernetes.resources.limits.memory ({format_size(pod_limit)}): "
                "the kernel kills a pool process before the guard acts; lower memory_limit "
                "or concurrency, or raise the container's limit"
            )


def memory_limit_needs_processes(config: FleetConfig) -> Iterator[Found]:
    """Threads share one process: no single task's memory can be measured or stopped."""
    for name, queue in _queues(config):
        if queue.memory_limit is not None and queue.pool != "prefork":
            yield ("queues", name, "memory_limit"), (
                f"needs pool: prefork (pool {queue.pool!r} runs tasks inside the worker "
                "process, so one task cannot be stopped alone)"
            )


def retry_goes_to_larger_class(config: FleetConfig) -> Iterator[Found]:
    for name, queue in _queues(config):
        target = queue.on_memory_exceeded.retry_on
        if target is None or target not in config.queues:
            continue
        path = ("queues", name, "on_memory_exceeded", "retry_on")
        if target == name:
            yield path, "retries on the same queue; the task would run out of memory again"
            continue
        bigger = config.queues[target].memory_limit
        if queue.memory_limit is not None and bigger is not None and bigger <= queue.memory_limit:
            yield path, (
                f"queue {target!r} has memory_limit {format_size(bigger)}, not larger than "
                f"this queue's {format_size(queue.memory_limit)}"
            )


def one_queue_per_task(config: FleetConfig) -> Iterator[Found]:
    owners: dict[str, str] = {}
    for name, queue in _queues(config):
        for index, pattern in enumerate(queue.tasks):
            if pattern in owners and owners[pattern] != name:
                yield ("queues", name, "tasks", index), (
                    f"{pattern!r} is already claimed by queue {owners[pattern]!r}"
                )
            elif pattern in owners:
                yield ("queues", name, "tasks", index), f"{pattern!r} is listed twice"
            owners.setdefault(pattern, name)


def globs_do_not_tie(config: FleetConfig) -> Iterator[Found]:
    """Routing by name: an exact name beats every glob, and of two globs that match, the
    one with more literal characters wins (``tasks.heavy.*`` over ``tasks.*``). Two
    globs of different queues that can match the same name with as many literal
    characters each would be settled by their alphabetical order: no one means that."""
    seen: list[tuple[str, str]] = []
    for name, queue in _queues(config):
        for index, pattern in enumerate(queue.tasks):
            if not any(ch in pattern for ch in "*?["):
                continue
            for other, owner in seen:
                # The very same glob twice is one_queue_per_task's to report.
                if owner != name and other != pattern \
                        and specificity(other) == specificity(pattern) \
                        and globs_overlap(pattern, other):
                    yield ("queues", name, "tasks", index), (
                        f"{pattern!r} and {other!r} (queue {owner!r}) can match the same "
                        "task name and neither is more specific (the glob with more "
                        "literal characters wins, an exact name beats both): make one "
                        "narrower, or list the names")
            seen.append((pattern, name))


def time_limits_need_prefork(config: FleetConfig) -> Iterator[Found]:
    """Celery enforces soft and hard time limits only in the prefork pool."""
    for name, queue in _queues(config):
        limits = queue.time_limit
        if queue.pool != "prefork" and (limits.soft is not None or limits.hard is not None):
            yield ("queues", name, "time_limit"), (
                f"needs pool: prefork (Celery does not enforce time limits in the "
                f"{queue.pool!r} pool)"
            )


def replicas_ordered(config: FleetConfig) -> Iterator[Found]:
    for name, queue in _queues(config):
        scaling = queue.autoscaling
        if scaling.min_replicas > scaling.max_replicas:
            yield ("queues", name, "autoscaling", "min_replicas"), (
                f"{scaling.min_replicas} is above max_replicas ({scaling.max_replicas})"
            )


def requests_within_limits(config: FleetConfig) -> Iterator[Found]:
    for name, queue in _queues(config):
        resources = queue.kubernetes.resources
        req, lim = resources.requests.memory, resources.limits.memory
        if req is not None and lim is not None and req > lim:
            yield ("queues", name, "kubernetes", "resources", "requests", "memory"), (
                f"{format_size(req)} is above limits.memory ({format_size(lim)})"
            )
        req_cpu, lim_cpu = cpu_cores(resources.requests.cpu), cpu_cores(resources.limits.cpu)
        if req_cpu is not None and lim_cpu is not None and req_cpu > lim_cpu:
            yield ("queues", name, "kubernetes", "resources", "requests", "cpu"), (
                f"{resources.requests.cpu} is above limits.cpu ({resources.limits.cpu})"
            )


def retry_exceptions_known(config: FleetConfig) -> Iterator[Found]:
    for name, queue in _queues(config):
        if queue.retry is None:
            continue
        for index, exc_name in enumerate(queue.retry.exceptions):
            try:
                resolve_exception(exc_name)
            except ValueError as exc:
                yield ("queues", name, "retry", "exceptions", index), str(exc)


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def queue_names_fit_kubernetes(config: FleetConfig) -> Iterator[Found]:
    """A queue names its worker Deployment: it must make a valid DNS label (RFC 1123)."""
    target = config.autoscaler.kubernetes
    for name in config.queues:
        deployment = target.deployment_name(name)
        if not _DNS_LABEL.match(name) or len(deployment) > 63:
            yield ("queues", name), (
                f"queue name must be lowercase letters, digits and '-', and make a "
                f"Deployment name ({deployment!r}) of at most 63 characters")


def grace_within_platform_cap(config: FleetConfig) -> Iterator[Found]:
    """A pod that needs longer to stop than the platform waits is killed mid-task when a
    node is drained (Cluster Autoscaler: 600 s by default), whatever its grace says."""
    cap = config.autoscaler.kubernetes.max_termination_grace
    for name, q in _queues(config):
        grace = grace_period(q)
        if grace <= cap:
            continue
        limit = q.time_limit.hard
        path = ("queues", name, "time_limit", "hard") if limit is not None else \
            ("queues", name, "time_limit")
        bound = (f"its hard time limit {format_duration(limit)}" if limit is not None
                 else "the 5m allowed for a task without a hard limit")
        yield path, (
            f"its pods need {grace}s to stop ({bound} for a task started just before "
            f"SIGTERM, + {GRACE_MARGIN_SECONDS}s to exit), over the "
            f"{format_duration(cap)} the platform honours "
            f"(autoscaler.kubernetes.max_termination_grace; Cluster Autoscaler's "
            f"--max-graceful-termination-sec is 600s unless set): a node drain would kill "
            f"a task in its last minutes. Lower time_limit.hard to "
            f"{format_duration(cap - GRACE_MARGIN_SECONDS)} or less, or raise "
            f"max_termination_grace on purpose where the platform waits longer (and set "
            f"Cluster Autoscaler's flag to match)")


def replicas_fit_capacity(config: FleetConfig) -> Iterator[Found]:
    """The capacity budget (autoscaler.capacity) and the replicas' requests must add up:
    the budget grants every queue its min_replicas first, so minimums above it are not
    met, and a queue one of whose replicas exceeds it never gets one."""
    cap = config.autoscaler.capacity
    limits = {"cpu": cpu_cores(cap.cpu), "memory": cap.memory}
    shown = {"cpu": lambda v: f"{v:g} cores", "memory": format_size}
    minimum = {"cpu": 0.0, "memory": 0}
    for name, q in _queues(config):
        one = dict(zip(("cpu", "memory"), q.kubernetes.resources.per_replica(), strict=True))
        for kind, limit in limits.items():
            if limit is None:
                continue
            minimum[kind] += one[kind] * q.autoscaling.min_replicas
            if q.autoscaling.max_replicas > 0 and one[kind] > limit:
                yield ("queues", name, "kubernetes", "resources", "requests", kind), (
                    f"one replica requests {shown[kind](one[kind])}, more than the whole "
                    f"capacity budget (autoscaler.capacity.{kind}: {shown[kind](limit)}): "
                    f"the autoscaler could never start one")
    for kind, limit in limits.items():
        if limit is not None and minimum[kind] > limit:
            yield ("autoscaler", "capacity", kind), (
                f"the queues' min_replicas together request {shown[kind](minimum[kind])}, "
                f"more than the budget's {shown[kind](limit)}: raise the budget or lower "
                f"some min_replicas (each queue's requests x min_replicas)")


def plugins_registered(config: FleetConfig) -> Iterator[Found]:
    """A backend or store name is a plug-in's (fleet.plugins): a typo, or a team's
    package not installed here, is reported now, with the names that are."""
    for path, registry, name in (
            (("autoscaler", "backend"), BACKENDS, config.autoscaler.backend),
            (("payloads", "store"), PAYLOAD_STORES, config.payloads.store)):
        reason = registry.unknown(name)
        if reason is not None:
            yield path, reason


RULES: list[Callable[[FleetConfig], Iterator[Found]]] = [
    routes_to_known_queues,
    time_limits_ordered,
    hard_limit_below_visibility,
    lease_renews_in_time,
    memory_within_pod,
    memory_limit_needs_processes,
    time_limits_need_prefork,
    retry_goes_to_larger_class,
    one_queue_per_task,
    globs_do_not_tie,
    replicas_ordered,
    requests_within_limits,
    retry_exceptions_known,
    queue_names_fit_kubernetes,
    grace_within_platform_cap,
    replicas_fit_capacity,
    plugins_registered,
]
