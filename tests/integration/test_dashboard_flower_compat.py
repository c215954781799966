"""Scripts written against Flower keep working: the same Flower API calls, against Flower
and against the dashboard, on the same broker, workers and tasks, give the same shapes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from tests.conftest import ROOT, free_port, wait_for
from tests.integration.dashboard_util import FAST, start_dashboard

pytestmark = pytest.mark.slow
pytest.importorskip("flower", reason="flower is in the dev extra")


def shape(value):
    """Keys and value types, recursively (None matches anything: a field not set yet)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return None if value is None else type(value).__name__


def same_shape(flower, ours, where="") -> list[str]:
    """Differences where ours lacks what Flower has, or types differ."""
    problems = []
    if isinstance(flower, dict):
        if not isinstance(ours, dict):
            return [f"{where}: Flower has an object, we have {ours!r}"]
        for key, value in flower.items():
            if key not in ours:
                problems.append(f"{where}.{key}: missing")
            else:
                problems += same_shape(value, ours[key], f"{where}.{key}")
    elif isinstance(flower, list):
        if not isinstance(ours, list):
            problems.append(f"{where}: Flower has a list, we have {ours!r}")
        elif flower and ours:
            problems += same_shape(flower[0], ours[0], f"{where}[0]")
    elif flower is not None and ours is not None and flower != ours:
        problems.append(f"{where}: Flower {flower}, ours {ours}")
    return problems


@pytest.fixture
def flower(fleet):
    port = free_port()
    env = {**fleet.env, "FLEET_CONFIG": str(fleet.config_path),
           "FLOWER_UNAUTHENTICATED_API": "true"}
    log = fleet.tmp_path / "flower.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "fleet.app", "flower", f"--port={port}",
             "--address=127.0.0.1"], cwd=ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            return requests.get(base + "/healthcheck", timeout=2).ok
        except requests.ConnectionError:
            return False
    wait_for(up, 60, what="Flower to answer")
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_flowers_api_calls_answer_alike(fleet, tmp_path, flower):
    fleet.configure(FAST)
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}")
    try:
        worker = fleet.start_worker("default")
        name = worker.hostname
        ours = board.base
        r = requests.post(f"{ours}/api/task/async-apply/tasks.aggregate.sum_by",
                          json={"args": [[{"key": "k"}]]}, timeout=10)
        f = requests.post(f"{flower}/api/task/async-apply/tasks.aggregate.sum_by",
                          json={"args": [[{"key": "k"}]]}, timeout=10)
        assert r.status_code == f.status_code == 200, (r.text, f.text)
        assert set(f.json()) <= set(r.json())
        task_id = f.json()["task-id"]

        def both_know():
            a = requests.get(f"{flower}/api/task/info/{task_id}", timeout=5)
            b = requests.get(f"{ours}/api/task/info/{task_id}", timeout=5)
            done = (a.ok and b.ok and a.json()["state"] == "SUCCESS"
                    and b.json()["state"] == "SUCCESS")
            return done and (a.json(), b.json())
        f_info, o_info = wait_for(both_know, 30, interval=0.5,
                                  what="Flower and the dashboard to see the task succeed")
        assert same_shape(shape(f_info), shape(o_info)) == []
        for key in ("uuid", "name", "state", "worker", "args", "kwargs", "result"):
            assert f_info[key] == o_info[key], key

        calls = [
            ("GET", "/api/workers", {"refresh": "true"}),
            ("GET", "/api/workers", {"status": "true"}),
            ("GET", "/api/tasks", {"limit": "10"}),
            ("GET", "/api/tasks", {"state": "SUCCESS", "workername": name}),
            ("GET", "/api/task/types", {}),
            ("GET", f"/api/task/result/{task_id}", {}),
            ("GET", "/api/queues/length", {}),
            ("POST", f"/api/worker/pool/grow/{name}", {"n": "1"}),
            ("POST", f"/api/worker/pool/shrink/{name}", {"n": "1"}),
            ("POST", f"/api/worker/queue/add-consumer/{name}", {"queue": "io"}),
            ("POST", f"/api/worker/queue/cancel-consumer/{name}", {"queue": "io"}),
            ("POST", "/api/task/rate-limit/tasks.aggregate.sum_by",
             {"workername": name, "ratelimit": "100/m"}),
            ("POST", "/api/task/timeout/tasks.aggregate.sum_by",
             {"workername": name, "soft": "50", "hard": "60"}),
            ("POST", f"/api/task/revoke/{task_id}", {"terminate": "false"}),
        ]
        problems = []
        for method, path, params in calls:
            answers = []
            for base in (flower, ours):
                if method == "GET":
                    reply = requests.get(base + path, params=params, timeout=15)
                else:
                    reply = requests.post(base + path, data=params, timeout=15)
                answers.append(reply)
            a, b = answers
            if a.status_code != b.status_code:
                problems.append(f"{method} {path}: Flower {a.status_code}, ours {b.status_code}"
                                f" ({b.text[:200]})")
                continue
            problems += same_shape(shape(a.json()), shape(b.json()), f"{method} {path}")
        assert problems == []
    finally:
        board.stop()


def test_worker_lists_have_flowers_keys_and_types(fleet, tmp_path, flower):
    """Flower's /workers?json=1 items (event counts by type, celery's Worker fields,
    status) and /api/workers in each of its modes: the same keys and value types from
    both, on one live worker; the counts grow as a task runs."""
    fleet.configure(FAST)
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}")
    try:
        worker = fleet.start_worker("default")
        name = worker.hostname
        both = (flower, board.base)

        def items(params=None) -> list:
            out = []
            for base in both:
                reply = requests.get(f"{base}/workers", params=params or {"json": "1"},
                                     timeout=15)
                assert reply.status_code == 200, (base, reply.text)
                assert list(reply.json()) == ["data"]
                out.append({w["hostname"]: w for w in reply.json()["data"]}.get(name))
            return out

        def heard():
            got = items()
            return all(w and "worker-heartbeat" in w for w in got) and got
        before = wait_for(heard, 30, interval=0.5, what="both to hear the worker's heartbeat")
        result = fleet.app().send_task("tasks.aggregate.sum_by", args=[[{"key": "k"}]])
        assert result.get(timeout=30) == {"k": {"count": 1, "value": 0.0}}

        def counted():
            got = items()
            kinds = ("task-received", "task-started", "task-succeeded")
            return all(w.get(k, 0) == b.get(k, 0) + 1
                       for w, b in zip(got, before, strict=True) for k in kinds) and got
        f, o = wait_for(counted, 30, interval=0.5, what="both to count the task's events")
        assert sorted(f) == sorted(o)
        assert same_shape(shape(f), shape(o)) == [] and same_shape(shape(o), shape(f)) == []
        assert {k for k in o if "-" in k} >= {"worker-online", "worker-heartbeat",
                                              "task-received", "task-started",
                                              "task-succeeded"}
        assert o["status"] is True and o["hostname"] == name
        assert type(o["clock"]) is int and type(o["pid"]) is int
        assert 1 <= len(o["heartbeats"]) <= 4 and all(type(t) is float
                                                      for t in o["heartbeats"])
        assert o["heartbeats"] == sorted(o["heartbeats"])
        assert len(o["loadavg"]) == 3 and o["sw_ident"] == f["sw_ident"] == "py-celery"
        assert (o["freq"], o["processed"]) == (f["freq"], f["processed"])
        f_again, o_again = items({"json": "1", "refresh": "1"})
        assert sorted(f_again) == sorted(o_again) == sorted(o)

        # /api/workers: the same sequence to both (each keeps an inspect cache, Flower's
        # way: the task lists only once the worker was refreshed on its own).
        without_tasks = {"stats", "active_queues", "registered", "conf", "timestamp"}
        every = without_tasks | {"scheduled", "active", "reserved", "revoked"}
        for params, keys in (({"refresh": "1"}, without_tasks), ({}, without_tasks),
                             ({"workername": name}, without_tasks),
                             ({"refresh": "1", "workername": name}, every), ({}, every),
                             ({"workername": name}, every)):
            f, o = (requests.get(f"{base}/api/workers", params=params, timeout=15)
                    for base in both)
            assert f.status_code == o.status_code == 200, (params, f.text, o.text)
            f, o = f.json(), o.json()
            assert set(f) == set(o) == {name}, params
            assert set(f[name]) == set(o[name]) == keys, params
            assert set(f[name]["stats"]) == set(o[name]["stats"]), params
            f_types = {k: type(v).__name__ for k, v in f[name].items()}
            assert f_types == {k: type(v).__name__ for k, v in o[name].items()}, params
        status = [requests.get(f"{base}/api/workers", params={"status": "1"}, timeout=15)
                  for base in both]
        assert status[0].json() == status[1].json() == {name: True}
        unknown = [requests.get(f"{base}/api/workers", params={"workername": "no@body"},
                                timeout=15) for base in both]
        assert [r.status_code for r in unknown] == [404, 404]
        # Without json Flower renders its page; the dashboard sends the browser to its own
        page = requests.get(f"{board.base}/workers", allow_redirects=False, timeout=15)
        assert page.status_code == 303 and page.headers["location"] == "/#/workers"
    finally:
        board.stop()
