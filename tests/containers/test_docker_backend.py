"""The docker backend (autoscale/backends/docker.py) on a real engine (issue 12 item 3).

Real containers of the fleet image built from this tree, real workers in them on the
host network, the test Redis under the test's own key prefix. Each test's backend
labels its containers with the test's fleet id (the key prefix), so a test sees and
removes only its own.
"""

from __future__ import annotations

import collections
import contextlib
import json
import subprocess
import sys
import threading
import time

import docker
import pytest

from autoscale.backends.base import BackendError
from autoscale.backends.docker import LABEL_FLEET, DockerBackend
from autoscale.loop import Autoscaler
from fleet.eventlog import EVENT_FIELD, events_in
from fleet.keys import broker_client, events_stream_key, latest_decisions_key
from fleet.observe.metrics import RedisMetrics
from tests.conftest import REDIS_URL, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

FAST = {"autoscaler": {"worker_metrics_interval": "1s"},
        "broker": {"visibility_timeout": "10s", "lease": {"interval": "2s"}},
        "queues": {"heavy": {"time_limit": {"soft": "20s", "hard": "25s"}}}}


@pytest.fixture
def backends(docker_engine, docker_client, fleet):
    made: list[DockerBackend] = []

    def make(overrides: dict | None = None, env: dict | None = None, **options):
        fleet.configure({**FAST, **(overrides or {}),
                         "autoscaler": {**FAST["autoscaler"],
                                        "docker": {"image": docker_engine.image},
                                        **(overrides or {}).get("autoscaler", {})}})
        options.setdefault("client_factory", docker_engine.client)
        backend = DockerBackend(
            fleet.config, config_path=str(fleet.config_path),
            env=env or {"FLEET_BROKER_URL": REDIS_URL, "FLEET_KEY_PREFIX": fleet.prefix,
                        "FLEET_LEDGER_URL": "sqlite:////tmp/ledger.sqlite"}, **options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()
    for c in ours(docker_client, fleet, all=True):
        with contextlib.suppress(docker.errors.NotFound):
            c.remove(force=True)


def ours(docker_client, fleet, all: bool = False) -> list:
    """The test's containers, inspected; one removed meanwhile (a backend's stop thread
    removes what it stopped) is left out, not an error."""
    found = []
    for c in docker_client.containers.list(
            all=all, sparse=True,
            filters={"label": f"{LABEL_FLEET}={fleet.prefix.rstrip(':')}"}):
        with contextlib.suppress(docker.errors.NotFound):
            found.append(docker_client.containers.get(c.id))
    return found


@contextlib.contextmanager
def looping(fleet, backend):
    """The real autoscaler loop over ``backend`` on a thread; yields what it reports."""
    said: list[str] = []
    scaler = Autoscaler(fleet.config, RedisMetrics(fleet.config, broker_client(fleet.config)),
                        backend, report=said.append)
    stop = threading.Event()
    loop = threading.Thread(target=scaler.run, args=(stop,), daemon=True)
    loop.start()
    try:
        yield said
    finally:
        stop.set()
        loop.join(30)


def workers(fleet, queue: str = "heavy"):
    return RedisMetrics(fleet.config, broker_client(fleet.config)).poll().workers_of(queue)


def started(fleet, ids: list[str], timeout: float = 60) -> collections.Counter:
    """How many times each task of ``ids`` started, counted from the task-started
    events the workers in the containers sent (the fleet's event stream): executions,
    not results. Waits until every one has started at least once (a worker sends its
    task events in groups, a moment later)."""
    client = broker_client(fleet.config)
    key, want = events_stream_key(fleet.config), set(ids)

    def count() -> collections.Counter:
        seen = collections.Counter()
        for _, fields in client.xrange(key):
            raw = fields.get(EVENT_FIELD.encode())
            for e in events_in(json.loads(raw)) if raw else ():
                if e.get("type") == "task-started" and e.get("uuid") in want:
                    seen[e["uuid"]] += 1
        return seen

    wait_for(lambda: set(count()) == want, timeout, interval=0.5,
             what=f"a task-started event for each of {len(want)} tasks")
    return count()


def reporting(fleet, n: int, queue: str = "heavy", timeout: float = 60):
    return wait_for(lambda: len(ws := workers(fleet, queue)) == n and ws, timeout,
                    interval=0.5, what=f"{n} {queue} worker(s) reporting")


def test_scale_up_adopt_and_scale_down_idle_first(fleet, backends, docker_client):
    backend = backends()
    backend.scale("heavy", 2, [])
    assert backend.replicas()["heavy"] == 2
    reported = reporting(fleet, 2)
    names = {c.name for c in ours(docker_client, fleet)}
    assert {w.hostname.split("@")[0] for w in reported} == names
    app = fleet.app()
    results = [app.send_task("tasks.heavy.sleep", kwargs={"seconds": 0.2, "tag": str(i)})
               for i in range(6)]
    assert sorted(r.get(timeout=60)["tag"] for r in results) == [str(i) for i in range(6)]

    # A restarted autoscaler adopts what runs instead of starting twins.
    again = backends()
    assert again.replicas()["heavy"] == 2
    assert len(ours(docker_client, fleet)) == 2

    # The workers' own counts settle after the results are in (a report is up to one
    # worker_metrics_interval old).
    wait_for(lambda: sum(w.processed for w in workers(fleet)) == 6
             and not any(w.active for w in workers(fleet)), 30, interval=0.3,
             what="both workers' reports to show the six done")
    long = app.send_task("tasks.heavy.sleep", kwargs={"seconds": 8, "tag": "long"})
    busy = wait_for(lambda: [w for w in workers(fleet) if w.active], 30, interval=0.3,
                    what="a worker busy with the long task")
    again.scale("heavy", 1, workers(fleet))
    wait_for(lambda: len(ours(docker_client, fleet)) == 1, 60, what="the idle one to stop")
    (left,) = ours(docker_client, fleet)
    assert f"{left.name}@" in busy[0].hostname + "@"  # the busy one was spared
    assert long.get(timeout=30)["tag"] == "long"
    again.stop_all()
    assert ours(docker_client, fleet) == []


def test_a_killed_container_is_replaced_and_said_so(fleet, backends, docker_client):
    backend = backends(quick_exit=0)
    backend.scale("heavy", 1, [])
    (first,) = ours(docker_client, fleet)
    first.kill()  # SIGKILL of the worker itself
    wait_for(lambda: first.id not in {c.id for c in ours(docker_client, fleet)}, 30)
    assert backend.replicas()["heavy"] == 1
    notes = backend.notices()["heavy"]
    assert any(f"container {first.name} exited (code 137) without being asked: replaced"
               in n for n in notes), notes
    (second,) = ours(docker_client, fleet)
    assert second.id != first.id
    assert backend.restarts == 1
    assert backend.notices() == {}  # each said once


def test_an_oom_killed_container_is_named_and_not_restarted_in_a_loop(fleet, backends,
                                                                      docker_client,
                                                                      redis_client, tmp_path):
    """A limit the worker itself cannot start in: the engine OOM-kills PID 1. The loop
    says so, and so does the queue's decision, as the dashboard's Autoscaler page gets it
    (the sampler's ``latest``, what /api/fleet/autoscaler returns)."""
    from fleet.dashboard.sampler import Sampler
    from fleet.dashboard.store import Store

    backend = backends({"queues": {"default": {"autoscaling": {"min_replicas": 0}},
                                   "io": {"kubernetes": {"resources": {
                                       "requests": {"memory": "24Mi"},
                                       "limits": {"memory": "24Mi"}}}}}})
    said: list[str] = []
    scaler = Autoscaler(fleet.config, RedisMetrics(fleet.config, broker_client(fleet.config)),
                        backend, report=said.append)
    backend.scale("io", 1, [])
    wait_for(lambda: not ours(docker_client, fleet), 60, interval=0.5,
             what="the container to be OOM-killed")
    (decision,) = [d for d in scaler.run_once() if d.queue == "io"]
    assert "was OOM-killed by the engine" in decision.reason, decision
    assert "within 10s of its start" in decision.reason, decision
    assert any(line.startswith("io: container ") and "OOM-killed" in line for line in said)
    latest = redis_client.hget(latest_decisions_key(fleet.config), "io")
    assert b"OOM-killed by the engine" in latest
    sampler = Sampler(fleet.config, redis_client, Store(f"sqlite:///{tmp_path}/dash.sqlite"))
    shown = sampler.poll().replicas["io"]
    assert "was OOM-killed by the engine" in shown["reason"], shown
    with pytest.raises(BackendError, match="not starting a io container for"):
        backend.scale("io", 1, [])
    assert ours(docker_client, fleet) == []


def test_a_container_that_exits_at_once_says_why(fleet, backends, docker_client):
    backend = backends(env={"FLEET_BROKER_URL": "not-a-url", "FLEET_KEY_PREFIX": fleet.prefix})
    backend.scale("heavy", 1, [])
    wait_for(lambda: backend.replicas()["heavy"] == 0, 60, interval=0.5,
             what="the container to exit")
    (note,) = backend.notices()["heavy"]
    assert "exited (code 2) without being asked within 10s of its start" in note, note
    assert "FLEET_BROKER_URL" in note, note  # the worker's own last line, not a guess
    with pytest.raises(BackendError, match=r"not starting a heavy container"):
        backend.scale("heavy", 1, [])


def test_no_engine_and_a_missing_image_are_clear(fleet, backends):
    gone = backends({"autoscaler": {"docker": {"host": "unix:///nonexistent/docker.sock"}}},
                    client_factory=None)
    with pytest.raises(BackendError, match="no Docker engine answers at unix:///nonexistent"):
        gone.replicas()
    missing = backends({"autoscaler": {"docker": {"image": "fleet:not-built-here"}}})
    with pytest.raises(BackendError, match=r"'fleet:not-built-here' is not on the Docker "
                                           r"engine.*docker build -f k8s/Dockerfile"):
        missing.scale("heavy", 1, [])


def test_a_burst_starts_containers_within_two_polls_and_they_go_after_it(fleet, backends,
                                                                       docker_client):
    """End to end: the real loop over the docker backend. 20 tasks land at once; the
    containers start within two polls, the backlog drains, every task ran once (each
    tag comes back once, and each started once by the workers' own task-started
    events), and the containers go after the stabilization window."""
    backend = backends({"autoscaler": {"interval": "1s"}, "queues": {
        "default": {"autoscaling": {"min_replicas": 0}}, "heavy": {
        "time_limit": {"soft": "20s", "hard": "25s"},
        "autoscaling": {"min_replicas": 0, "max_replicas": 3, "target_wait": "2s",
                        "scale_down_stabilization": "5s", "cooldown": "3s"}}}})
    with looping(fleet, backend) as said:
        time.sleep(2)
        app = fleet.app()
        sent = time.monotonic()
        results = [app.send_task("tasks.heavy.sleep", kwargs={"seconds": 0.5, "tag": str(i)})
                   for i in range(20)]
        wait_for(lambda: ours(docker_client, fleet), 10, interval=0.1,
                 what="a container for the burst")
        assert time.monotonic() - sent <= 2 * 1.0 + 1.0  # two polls, and the start call
        tags = sorted(int(r.get(timeout=120)["tag"]) for r in results)
        assert tags == list(range(20))
        runs = started(fleet, [r.id for r in results])
        assert sorted(runs.values()) == [1] * 20, runs  # ran once each, none twice
        try:
            wait_for(lambda: not ours(docker_client, fleet), 60, interval=1,
                     what="the containers to go after the burst")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n" + "\n".join(said[-30:])) from None


def test_fleet_autoscale_dry_run_says_what_it_would_start(fleet, docker_engine, docker_client):
    fleet.configure({**FAST, "autoscaler": {**FAST["autoscaler"],
                                            "docker": {"image": docker_engine.image}}})
    app = fleet.app()
    for _ in range(3):
        app.send_task("tasks.heavy.sleep", kwargs={"seconds": 0})
    env = {**fleet.env, "DOCKER_HOST": docker_engine.host}
    run = subprocess.run([sys.executable, "-m", "fleet.cli", "autoscale", "--backend", "docker",
                          "--once", "--dry-run", "--config", str(fleet.config_path)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "would scale heavy: 0 -> " in run.stdout, run.stdout
    fleet_id = fleet.prefix.rstrip(":")
    assert f"start container fleet-{fleet_id}-heavy-1 from {docker_engine.image} " \
           f"(--memory {1536 << 20})" in run.stdout, run.stdout
    assert ours(docker_client, fleet) == []


def test_fleet_autoscale_goes_on_while_no_engine_answers(fleet, tmp_path):
    env = {**fleet.env, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "autoscale", "--backend",
                             "docker", "--interval", "0.5", "--config", str(fleet.config_path),
                             "--workdir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        time.sleep(6)
        assert proc.poll() is None  # still looping
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "no Docker engine answers at unix:///nonexistent/docker.sock" in out or \
        "Docker engine at unix:///nonexistent/docker.sock" in out, out
    assert "Traceback" not in out, out


def test_containers_of_an_older_config_are_replaced_not_adopted(fleet, backends,
                                                                docker_client):
    first = backends()
    first.scale("heavy", 1, [])
    (old,) = ours(docker_client, fleet)
    # queues.yaml edited (a longer hard limit): the next autoscaler's config differs.
    edited = backends({"queues": {"heavy": {"time_limit": {"soft": "21s", "hard": "26s"}}}})
    assert edited.replicas()["heavy"] == 0  # not adopted: it is being stopped, warm
    try:
        wait_for(lambda: old.id not in {c.id for c in ours(docker_client, fleet)}, 60,
                 what="the older config's container to stop")
    except AssertionError as exc:
        old.reload()
        raise AssertionError(f"{exc}: {edited.draining} {old.status}\n"
                             f"{old.logs(tail=20).decode()}") from None
    edited.scale("heavy", 1, [])
    (new,) = ours(docker_client, fleet)
    assert new.labels["fleet.io/config-hash"] != old.labels["fleet.io/config-hash"]


def test_a_scale_down_during_long_tasks_lets_them_finish(fleet, backends, docker_client):
    """End to end: the loop holds two heavy containers, each running an 8 s task; the
    operator lowers max_replicas to 1 (the dashboard's bounds); one busy container is
    stopped warm (docker stop -t <grace>), finishes its task and exits 0. Both tasks
    come back once, none is lost."""
    from fleet.observe import overrides

    backend = backends({"autoscaler": {"interval": "1s"}, "queues": {
        "default": {"autoscaling": {"min_replicas": 0}},
        "heavy": {"time_limit": {"soft": "20s", "hard": "25s"},
                  "autoscaling": {"min_replicas": 2, "max_replicas": 2}}}})
    client = broker_client(fleet.config)
    with looping(fleet, backend):
        reporting(fleet, 2)
        app = fleet.app()
        results = [app.send_task("tasks.heavy.sleep", kwargs={"seconds": 8, "tag": t})
                   for t in ("a", "b")]
        wait_for(lambda: sum(w.active for w in workers(fleet)) == 2, 30, interval=0.3,
                 what="both containers busy")
        before = {c.id: c for c in ours(docker_client, fleet)}
        overrides.write(client, fleet.config, "heavy",
                        overrides.Override(min_replicas=0, max_replicas=1))
        wait_for(lambda: len(ours(docker_client, fleet)) == 1, 60, interval=0.5,
                 what="one container stopped, warm")
        assert sorted(r.get(timeout=30)["tag"] for r in results) == ["a", "b"]
        runs = started(fleet, [r.id for r in results])
        assert sorted(runs.values()) == [1, 1], runs  # the stopped one did not run twice
        (kept,) = ours(docker_client, fleet)
        (gone,) = [c for cid, c in before.items() if cid != kept.id]
        # Warm: it exited by itself after its task (0), not by SIGKILL at the grace (137).
        wait_for(lambda: gone.name in backend.stopped, 30, what="the stop to end")
        assert backend.stopped[gone.name] == 0, backend.stopped


def test_a_container_oom_killed_mid_task_is_replaced_and_the_task_ends_counted(
        fleet, backends, docker_client):
    """End to end: a task that outgrows the container in its main process (``io``'s
    threads pool runs tasks there), so the engine OOM-kills the whole container. The loop
    replaces the container; the message comes back once its lease lapses and kills the
    next one; the delivery count stops it at the queue's max_deliveries: dead-lettered,
    failed with a clear reason, not a loop. Counted: kills, deliveries, the outcome."""
    from celery.result import AsyncResult

    from fleet.deadletter import DeadLetterList

    backend = backends({"autoscaler": {"interval": "1s"}, "queues": {
        "default": {"autoscaling": {"min_replicas": 0}},
        "io": {"max_deliveries": 2, "concurrency": 2,
               "kubernetes": {"resources": {"requests": {"memory": "256Mi"},
                                            "limits": {"memory": "256Mi"}}},
               "autoscaling": {"min_replicas": 1, "max_replicas": 1}}}}, quick_exit=2)
    with looping(fleet, backend) as said:
        reporting(fleet, 1, "io")
        app = fleet.app()
        result = app.send_task("tasks.heavy.grow", kwargs={"target_mb": 600}, queue="io")
        dead = DeadLetterList.for_config(fleet.config)
        try:
            wait_for(lambda: dead.counts(["io"])["io"] == 1, 120, interval=1,
                     what="the message to be dead-lettered")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n" + "\n".join(said[-20:])) from None
        kills = [line for line in said
                 if line.startswith("io: container ") and "was OOM-killed by the engine" in line]
        assert 1 <= len(kills) <= 2, said  # one per delivery the queue allows, no more
        assert AsyncResult(result.id, app=app).state == "FAILURE"
        (entry,) = dead.entries("io")
        assert entry.task_id == result.id
        reporting(fleet, 1, "io")  # and the queue has its replica again
