"""Control actions: Celery's remote control (what Flower offers) and fleet's own.

A thin adapter: each method does one broadcast or one fleet call and returns a message;
``ControlError`` carries what went wrong for the API to report (no worker replied, an
unknown job). Who may call what, and the audit record, are the API's business.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery

from fleet import deadletter
from fleet.errors import FleetError, NotRequeueableError, UnknownDeadLetterError
from fleet.jobs.ids import aggregate_task_id, chunk_task_id
from fleet.jobs.state import FAILED, JobStore
from fleet.keys import broker_client
from fleet.observe import overrides

REPLY_TIMEOUT = 2.0


class ControlError(FleetError):
    """An action that could not be done; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 403):
        super().__init__(message)
        self.status = status


@dataclass
class Control:
    app: Celery

    @property
    def config(self):
        return self.app.config

    def _broadcast(self, command: str, worker: str, what: str, **arguments) -> str:
        replies = self.app.control.broadcast(command, arguments=arguments,
                                             destination=[worker], reply=True,
                                             timeout=REPLY_TIMEOUT)
        for reply in replies or ():
            answer = reply.get(worker)
            if answer is None:
                continue
            if "error" in answer:
                raise ControlError(f"{what} failed on {worker}: {answer['error']}")
            return answer.get("ok", what)
        raise ControlError(f"{what}: no reply from {worker} within {REPLY_TIMEOUT:g}s")

    # -- workers (Flower's) --------------------------------------------------------

    def shutdown(self, worker: str) -> str:
        self.app.control.broadcast("shutdown", destination=[worker])
        return f"Shutting down {worker}"

    def pool_restart(self, worker: str) -> str:
        self._broadcast("pool_restart", worker, "pool restart", reload=False)
        return f"Restarting {worker} worker's pool"

    def pool_grow(self, worker: str, n: int) -> str:
        self._broadcast("pool_grow", worker, "pool grow", n=n)
        return f"Growing {worker} worker's pool by {n}"

    def pool_shrink(self, worker: str, n: int) -> str:
        self._broadcast("pool_shrink", worker, "pool shrink", n=n)
        return f"Shrinking {worker} worker's pool by {n}"

    def pool_autoscale(self, worker: str, min_: int, max_: int) -> str:
        if min_ > max_:
            raise ControlError(f"autoscale: min {min_} is above max {max_}", 400)
        self._broadcast("autoscale", worker, "autoscale", min=min_, max=max_)
        return f"Autoscaling {worker} worker (min={min_}, max={max_})"

    def add_consumer(self, worker: str, queue: str) -> str:
        self._broadcast("add_consumer", worker, "add consumer", queue=queue)
        return f"add consumer {queue}"

    def cancel_consumer(self, worker: str, queue: str) -> str:
        self._broadcast("cancel_consumer", worker, "cancel consumer", queue=queue)
        return f"cancel consumer {queue}"

    # -- tasks (Flower's) ----------------------------------------------------------

    def revoke(self, task_id: str, terminate: bool = False, signal: str = "SIGTERM") -> str:
        self.app.control.revoke(task_id, terminate=terminate, signal=signal)
        return f"Revoked '{task_id}'"

    def rate_limit(self, worker: str, task: str, rate: str) -> str:
        self._broadcast("rate_limit", worker, "rate limit", task_name=task, rate_limit=rate)
        return f"new rate limit set successfully for {task}"

    def time_limit(self, worker: str, task: str, soft: float | None, hard: float | None) -> str:
        self._broadcast("time_limit", worker, "time limit", task_name=task, soft=soft,
                        hard=hard)
        return f"time limits set successfully for {task}"

    # -- fleet's own ---------------------------------------------------------------

    def retry_job(self, job_id: str) -> str:
        from fleet.jobs.submit import retry_failed

        done = retry_failed(self.app, job_id)
        if done.aggregate:
            return f"{job_id}: aggregate step sent again"
        cleared = (f" ({done.dead_letters} dead-letter entries removed with them)"
                   if done.dead_letters else "")
        return f"{job_id}: {done.chunks + done.lost} chunks sent again{cleared}"

    def revoke_job(self, job_id: str, who: str) -> str:
        """Revoke every chunk and the aggregate step (one broadcast), and end the job."""
        store = JobStore(self.config)
        status = store.status(job_id)
        ids = [chunk_task_id(job_id, i) for i in range(status.total)]
        ids.append(aggregate_task_id(job_id))
        self.app.control.revoke(ids, terminate=True)
        store.set_state(job_id, FAILED, error=f"revoked by {who}")
        return f"{job_id}: revoked {len(ids)} tasks"

    def requeue_dead(self, entry_id: str) -> str:
        try:
            entry = deadletter.requeue(self.config, entry_id)
        except UnknownDeadLetterError as exc:
            raise ControlError(str(exc), 404) from None
        except NotRequeueableError as exc:
            raise ControlError(str(exc), 409) from None
        return f"requeued {entry.id}: {entry.task}[{entry.task_id}] onto {entry.queue}"

    def requeue_dead_queue(self, queue: str) -> str:
        done, left = deadletter.requeue_all(self.config, queue)
        return f"{queue}: {len(done)} dead letters requeued" + (
            f", {len(left)} left (not task messages)" if left else "")

    def purge_dead(self, queue: str) -> str:
        removed = deadletter.DeadLetterList.for_config(self.config).purge(queue)
        return f"{queue}: {removed} dead letters purged"

    def set_bounds(self, queue: str, min_replicas: int | None, max_replicas: int | None) -> str:
        self.config.queue(queue)  # raises for an unknown queue
        if min_replicas is not None and max_replicas is not None and min_replicas > max_replicas:
            raise ControlError(f"{queue}: min_replicas {min_replicas} is above "
                               f"max_replicas {max_replicas}", 400)
        client = broker_client(self.config)
        current = overrides.read(client, self.config).get(queue, overrides.Override())
        overrides.write(client, self.config, queue, overrides.Override(
            min_replicas, max_replicas, current.paused))
        return f"{queue}: autoscaler bounds {min_replicas}..{max_replicas}"

    def pause(self, queue: str, paused: bool) -> str:
        """Stop (or resume) consuming a queue: workers cancel (add) the consumer now, and
        the autoscaler holds the queue at zero replicas until resumed."""
        self.config.queue(queue)
        client = broker_client(self.config)
        current = overrides.read(client, self.config).get(queue, overrides.Override())
        overrides.write(client, self.config, queue, overrides.Override(
            current.min_replicas, current.max_replicas, paused))
        command = "cancel_consumer" if paused else "add_consumer"
        self.app.control.broadcast(command, arguments={"queue": queue})
        return f"{queue}: {'paused' if paused else 'resumed'}"
