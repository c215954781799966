"""What the dashboard can and cannot recover from the event stream: the pure decisions."""

from __future__ import annotations

import json

from fleet.dashboard.eventstream import decode_entry
from fleet.dashboard.gaps import (
    RESET,
    TRIMMED,
    WORKER_BUFFER,
    admit,
    attach_plan,
    id_time,
    later,
    marker_gap,
    parse_id,
    trim_gap,
)
from fleet.eventlog import Dropped


def test_ids_compare_as_numbers_not_text():
    assert parse_id("1700000000123-7") == (1700000000123, 7)
    assert parse_id(b"9-10") > parse_id("9-9")
    assert later("9-10", "9-9") == "9-10" and later(None, "1-0") == "1-0"
    assert id_time("1700000000123-0") == 1700000000.123


def test_an_entry_stored_already_is_only_acked():
    assert admit("5-0", written="7-0", fed="9-0") == "ack"
    assert admit("8-0", written="7-0", fed="9-0") == "skip"  # in a batch being written
    assert admit("10-0", written="7-0", fed="9-0") == "feed"
    assert admit("1-0", written=None, fed=None) == "feed"


def test_attaching_on_first_start_reads_the_whole_stream_and_loses_nothing():
    assert attach_plan(None, None, 100.0) == ("0", None)
    assert attach_plan(None, {"first-entry": ("5-0", {})}, 100.0) == ("0", None)


def test_a_group_gone_from_a_stream_that_still_holds_our_position_is_no_gap():
    info = {"first-entry": ("1000-0", {}), "length": 10}
    assert attach_plan("2000-0", info, 100.0) == ("2000-0", None)


def test_a_stream_gone_or_new_is_a_reset_gap():
    start, gap = attach_plan("2000-0", None, 100.0)
    assert start == "0" and gap.reason == RESET
    assert (gap.since, gap.until) == (2.0, 100.0)
    start, gap = attach_plan("2000-0", {"first-entry": ("9000-0", {})}, 100.0)
    assert start == "0" and (gap.since, gap.until) == (2.0, 9.0)


def test_trimmed_past_the_groups_position_counts_what_was_lost_on_redis_7():
    info = {"first-entry": ("5000-0", {}), "length": 1000}
    gap = trim_gap({"last-delivered-id": b"3000-0", "lag": 1500}, info)
    assert gap.reason == TRIMMED and gap.detail.startswith("500 stream entries")
    assert (gap.since, gap.until) == (3.0, 5.0)
    # trimmed exactly up to our position: the first entry left is newer, nothing lost
    assert trim_gap({"last-delivered-id": "3000-0", "lag": 1000}, info) is None
    # our position is still in the stream
    assert trim_gap({"last-delivered-id": "6000-0", "lag": 10}, info) is None
    assert trim_gap({"last-delivered-id": "6000-0"}, {"first-entry": None}) is None


def test_redis_6_cannot_count_so_it_says_may_have():
    gap = trim_gap({"last-delivered-id": "3000-0"}, {"first-entry": ("5000-0", {})})
    assert gap.reason == TRIMMED and "may have been" in gap.detail


def test_a_workers_marker_is_a_gap_and_garbage_is_not():
    d = Dropped()
    d.add([{"timestamp": 12.0}, {"timestamp": 10.0}])
    d.add({"timestamp": 11.0})
    marker = d.marker("w@h")
    gap = marker_gap(marker["gap"])
    assert (gap.since, gap.until, gap.reason) == (10.0, 12.0, WORKER_BUFFER)
    assert gap.detail == "w@h dropped 3 events"
    assert marker_gap(b"not json") is None and marker_gap(json.dumps({"x": 1})) is None
    assert Dropped().marker("w") is None


def test_decode_entry():
    events, gap = decode_entry({b"e": json.dumps([{"type": "task-received", "uuid": "a"},
                                                  {"no": "type"}])})
    assert [e["uuid"] for e in events] == ["a"] and gap is None
    assert decode_entry({b"e": b"{broken"}) == ([], None)
    assert decode_entry(None) == ([], None) and decode_entry({}) == ([], None)
    events, gap = decode_entry({b"gap": json.dumps({"hostname": "w", "dropped": 2,
                                                    "since": 1.0, "until": 2.0})})
    assert events == [] and gap.reason == WORKER_BUFFER
