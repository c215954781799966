"""The what-if seam's pure parts, without Redis or HTTP: the window, the pasted
candidate, the settings diff and ratios (fleet/dashboard/whatif.py, fleet/whatif.py),
and the simulator's implementation on a synthetic trace (autoscale/sim/whatif.py)."""

from __future__ import annotations

import sys

import pytest

from autoscale.sim import whatif as sim_whatif
from autoscale.sim.engine import Simulation
from autoscale.sim.startup import STARTUP
from fleet.config import load_config
from fleet.dashboard.whatif import (
    CandidateError,
    WhatIfWindowError,
    candidate_config,
    changes,
    window,
)
from fleet.trace.synth import synthesize
from fleet.whatif import Figures, UnavailableWhatIf, WhatIf, WhatIfUnavailable, ratios
from tests.conftest import ROOT

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def config():
    return load_config(ROOT / "queues.yaml")


def test_the_window_defaults_to_the_last_hour_and_takes_export_s_spellings():
    assert window(None, None, NOW) == (NOW - 3600, NOW)
    assert window("90m", "30m", NOW) == (NOW - 5400, NOW - 1800)
    since, until = window("2027-01-15T08:00", "2027-01-15T10:00+01:00", NOW)  # UTC unless
    assert until - since == 3600


@pytest.mark.parametrize(("since", "until", "says"), [
    ("soon", None, "since: expected a duration ago"),
    ("1h", "later", "until: expected"),
    ("1h", "2h", "the window is empty"),
    ("25h", None, "at most 24 h"),
])
def test_a_bad_window_says_why(since, until, says):
    with pytest.raises(WhatIfWindowError, match=says):
        window(since, until, NOW)


def test_a_pasted_fragment_goes_over_the_current_settings(config):
    given = candidate_config(config, "queues: {io: {autoscaling: {max_replicas: 9}}}\n"
                                     "autoscaler: {interval: 5s}")
    assert given.queues["io"].autoscaling.max_replicas == 9
    assert given.autoscaler.interval == 5.0
    assert given.queues["default"] == config.queues["default"]
    assert changes(config, given) == [
        {"setting": "autoscaler.interval", "current": config.autoscaler.model_dump(
            mode="json")["interval"], "candidate": "5s"},
        {"setting": "queues.io.autoscaling.max_replicas",
         "current": config.queues["io"].autoscaling.max_replicas, "candidate": 9}]
    assert changes(config, config) == []


@pytest.mark.parametrize(("text", "says"), [
    ("", "expected a mapping"),
    ("- 1", "expected a mapping"),
    ("broker: {url: 'redis://elsewhere'}", "broker cannot be changed here"),
    ("queues: [io]", "queues must be a mapping"),
    ("queues: {nosuch: {}}", "no queue 'nosuch'"),
    ("queues: {io: {autoscaling: {target_wait: soon}}}", "queues.io.autoscaling.target_wait"),
    ("x" * 5000, "at most 4000 characters"),
])
def test_a_bad_fragment_says_why(config, text, says):
    with pytest.raises(CandidateError, match=says):
        candidate_config(config, text)


def figures(**kw) -> Figures:
    base = dict(queue="total", tasks=1, worker_seconds=100.0, wait_p50=0.0, wait_p95=2.0,
                wait_p99=4.0, slo_violation_seconds=0.0, scale_events=2, max_replicas=2,
                max_backlog=5)
    return Figures(**{**base, **kw})


def test_ratios_are_candidate_over_current_with_zeros_as_compare_has_them():
    r = ratios(figures(worker_seconds=50.0, slo_violation_seconds=3.0), figures())
    assert r["worker_seconds"] == 0.5 and r["wait_p95"] == 1.0
    assert r["wait_p50"] == 1.0  # both 0
    assert r["slo_violation_seconds"] is None  # only the current one is 0


def test_the_simulator_s_sides_are_simulation_s_runs(config):
    header, tasks = synthesize("bursts", {"chunks": 200, "every": 600, "median": 2},
                               duration=1800, seed=1)
    tasks = list(tasks)
    cls = config.queues["default"]
    tighter = config.model_copy(update={"queues": {**config.queues, "default": cls.model_copy(
        update={"autoscaling": cls.autoscaling.model_copy(update={"max_replicas": 2})})}})
    impl = sim_whatif.SimulatedWhatIf(lambda h, t, c: tighter, plots=False)
    assert isinstance(impl, WhatIf)
    out = impl.replay(header, list(reversed(tasks)), config)  # any order: it sorts
    for side, cfg in ((out.current, config), (out.candidate, tighter)):
        total = Simulation(header, tasks, cfg, startup=STARTUP["local"]).run().total
        assert side.total.worker_seconds == pytest.approx(total.worker_seconds, abs=1e-3)
        assert side.total.max_replicas == total.max_replicas
        assert side.svg is None and side.config is cfg
    assert out.candidate.source == "tuner" and out.candidate.total.max_replicas == 2
    given = impl.replay(header, tasks, config, candidate=config)
    assert given.candidate.source == "given"
    assert given.candidate.total == given.current.total


def test_without_the_tuner_or_matplotlib_it_says_what_is_missing(config, monkeypatch):
    header, tasks = synthesize("steady", {"rate": 0.5}, duration=600, seed=1)
    monkeypatch.setitem(sys.modules, "autoscale.sim.tune", None)
    with pytest.raises(WhatIfUnavailable, match=r"tuner .* is not installed"):
        sim_whatif.SimulatedWhatIf(plots=False).replay(header, list(tasks), config)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    stub = sim_whatif.build()
    assert isinstance(stub, UnavailableWhatIf)
    with pytest.raises(WhatIfUnavailable, match=r"fleet\[tune\]"):
        stub.replay(header, [], config)
