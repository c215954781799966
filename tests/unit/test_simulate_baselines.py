"""Baselines in the same run (autoscale/sim/baselines.py, compare.py): the KEDA-like and
fixed-size controllers from hand-computed cases and the `--compare` command. No services.

(That the controller seam left the fleet's own results bit for bit as they were was
checked when it was added, on four shapes, by hashing every figure before and after; the
hashes are not kept as a test, which would fail on every deliberate change of policy.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoscale.sim.baselines import FixedController, KedaController, work_floor
from autoscale.sim.engine import Simulation
from fleet.config import parse_config
from fleet.observe.model import Observation, QueueSample
from fleet.trace.model import Header, Task

QUEUES_YAML = Path(__file__).resolve().parents[2] / "queues.yaml"


# -- the KEDA-like controller, by hand ---------------------------------------------------


def config(max_replicas: int = 20, **top):
    return parse_config({"version": 1, "default_queue": "a", "queues": {"a": {
        "concurrency": 1, "autoscaling": {"max_replicas": max_replicas}}}, **top},
        "test.yaml")


def drive(ctl, waiting, until: float, current: int = 0) -> dict[float, int]:
    """Poll ``ctl`` every ``ctl.interval`` from t=0 to ``until`` with ``waiting(t)``
    messages in the list, applying each decision at once; t -> replicas after it."""
    out, t = {}, 0.0
    while t <= until:
        obs = Observation(t, {"a": QueueSample("a", waiting(t), 0, None)})
        (d,) = ctl.decide(t, obs, {"a": current})
        current = out[t] = d.desired
        t += ctl.interval
    return out


def test_keda_polls_every_30s_and_the_hpa_every_15s():
    ctl = KedaController(config())
    assert ctl.interval == 15.0
    # 40 waiting from t=1: the HPA's sync at 15 does nothing at 0 replicas (KEDA owns
    # 0 -> 1); KEDA's own poll at 30 activates to 1.
    seen = drive(ctl, lambda t: 40 if t >= 1 else 0, 30)
    assert seen == {0.0: 0, 15.0: 0, 30.0: 1}


def test_a_burst_at_t1_gets_its_first_replica_at_t30_in_the_simulator():
    tasks = [Task(queue="a", name="t", sent=1.0 + i * 0.01, service=1.0) for i in range(23)]
    head = Header(version=1, source="synth:test", duration=600, queues=["a"])
    sim = Simulation(head, tasks, config(), startup=0.0, controller=KedaController(config()))
    sim.advance(29.9)
    assert sim.backend.replicas() == {"a": 0}
    sim.advance(30.0)
    assert sim.backend.replicas() == {"a": 1}
    report = sim.run()
    assert report.queues["a"].finished == 23
    assert report.queues["a"].waits.quantile(0.0) >= 28.9  # nothing ran before t=30


def test_keda_list_length_tolerance_rate_limit_stabilization_and_cooldown():
    # 23 waiting at t=30: KEDA activates (0 -> 1); at 45 the HPA wants ceil(23/5) = 5,
    # within the scale-up limit from 1, max(2 x 1, 1 + 4) = 5.
    # At 60, 100 waiting: ceil(100/5) = 20, limited to max(2 x 5, 5 + 4) = 10 (the +4 at
    # 45 is exactly 15 s old: out of the period, as the HPA's strict After).
    # From 75, 1 waiting: ceil(1/5) = 1, but the highest recommendation of the last
    # 300 s (20, at 60) holds 10 until 360, when it is out of the window: 1.
    # From 375 nothing waits: KEDA last saw it active at 360, so it goes to 0 at its
    # first poll 300 s later, 660.
    def waiting(t):
        return 0 if t < 30 else 23 if t < 60 else 100 if t < 75 else 1 if t <= 360 else 0

    seen = drive(KedaController(config()), waiting, 700)
    assert [seen[t] for t in (15, 30, 45, 60, 75)] == [0, 1, 5, 10, 10]
    assert seen[345] == 10 and seen[360] == 1
    assert seen[645] == 1 and seen[660] == 0 and seen[690] == 0


def test_keda_tolerance_is_10_percent_of_the_target_per_replica():
    ctl = KedaController(config())
    obs = lambda t, n: Observation(t, {"a": QueueSample("a", n, 0, None)})  # noqa: E731
    # 4 replicas, 21 waiting: 21 / (5 x 4) = 1.05, within 0.1: no change.
    (d,) = ctl.decide(15.0, obs(15.0, 21), {"a": 4})
    assert d.desired == 4 and "tolerance" in d.reason
    # 23: 1.15, outside: ceil(23 / 5) = 5.
    (d,) = ctl.decide(45.0, obs(45.0, 23), {"a": 4})
    assert d.desired == 5


def test_keda_stops_at_the_queues_max_replicas():
    seen = drive(KedaController(config(max_replicas=3)), lambda t: 500, 120)
    assert max(seen.values()) == 3 and seen[45] == 3


# -- fixed --------------------------------------------------------------------------------

def test_the_fixed_fleet_never_scales_after_t0():
    tasks = [Task(queue="a", name="t", sent=100.0 + i, service=5.0) for i in range(50)]
    head = Header(version=1, source="synth:test", duration=900, queues=["a"])
    ctl = FixedController(config(), {"a": 3})
    report = Simulation(head, tasks, config(), startup=2.0, controller=ctl).run()
    a = report.queues["a"]
    assert a.scale_events == 1 and a.max_replicas == 3 and a.finished == 50
    # Three replicas from t=0 to the end.
    assert a.worker_seconds == pytest.approx(3 * report.simulated)


# -- the command --------------------------------------------------------------------------

def _files(tmp_path):
    trace = tmp_path / "trace.jsonl"
    lines = [{"kind": "header", "version": 1, "source": "synth:test", "duration": 600,
              "queues": ["a"]}]
    lines += [{"kind": "task", "queue": "a", "name": "t", "sent": 10 + i * 0.1, "service": 4}
              for i in range(60)]
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = tmp_path / "queues.yaml"
    cfg.write_text("version: 1\ndefault_queue: a\nqueues:\n"
                   "  a: {concurrency: 2, autoscaling: {max_replicas: 6, target_wait: 10s}}\n")
    return ["simulate", str(trace), "--config", str(cfg)]


def test_compare_prints_the_three_side_by_side_with_ratios(tmp_path):
    from click.testing import CliRunner

    from fleet.cli import cli

    args = _files(tmp_path)
    done = CliRunner().invoke(cli, [*args, "--compare", "keda,fixed"])
    assert done.exit_code == 0, done.output
    rows = [line.split() for line in done.output.splitlines()[1:]]
    assert [r[1] if r[0] in ("a", "total") else r[0] for r in rows[:6]] == \
        ["fleet", "keda", "fixed"] * 2
    assert rows[0][0] == "a" and rows[3][0] == "total"
    assert "x)" in " ".join(rows[1]) and "ratios are baseline / fleet" in done.output

    done = CliRunner().invoke(cli, [*args, "--compare", "keda,fixed", "--json"])
    assert done.exit_code == 0, done.output
    out = json.loads(done.output)
    assert out["total"]["finished"] == 60
    assert set(out["compare"]) == {"keda", "fixed"}
    fleet_max = out["queues"][0]["max_replicas"]
    assert out["compare"]["fixed"]["replicas"] == {"a": fleet_max}
    assert out["compare"]["fixed"]["total"]["max_replicas"] == fleet_max
    for name in ("keda", "fixed"):
        r = out["compare"][name]
        assert r["total"]["finished"] == 60
        assert set(r["ratios"]["total"]) >= {"worker_seconds", "wait_p50", "wait_p95",
                                             "wait_p99", "max_backlog",
                                             "slo_violation_seconds", "scale_events"}
        ws = r["total"]["worker_seconds"] / out["total"]["worker_seconds"]
        assert r["ratios"]["total"]["worker_seconds"] == pytest.approx(ws, abs=1e-3)

    done = CliRunner().invoke(cli, [*args, "--compare", "fixed", "--fixed-replicas", "a=1",
                                    "--json"])
    assert json.loads(done.output)["compare"]["fixed"]["replicas"] == {"a": 1}


def test_compare_with_an_unknown_baseline_is_exit_2_naming_the_known_ones(tmp_path):
    from click.testing import CliRunner

    from fleet.cli import cli

    done = CliRunner().invoke(cli, [*_files(tmp_path), "--compare", "nope"])
    assert done.exit_code == 2
    assert "nope" in done.output and "keda, fixed" in done.output

    for bad in (["--compare", "fixed", "--fixed-replicas", "b=2"],
                ["--compare", "fixed", "--fixed-replicas", "-1"],
                ["--fixed-replicas", "2"]):
        done = CliRunner().invoke(cli, [*_files(tmp_path), *bad])
        assert done.exit_code == 2 and "--fixed-replicas" in done.output, bad


def test_the_work_floor_is_service_over_slots_and_no_simulated_fleet_gets_under_it():
    config = parse_config({"version": 1, "default_queue": "a", "queues": {
        "a": {"concurrency": 2}, "b": {"concurrency": 1}}}, "floor.yaml")
    tasks = [Task(queue="a", name="t", sent=i, service=30.0) for i in range(10)] + [
        Task(queue="b", name="t", sent=i, service=5.0) for i in range(4)] + [
        Task(queue="b", name="t", sent=9.0, service=None)]
    assert work_floor(tasks, config) == {"a": 150.0, "b": 20.0}
    header = Header(version=1, source="t", duration=60.0, queues=["a", "b"])
    ordered = sorted(tasks, key=lambda t: t.sent)
    for controller in (None, KedaController(config), FixedController(config, {"a": 1, "b": 1})):
        report = Simulation(header, ordered, config, controller=controller).run()
        for q, floor in work_floor(tasks, config).items():
            assert report.queues[q].worker_seconds >= floor
