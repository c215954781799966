"""The memory guard: stop a task whose pool process outgrows its class, mid-task.

Celery's ``worker_max_memory_per_child`` is checked only after a task returns, so a
runaway task grows until the kernel OOM-kills the whole pod and every neighbour with
it. Here a thread in the worker's main process samples the RSS of each busy prefork
child (and its own subprocesses) with psutil; a child over the queue's limit is killed
at once. The worker then sees a lost child; ``GuardedRequest`` recognises the kill and
turns it into a clear ``MemoryLimitExceeded`` result (task id, RSS, limit) instead of a
bare WorkerLostError, or re-sends the task to a larger class (``on_memory_exceeded``).
It never requeues it onto the same queue, where it would only die again.

The kernel may strike first: a task that grows faster than the guard samples, or a
container whose limit is below the class's. Then a child dies of SIGKILL that the guard
did not send, and the container's cgroup counts an OOM kill (fleet.cgroup.OomKills);
``GuardedRequest`` treats that the same way as a guard kill, so such a task is escalated
or failed once, not redelivered into the next kill (the poison loop of issue 12: 24
kernel kills in 35 s).

A pool process that dies by itself (a signal, ``os._exit``, SystemExit) on a queue with
acks_late + reject_on_worker_lost is requeued by Celery; ``GuardedRequest`` counts those
deliveries (fleet.deliveries) and, on the last one the queue's ``max_deliveries`` allows,
dead-letters the message and fails the task (fleet.poison) instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil
import redis
from billiard.exceptions import WorkerLostError
from celery import signals
from celery.exceptions import Reject
from celery.utils.serialization import get_pickled_exception
from celery.worker import state as worker_state
from celery.worker.request import Request

from fleet import poison
from fleet.cgroup import OomKills
from fleet.deadletter import MEMORY_LIMIT, REDELIVERED, WRONG_ARGUMENTS, Reason
from fleet.deliveries import (
    DeliveryCounter,
    killed_by_sigkill,
    max_deliveries,
    reason_of_worker_lost,
    retire_on_loss,
)
from fleet.errors import MemoryLimitExceeded, WrongArguments
from fleet.fleetapp import fleet_config_of
from fleet.periodic import Periodic
from fleet.units import format_size

logger = logging.getLogger("fleet.guard")

ATTEMPT_HEADER = "fleet-memory-attempt"


@dataclass(frozen=True)
class Kill:
    task_id: str
    task_name: str
    pid: int
    rss: int
    limit: int
    queue: str
    #: "guard" (the guard's own kill, over memory_limit) or "kernel" (the cgroup's OOM
    #: killer, at the container's limit; rss is the guard's last sample, 0 if none).
    by: str = "guard"

    def message(self) -> str:
        if self.by == "kernel":
            seen = f"; it last had {format_size(self.rss)} RSS" if self.rss else ""
            limit = (f"the container's memory limit of {format_size(self.limit)}"
                     if self.limit else "its container's memory limit")
            return (
                f"Task {self.task_name}[{self.task_id}] killed by the kernel's OOM killer "
                f"mid-task: its pool process (pid {self.pid}) on queue {self.queue!r} "
                f"reached {limit}{seen}"
            )
        return (
            f"Task {self.task_name}[{self.task_id}] stopped mid-task: its pool process "
            f"(pid {self.pid}) reached {format_size(self.rss)} RSS, over the {self.queue!r} "
            f"queue's memory_limit of {format_size(self.limit)}"
        )


@dataclass(frozen=True)
class Busy:
    """A pool process running a task, as the guard samples it."""

    task_id: str
    task_name: str
    pid: int


def over_limit(samples: Iterable[tuple[Busy, int]], limit: int) -> list[tuple[Busy, int]]:
    """The busy processes whose RSS is above ``limit`` (the decision, without I/O)."""
    return [(busy, rss) for busy, rss in samples if rss > limit]


class RssReader:
    """RSS of a pool process plus its descendants (a task may shell out).

    Finding descendants means scanning every process on the host (/proc), too costly
    to do four times a second for every task: a task's descendants are first looked
    for once it has run ``rescan`` samples (short tasks never pay), then every
    ``rescan`` samples; in between, only the known ones' RSS is read (one cheap read
    each). The pool process's own RSS is read at every sample.
    """

    def __init__(self, rescan: int = 8):
        self.rescan = rescan
        #: pid -> (task id, samples of that task so far, its known descendants)
        self._known: dict[int, tuple[str, int, list[psutil.Process]]] = {}
        self._procs: dict[int, psutil.Process] = {}

    def __call__(self, pid: int, task_id: str = "") -> int | None:
        try:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            known_task, reads, children = self._known.get(pid, (task_id, 0, []))
            if known_task != task_id:
                reads, children = 0, []
            reads += 1
            if reads % self.rescan == 0:
                children = proc.children(recursive=True)
            self._known[pid] = (task_id, reads, children)
            total = proc.memory_info().rss
        except psutil.Error:
            self.forget(pid)
            return None
        for child in children:
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total

    def descendants(self, pid: int) -> list[psutil.Process]:
        """The processes a task started, as last seen (freshly scanned if possible)."""
        try:
            return self._procs[pid].children(recursive=True)
        except (KeyError, psutil.Error):
            return self._known.get(pid, ("", 0, []))[2]

    def forget(self, pid: int) -> None:
        self._known.pop(pid, None)
        self._procs.pop(pid, None)

    def keep_only(self, pids: set[int]) -> None:
        for pid in list(self._procs):
            if pid not in pids:
                self.forget(pid)


_kills: dict[str, Kill] = {}
_kills_lock = threading.Lock()


def record_kill(kill: Kill) -> None:
    with _kills_lock:
        _kills[kill.task_id] = kill


def pop_kill(task_id: str) -> Kill | None:
    with _kills_lock:
        return _kills.pop(task_id, None)


#: The guard's last RSS sample of each running task (for a kernel kill's message).
_last_rss: dict[str, int] = {}
#: This worker's container's OOM kills (set at worker start: a counter first read after
#: a kill would take that kill for an old one).
_oom_kills: OomKills | None = None


def watch_kernel_oom_kills(counter: OomKills | None = None) -> None:
    global _oom_kills
    _oom_kills = counter if counter is not None else OomKills()


def kernel_kill(task_id: str, task_name: str, pid: int | None, queue: str,
                text: str) -> Kill | None:
    """A Kill if this lost pool process was the kernel OOM killer's victim: it died of
    SIGKILL, the guard did not send it, and the cgroup counts a kill nobody claimed."""
    if _oom_kills is None or not killed_by_sigkill(text) or _oom_kills.claim() is None:
        return None
    return Kill(task_id, task_name, pid or 0, _last_rss.pop(task_id, 0),
                _oom_kills.limit() or 0, queue, by="kernel")


def busy_children() -> list[Busy]:
    """Tasks running in pool processes right now (from the worker's own state)."""
    for _ in range(3):
        try:
            requests = list(worker_state.active_requests)
            break
        except RuntimeError:  # the event loop changed the set under us
            continue
    else:
        return []
    return [Busy(r.id, r.name, r.worker_pid) for r in requests if r.worker_pid]


class MemoryGuard:
    """Samples busy children every ``interval`` and kills the ones over ``limit``."""

    def __init__(self, queue: str, limit: int, interval: float = 0.25,
                 busy: Callable[[], list[Busy]] = busy_children):
        self.queue = queue
        self.limit = limit
        self.interval = interval
        self.busy = busy
        self.rss_of = RssReader()
        self._thread = Periodic("fleet-memory-guard", self.tick, interval,
                                what="memory guard sampling", logger=logger)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop()

    def tick(self) -> list[Kill]:
        samples = []
        busy_now = self.busy()
        self.rss_of.keep_only({b.pid for b in busy_now})
        running = {b.task_id for b in busy_now}
        for task_id in [t for t in _last_rss if t not in running]:
            _last_rss.pop(task_id, None)
        for busy in busy_now:
            rss = self.rss_of(busy.pid, busy.task_id)
            if rss is not None:
                samples.append((busy, rss))
                _last_rss[busy.task_id] = rss
        kills = []
        for busy, rss in over_limit(samples, self.limit):
            kill = Kill(busy.task_id, busy.task_name, busy.pid, rss, self.limit, self.queue)
            record_kill(kill)
            logger.error("%s; killing the process", kill.message())
            # What the task started goes too: orphans would keep the memory.
            for child in self.rss_of.descendants(busy.pid):
                with contextlib.suppress(psutil.Error):
                    child.kill()
            try:
                os.kill(busy.pid, signal.SIGKILL)
            except ProcessLookupError:
                pop_kill(busy.task_id)  # it ended on its own meanwhile
                continue
            kills.append(kill)
        return kills


class GuardedRequest(Request):
    """A Celery request that knows a lost child may have been the guard's doing, and
    that a message whose pool process keeps dying must not be delivered forever."""

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if (isinstance(exc, SystemExit | KeyboardInterrupt)
                and not (self._already_cancelled or self._already_revoked)):
            # Celery's own on_failure turns a pool process's SystemExit into a lost
            # worker ("exitcode 3") and requeues it like one: so do we, before deciding.
            exc_info = self._worker_lost_info(exc)
            exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if isinstance(exc, WrongArguments):
            # The child stored the failure and sent task_failure; keep the message.
            self._keep(Reason(WRONG_ARGUMENTS, str(exc)))
            return super().on_failure(exc_info, send_failed_event, return_ok)
        kill = None
        if isinstance(exc, WorkerLostError):
            kill = pop_kill(self.id) or kernel_kill(
                self.id, self.name, self.worker_pid,
                poison.queue_of(self, self.task.app.fleet_queue), str(exc))
        if kill is None:
            requeued = self._requeued_as(exc)
            if requeued is not None and self._retired(requeued):
                return None
            return super().on_failure(exc_info, send_failed_event, return_ok)
        worker_state.task_ready(self)
        error = MemoryLimitExceeded(kill.message())
        target = self._memory_retry_target()
        if target is not None:
            self._resend(error, target)
        else:
            self._fail(error, exc_info, send_failed_event)
        self.send_event("task-memory-exceeded", rss=kill.rss, limit=kill.limit,
                        child_pid=kill.pid, queue=kill.queue, retry_on=target, by=kill.by)
        return None

    def _requeued_as(self, exc: BaseException) -> Reason | None:
        """Why Celery is about to requeue this message (None: it will not)."""
        if isinstance(exc, Reject):
            return Reason(REDELIVERED, f"the task rejected it with requeue ({exc.reason or exc})"
                          ) if exc.requeue else None
        if (isinstance(exc, WorkerLostError) and self.task.acks_late
                and self.task.reject_on_worker_lost):
            return reason_of_worker_lost(str(exc))
        return None  # Celery fails and acks it: not delivered again anyway

    def _retired(self, reason: Reason) -> bool:
        """Count the lost delivery; dead-letter the message if it was the last one the
        queue allows. False: Celery requeues it as usual."""
        config = fleet_config_of(self.task.app)
        tag = getattr(self.message, "delivery_tag", None)
        if config is None or not tag:
            return False
        queue = poison.queue_of(self, self.task.app.fleet_queue)
        try:
            deliveries = DeliveryCounter.for_config(config).lost(str(tag), reason)
            if not retire_on_loss(deliveries, max_deliveries(config, queue)):
                return False
            poison.retire(self, reason, deliveries)
        except redis.RedisError as exc:
            logger.error("task %s[%s]: delivery count unavailable (%s); requeued as usual",
                         self.name, self.id, exc)
            return False
        return True

    def _keep(self, reason: Reason) -> None:
        try:
            poison.keep(self, reason)
        except redis.RedisError as exc:
            logger.error("task %s[%s]: could not dead-letter it (%s): %s",
                         self.name, self.id, reason, exc)

    def _memory_retry_target(self) -> str | None:
        config = fleet_config_of(self.task.app)
        queue = (self.delivery_info or {}).get("routing_key")
        if config is None or queue not in config.queues:
            return None
        policy = config.queues[queue].on_memory_exceeded
        attempt = int((self._context.headers or {}).get(ATTEMPT_HEADER, 1))
        if policy.retry_on is None or attempt >= policy.max_attempts:
            return None
        return policy.retry_on

    def _resend(self, error: MemoryLimitExceeded, target: str) -> None:
        context = self._context
        headers = dict(context.headers or {})
        attempt = int(headers.get(ATTEMPT_HEADER, 1)) + 1
        headers[ATTEMPT_HEADER] = attempt
        self.task.signature_from_request(context, queue=target, headers=headers).apply_async()
        logger.error("%s; re-sent to queue %r (attempt %d)", error, target, attempt)
        if self.store_errors:
            self.task.backend.mark_as_retry(self.id, error, request=context)
        self.acknowledge()
        self.send_event("task-retried", exception=repr(error), traceback="")

    def _fail(self, error: MemoryLimitExceeded, exc_info, send_failed_event: bool) -> None:
        logger.error("%s; task failed", error)
        # The final memory kill: no larger class left. Keep the message for a requeue
        # (e.g. once the queue's memory_limit is raised); the result says what happened.
        self._keep(Reason(MEMORY_LIMIT, str(error)))
        self.acknowledge()
        self.task.backend.mark_as_failure(self.id, error, request=self._context,
                                          store_result=self.store_errors)
        self.task.request_stack.push(self._context)
        try:
            signals.task_failure.send(sender=self.task, task_id=self.id, exception=error,
                                      args=self.args, kwargs=self.kwargs,
                                      traceback=None, einfo=exc_info)
        finally:
            self.task.request_stack.pop()
        if send_failed_event:
            self.send_event("task-failed",
                            exception=repr(get_pickled_exception(error)), traceback="")
