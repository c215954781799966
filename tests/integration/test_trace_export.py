"""`fleet trace export` against what a real run recorded: real workers on two queues, a
batch job (its chunks in the job ledger) and plain tasks stored by a real dashboard, and
decisions recorded by a real Autoscaler.run_once on the stub backend; the trace is read
back with read_trace."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, text

from fleet.jobs.ids import parse_task_id
from fleet.trace.io import read_trace
from fleet.trace.model import Replicas, Task
from tests.conftest import ROOT, deep_merge, wait_for
from tests.integration.dashboard_util import FAST, start_dashboard

pytestmark = pytest.mark.slow

SUM = "tasks.aggregate.sum_by"


def export(fleet, *args: str, database: str | None = None) -> subprocess.CompletedProcess:
    args = ("--database", database, *args) if database else args
    return subprocess.run([sys.executable, "-m", "fleet.cli", "trace", "export", *args,
                           "--config", str(fleet.config_path)],
                          capture_output=True, text=True, timeout=120, cwd=fleet.tmp_path,
                          env={**fleet.env, "PYTHONPATH": str(ROOT)})


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


@pytest.fixture
def recorded(fleet, tmp_path):
    """A run: a 3-chunk job on default, then (after ``mark``) two plain tasks, one on
    each of default and io, all stored by the dashboard; one autoscaler pass."""
    from autoscale.backends.stub import StubBackend
    from autoscale.loop import Autoscaler
    from fleet.jobs.state import JobStore
    from fleet.jobs.submit import JobSpec, submit
    from fleet.keys import broker_client
    from fleet.observe.metrics import RedisMetrics

    fleet.configure(deep_merge(FAST, {}))
    url = f"sqlite:///{tmp_path / 'dash.sqlite'}"
    board = start_dashboard(fleet.config, url)
    try:
        workers = [fleet.start_worker(q, wait=False) for q in ("default", "io")]
        for worker in workers:
            fleet.wait_ready(worker)
        data = tmp_path / "in.jsonl"
        data.write_text("".join(json.dumps({"region": r, "amount": 1}) + "\n"
                                for r in "nsnsnsnsnsnsnsnsnsns" * 3))
        app = fleet.app()
        job = submit(app, JobSpec(task=SUM, input=str(data), chunk_size=20,
                                  kwargs={"group_by": "region", "fields": ["amount"]}))
        engine = create_engine(url)

        def settled(minimum: int) -> bool:
            """At least ``minimum`` tasks stored, every one ended well on a known queue."""
            with engine.connect() as conn:
                total, good = conn.execute(text(
                    "SELECT count(*), sum(state = 'SUCCESS' AND queue IS NOT NULL) FROM tasks"
                )).one()
            return total >= minimum and total == good

        jobs = JobStore(fleet.config)
        wait_for(lambda: jobs.status(job.job_id).is_terminal, 60, what="the job to end")
        wait_for(lambda: settled(4), 30, what="the 3 chunks and the collect step stored")
        time.sleep(0.05)
        mark = time.time()
        time.sleep(0.05)
        plain = [app.send_task(SUM, args=[[{"key": "a", "value": 1}]], queue=q)
                 for q in ("default", "io")]
        for result in plain:
            result.get(timeout=30)
        wait_for(lambda: settled(6), 30, what="the plain tasks stored")
        scaler = Autoscaler(fleet.config, RedisMetrics(fleet.config, broker_client(fleet.config)),
                            StubBackend(list(fleet.config.queues)))
        decisions = scaler.run_once()
        # the dashboard's sampler copies the changes into its database: export must not
        # count them twice
        def copied() -> bool:
            with engine.connect() as conn:
                count = conn.execute(text("SELECT count(*) FROM decisions")).scalar()
            return count >= sum(d.changes for d in decisions)

        wait_for(copied, 20, what="the sampler to copy the decisions")
        with engine.connect() as conn:
            total = conn.execute(text("SELECT count(*) FROM tasks")).scalar()
        engine.dispose()
        yield {"url": url, "job": job.job_id, "mark": mark, "plain": [r.id for r in plain],
               "decisions": decisions, "total": total}
    finally:
        board.stop()


def read(path):
    header, records = read_trace(path)
    records = list(records)
    return (header, [r for r in records if isinstance(r, Task)],
            [r for r in records if isinstance(r, Replicas)])


def test_export_writes_what_the_run_recorded(fleet, recorded, tmp_path):
    out = tmp_path / "all.jsonl.gz"
    done = export(fleet, "-o", str(out), database=recorded["url"])
    assert done.returncode == 0, done.stderr
    header, tasks, replicas = read(out)
    assert f"{recorded['total']} tasks and {len(replicas)} decisions" in done.stdout
    assert header.source == "export" and header.version == 1
    assert header.queues[:4] == ["default", "io", "heavy", "xl"]
    assert len(tasks) == recorded["total"]
    assert header.start <= recorded["mark"] < header.start + header.duration
    ids = {t.task_id for t in tasks}
    chunk_ids = {f"{recorded['job']}.{i}" for i in range(3)}
    assert chunk_ids | set(recorded["plain"]) <= ids
    by_id = {t.task_id: t for t in tasks}
    assert {by_id[i].queue for i in recorded["plain"]} == {"default", "io"}
    for t in tasks:
        assert t.state == "SUCCESS" and t.name and t.service is not None and t.service > 0
        assert t.sent <= t.received <= t.started <= t.finished, t
        assert t.service <= t.finished - t.started + 0.01, t
    for i in chunk_ids:  # the ledger knows when a chunk was sent, and its size
        ref = parse_task_id(i)
        assert ref is not None and by_id[i].input_bytes and by_id[i].input_bytes > 0
        assert by_id[i].sent <= by_id[i].received
    assert all(by_id[i].input_bytes is None for i in recorded["plain"])
    # one Replicas per decision of the pass (Redis's list and hash, and the
    # dashboard's copy, counted once), at the pass's time
    decided = {d.queue: d for d in recorded["decisions"]}
    assert sorted(r.queue for r in replicas) == sorted(decided)
    for r in replicas:
        assert (r.current, r.desired, r.reason) == (
            decided[r.queue].current, decided[r.queue].desired, decided[r.queue].reason)
        assert 0 <= r.at <= header.duration
    assert len({r.at for r in replicas}) == 1


def test_export_filters_by_window_and_queue(fleet, recorded, tmp_path):
    url = recorded["url"]
    out = tmp_path / "io.jsonl"
    done = export(fleet, "-o", str(out), "--queue", "io", database=url)
    assert done.returncode == 0, done.stderr
    header, tasks, replicas = read(out)
    assert header.queues == ["io"] and header.params["queues"] == ["io"]
    assert [t.task_id for t in tasks] == [recorded["plain"][1]]
    assert [r.queue for r in replicas] == ["io"]

    out = tmp_path / "after.jsonl"
    done = export(fleet, "-o", str(out), "--since", iso(recorded["mark"]), database=url)
    assert done.returncode == 0, done.stderr
    header, tasks, _ = read(out)
    assert header.start == pytest.approx(recorded["mark"], abs=1e-3)
    assert sorted(t.task_id for t in tasks) == sorted(recorded["plain"])
    assert all(t.sent >= 0 for t in tasks)

    done = export(fleet, "-o", str(out), "--until", iso(recorded["mark"]), database=url)
    assert done.returncode == 0, done.stderr
    _, tasks, replicas = read(out)
    assert {f"{recorded['job']}.{i}" for i in range(3)} <= {t.task_id for t in tasks}
    assert not set(recorded["plain"]) & {t.task_id for t in tasks}
    assert replicas == []  # the pass came after the mark

    done = export(fleet, "-o", str(out), "--since", "1h", database=url)
    assert done.returncode == 0, done.stderr
    assert len(read(out)[1]) == recorded["total"]

    done = export(fleet, "-o", str(tmp_path / "gpu.jsonl"), "-q", "gpu", database=url)
    assert done.returncode == 2 and "no queue 'gpu' in" in done.stderr, done.stderr


@pytest.mark.parametrize(("args", "says"), [
    (["--since", "last tuesday"], "Invalid value for --since: expected a duration ago"),
    (["--until", "2026-13-01"], "Invalid value for --until"),
    (["--since", "1m", "--until", "2h"], "the window is empty"),
    (["--database", "postgresql://nobody@127.0.0.1:1/fleet"],
     "cannot read the dashboard database postgresql://nobody@127.0.0.1:1/fleet"),
    (["--database", "sqlite:///no/such/dash.sqlite"], "no dashboard database at"),
    (["--database", "mysql+nothing://x"], "only sqlite and postgresql"),
])
def test_bad_arguments_and_an_unreachable_database_are_exit_2(fleet, tmp_path, args, says):
    out = tmp_path / "t.jsonl"
    done = export(fleet, "-o", str(out), *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_export_streams_from_postgresql_and_says_what_it_left_out(fleet, postgres_url,
                                                                    tmp_path):
    """More rows than one fetch (a server-side cursor), a task of no known queue, a dry
    run's decision; no ledger file: a warning, not a created ledger."""
    from fleet.dashboard.events import TASK_FIELDS
    from fleet.dashboard.store import Store

    store = Store(postgres_url)
    t0 = float(int(time.time()) - 600)  # a whole second: exact through ISO text
    rows = []
    for i in range(2500):
        row = dict.fromkeys(TASK_FIELDS)
        at = t0 + i * 0.1
        row.update(uuid=f"job-0123456789ab.{i}" if i < 10 else f"task-{i}", name="t.x",
                   state="SUCCESS", state_rank=3, queue="default" if i % 5 else "io",
                   received=at, started=at + 0.01, succeeded=at + 0.05, runtime=0.04,
                   retries=0, memory_kill=False, first_seen=at, updated=at + 0.05)
        rows.append(row)
    rows[-1]["queue"] = None
    store.write(rows, [])
    store.add_decisions([
        {"at": t0 + 10, "queue": "io", "current": 0, "desired": 1, "reason": "backlog",
         "dry_run": False},
        {"at": t0 + 20, "queue": "io", "current": 1, "desired": 3, "reason": "would",
         "dry_run": True}])
    store.close()
    out = tmp_path / "pg.jsonl"
    done = export(fleet, "-o", str(out), "--since", iso(t0), database=postgres_url)
    assert done.returncode == 0, done.stderr
    assert "2499 tasks and 1 decisions" in done.stdout
    assert "1 left out: queue unknown" in done.stdout
    assert "no job ledger at" in done.stderr
    assert not (tmp_path / ".fleet").exists()
    header, tasks, replicas = read(out)
    assert header.start == pytest.approx(t0, abs=1e-3)
    assert [t.sent for t in tasks] == pytest.approx([i * 0.1 for i in range(2499)], abs=1e-3)
    assert sum(t.queue == "io" for t in tasks) == 500
    assert [(r.queue, r.current, r.desired, r.reason) for r in replicas] == [
        ("io", 0, 1, "backlog")]
    assert replicas[0].at == pytest.approx(10, abs=1e-3)
    assert not (tmp_path / "ledger.sqlite").exists()


def test_an_empty_dashboard_database_is_exit_2_not_an_empty_trace(fleet, tmp_path):
    from fleet.dashboard.store import Store

    url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    Store(url).close()
    done = export(fleet, "-o", str(tmp_path / "t.jsonl"), database=url)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "holds no tasks: nothing to export" in done.stderr
    done = export(fleet, "-o", str(tmp_path / "t.jsonl"), "--since", "1h", database=url)
    assert done.returncode == 0, done.stderr  # a window given: an empty trace of it
    header, tasks, _ = read(tmp_path / "t.jsonl")
    assert tasks == [] and header.duration == pytest.approx(3600, abs=5)
