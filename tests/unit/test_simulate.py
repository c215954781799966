"""The simulator (autoscale/sim): conservation, determinism, the delivery model, and
that the real policy decides. No services: configs are parsed from dicts."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from autoscale.sim import simulate, startup_delay
from autoscale.sim.engine import Simulation
from autoscale.sim.errors import SimulationError
from fleet.config import parse_config
from fleet.errors import FleetError
from fleet.trace.model import Header, Task


def config(queues: dict, **top):
    first = next(iter(queues))
    return parse_config({"version": 1, "default_queue": first, "queues": queues, **top},
                        "test.yaml")


def header(duration: float, queues=("a",)) -> Header:
    return Header(version=1, source="synth:test", duration=duration, queues=list(queues))


def task(sent: float, service: float, queue: str = "a") -> Task:
    return Task(queue=queue, name="t", sent=sent, service=service)


def poisson(rate: float, service, duration: float, seed: int, queue: str = "a",
            start: float = 0.0) -> list[Task]:
    rng = random.Random(seed)
    out, t = [], start
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append(task(t, service(rng), queue))


def fixed(n: int, concurrency: int = 1, **queue) -> dict:
    """A queue of exactly ``n`` replicas (min = max)."""
    return {"concurrency": concurrency, **queue,
            "autoscaling": {"min_replicas": n, "max_replicas": n}}


def bursty(seed: int = 3) -> list[Task]:
    """Quiet, a burst, quiet, another burst: scales up, down (to zero) and up again."""
    tasks = poisson(0.2, lambda r: r.expovariate(1 / 5), 600, seed)
    tasks += [task(700 + i * 0.01, 20 + i % 7) for i in range(300)]
    tasks += poisson(0.05, lambda r: 3.0, 3000, seed + 1, start=1000)
    tasks += [task(3000 + i * 0.1, 8.0) for i in range(200)]
    return sorted(tasks, key=lambda t: t.sent)


SCALING = {"a": {"concurrency": 2, "autoscaling": {
    "max_replicas": 12, "target_wait": "20s", "scale_down_stabilization": "60s",
    "cooldown": "10s"}}}


def test_every_task_starts_and_finishes_exactly_once_through_scale_up_and_down():
    tasks = bursty()
    report = simulate(header(3600), tasks, config(SCALING), startup=5.0)
    a = report.queues["a"]
    assert a.tasks == a.started == a.finished == len(tasks)
    assert a.waits.count == len(tasks)
    # It did scale both ways (or the test would prove nothing about scale-down).
    assert a.scale_events >= 4
    assert a.max_replicas > 3


def test_the_same_trace_config_and_seed_give_identical_results():
    tasks = bursty()
    cfg = config(SCALING)
    runs = [json.dumps(simulate(header(3600), tasks, cfg, startup=5.0,
                                startup_jitter=0.5, seed=seed).as_dict())
            for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # the seed does reach the start-up jitter


def test_one_sample_per_queue_decides_as_one_sample_per_replica():
    """The aggregated worker report (engine._worker_samples) must not change a decision."""
    tasks = bursty()
    cfg = config({**SCALING, "b": {"concurrency": 3, "kubernetes": {"resources": {
        "requests": {"cpu": "2"}, "limits": {"memory": "1Gi"}}},
        "autoscaling": {"max_replicas": 6, "target_wait": "5s"}}})
    tasks = sorted(tasks + poisson(0.3, lambda r: r.expovariate(1 / 12), 3600, 9, "b"),
                   key=lambda t: t.sent)
    out = [simulate(header(3600, ("a", "b")), tasks, cfg, startup=3.0, rss=300 << 20,
                    aggregate_workers=mode).as_dict() for mode in (True, False)]
    assert out[0] == out[1]
    assert out[0]["total"]["scale_events"] > 6


def test_warm_scale_down_finishes_running_tasks_and_returns_prefetched_ones():
    # One replica, one slot, prefetch 4: a long task runs, three wait in its buffer.
    tasks = [task(10.0, 100.0)] + [task(10.0 + i, 1.0) for i in range(1, 4)]
    sim = Simulation(header(400), tasks, config({"a": fixed(1)}), startup=0.0)
    sim.advance(20.0)
    q = sim.queues["a"]
    (replica,) = q.replicas
    assert (replica.running, len(replica.reserved), len(q.waiting)) == (1, 3, 0)
    sim.backend.scale("a", 0, [])
    assert sim.backend.replicas() == {"a": 0}
    assert replica.draining and replica.running == 1 and not replica.gone
    # The held messages are back at the head of the list, in their order.
    assert [sent for sent, _ in q.waiting] == [11.0, 12.0, 13.0]
    report = sim.run()
    a = report.queues["a"]
    assert a.finished == a.started == 4
    assert replica.gone and replica.processed == 1  # it finished its task, took no other


def step(sim: Simulation, t: float) -> None:
    """The simulator's clock at ``t`` (advance stops at the last event before it), for
    a scale call made by hand at that time."""
    sim.advance(t)
    sim.now = t


def ready_times(sim: Simulation, until: float) -> list[float]:
    """When each replica became ready (the simulator's clock), stepping 10 ms."""
    seen: dict[int, float] = {}
    t = 0.0
    while t < until:
        t = round(t + 0.01, 2)
        sim.advance(t)
        for q in sim.queues.values():
            for r in q.replicas:
                if r.ready and r.id not in seen:
                    seen[r.id] = t
    return [seen[i] for i in sorted(seen)]


def test_startups_share_the_cores_of_one_machine():
    """Four workers starting at once on two cores take twice one's start-up; one that
    starts later shares while the others run, then runs alone."""
    cfg = config({"a": fixed(0)}, autoscaler={"interval": "1000s"})
    sim = Simulation(header(100), [], cfg, startup=2.0, startup_cores=2)
    step(sim, 0.0)
    sim.scale("a", 4)
    assert ready_times(sim, 6.0) == pytest.approx([4.0] * 4, abs=0.011)
    # Two start at 0 (each at full speed: 2 cores), a third at 1 s: from then three
    # share two cores. The first two have 1 s of work left at 2/3 speed: done at 2.5 s;
    # the third did 1.5 x 2/3 = 1 s of its 2 by then, the rest alone: at 3.5 s.
    sim = Simulation(header(100), [], cfg, startup=2.0, startup_cores=2)
    step(sim, 0.0)
    sim.scale("a", 2)
    step(sim, 1.0)
    sim.scale("a", 3)
    assert ready_times(sim, 6.0) == pytest.approx([2.5, 2.5, 3.5], abs=0.011)
    # The validation harness fits start-ups with its own copy of the model: the same.
    from tests.live_replay import shared_startups

    assert shared_startups([0.0] * 4, 2.0, 2) == pytest.approx([4.0] * 4)
    assert shared_startups([0.0, 0.0, 1.0], 2.0, 2) == pytest.approx([2.5, 2.5, 2.5])
    # Without the option, start-ups are independent (pods on a cluster's nodes).
    sim = Simulation(header(100), [], cfg, startup=2.0)
    step(sim, 0.0)
    sim.scale("a", 4)
    assert ready_times(sim, 6.0) == pytest.approx([2.0] * 4, abs=0.011)


def test_a_replica_stopped_while_starting_frees_its_share():
    cfg = config({"a": fixed(0)}, autoscaler={"interval": "1000s"})
    sim = Simulation(header(100), [], cfg, startup=2.0, startup_cores=1)
    step(sim, 0.0)
    sim.scale("a", 2)  # each at half speed
    step(sim, 1.0)
    sim.scale("a", 1)  # the youngest goes: the other has 1.5 s of work left, alone
    assert ready_times(sim, 4.0) == pytest.approx([2.5], abs=0.011)
    with pytest.raises(SimulationError, match="at least 1"):
        Simulation(header(100), [], cfg, startup_cores=0)


def test_a_stopped_replica_costs_its_shutdown_and_one_stopped_starting_does_not():
    cfg = config({"a": fixed(0)}, autoscaler={"interval": "1000s"})
    for shutdown in (0.0, 2.5):
        sim = Simulation(header(100), [], cfg, startup=1.0, shutdown=shutdown)
        step(sim, 0.0)
        sim.scale("a", 2)
        step(sim, 10.0)
        sim.scale("a", 1)       # a ready, idle replica: 10 s + shutdown
        sim.scale("a", 2)
        step(sim, 10.5)
        sim.scale("a", 1)       # stopped while starting: 0.5 s, nothing more
        assert sim.queues["a"].report.worker_seconds == pytest.approx(10.5 + shutdown)


def test_the_tasks_of_a_stopped_replica_are_reported_as_draining():
    """They finish (warm), and the policy must not start a replica for them."""
    tasks = [task(1.0, 50.0), task(1.0, 50.0)]
    sim = Simulation(header(400), tasks, config({"a": fixed(1, concurrency=2)}),
                     startup=0.0)
    step(sim, 5.0)
    sim.backend.scale("a", 0, [])
    (sample,) = sim._worker_samples()
    assert (sample.active, sample.draining) == (2, 2)
    sim.advance(60.0)
    assert sim.queues["a"].leaving == 0


def test_prefetched_messages_are_held_not_free_capacity():
    # Two replicas of one slot. A long task, then short ones: with prefetch, the long
    # task's replica holds every other short one while the other replica idles.
    tasks = [task(50.0, 100.0)] + [task(50.0 + i * 0.001, 1.0) for i in range(1, 5)]
    waits = {}
    for off in (False, True):
        cfg = config({"a": fixed(2, disable_prefetch=off)})
        waits[off] = simulate(header(400), tasks, cfg, startup=0.0).queues["a"].waits
    assert waits[False].maximum > 99.0  # stuck behind the long task
    assert waits[True].maximum < 4.0    # each taken only by a free slot


def test_a_queue_scales_to_zero_and_a_new_arrival_activates_it():
    tasks = [task(5.0, 2.0), task(2000.0, 2.0)]
    cfg = config({"a": {"autoscaling": {"min_replicas": 0, "scale_down_stabilization": "60s",
                                         "cooldown": "10s"}}}, autoscaler={"interval": "2s"})
    report = simulate(header(2100), tasks, cfg, startup=8.0)
    a = report.queues["a"]
    assert a.finished == 2
    assert a.scale_events == 4  # 0 -> 1, 1 -> 0, 0 -> 1, 1 -> 0
    # The second waited for the next poll and a replica's start-up, no longer.
    assert 8.0 <= a.waits.maximum <= 2.0 + 8.0 + 1e-6
    # Zero replicas for most of the gap: far fewer worker-seconds than the duration.
    assert a.worker_seconds < 400


def test_a_burst_on_one_slot_waits_as_computed_by_hand():
    # 100 tasks at once, 2 s each, one slot: the k-th waits 2k seconds (the replica is
    # up before they come). Mean 99 s, median the 50th: 98 s; p99 the 99th: 196 s.
    tasks = [task(30.0, 2.0) for _ in range(100)]
    w = simulate(header(400), tasks, config({"a": fixed(1)}), startup=0.0).queues["a"].waits
    assert w.total / w.count == pytest.approx(99.0)
    assert w.quantile(0.5) == pytest.approx(98.0, rel=0.01)
    assert w.quantile(0.99) == pytest.approx(196.0, rel=0.01)
    assert w.maximum == pytest.approx(198.0)


def test_m_d_1_mean_wait_matches_pollaczek_khinchine():
    # Poisson arrivals at 0.5/s, 1 s of service, one slot: rho 0.5 and the mean wait
    # is lambda s^2 / (2 (1 - rho)) = 0.5 s.
    tasks = poisson(0.5, lambda r: 1.0, 100_000, seed=5, start=10.0)
    w = simulate(header(100_000), tasks, config({"a": fixed(1)}),
                 startup=0.0).queues["a"].waits
    assert w.total / w.count == pytest.approx(0.5, rel=0.05)


def test_the_capacity_budget_caps_all_queues_together():
    one_core = {"kubernetes": {"resources": {"requests": {"cpu": "1"}}},
                "autoscaling": {"max_replicas": 10, "target_wait": "5s"}}
    tasks = sorted([task(10 + i * 0.05, 30.0, q) for i in range(400) for q in ("a", "b")],
                   key=lambda t: t.sent)
    report = simulate(header(900, ("a", "b")), tasks,
                      config({"a": one_core, "b": one_core},
                             autoscaler={"capacity": {"cpu": "5"}}), startup=1.0)
    assert report.max_total_replicas == 5
    assert report.total.finished == 800
    unbounded = simulate(header(900, ("a", "b")), tasks,
                         config({"a": one_core, "b": one_core}), startup=1.0)
    assert unbounded.max_total_replicas > 5


def test_the_real_policy_decides_a_shorter_target_wait_means_more_replicas():
    # Short tasks (many completions per poll, so the measured service time is steady),
    # then four times the load: draining the backlog within 5 s takes more replicas
    # than within 10 minutes, and buys shorter waits.
    ex = lambda r: r.expovariate(1 / 2)  # noqa: E731
    tasks = sorted(poisson(10, ex, 600, 2) + poisson(40, ex, 1200, 3, start=600),
                   key=lambda t: t.sent)

    def run(target):
        cfg = config({"a": {"concurrency": 4, "autoscaling": {
            "max_replicas": 200, "target_wait": target}}})
        return simulate(header(1200), tasks, cfg, startup=10.0, cpu_per_task=0).queues["a"]

    quick, patient = run("5s"), run("10m")
    assert quick.max_replicas > patient.max_replicas
    assert quick.worker_seconds > patient.worker_seconds
    assert quick.waits.quantile(0.99) < patient.waits.quantile(0.99)


def test_a_task_of_a_queue_not_in_the_config_is_an_error():
    with pytest.raises(SimulationError, match="'zz'"):
        simulate(header(10), [task(1.0, 1.0, "zz")], config({"a": {}}))
    with pytest.raises(SimulationError, match="order"):
        simulate(header(10), [task(2.0, 1.0), task(1.0, 1.0)], config({"a": {}}))


def test_tasks_without_a_service_time_are_counted_not_replayed():
    tasks = [task(1.0, 1.0), Task(queue="a", name="t", sent=2.0, service=None)]
    report = simulate(header(100), tasks, config({"a": {}}), startup=0.0)
    assert (report.skipped, report.total.finished) == (1, 1)


def test_startup_delays_by_kind_or_seconds():
    assert startup_delay("kubernetes") > startup_delay("container") >= startup_delay("local")
    assert startup_delay("12.5") == 12.5
    with pytest.raises(FleetError, match="local, container, kubernetes"):
        startup_delay("nomad")
    with pytest.raises(FleetError):
        startup_delay("-1")


def _trace_file(tmp_path, lines: list[dict]):
    path = tmp_path / "trace.jsonl"
    head = {"kind": "header", "version": 1, "source": "synth:test", "duration": 300,
            "queues": ["a"]}
    path.write_text("\n".join(json.dumps(x) for x in [head, *lines]) + "\n")
    return path


def _config_file(tmp_path):
    path = tmp_path / "queues.yaml"
    path.write_text("version: 1\ndefault_queue: a\nqueues:\n  a: {concurrency: 2}\n")
    return path


def test_the_command_reports_per_queue_and_in_total(tmp_path):
    from click.testing import CliRunner

    from fleet.cli import cli

    lines = [{"kind": "task", "queue": "a", "name": "t", "sent": 10 + i, "service": 3}
             for i in range(20)]
    lines.insert(5, {"kind": "replicas", "at": 12, "queue": "a", "current": 1, "desired": 2})
    args = ["simulate", str(_trace_file(tmp_path, lines)), "--config",
            str(_config_file(tmp_path)), "--startup", "kubernetes"]
    done = CliRunner().invoke(cli, [*args, "--json"])
    assert done.exit_code == 0, done.output
    out = json.loads(done.output)
    assert out["startup"] == 8.0
    assert out["total"]["finished"] == out["queues"][0]["finished"] == 20
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    assert [line.split()[0] for line in done.output.splitlines()[1:3]] == ["a", "total"]


def test_the_command_takes_startup_cores_and_shutdown(tmp_path):
    """A burst on a queue that starts four replicas: sharing one core, their start-ups
    take longer and the tasks wait longer; a longer shutdown costs more."""
    from click.testing import CliRunner

    from fleet.cli import cli

    lines = [{"kind": "task", "queue": "a", "name": "t", "sent": 10, "service": 5}
             for _ in range(40)]
    cfg = tmp_path / "queues.yaml"
    cfg.write_text("version: 1\ndefault_queue: a\nqueues:\n  a: {concurrency: 2, "
                   "autoscaling: {min_replicas: 0, max_replicas: 4, "
                   "scale_down_stabilization: 10s, cooldown: 2s}}\n")
    base = ["simulate", str(_trace_file(tmp_path, lines)), "--config", str(cfg),
            "--startup", "3", "--json"]

    def run(*extra):
        done = CliRunner().invoke(cli, [*base, *extra])
        assert done.exit_code == 0, done.output
        return json.loads(done.output)

    alone, shared = run(), run("--startup-cores", "1")
    assert shared["total"]["wait_p95"] > alone["total"]["wait_p95"]
    long_stop = run("--shutdown", "30")
    assert long_stop["shutdown"] == 30.0
    assert long_stop["total"]["worker_seconds"] > alone["total"]["worker_seconds"]
    for bad in (["--startup-cores", "0"], ["--shutdown", "-1"]):
        done = CliRunner().invoke(cli, [*base, *bad])
        assert done.exit_code == 2 and bad[0] in done.output, done.output


def test_a_bad_trace_line_is_exit_2_naming_file_and_line(tmp_path):
    path = _trace_file(tmp_path, [{"kind": "task", "queue": "a", "name": "t", "sent": 1,
                                   "service": 1},
                                  {"kind": "task", "queue": "a", "name": "t", "sent": "soon",
                                   "service": 1}])
    args = ["simulate", str(path), "--config", str(_config_file(tmp_path))]
    done = subprocess.run([sys.executable, "-m", "fleet.cli", *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"{path}:3: sent: " in done.stderr and "Traceback" not in done.stderr


def test_an_exported_trace_out_of_send_order_is_replayed_in_send_order():
    from autoscale.sim.tracefile import tasks_in_send_order
    from fleet.trace.model import Replicas, Task

    records = [Task(queue="a", name="t", sent=5, service=1),
               Replicas(at=1, queue="a", current=0, desired=1),
               Task(queue="a", name="t", sent=2, service=1, task_id="x"),
               Task(queue="a", name="t", sent=2, service=1, task_id="y")]
    assert [(t.sent, t.task_id) for t in tasks_in_send_order(records)] == [
        (2, "x"), (2, "y"), (5, None)]


def test_the_indexed_observation_answers_workers_of_as_the_real_one():
    from autoscale.sim.engine import _Observation
    from fleet.observe.model import Observation, WorkerSample

    workers = [WorkerSample(f"w{i}", q, "p", i, 2, 1, 0, i, 0.0, 0, 0, 0, 1.0)
               for i, q in enumerate(["a", "b", "a", None, "c", "a"])]
    mine, real = _Observation(1.0, {}, workers), Observation(1.0, {}, workers)
    for q in ("a", "b", "c", "d", None):
        assert mine.workers_of(q) == real.workers_of(q)
    assert isinstance(mine, Observation)


def test_scale_down_stops_the_idle_replica_and_polls_count_held_messages():
    tasks = [task(10.0, 100.0)] + [task(10.0 + i, 1.0) for i in range(1, 4)]
    sim = Simulation(header(400), tasks, config({"a": fixed(2)}), startup=0.0)
    sim.advance(10.5)
    q = sim.queues["a"]
    busy, idle = sorted(q.replicas, key=lambda r: -r.held)
    assert (busy.running, idle.held) == (1, 0)
    # Turns alternate: 11 goes to the idle one (done at 12), 12 into the busy one's buffer.
    sim.advance(12.5)
    assert (len(busy.reserved), idle.held) == (1, 0)
    sim.backend.scale("a", 1, [])
    assert q.replicas == [busy] and idle.gone and not busy.draining
    # What the next poll reports: the held message is unacked, not waiting, and the
    # rates see it as backlog (held by a busy worker), not as a free slot.
    figures = {}
    real = sim.tracker.update

    def spy(obs):
        figures.update(real(obs))
        return figures

    sim.tracker.update = spy
    sim.advance(14.0)
    m = figures["a"]
    assert (m.waiting, m.running, m.slots) == (0, 1, 1)
    # 13 came after the scale-down: the one replica left took it into its buffer too.
    assert (m.unacked, m.backlog, len(busy.reserved)) == (3, 2, 2)


def test_the_validations_rank_band_passes_a_quantile_near_the_95th_and_no_other():
    from tests.live_replay import Comparison, mid_rank

    waits = [0.0] * 150 + [0.3] * 17 + [1.3] * 10  # bimodal, as the mixed shape's
    assert mid_rank(waits, 0.0) == pytest.approx(75 / 177)
    assert mid_rank(waits, 0.95) == pytest.approx(167 / 177)
    assert mid_rank(waits, 9.0) == 1.0
    c = Comparison("mixed", 1.0, 1.0, 0.3, 0.95, 1.0, 177, sim_p95_rank=167 / 177)
    assert c.p95_rank_tolerance == pytest.approx(0.0328, abs=1e-4)
    assert abs(c.sim_p95_rank - 0.95) <= c.p95_rank_tolerance
    far = Comparison("mixed", 1.0, 1.0, 0.3, 9.0, 1.0, 177, sim_p95_rank=1.0)
    assert abs(far.sim_p95_rank - 0.95) > far.p95_rank_tolerance
