import pytest

from fleet.config import parse_config
from fleet.routing import (
    SIZE_HEADER,
    FleetRouter,
    RoutingTable,
    globs_overlap,
    queue_for_name,
    route,
)
from tests.conftest import shipped_config


def table(overrides=None):
    data = shipped_config()
    data.update(overrides or {})
    return RoutingTable.from_config(parse_config(data, "queues.yaml"))


def test_names_and_globs_pick_their_queue():
    t = table()
    assert queue_for_name(t, "tasks.heavy.crunch") == "heavy"
    assert queue_for_name(t, "tasks.io.fetch") == "io"
    assert queue_for_name(t, "tasks.aggregate.sum_by") == "default"
    assert queue_for_name(t, "something.else") == "default"  # default_queue


def test_exact_name_beats_glob_and_specific_glob_beats_general():
    data = shipped_config()
    data["queues"]["io"]["tasks"] = ["tasks.*"]
    data["queues"]["heavy"]["tasks"] = ["tasks.heavy.*", "tasks.io.big_download"]
    t = RoutingTable.from_config(parse_config(data, "queues.yaml"))
    assert route(t, "tasks.heavy.crunch") == "heavy"
    assert route(t, "tasks.io.big_download") == "heavy"
    assert route(t, "tasks.io.fetch") == "io"


def test_size_rules_send_large_inputs_to_the_larger_class():
    t = table()
    assert route(t, "tasks.heavy.crunch", 10 * 2**20) == "heavy"
    assert route(t, "tasks.heavy.crunch", 300 * 2**20) == "xl"
    assert route(t, "tasks.aggregate.sum_by", 300 * 2**20) == "xl"
    # The rule covers tasks.* only: fleet's own tasks keep their queue.
    assert route(t, "fleet.jobs.collect", 300 * 2**20) == "default"
    # Exactly at the threshold is not over it.
    assert route(t, "tasks.heavy.crunch", 256 * 2**20) == "heavy"


def test_largest_matching_size_rule_wins():
    t = table({"size_rules": [
        {"over": "1Mi", "queue": "heavy"},
        {"over": "100Mi", "queue": "xl"},
    ]})
    assert route(t, "tasks.aggregate.sum_by", 2 * 2**20) == "heavy"
    assert route(t, "tasks.aggregate.sum_by", 200 * 2**20) == "xl"
    assert route(t, "tasks.aggregate.sum_by", 1000) == "default"


def test_celery_router_reads_the_size_header_and_gives_the_queue_priority():
    router = FleetRouter(table())
    # heavy declares priority 5 in the shipped queues.yaml; xl declares none.
    assert router("tasks.heavy.crunch", (), {}, {}) == {"queue": "heavy", "priority": 5}
    big = {"headers": {SIZE_HEADER: 512 * 2**20}}
    assert router("tasks.heavy.crunch", (), {}, big) == {"queue": "xl"}


@pytest.mark.parametrize(("a", "b", "overlap"), [
    ("tasks.*", "tasks.heavy.*", True), ("tasks.a*", "tasks.b*", False),
    ("*.heavy", "tasks.*", True), ("tasks.?x", "tasks.a?", True), ("a*b", "c*", False),
    ("[ab]x", "cx", False), ("[ab]x", "bx", True), ("tasks.io.*", "tasks.heavy.*", False),
    ("a*c*e", "*b*d*", True), ("abc", "a*", True), ("abc", "b*", False), ("*", "x", True),
    ("t.[ab]*", "t.[cd]*", False), ("t.[a-c]x", "t.[c-e]?", True),
])
def test_globs_overlap_when_some_name_matches_both(a, b, overlap):
    assert globs_overlap(a, b) is overlap
    assert globs_overlap(b, a) is overlap
