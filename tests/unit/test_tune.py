"""The tuner (autoscale/sim/tune.py, space.py): the search space, the Pareto choice, the
fragment, reproducibility and the SLO that cannot be met. Real simulations of short
synthetic traces, no services."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from autoscale.sim.errors import SimulationError
from autoscale.sim.space import COUNTS, FIELDS, search_space, source_settings
from autoscale.sim.tune import (
    Candidate,
    QueueFigures,
    SloNotMet,
    choose,
    merged,
    pareto_front,
    recommend,
)
from fleet.config import Autoscaling, parse_config
from fleet.trace.synth import synthesize

QUEUES_YAML = Path(__file__).resolve().parents[2] / "queues.yaml"


def shipped():
    return parse_config(yaml.safe_load(QUEUES_YAML.read_text()), str(QUEUES_YAML))


def trace(shape: str = "steady", duration: float = 900.0, **params):
    """Steady: the shipped config keeps a replica warm that it needs only part time, so
    a short study finds savings. Bursts of 40 every 2 minutes: the shipped default
    queue's 10 s target_wait needs all 8 of its replicas, so no SLO below that holds."""
    if shape == "bursts":
        params = {"chunks": 40, "every": "2m", **params}
    header, tasks = synthesize(shape, params, duration=duration, seed=1)
    return header, list(tasks)


# -- the search space --------------------------------------------------------------------


def test_every_source_value_is_a_point_of_its_own_space():
    config = shipped()
    queues = list(config.queues)
    space = search_space(config, queues)
    point = source_settings(config, queues).params()
    low, high = space.interval
    assert low <= point["interval"] <= high
    for q in queues:
        for f, r in space.queues[q].items():
            assert r.low <= point[f"{q}.{f}"] <= r.high, (q, f)


def test_min_replicas_can_never_exceed_max_replicas():
    for scaling in (Autoscaling(), Autoscaling(min_replicas=3, max_replicas=3),
                    Autoscaling(min_replicas=0, max_replicas=1)):
        s = search_space(parse_config({"version": 1, "default_queue": "a", "queues": {
            "a": {"autoscaling": scaling.model_dump(mode="json")}}}, "t.yaml"), ["a"])
        r = s.queues["a"]
        assert r["min_replicas"].high <= r["max_replicas"].low


def test_the_space_covers_every_autoscaling_field():
    assert set(FIELDS) == set(Autoscaling.model_fields)
    assert set(COUNTS) < set(FIELDS)


# -- the Pareto choice -------------------------------------------------------------------


def cand(n: int, cost: float, p95: float, slo: float = 10.0) -> Candidate:
    return Candidate(f"trial {n}", n, None, cost, p95,
                     {"a": QueueFigures(cost, p95, slo, tasks=10)})


def test_the_front_keeps_what_nothing_beats_on_both_cheapest_first():
    runs = [cand(0, 100, 5), cand(1, 80, 9), cand(2, 90, 9), cand(3, 120, 1), cand(4, 80, 9)]
    assert [c.trial for c in pareto_front(runs)] == [1, 0, 3]


def test_the_recommendation_is_the_cheapest_that_meets_the_slo():
    runs = [cand(0, 50, 30), cand(1, 80, 9), cand(2, 100, 2)]
    front, best, closest = choose(runs)
    assert best is closest is runs[1]
    assert [c.trial for c in front] == [1, 2]  # the front of the trials that met it


def test_without_a_trial_that_meets_it_there_is_none_and_the_closest_is_named():
    runs = [cand(0, 50, 30), cand(1, 80, 12), cand(2, 40, 100)]
    _, best, closest = choose(runs)
    assert best is None and closest is runs[1]


def test_a_run_that_could_not_drain_never_meets_the_slo():
    c = Candidate("t", 0, None, 1, 0.0, {"a": QueueFigures(1, 0.0, 10, tasks=5, unstarted=2)})
    assert not c.meets_slo and c.violation > 1000


def test_merged_replaces_by_path():
    assert merged({"a": {"b": 1, "c": [1]}, "d": 2}, {"a": {"c": [2]}}) == {
        "a": {"b": 1, "c": [2]}, "d": 2}


# -- whole studies -----------------------------------------------------------------------


def test_a_study_recommends_a_valid_config_cheaper_than_the_source_and_is_reproducible():
    """The whole contract the CLI and the dashboard rely on, in one study of 12 trials."""
    header, tasks = trace()
    config = shipped()
    first = recommend(header, tasks, config, trials=12, seed=3)
    assert first.best is not None and first.best.meets_slo
    assert first.best.worker_seconds < first.current.worker_seconds
    # The fragment alone is a valid config; merged into the source it is the config
    # the result carries, in which only the queue the trace uses changed.
    fragment = first.fragment()
    assert set(fragment["queues"]) == set(config.queues)
    alone = parse_config(fragment, "fragment.yaml")
    assert alone.queues["default"].autoscaling == first.config.queues["default"].autoscaling
    again = parse_config(merged(yaml.safe_load(QUEUES_YAML.read_text()), fragment),
                         first.config.source)
    assert again == first.config
    assert again.queues["heavy"] == config.queues["heavy"]
    assert again.queues["default"].autoscaling != config.queues["default"].autoscaling
    second = recommend(header, tasks, config, trials=12, seed=3)
    assert second.fragment() == fragment
    assert [c.as_dict() for c in second.front] == [c.as_dict() for c in first.front]


def test_progress_is_told_every_run():
    header, tasks = trace(duration=300)
    seen = []
    recommend(header, tasks, shipped(), trials=3, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, 5) for i in range(1, 6)]


def test_an_slo_no_setting_can_meet_gives_no_recommendation():
    header, tasks = trace("bursts")
    result = recommend(header, tasks, shipped(), slo_wait_p95=0.001, trials=4)
    assert result.best is None and not result.closest.meets_slo
    assert result.config == shipped()
    with pytest.raises(SloNotMet, match="no trial of 4 met the SLO"):
        result.fragment()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"trials": 0}, "trials 0: must be at least 1"),
    ({"slo_wait_p95": 0.0}, "seconds must be more than 0"),
])
def test_bad_arguments_are_simulation_errors(kwargs, message):
    header, tasks = trace(duration=300)
    with pytest.raises(SimulationError, match=message):
        recommend(header, tasks, shipped(), **kwargs)


def test_a_queue_the_config_does_not_know_is_an_error():
    header, tasks = trace(duration=300)
    config = parse_config({"version": 1, "default_queue": "other",
                           "queues": {"other": {}}}, "other.yaml")
    with pytest.raises(SimulationError, match="'default' is not in other"):
        recommend(header, tasks, config, trials=1)


def test_an_slo_per_queue_leaves_the_others_at_their_target_wait():
    from autoscale.sim.tune import slo_per_queue

    config = shipped()
    assert slo_per_queue(config, ["default", "heavy"], {"heavy": 600.0}) == {
        "default": 10.0, "heavy": 600.0}
    assert slo_per_queue(config, ["default"], 30.0) == {"default": 30.0}
    with pytest.raises(SimulationError, match="SLO of queue 'nosuch'"):
        slo_per_queue(config, ["default"], {"nosuch": 1.0})
