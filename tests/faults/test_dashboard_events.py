"""The dashboard loses no events across a Redis restart, and shows what it cannot recover.

Real things only: a redis-server of the test's own (AOF, fsync always) stopped and
started again, a real worker running a steady stream of short tasks, the real dashboard
(DashboardServer, HTTP) reading the workers' event stream. The truth about what ran is
the worker's own log ("Task name[id] succeeded"): the dashboard must hold every one of
those tasks, in its final state, and count each once.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from fleet.dashboard.gaps import RESET
from tests.conftest import deep_merge, wait_for
from tests.fakes.redis_server import PersistentRedis
from tests.faults.figures import Figures, report
from tests.integration.dashboard_util import FAST, start_dashboard
from tests.integration.test_dashboard_api import metric

pytestmark = pytest.mark.slow

SUCCEEDED = re.compile(r"Task tasks\.aggregate\.sum_by\[([0-9a-f-]{36})\] succeeded in")
#: From Redis being back to every task that ran stored in the dashboard.
RECOVERY_BOUND = 30.0
OUTAGE = 10.0

#: Early acks: a task whose ack an outage swallowed is not run again a visibility timeout
#: later (that is the broker's fault suite); here only what the dashboard sees counts.
SETTINGS = deep_merge(FAST, {"queues": {"default": {"acks_late": False}}})


class Submitter:
    """A steady stream of short tasks (one every ``every`` s); sends during the outage
    fail fast and are not counted as submitted."""

    def __init__(self, app, every: float = 0.05):
        self.app, self.every = app, every
        self.ids: list[str] = []
        self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self.stop.wait(self.every):
            n += 1
            try:
                r = self.app.send_task("tasks.aggregate.sum_by",
                                       args=[[{"key": "k", "value": n}]], queue="default",
                                       ignore_result=True, retry=False)
                self.ids.append(r.id)
            except Exception:  # Redis is down: this one was never submitted
                self.failed += 1

    def __enter__(self) -> Submitter:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def succeeded_in_log(fleet, worker) -> list[str]:
    return SUCCEEDED.findall(fleet.log_of(worker))


def settled(fleet, worker, submitted: list[str], timeout: float = 60.0) -> set[str]:
    """Wait until the worker has run everything it will run (no new success for 3 s)."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = set(succeeded_in_log(fleet, worker))
        if len(done) != last:
            last, since = len(done), time.monotonic()
        elif time.monotonic() - since > 3.0 and done >= set(submitted[-5:]):
            return done
        time.sleep(0.3)
    return set(succeeded_in_log(fleet, worker))


def missing(board, ids: set[str]) -> set[str]:
    """Tasks the worker ran that the dashboard does not hold as succeeded."""
    out = set()
    for tid in ids:
        reply = board.get(f"/api/fleet/tasks/{tid}")
        if reply.status_code != 200 or reply.json()["state"] != "SUCCESS":
            out.add(tid)
    return out


def succeeded_counter(board, hostname: str) -> int:
    w = {w["hostname"]: w for w in board.json("/api/fleet/workers")}.get(hostname) or {}
    return int(w.get("succeeded") or 0)


@dataclass
class Outage:
    worker: object
    board: object
    sub: Submitter
    #: Tasks the worker's log says succeeded, and those of them the dashboard lacks.
    done: set[str]
    lost: set[str]
    #: Seconds from Redis answering again to the dashboard's reader attached again.
    reattached_s: float | None


@contextmanager
def outage(fleet, tmp_path, *, appendonly: bool) -> Iterator[Outage]:
    """Tasks flow for 5 s, Redis stops for OUTAGE s (and forgets everything unless
    ``appendonly``), tasks flow 10 s more; then the worker settles and the dashboard
    gets up to RECOVERY_BOUND s more to hold every task that ran."""
    server = PersistentRedis(tmp_path / "redis", appendonly=appendonly).start()
    fleet.configure(deep_merge(SETTINGS, {"broker": {"url": server.url}}))
    worker = fleet.start_worker("default")
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'dash.sqlite'}")
    try:
        with Submitter(fleet.app()) as sub:
            time.sleep(5)
            server.stop()
            if not appendonly:
                server.wipe()
            wait_for(lambda: not board.json("/api/fleet/overview")["events_connected"],
                     OUTAGE, what="the dashboard to notice the outage")
            time.sleep(OUTAGE)
            server.start()
            back, reattached = time.monotonic(), None
            while time.monotonic() - back < 10:
                if reattached is None and board.json("/api/fleet/overview")[
                        "events_connected"]:
                    reattached = time.monotonic() - back
                time.sleep(0.25)
        done = settled(fleet, worker, sub.ids)
        deadline = time.monotonic() + RECOVERY_BOUND
        lost = missing(board, done)
        while lost and time.monotonic() < deadline:
            time.sleep(1.0)
            lost = missing(board, lost)
        yield Outage(worker, board, sub, done, lost, reattached)
    finally:
        board.stop()
        fleet.close()
        server.stop()


def test_every_task_reaches_the_dashboard_across_a_10s_redis_restart(fleet, tmp_path):
    with outage(fleet, tmp_path, appendonly=True) as o:
        runs = len(succeeded_in_log(fleet, o.worker))
        deadline = time.monotonic() + 20
        while (counted := succeeded_counter(o.board, o.worker.hostname)) < runs and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        gaps = o.board.json("/api/fleet/events/gaps")
        figures = report(Figures(
            case="dashboard-redis-restart-10s", submitted=len(o.sub.ids),
            completed=len(o.done), lost=len(o.lost), duplicated=counted - runs,
            recovery_s=o.reattached_s,
            extra={"runs_in_log": runs, "sends_refused": o.sub.failed, "gaps": len(gaps)}))
        assert o.sub.failed > 0  # Redis really was down while tasks were being sent
        assert figures.completed >= 0.9 * figures.submitted, figures
        assert figures.lost == 0, sorted(o.lost)[:10]
        assert figures.duplicated == 0, figures  # each event folded once
        assert gaps == []  # AOF kept the stream and the group: nothing to report
        assert figures.recovery_s is not None and figures.recovery_s <= RECOVERY_BOUND


def test_redis_restarted_empty_shows_a_gap_and_what_ran_after_it(fleet, tmp_path):
    with outage(fleet, tmp_path, appendonly=False) as o:
        gaps = o.board.json("/api/fleet/overview")["event_gaps"]
        figures = report(Figures(
            case="dashboard-redis-restarted-empty", submitted=len(o.sub.ids),
            completed=len(o.done), lost=len(o.lost), recovery_s=o.reattached_s,
            extra={"gaps": len(gaps), "reason": gaps[0]["reason"] if gaps else None}))
        assert [g["reason"] for g in gaps] == [RESET], gaps
        assert gaps[0]["since"] < gaps[0]["until"]
        assert "restarted empty" in gaps[0]["meaning"]
        text = o.board.get("/metrics").text
        assert metric(text, "fleet_dashboard_event_gaps_total", reason=RESET) == 1
        # Everything the worker ran reached the dashboard: what ran before the restart
        # was read in time, what ran after it is in the new stream, read from its start.
        assert figures.completed > 0
        assert figures.lost == 0, sorted(o.lost)[:10]


def test_a_memory_kill_reaches_the_dashboard(fleet, tmp_path):
    """The guard's task-memory-exceeded event (sent with child_pid: pid is the
    dispatcher's own field) is what flags a task re-sent to a larger class."""
    fleet.configure(deep_merge(FAST, {"queues": {
        "heavy": {"memory_limit": "200Mi", "on_memory_exceeded": {"retry_on": "xl"}},
        "xl": {"memory_limit": "1Gi"}}}))
    worker = fleet.start_worker("heavy")
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'dash.sqlite'}")
    try:
        started = time.monotonic()
        result = fleet.app().send_task("tasks.heavy.grow",
                                       kwargs={"target_mb": 600, "step_mb": 16})

        def flagged():
            r = board.get(f"/api/fleet/tasks/{result.id}")
            return r.status_code == 200 and r.json()["memory_kill"] and r.json()

        task = wait_for(flagged, 60, what="the memory kill in the dashboard")
        seen = time.monotonic() - started
        # No xl worker runs: the task waits there, re-sent; task-retried alone never
        # sets the flag, only the guard's event does.
        assert task["state"] == "RETRY" and "MemoryLimitExceeded" in task["exception"]
        assert "re-sent to queue 'xl'" in fleet.log_of(worker)
        w = wait_for(lambda: {w["hostname"]: w for w in board.json("/api/fleet/workers")}
                     .get(worker.hostname), 10, what="the worker row")
        text = board.get("/metrics").text
        kills = metric(text, "fleet_memory_limit_kills_total", queue_name="heavy")
        report(Figures(case="dashboard-memory-kill-event", submitted=1, completed=1,
                       lost=0 if task["memory_kill"] else 1, recovery_s=seen,
                       extra={"worker_memory_kills": w["memory_kills"], "metric": kills}))
        assert w["memory_kills"] == 1 and kills == 1
    finally:
        board.stop()
