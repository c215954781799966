"""The local backend and the whole loop on this machine, with real workers."""

from __future__ import annotations

import threading
import time

import pytest

from autoscale.backends.local import LocalBackend
from autoscale.loop import Autoscaler
from fleet.keys import broker_client, changes_key
from fleet.observe.metrics import RedisMetrics
from tests.conftest import ROOT, shipped_config, wait_for
from tests.probe_tasks import executions

pytestmark = pytest.mark.slow

IMPORTS = [*shipped_config()["imports"], "tests.probe_tasks"]


def probe_config(fleet, **heavy):
    return fleet.configure({
        "imports": IMPORTS,
        "autoscaler": {"interval": "1s", "worker_metrics_interval": "1s"},
        "queues": {"heavy": {"tasks": ["tasks.heavy.*", "tests.probe.*"], "concurrency": 1,
                             **heavy}},
    })


def backend_for(fleet) -> LocalBackend:
    return LocalBackend(fleet.config, str(fleet.config_path), fleet.env,
                        fleet.tmp_path / "logs", node=fleet.prefix.rstrip(":"))


@pytest.fixture
def local(fleet, monkeypatch):
    monkeypatch.chdir(ROOT)  # workers import tests.probe_tasks from the repository root
    probe_config(fleet)
    backends: list[LocalBackend] = []

    def make() -> LocalBackend:
        backends.append(backend_for(fleet))
        return backends[-1]

    yield make
    for backend in backends:
        backend.close(grace=15)


def live_workers(fleet, queue: str) -> list:
    return RedisMetrics(fleet.config, broker_client(fleet.config)).poll().workers_of(queue)


def test_scale_up_down_spares_the_busy_worker_and_restarts_a_crashed_one(fleet, local):
    backend = local()
    backend.scale("heavy", 2, [])
    assert backend.replicas()["heavy"] == 2
    wait_for(lambda: len(live_workers(fleet, "heavy")) == 2, 60, what="two workers to report")
    job = fleet.app().send_task("tests.probe.slow", kwargs={"seconds": 6})
    busy = wait_for(lambda: [w for w in live_workers(fleet, "heavy") if w.active], 30,
                    what="one worker to be busy")
    backend.scale("heavy", 1, live_workers(fleet, "heavy"))
    [kept] = backend.running["heavy"]
    assert kept.hostname == busy[0].hostname  # the idle one went
    assert job.get(timeout=30)["host"] == busy[0].hostname
    kept.kill()  # a crash, not a scale-down
    assert backend.replicas()["heavy"] == 1
    assert backend.restarts == 1 and backend.running["heavy"][0] is not kept


def test_a_warm_scale_down_lets_running_tasks_finish_and_loses_nothing(fleet, local):
    probe_config(fleet, prefetch_multiplier=2, disable_prefetch=False)
    backend = local()
    backend.scale("heavy", 1, [])
    wait_for(lambda: live_workers(fleet, "heavy"), 60, what="the worker to report")
    app = fleet.app()
    results = [app.send_task("tests.probe.slow", kwargs={"seconds": 3}) for _ in range(4)]
    wait_for(lambda: any(w.active for w in live_workers(fleet, "heavy")), 30,
             what="a task to start")
    backend.scale("heavy", 0, live_workers(fleet, "heavy"))  # the busy one goes, warm
    assert backend.wait_drained(timeout=60), "the worker did not finish its task and exit"
    backend.scale("heavy", 1, [])  # the rest comes back from the queue
    values = [r.get(timeout=90) for r in results]
    assert len(values) == 4
    client = broker_client(fleet.config)
    assert [executions(client, fleet.config, r.id) for r in results] == [1, 1, 1, 1]


def test_a_burst_scales_up_within_two_polls_drains_and_scales_back_down(fleet, local):
    config = probe_config(fleet, autoscaling={
        "min_replicas": 0, "max_replicas": 3, "target_wait": "5s",
        "scale_down_stabilization": "4s", "cooldown": "1s", "scale_down_step": 3})
    backend = local()
    scaler = Autoscaler(config, RedisMetrics(config, broker_client(config)), backend)
    stop = threading.Event()
    loop = threading.Thread(target=scaler.run, args=(stop,), daemon=True)
    loop.start()
    try:
        time.sleep(1.5)
        assert backend.replicas()["heavy"] == 0
        app = fleet.app()
        sent = time.time()
        results = [app.send_task("tests.probe.slow", kwargs={"seconds": 1}) for _ in range(12)]
        wait_for(lambda: backend.replicas()["heavy"] >= 1, 2 * config.autoscaler.interval + 1,
                 interval=0.05, what="a scale-up within two poll intervals")
        reacted = time.time() - sent
        peak = wait_for(lambda: backend.replicas()["heavy"] >= 2 and backend.replicas()["heavy"],
                        15, what="more than one replica for the burst")
        assert [r.get(timeout=120)["slept"] for r in results] == [1] * 12
        client = broker_client(config)
        assert [executions(client, config, r.id) for r in results] == [1] * 12
        wait_for(lambda: backend.replicas()["heavy"] == 0, 30,
                 what="scale back to zero after the stabilization window")
        changes = [c.decode() for c in client.lrange(changes_key(config), 0, -1)]
        assert any('"desired": 0' in c and "idle" in c for c in changes)
        assert reacted <= 2 * config.autoscaler.interval + 1 and peak <= 3
    finally:
        stop.set()
        loop.join(timeout=10)
