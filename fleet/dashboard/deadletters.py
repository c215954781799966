"""The dead-letter lists on the dashboard: /api/fleet/dead (read) and the requeue and
purge actions, with the same roles, CSRF checks and audit record as every control.

Its own routers so the response shapes (pydantic models, hence the OpenAPI spec) sit
beside the routes that answer with them; the actions are ``Control`` methods."""

from __future__ import annotations

from typing import Any

from fastapi import Query, Request
from pydantic import BaseModel

from fleet.dashboard.deps import GateDep, ServiceDep, role_router
from fleet.dashboard.gate import Denied
from fleet.dashboard.schemas import ActionResult
from fleet.deadletter import DeadLetter, DeadLetterList, decoded_body
from fleet.errors import UnknownDeadLetterError


class DeadLetterRow(BaseModel):
    id: str
    queue: str
    reason: str
    detail: str
    at: float
    deliveries: int
    task: str | None
    task_id: str | None
    worker: str | None
    #: Why it cannot be requeued (not a task message), or None.
    requeue_problem: str | None


class DeadLetterPage(BaseModel):
    #: Entries per queue (every queue of queues.yaml).
    counts: dict[str, int]
    #: Newest first, at most ``limit`` per queue.
    entries: list[DeadLetterRow]


class DeadLetterDetail(DeadLetterRow):
    #: The message as kombu stored it, when it was JSON.
    message: Any = None
    #: Its text, when it was not JSON (truncated).
    raw: str | None = None
    #: A task message's decoded [args, kwargs, embed].
    arguments: Any = None


def _row(entry: DeadLetter) -> dict:
    return {k: getattr(entry, k) for k in DeadLetterRow.model_fields if k != "requeue_problem"
            } | {"requeue_problem": entry.requeue_problem}


viewer = role_router("viewer", tags=["fleet"])
operator = role_router("operator", tags=["fleet"])
admin = role_router("admin", tags=["fleet"])
routers = (viewer, operator, admin)


@viewer.get("/api/fleet/dead", response_model=DeadLetterPage)
def dead_letters(svc: ServiceDep, gate: GateDep, queue: str | None = None,
                 limit: int = Query(50, ge=1, le=1000)):
    if queue is not None:
        gate.known_queue(queue)
    queues = list(svc.config.queues)
    dead = DeadLetterList.for_config(svc.config)
    shown = [queue] if queue else queues
    return {"counts": dead.counts(queues),
            "entries": [_row(e) for q in shown for e in dead.entries(q, limit)]}


@viewer.get("/api/fleet/dead/{entry_id}", response_model=DeadLetterDetail)
def dead_letter(svc: ServiceDep, entry_id: str):
    try:
        _, entry = DeadLetterList.for_config(svc.config).find(entry_id, list(svc.config.queues))
    except UnknownDeadLetterError as exc:
        raise Denied(404, str(exc)) from None
    return {**_row(entry), "message": entry.message, "raw": entry.raw,
            "arguments": decoded_body(entry.message)}


@operator.post("/api/fleet/dead/{entry_id}/requeue", response_model=ActionResult)
async def requeue(request: Request, svc: ServiceDep, gate: GateDep, entry_id: str):
    return gate.act(request, "dead.requeue", entry_id, {},
                    lambda: svc.control.requeue_dead(entry_id))


@operator.post("/api/fleet/queues/{queue}/dead/requeue", response_model=ActionResult)
async def requeue_queue(request: Request, svc: ServiceDep, gate: GateDep, queue: str):
    gate.known_queue(queue)
    return gate.act(request, "dead.requeue-all", queue, {},
                    lambda: svc.control.requeue_dead_queue(queue))


@admin.post("/api/fleet/queues/{queue}/dead/purge", response_model=ActionResult)
async def purge(request: Request, svc: ServiceDep, gate: GateDep, queue: str):
    gate.known_queue(queue)
    return gate.act(request, "dead.purge", queue, {},
                    lambda: svc.control.purge_dead(queue))
