"""The worker image run as Kubernetes would run it (issue 12 item 2), on a real engine.

Each test starts a queue's pod from the manifest ``fleet render k8s`` writes
(tests/containers/pod.py): the manifest's command, env, config mount, securityContext
and ``resources.limits`` as ``--memory``/``--cpus``; the probes are the manifest's exec
probes run inside the container. The fleet's Redis is the test Redis on the host
network, under the test's own key prefix.

The engine here is cgroup v1, so the kernel OOM kills below are counted by v1's
``memory.oom_control``; v2's ``memory.events`` is covered from files
(tests/unit/test_cgroup.py).
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from celery.result import AsyncResult

from fleet.keys import list_keys
from tests.conftest import REDIS_URL, wait_for
from tests.containers.pod import Pod, run_pod
from tests.fakes.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

#: Short time limits, so the manifest's grace period (hard limit + 30 s) is short too,
#: and a quick worker report, so a frozen worker's goes stale within the test.
HEAVY = {"time_limit": {"soft": "20s", "hard": "25s"}}
FAST = {"autoscaler": {"worker_metrics_interval": "1s"},
        "broker": {"visibility_timeout": "10s", "lease": {"interval": "2s"}}}


@pytest.fixture
def pods(docker_engine, docker_client, fleet):
    started: list[Pod] = []

    def start(queue: str = "heavy", **options) -> Pod:
        pod = run_pod(docker_client, docker_engine.image, fleet.config, fleet.config_path,
                      queue, prefix=fleet.prefix, **options)
        started.append(pod)
        wait_for(lambda: pod.probe("startup")[0], 90, interval=1,
                 what=f"the {queue} pod's startup probe to pass\n{pod.logs()[-2000:]}")
        return pod

    yield start
    for pod in started:
        pod.remove()


def oom_kills_in(pod: Pod) -> int:
    code, out = pod.container.exec_run(
        ["python3", "-c", "from fleet.cgroup import oom_kills; print(oom_kills())"])
    assert code == 0, out
    return int(out.split()[-1])


def test_probes_pass_on_a_healthy_worker_and_fail_on_a_frozen_one(fleet, pods):
    fleet.configure({**FAST, "queues": {"heavy": HEAVY}})
    pod = pods("heavy")
    for kind in ("readiness", "liveness"):
        passed, out = pod.probe(kind)
        assert passed, (kind, out)
    main = pod.main_pid()
    os.kill(main, signal.SIGSTOP)  # the worker hangs: no report, no event loop
    try:
        began = time.monotonic()
        wait_for(lambda: not pod.probe("readiness")[0], 60, interval=2,
                 what="readiness to fail on the frozen worker")
        # Readiness allows reports 30 s old, liveness 60 s: each fails after its own age.
        assert time.monotonic() - began > 25
        passed, out = pod.probe("readiness")
        # The report or the event loop's stamp, whichever was found older first.
        assert re.search(r"last (reported|ran) \d+s ago", out), out
        assert pod.probe("liveness")[0]
        wait_for(lambda: not pod.probe("liveness")[0], 60, interval=2,
                 what="liveness to fail on the frozen worker")
    finally:
        os.kill(main, signal.SIGCONT)
    wait_for(lambda: pod.probe("readiness")[0], 20, interval=1,
             what="readiness to pass again once the worker runs")


def test_readiness_fails_and_liveness_holds_while_the_broker_is_unreachable(fleet, pods):
    host, port = REDIS_URL.removeprefix("redis://").split("/")[0].split(":")
    proxy = TcpProxy((host, int(port)))
    try:
        db = REDIS_URL.rsplit("/", 1)[1]
        fleet.configure({**FAST, "broker": {**FAST["broker"],
                                            "url": f"redis://127.0.0.1:{proxy.port}/{db}"},
                         "queues": {"heavy": HEAVY}})
        pod = pods("heavy")
        assert pod.probe("readiness")[0]
        proxy.cut()
        passed, out = pod.probe("readiness")
        assert not passed
        assert "Redis" in out or "broker" in out, out
        # Liveness reads the container's own health file: the outage restarts nothing.
        wait_for(lambda: "broker unreachable" in pod.probe("liveness")[1], 30, interval=1,
                 what="the worker's health file to record the outage")
        passed, out = pod.probe("liveness")
        assert passed, out
        proxy.mend()
        wait_for(lambda: pod.probe("readiness")[0], 60, interval=1,
                 what="readiness to pass once the broker is back")
    finally:
        proxy.close()


def test_docker_stop_with_the_manifests_grace_lets_a_long_task_finish(fleet, pods):
    fleet.configure({**FAST, "queues": {"heavy": HEAVY}})
    pod = pods("heavy")
    assert pod.grace > 25  # the manifest's: above the hard limit
    app = fleet.app()
    result = app.send_task("tasks.heavy.sleep", kwargs={"seconds": 8, "tag": "grace"})
    wait_for(lambda: "Task tasks.heavy.sleep" in pod.logs() and "received" in pod.logs(), 30,
             what="the pod to receive the task")
    time.sleep(1)
    began = time.monotonic()
    pod.container.stop(timeout=pod.grace)  # SIGTERM, then SIGKILL after the grace
    took = time.monotonic() - began
    pod.container.reload()
    assert pod.container.attrs["State"]["ExitCode"] == 0, pod.logs()[-3000:]
    assert result.get(timeout=10)["tag"] == "grace"
    assert 4 < took < pod.grace, took  # it waited for the task, not for the grace


def test_a_stop_shorter_than_the_task_hands_it_to_another_worker(fleet, pods):
    """A grace cut short (``docker stop -t 2``): the worker is killed mid-task, the
    message stays unacknowledged and comes back once the lease lapses; run once more
    by a worker outside the container, never lost."""
    fleet.configure({**FAST, "queues": {"heavy": HEAVY}})
    pod = pods("heavy")
    app = fleet.app()
    result = app.send_task("tasks.heavy.sleep", kwargs={"seconds": 6, "tag": "cut"})
    wait_for(lambda: "received" in pod.logs(), 30, what="the pod to receive the task")
    time.sleep(1)
    pod.container.stop(timeout=2)
    pod.container.reload()
    assert pod.container.attrs["State"]["ExitCode"] == 137  # SIGKILLed at the grace
    assert AsyncResult(result.id, app=app).state != "SUCCESS"
    fleet.start_worker("heavy")
    assert result.get(timeout=60)["tag"] == "cut"


def test_a_kernel_oom_kill_is_a_memory_kill_escalated_once(fleet, pods, redis_client):
    """The container's limit (600Mi, below the manifest's 1536Mi, as a LimitRange or a
    node could impose) is hit before the guard's 1Gi: the kernel kills the pool child,
    the worker stays up. It must be taken for a memory kill and re-sent to ``xl`` once,
    not redelivered into the next kill (issue 12 saw 24 kills in 35 s)."""
    fleet.configure({**FAST, "queues": {"heavy": HEAVY}})
    pod = pods("heavy", memory="600Mi")
    app = fleet.app()
    result = app.send_task("tasks.heavy.grow", kwargs={"target_mb": 900})
    def waiting(queue: str) -> int:  # every priority step's list
        return sum(redis_client.llen(k) for k in list_keys(fleet.config, queue))

    try:
        wait_for(lambda: waiting("xl") == 1, 60, what="the task re-sent to xl")
    except AssertionError as exc:
        keys = sorted(redis_client.scan_iter(match=f"{fleet.prefix}*"))
        raise AssertionError(f"{exc}\n{keys}\n{pod.logs()[-3000:]}") from None
    time.sleep(5)  # a poison loop would kill again and again meanwhile
    assert oom_kills_in(pod) == 1
    assert waiting("xl") == 1
    assert waiting("heavy") == 0
    state = AsyncResult(result.id, app=app)
    assert state.state == "RETRY"
    assert "killed by the kernel's OOM killer" in str(state.result), state.result
    pod.container.reload()
    assert pod.container.attrs["State"]["Running"]  # the worker itself survived
    assert "re-sent to queue 'xl' (attempt 2)" in pod.logs()


def test_a_kernel_oom_kill_without_a_larger_class_fails_the_task_clearly(fleet, pods,
                                                                          redis_client):
    fleet.configure({**FAST, "queues": {"heavy": {**HEAVY, "on_memory_exceeded": {
        "retry_on": None}}}})
    pod = pods("heavy", memory="600Mi")
    app = fleet.app()
    result = app.send_task("tasks.heavy.grow", kwargs={"target_mb": 900})
    with pytest.raises(Exception) as failed:
        result.get(timeout=60, propagate=True)
    assert "killed by the kernel's OOM killer" in str(failed.value)
    assert "600.0Mi" in str(failed.value)  # the container's limit, named
    time.sleep(5)
    assert oom_kills_in(pod) == 1
    assert sum(redis_client.llen(k) for k in list_keys(fleet.config, "heavy")) == 0


def test_with_headroom_the_guard_stops_the_task_before_the_kernel(fleet, pods):
    fleet.configure({**FAST, "queues": {"heavy": {**HEAVY, "memory_limit": "512Mi",
                                                  "on_memory_exceeded": {"retry_on": None}}}})
    pod = pods("heavy")  # the manifest's 1536Mi
    app = fleet.app()
    result = app.send_task("tasks.heavy.grow", kwargs={"target_mb": 900})
    with pytest.raises(Exception) as failed:
        result.get(timeout=60, propagate=True)
    assert "over the 'heavy' queue's memory_limit of 512.0Mi" in str(failed.value)
    assert oom_kills_in(pod) == 0


def test_a_stop_during_start_up_is_not_lost(fleet, docker_engine, docker_client):
    """The worker is the container's PID 1, which the kernel gives no default signal
    actions: a SIGTERM before Celery sets its handler used to be ignored, and the stop
    waited out the whole grace. The entrypoint's handler now covers the second or so of
    imports (fleet/entrypoint.py); the interpreter's own start, before it, is not
    covered without an init in the image (the docker backend runs one: --init)."""
    fleet.configure({**FAST, "queues": {"heavy": HEAVY}})
    pod = run_pod(docker_client, docker_engine.image, fleet.config, fleet.config_path,
                  "heavy", prefix=fleet.prefix)
    try:
        time.sleep(0.5)  # the interpreter is up, the worker still importing
        assert "ready." not in pod.logs()
        began = time.monotonic()
        pod.container.stop(timeout=pod.grace)
        took = time.monotonic() - began
        pod.container.reload()
        assert took < 15, f"{took:.1f}s of a {pod.grace}s grace"
        assert pod.container.attrs["State"]["ExitCode"] in (0, 143), pod.logs()[-2000:]
    finally:
        pod.remove()
