"""The dashboard against real workers and the real Redis: events become pages and API
answers (Flower's paths included), control actions act and are audited, /metrics tells
the truth, dead workers go offline and then away, a restart keeps everything."""

from __future__ import annotations

import re
import signal

import pytest

from fleet.config import load_config
from tests.conftest import deep_merge, wait_for
from tests.integration.dashboard_util import FAST, start_dashboard

pytestmark = pytest.mark.slow


@pytest.fixture
def board(fleet, tmp_path):
    fleet.configure(deep_merge(FAST, {}))
    running = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'dash.sqlite'}")
    yield running
    running.stop()


def metric(text: str, name: str, /, **labels) -> float | None:
    """The value of one sample in Prometheus text format (None when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_task_shows_up_in_flowers_api_and_ours(fleet, board):
    worker = fleet.start_worker("default")
    result = fleet.app().send_task("tasks.aggregate.sum_by",
                                   args=[[{"key": "a", "value": 2}]], queue="default")
    assert result.get(timeout=30) == {"a": {"count": 1, "value": 2.0}}

    def stored():
        r = board.get(f"/api/task/info/{result.id}")
        return r.ok and r.json()["state"] == "SUCCESS" and r.json()

    info = wait_for(stored, 20, what="the dashboard to store the task's success")
    assert info["name"] == "tasks.aggregate.sum_by"
    assert info["worker"] == worker.hostname
    assert info["routing_key"] == "default"
    assert "'key': 'a'" in info["args"] and info["runtime"] > 0
    assert result.id in board.json("/api/tasks", params={"state": "SUCCESS"})
    assert board.json("/api/tasks", params={"state": "FAILURE"}) == {}
    assert board.json("/api/task/result/" + result.id)["result"] == {
        "a": {"count": 1, "value": 2.0}}
    assert "tasks.aggregate.sum_by" in board.json("/api/task/types")["task-types"]
    page = board.json("/api/fleet/tasks", params={"queue": "default", "search": "'key': 'a'"})
    assert [t["uuid"] for t in page["tasks"]] == [result.id]

    workers = board.json("/api/workers", params={"refresh": "true"})
    assert workers[worker.hostname]["stats"]["pool"]["max-concurrency"] == 2
    assert board.json("/api/workers", params={"status": "true"})[worker.hostname] is True

    def counted():
        w = {w["hostname"]: w for w in board.json("/api/fleet/workers")}.get(worker.hostname)
        return w and w["succeeded"] == 1 and w["status"] == "online" and w["rss"] and w
    wait_for(counted, 20, what="the worker's counters and psutil figures")

    text = board.get("/metrics").text
    assert metric(text, "celery_task_succeeded_total", name="tasks.aggregate.sum_by",
                  queue_name="default") == 1
    assert metric(text, "celery_worker_up", hostname=worker.hostname) == 1
    assert metric(text, "celery_queue_length", queue_name="default") == 0
    assert metric(text, "celery_task_runtime_count", name="tasks.aggregate.sum_by",
                  queue="default") == 1


def test_failures_are_grouped_and_the_queue_depth_counts_priorities(fleet, board):
    app = fleet.app()
    # No worker yet: messages wait, some of them on priority sub-lists.
    for priority in (0, 5, 9):
        app.send_task("tasks.aggregate.sum_by", args=["not a list"], queue="default",
                      priority=priority)
    queues = {q["name"]: q for q in board.json("/api/fleet/queues")}
    assert queues["default"]["waiting"] == 3
    assert board.json("/api/queues/length")["active_queues"][0] == {"name": "default",
                                                                    "messages": 3}
    fleet.start_worker("default")

    def grouped():
        groups = board.json("/api/fleet/failures")
        return groups and groups[0]["count"] == 3 and groups
    groups = wait_for(grouped, 30, what="three failures grouped")
    assert groups[0]["tasks"] == {"tasks.aggregate.sum_by": 3}
    failed = board.json("/api/fleet/tasks", params={"state": ["FAILURE", "RETRY"]})["tasks"]
    assert len(failed) == 3 and all(t["traceback"] for t in failed)


def test_control_actions_act_and_are_audited(fleet, board):
    worker = fleet.start_worker("default")
    name = worker.hostname
    r = board.post(f"/api/worker/pool/grow/{name}", data={"n": "1"})
    assert r.status_code == 200, r.text
    assert r.json() == {"message": f"Growing {name} worker's pool by 1"}

    def grown():
        stats = board.json("/api/workers", params={"refresh": "true", "workername": name})
        return len(stats[name]["stats"]["pool"]["processes"]) == 3
    wait_for(grown, 15, interval=0.5, what="the pool to have 3 processes")

    r = board.post(f"/api/worker/queue/cancel-consumer/{name}", params={"queue": "default"})
    assert r.status_code == 200, r.text
    queues = board.json("/api/workers", params={"refresh": "true"})[name]["active_queues"]
    assert queues == []

    # Unknown worker: Flower's 404, as JSON
    r = board.post("/api/worker/pool/grow/nobody@nowhere")
    assert r.status_code == 404 and r.json() == {"error": "Unknown worker 'nobody@nowhere'"}
    r = board.post(f"/api/worker/pool/grow/{name}", params={"n": "lots"})
    assert r.status_code == 400 and "n must be a number" in r.json()["error"]

    r = board.post("/api/fleet/queues/heavy/pause")
    assert r.status_code == 200, r.text
    queues = {q["name"]: q for q in board.json("/api/fleet/queues")}
    assert queues["heavy"]["paused"] is True
    r = board.post("/api/fleet/queues/heavy/bounds", json={"min_replicas": 1,
                                                          "max_replicas": 3})
    assert r.status_code == 200, r.text
    queues = {q["name"]: q for q in board.json("/api/fleet/queues")}
    assert (queues["heavy"]["min_replicas"], queues["heavy"]["max_replicas"]) == (1, 3)
    r = board.post("/api/fleet/queues/heavy/bounds", json={"min_replicas": 4,
                                                          "max_replicas": 3})
    assert r.status_code == 400 and "above max_replicas" in r.json()["error"]
    r = board.post("/api/fleet/queues/nope/pause")
    assert r.status_code == 404

    audit = board.json("/api/fleet/audit")
    assert [a["action"] for a in audit][:5] == [
        "autoscaler.bounds", "autoscaler.bounds", "queue.pause", "worker.cancel_consumer",
        "worker.pool_grow"]
    assert audit[0]["ok"] is False and audit[1]["ok"] is True
    assert {a["user"] for a in audit} == {"anonymous"}


def test_the_autoscaler_honours_a_pause_from_the_dashboard(fleet, board):
    """Pausing holds the queue at zero replicas in the very next decision."""
    from autoscale.backends.base import Backend
    from autoscale.loop import Autoscaler
    from fleet.keys import broker_client
    from fleet.observe.metrics import RedisMetrics

    class Fixed(Backend):
        def replicas(self):
            return {q: 2 for q in fleet.config.queues}

        def scale(self, queue, replicas, workers):
            pass

    scaler = Autoscaler(fleet.config, RedisMetrics(fleet.config, broker_client(fleet.config)),
                        Fixed())
    assert board.post("/api/fleet/queues/io/pause").status_code == 200
    decisions = {d.queue: d for d in scaler.run_once()}
    assert decisions["io"].desired == 0 and "bounds 0..0" in decisions["io"].reason
    assert decisions["io"].reason.endswith("; paused from the dashboard")
    assert board.post("/api/fleet/queues/io/resume").status_code == 200
    assert {d.queue: d for d in scaler.run_once()}["io"].desired == 2


def test_a_killed_worker_goes_offline_then_leaves_pages_and_metrics(fleet, board):
    worker = fleet.start_worker("default")
    wait_for(lambda: board.json("/api/workers", params={"status": "true"}).get(
        worker.hostname), 20, what="the worker to show up")
    worker.signal(signal.SIGKILL)  # the whole process group: main process and pool

    def offline():
        w = {w["hostname"]: w for w in board.json("/api/fleet/workers")}.get(worker.hostname)
        return w and w["status"] == "offline"
    wait_for(offline, 30, what="the killed worker to be shown offline")
    assert metric(board.get("/metrics").text, "celery_worker_up",
                  hostname=worker.hostname) == 0

    def purged():
        names = {w["hostname"] for w in board.json("/api/fleet/workers")}
        return worker.hostname not in names
    wait_for(purged, 30, what="the offline worker to be purged")
    assert metric(board.get("/metrics").text, "celery_worker_up",
                  hostname=worker.hostname) is None
    assert worker.hostname not in board.json("/api/workers")


def test_state_survives_a_dashboard_restart(fleet, tmp_path):
    fleet.configure(FAST)
    url = f"sqlite:///{tmp_path / 'dash.sqlite'}"
    first = start_dashboard(fleet.config, url)
    try:
        fleet.start_worker("default")
        result = fleet.app().send_task("tasks.aggregate.sum_by", args=[[]], queue="default")
        result.get(timeout=30)
        wait_for(lambda: first.get(f"/api/task/info/{result.id}").ok, 20,
                 what="the task to be stored")
    finally:
        first.stop()
    second = start_dashboard(fleet.config, url)
    try:
        assert second.json(f"/api/task/info/{result.id}")["state"] == "SUCCESS"
    finally:
        second.stop()


def test_broker_down_gives_clear_errors_not_tracebacks(fleet, tmp_path):
    from tests.conftest import free_port

    dead = load_config(fleet.config_path, broker_url=f"redis://127.0.0.1:{free_port()}/0",
                       key_prefix=fleet.prefix)
    board = start_dashboard(dead, f"sqlite:///{tmp_path / 'dash.sqlite'}")
    try:
        r = board.get("/api/fleet/queues")
        assert r.status_code == 503
        assert "the broker (Redis) is unreachable" in r.json()["error"]
        overview = board.json("/api/fleet/overview")
        assert overview["events_connected"] is False
    finally:
        board.stop()


def test_jobs_page_retry_and_revoke(fleet, board, tmp_path):
    import json

    from fleet.jobs.submit import JobSpec, submit

    data = tmp_path / "in.jsonl"
    rows = [{"region": "n", "amount": 1}] * 25 + [{"amount": 1}] + [{"region": "s"}] * 4
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    app = fleet.app()
    fleet.start_worker("default")
    job = submit(app, JobSpec(task="tasks.aggregate.sum_by", input=str(data), chunk_size=10,
                              kwargs={"group_by": "region", "fields": ["amount"]}))

    def settled():
        jobs = {j["id"]: j for j in board.json("/api/fleet/jobs")}
        j = jobs.get(job.job_id)
        return j and j["done"] == 2 and j["failed"] == 1 and j
    wait_for(settled, 30, what="the job to show 2 chunks done and 1 failed")
    chunks = {f"{job.job_id}.{i}" for i in range(3)}

    def with_tasks():
        detail = board.json(f"/api/fleet/jobs/{job.job_id}")
        ended = {t["uuid"] for t in detail["tasks"] if t["state"] in ("SUCCESS", "FAILURE")}
        return ended == chunks and detail
    detail = wait_for(with_tasks, 15, what="the job's chunk tasks to be stored")
    assert [c["index"] for c in detail["failed_chunks"]] == [2]
    assert "has no field 'region'" in detail["failed_chunks"][0]["error"]

    r = board.post(f"/api/fleet/jobs/{job.job_id}/retry")
    assert r.status_code == 200 and r.json() == {"message": f"{job.job_id}: 1 chunks sent again"}

    # a job nobody serves yet: revoking it ends it and says who did
    idle = submit(app, JobSpec(task="tasks.io.fetch", input=str(data), chunk_size=10))
    r = board.post(f"/api/fleet/jobs/{idle.job_id}/revoke")
    assert r.status_code == 200 and r.json()["message"] == f"{idle.job_id}: revoked 4 tasks"
    status = board.json(f"/api/fleet/jobs/{idle.job_id}")
    assert (status["state"], status["error"]) == ("failed", "revoked by anonymous")

    r = board.post("/api/fleet/jobs/job-000000000000/retry")
    assert r.status_code == 404 and "job-000000000000" in r.json()["error"]
    actions = [(a["action"], a["ok"]) for a in board.json("/api/fleet/audit")]
    assert actions[:3] == [("job.retry", False), ("job.revoke", True), ("job.retry", True)]


def test_the_broker_page_shows_rabbitmq_queues_too(fleet, tmp_path):
    """The machine's RabbitMQ (guest/guest): queues this test declares and fills, one
    that does not exist, and an unreachable RabbitMQ, all answered, none a 5xx."""
    import kombu

    url = "amqp://guest:guest@127.0.0.1:5672//"
    names = [f"{fleet.prefix.rstrip(':')}-rq{i}" for i in range(3)]
    with kombu.Connection(url, connect_timeout=5) as conn:
        channel = conn.channel()
        for i, name in enumerate(names[:2]):
            channel.queue_declare(queue=name, auto_delete=False)
            for _ in range(i + 2):
                channel.basic_publish(channel.prepare_message(b"x"), routing_key=name)
    try:
        fleet.configure(deep_merge(FAST, {"dashboard": {"rabbitmq": {
            "url": url, "queues": names}}}))
        board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}")
        try:
            rabbit = wait_for(lambda: (lambda r: r["queues"][1]["messages"] == 3 and r)(
                board.json("/api/fleet/broker")["rabbitmq"]), 10, interval=0.3,
                what="RabbitMQ's counts")
            assert rabbit["url"] == "amqp://guest:***@127.0.0.1:5672//"
            assert [(q["name"], q["messages"], q["exists"]) for q in rabbit["queues"]] == [
                (names[0], 2, True), (names[1], 3, True), (names[2], None, False)]
        finally:
            board.stop()
        fleet.configure(deep_merge(FAST, {"dashboard": {"rabbitmq": {
            "url": "amqp://guest:guest@127.0.0.1:1//"}}}))
        board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd2.sqlite'}")
        try:
            rabbit = board.json("/api/fleet/broker")["rabbitmq"]
            assert rabbit["queues"] == [] and "RabbitMQ unreachable" in rabbit["error"]
        finally:
            board.stop()
    finally:
        with kombu.Connection(url, connect_timeout=5) as conn:
            channel = conn.channel()
            for name in names[:2]:
                channel.queue_delete(queue=name)
