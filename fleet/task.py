"""FleetTask: the base class of every task on a fleet app (``task_cls``).

It adds exactly what must happen inside the worker around task code, as hooks Celery
already calls: claim-check arguments are resolved before ``run`` and their payload is
deleted after success; fleet-wide rate limits are taken before ``run``; and the
request class is the guard's, so a memory-limit kill reads as one; and arguments that
do not bind to the task function fail as ``WrongArguments`` (its message is then kept in
the dead-letter list, for a producer of another version).
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import redis
from celery import Task, states
from celery.exceptions import Retry
from kombu.exceptions import OperationalError

from fleet import claimcheck, keys
from fleet.errors import WrongArguments
from fleet.fleetapp import fleet_config_of
from fleet.jobs import lifecycle
from fleet.jobs.ids import parse_task_id
from fleet.jobs.ledger import LedgerUnavailableError
from fleet.ratelimit import TokenBucket, requeue_delay

logger = logging.getLogger("fleet.task")

#: Seconds before a chunk whose completion could not be recorded runs again.
JOB_RECORD_RETRY = 5
#: How long a done chunk waits for the job ledger to answer before it is re-queued.
JOB_RECORD_WAIT = 30.0


def binding_problem(task: Task, args: tuple, kwargs: dict) -> str | None:
    """Why ``args``/``kwargs`` do not bind to the task function, or None if they do.

    Asked only after the task raised a TypeError, never per task: binding a signature
    costs about as much as a no-op task. Here, in the pool process, claim-check references
    are already resolved, so the real arguments are checked.
    """
    function = getattr(task, "_orig_run", task.run)  # autoretry wraps run in (*a, **kw)
    try:
        inspect.signature(function).bind(*args, **kwargs)
    except TypeError as exc:
        return str(exc)
    except ValueError:  # no signature to read (a builtin): cannot tell
        return None
    return None


class FleetTask(Task):
    Request = "fleet.guard:GuardedRequest"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        config = fleet_config_of(self.app)
        request = self.request
        if config is None or request.called_directly:
            # A plain call (or eager): Celery's own path, which pushes a request.
            return super().__call__(*args, **kwargs)
        # Run by a worker: the tracer already pushed this task's request, so run() is
        # called directly; Task.__call__ would build a second request context, which
        # costs as much as the rest of a no-op task's trace.
        ref = parse_task_id(request.id)
        if ref is not None and (request.delivery_info or {}).get("redelivered"):
            why = self._skip_reason(config, ref, request)
            if why:
                logger.warning("task %s[%s] delivered again: not run, %s", self.name,
                               request.id, why)
                return None
        args, kwargs, claimed = claimcheck.resolve_arguments(config.payloads, args, kwargs)
        if claimed:
            request.args, request.kwargs = args, kwargs
        self._take_rate_limits(config, request)
        try:
            result = self.run(*args, **kwargs)
        except TypeError as exc:
            problem = binding_problem(self, args, kwargs)
            if problem is None:
                raise  # the task's own TypeError
            raise WrongArguments(f"task {self.name}[{request.id}] cannot take the arguments "
                                 f"it was sent: {problem}") from exc
        if ref is not None:
            self._record(config, ref, request, result)
        return result

    def _record(self, config, ref, request, result: Any) -> None:
        """Note the chunk done in the job's ledger, waiting out a short outage of it.

        The work is done: running it again would be a duplicate. So a ledger that does
        not answer is asked again for up to ``JOB_RECORD_WAIT`` (the chunk keeps its pool
        slot meanwhile); only then is the chunk re-queued to run later. Recording is
        idempotent; if even the re-queue fails, the chunk is still pending in the ledger
        and the reconciler sends it again once it finds it nowhere.
        """
        deadline = time.monotonic() + JOB_RECORD_WAIT
        wait = 0.5
        while True:
            try:
                lifecycle.on_task_success(self.app, config, ref, result)
                return
            except LedgerUnavailableError as exc:
                if time.monotonic() + wait > deadline:
                    self._requeue(request, JOB_RECORD_RETRY, f"job {ref.job_id} could "
                                  f"not record chunk {ref.index}: {exc}")
                if wait == 0.5:
                    logger.warning("job %s: chunk %s is done but %s; waiting", ref.job_id,
                                   ref.index, exc)
                time.sleep(wait)
                wait = min(4.0, wait * 2)
            except (redis.RedisError, OperationalError) as exc:
                self._requeue(request, JOB_RECORD_RETRY,
                              f"job {ref.job_id} could not record chunk {ref.index}: {exc}")

    def _skip_reason(self, config, ref, request) -> str | None:
        try:
            return lifecycle.already_handled(config, ref, request.hostname)
        except Exception as exc:  # cannot tell: run it, at least once is the contract
            logger.warning("could not check whether %s already ran: %s", request.id, exc)
            return None

    def _requeue(self, request, delay: float, why: str) -> None:
        """Send this task again in ``delay`` seconds without spending one of its retries
        (those are for the task's own failures), and end this run as retried."""
        self.signature_from_request(request, countdown=delay).apply_async()
        raise Retry(f"{why}: re-queued for {delay:.1f}s", when=delay)

    def apply_async(self, args=None, kwargs=None, task_id=None, producer=None, link=None,
                    link_error=None, shadow=None, **options):
        if args or not claimcheck.is_claim(kwargs) or self.app.conf.task_always_eager:
            return super().apply_async(args, kwargs, task_id, producer, link, link_error,
                                       shadow, **options)
        # A reference re-sent from a request (autoretry, rate-limit requeue, memory
        # re-route: signature_from_request). Task.apply_async checks arguments against the
        # function's signature (task typing), which rejects the reference kwarg with a
        # TypeError that Celery's retry turns into a Reject. The real arguments were
        # checked when the task was first sent; the rest is Task.apply_async's own path.
        options = dict(self._get_exec_options(), **options)
        options.setdefault("ignore_result", self.ignore_result)
        return self.app.send_task(
            self.name, args, kwargs, task_id=task_id, producer=producer, link=link,
            link_error=link_error, result_cls=self.AsyncResult,
            shadow=shadow or self.shadow_name(args, kwargs, options), task_type=self,
            **options)

    def after_return(self, status, retval, task_id, args, kwargs, einfo) -> None:
        config = fleet_config_of(self.app)
        if (config is not None and status == states.SUCCESS and config.payloads.cleanup
                and not args and claimcheck.is_claim(kwargs)):
            from fleet.payloads import open_store

            try:
                open_store(config.payloads).delete(kwargs[claimcheck.CLAIM_KEY]["url"])
            except Exception as exc:  # cleanup is best effort; the task already succeeded
                logger.warning("could not delete payload of task %s: %s", task_id, exc)

    def _take_rate_limits(self, config, request) -> None:
        delivery = request.delivery_info or {}
        queue = config.queues.get(delivery.get("routing_key") or "")
        if queue is None:
            return  # called directly, not from a worker: nothing to share
        limits = []
        if self.name in queue.task_rate_limits:
            limits.append(("task", self.name, queue.task_rate_limits[self.name]))
        if queue.rate_limit is not None:
            limits.append(("queue", delivery["routing_key"], queue.rate_limit))
        for kind, name, rate in limits:
            bucket = TokenBucket(keys.broker_client(config),
                                 keys.rate_bucket_key(config, kind, name), rate.per_second)
            grant = bucket.take()
            if not grant.granted:
                self._requeue(request, requeue_delay(grant.wait),
                              f"fleet-wide rate limit {rate} on {kind} {name}")
            if grant.wait > 0:
                time.sleep(grant.wait)
