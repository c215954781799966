"""Trace files (fleet.trace.io) and synthetic traces (fleet.trace.synth), no services.

The statistical checks use long traces and tolerances of several standard deviations
(stated at each), so they fail on a wrong generator, not on an unlucky seed; the seeds
are fixed anyway, so a run is reproducible.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import statistics
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from fleet.cli import cli
from fleet.dashboard.traces import instant, task_from_row
from fleet.trace.io import TraceError, read_trace, write_trace
from fleet.trace.model import VERSION, Header, Replicas, Task
from fleet.trace.synth import SHAPES, SynthError, diurnal_rate, synthesize

HEADER = Header(version=VERSION, source="test", start=1_700_000_000.0, duration=60.0,
                queues=["default", "heavy"], params={"why": "a test"})
RECORDS = [
    Task(queue="default", name="t.a", sent=0.5, service=1.25),
    Task(queue="heavy", name="t.b", sent=2.0, service=None, state="STARTED", received=2.5,
         started=3.0, input_bytes=1024, task_id="job-0123456789ab.3"),
    Replicas(at=5.0, queue="heavy", current=0, desired=2, reason="backlog"),
    Task(queue="default", name="t.a", sent=1.0, service=0.0),  # out of order: fine
]


# -- io -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz"])
def test_a_trace_reads_back_as_written(tmp_path, name):
    path = tmp_path / name
    assert write_trace(path, HEADER, iter(RECORDS)) == len(RECORDS)
    header, records = read_trace(path)
    assert header == HEADER
    assert list(records) == RECORDS
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")


def test_optional_fields_left_at_none_are_not_written_but_service_is(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trace(path, HEADER, RECORDS[:2])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[1] == {"kind": "task", "queue": "default", "name": "t.a", "sent": 0.5,
                        "service": 1.25, "state": "SUCCESS"}
    assert lines[2]["service"] is None and "finished" not in lines[2]


def test_gzip_is_recognised_by_its_bytes_not_its_name(tmp_path):
    write_trace(tmp_path / "t.jsonl.gz", HEADER, RECORDS)
    (tmp_path / "t.jsonl.gz").rename(tmp_path / "renamed.jsonl")
    assert len(list(read_trace(tmp_path / "renamed.jsonl")[1])) == len(RECORDS)


def test_records_are_read_lazily(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trace(path, HEADER, RECORDS)
    with path.open("a") as out:
        out.write("not json\n")
    _, records = read_trace(path)  # the header is fine: no error yet
    assert next(records) == RECORDS[0]
    with pytest.raises(TraceError):
        list(records)


def test_write_refuses_a_queue_the_header_does_not_list_and_leaves_no_file(tmp_path):
    path = tmp_path / "t.jsonl"
    bad = Task(queue="xl", name="t", sent=0, service=1)
    with pytest.raises(TraceError, match=r"t.jsonl:3: queue: 'xl' is not one of the "
                                         r"header's queues \(default, heavy\)"):
        write_trace(path, HEADER, [RECORDS[0], bad])
    assert list(tmp_path.iterdir()) == []


def _header(**change) -> str:
    return json.dumps({**HEADER.model_dump(mode="json"), **change})


TASK = json.dumps({"kind": "task", "queue": "default", "name": "t", "sent": 1, "service": 2})
NEGATIVE = TASK.replace('"sent": 1', '"sent": -1')

#: (file content, line, key path, words of the reason)
BAD = {
    "empty": ("", 1, "", "empty file: expected a header"),
    "not JSON": (f"{_header()}\n{TASK}\n{{'kind': 'task'}}\n", 3, "", "not JSON"),
    "not an object": (f"{_header()}\n[1, 2]\n", 2, "", "expected a JSON object, got list"),
    "no header": (f"{TASK}\n", 1, "kind", "the first line must be the header"),
    "second header": (f"{_header()}\n{TASK}\n{_header()}\n", 3, "kind",
                      "a second header (the header is line 1)"),
    "version": (f"{_header(version=7)}\n", 1, "version",
                "version 7 is not supported: this fleet reads version 1"),
    "no version": (json.dumps({"kind": "header", "source": "x", "duration": 1,
                               "queues": ["default"]}) + "\n", 1, "version",
                   "Field required"),
    "kind": (f"{_header()}\n{TASK.replace('task', 'job', 1)}\n", 2, "kind",
             "unknown kind 'job': expected one of task, replicas"),
    "field": (f"{_header()}\n{NEGATIVE}\n", 2, "sent",
              "greater than or equal to 0"),
    "field type": (f"{_header()}\n" + json.dumps({"kind": "replicas", "at": 1,
                   "queue": "default", "current": "two", "desired": 1}) + "\n", 2,
                   "current", "valid integer"),
    "unknown field": (f"{_header()}\n{TASK[:-1]}, \"colour\": \"red\"}}\n", 2, "colour",
                      "unknown field"),
    "missing field": (f"{_header()}\n" + json.dumps({"kind": "task", "queue": "default",
                      "name": "t", "sent": 1}) + "\n", 2, "service", "Field required"),
    "queue": (f"{_header()}\n\n{TASK.replace('default', 'xl')}\n", 3, "queue",
              "'xl' is not one of the header's queues (default, heavy)"),
    "header field": (f"{_header(duration='long')}\n", 1, "duration", "valid number"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_file_names_file_line_key_and_reason(tmp_path, case):
    text, line, key, reason = BAD[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(TraceError) as caught:
        _, records = read_trace(path)
        list(records)
    err = caught.value
    assert (err.line, err.path) == (line, key), str(err)
    assert reason in err.reason, str(err)
    assert str(err).startswith(f"{path}:{line}: " + (f"{key}: " if key else "")), str(err)
    assert err.exit_code == 2


def test_a_truncated_gzip_is_named_too(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    write_trace(path, HEADER, RECORDS * 500)
    path.write_bytes(path.read_bytes()[:-40])
    _, records = read_trace(path)
    with pytest.raises(TraceError, match=r"t.jsonl.gz:\d+: unreadable"):
        list(records)


def test_a_missing_file_is_a_trace_error(tmp_path):
    with pytest.raises(TraceError, match=r"nope\.jsonl: cannot read: No such file"):
        read_trace(tmp_path / "nope.jsonl")


# -- synth: determinism -------------------------------------------------------------

@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_is_deterministic_by_seed_and_valid(tmp_path, shape):
    header, tasks = synthesize(shape, duration=600, seed=7)
    first = list(tasks)
    assert first == list(synthesize(shape, duration=600, seed=7)[1])
    assert first != list(synthesize(shape, duration=600, seed=8)[1])
    assert header.source == f"synth:{shape}" and header.params["shape"] == shape
    assert header.params["seed"] == 7
    assert [t.sent for t in first] == sorted(t.sent for t in first)
    assert all(0 <= t.sent < 600 and t.service >= 0 for t in first)
    # It is a valid trace: it writes and reads back.
    write_trace(tmp_path / "t.jsonl", header, first)
    assert list(read_trace(tmp_path / "t.jsonl")[1]) == first


def test_the_header_records_every_parameter_with_its_default():
    header, _ = synthesize("bursts", {"chunks": "20"}, duration=60, seed=1)
    assert header.params == {"shape": "bursts", "queue": "default", "task": "synthetic",
                             "chunks": 20, "every": 60.0, "spread": 1.0,
                             "service": "lognormal", "median": 1.0, "sigma": 0.5,
                             "seed": 1}
    assert header.queues == ["default", "io", "heavy", "xl"]


def test_the_service_option_does_not_move_the_arrivals():
    base = [t.sent for t in synthesize("steady", duration=600, seed=3)[1]]
    other = synthesize("steady", {"service": "pareto", "alpha": "2"}, duration=600, seed=3)
    assert [t.sent for t in other[1]] == base


# -- synth: each shape's statistics ---------------------------------------------------

def test_steady_mean_rate():
    tasks = list(synthesize("steady", {"rate": "2"}, duration=36_000, seed=1)[1])
    # 72,000 expected, standard deviation 268 (0.4%): 2% is five of them.
    assert len(tasks) == pytest.approx(72_000, rel=0.02)
    gaps = [b.sent - a.sent for a, b in itertools.pairwise(tasks)]
    # exponential gaps: standard deviation equals the mean
    assert statistics.stdev(gaps) == pytest.approx(statistics.fmean(gaps), rel=0.03)


def test_bursts_count_and_spacing():
    tasks = list(synthesize("bursts", {"chunks": 50, "every": "5m", "spread": "2s"},
                            duration=3600, seed=1)[1])
    assert len(tasks) == 12 * 50
    starts = sorted({math.floor(t.sent / 300) for t in tasks})
    assert starts == list(range(12))
    assert all(t.sent % 300 < 2 for t in tasks)


def test_diurnal_peak_and_trough():
    params = {"min_rate": 0.2, "max_rate": 2.0, "period": "1h"}
    tasks = list(synthesize("diurnal", params, duration=36_000, seed=1)[1])
    assert len(tasks) == pytest.approx(1.1 * 36_000, rel=0.02)  # the mean rate: 1.1/s
    phase = [t.sent % 3600 / 3600 for t in tasks]
    trough = sum(p < 0.05 or p >= 0.95 for p in phase)
    peak = sum(0.45 <= p < 0.55 for p in phase)
    v = {**params, "period": 3600.0}

    def expected(lo: float, hi: float) -> float:  # 10 periods of the rate's integral
        steps = 1000
        width = (hi - lo) * 3600 / steps
        return 10 * sum(diurnal_rate(v, (lo + (i + 0.5) / steps * (hi - lo)) * 3600)
                        for i in range(steps)) * width

    low = expected(0, 0.05) + expected(0.95, 1)
    high = expected(0.45, 0.55)
    # peak ~7,100 (sd 84) and trough ~850 (sd 29): within five standard deviations
    assert abs(peak - high) < 5 * math.sqrt(high)
    assert abs(trough - low) < 5 * math.sqrt(low)


def test_spike_is_silent_in_its_gap_and_steady_around_it():
    tasks = list(synthesize("spike", {"rate": 5, "at": "10m", "gap": "5m"},
                            duration=1800, seed=1)[1])
    assert not [t for t in tasks if 600 <= t.sent < 900]
    before = sum(t.sent < 600 for t in tasks)
    after = sum(t.sent >= 900 for t in tasks)
    assert before == pytest.approx(3000, rel=0.1)  # sd 55: about five
    assert after == pytest.approx(4500, rel=0.1)


def test_lognormal_median():
    tasks = synthesize("steady", {"rate": 10, "median": "3", "sigma": "1"},
                       duration=3600, seed=2)[1]
    services = [t.service for t in tasks]
    # 36,000 draws, sigma 1: the log of the median has sd 1.25/190 (0.7%)
    assert statistics.median(services) == pytest.approx(3.0, rel=0.04)


def test_pareto_median_and_floor():
    tasks = synthesize("heavy-tailed", {"rate": 10, "scale": "2", "alpha": "1.5"},
                       duration=3600, seed=2)[1]
    services = [t.service for t in tasks]
    assert min(services) >= 2.0
    # the median is scale * 2^(1/alpha) = 3.17; its sd here is well under 1%
    assert statistics.median(services) == pytest.approx(2 * 2 ** (1 / 1.5), rel=0.04)
    assert max(services) > 50 * statistics.median(services)  # and the tail is heavy


def test_mixed_sends_short_tasks_to_default_and_heavy_ones_to_heavy():
    tasks = list(synthesize("mixed", {"rate": 2, "heavy_rate": 0.1}, duration=36_000,
                            seed=1)[1])
    short = [t for t in tasks if t.queue == "default"]
    heavy = [t for t in tasks if t.queue == "heavy"]
    assert len(short) + len(heavy) == len(tasks)
    assert len(short) == pytest.approx(72_000, rel=0.02)
    assert len(heavy) == pytest.approx(3_600, rel=0.1)  # sd 60
    assert statistics.median(t.service for t in short) == pytest.approx(0.2, rel=0.04)
    assert min(t.service for t in heavy) >= 30
    assert {t.name for t in heavy} == {"synthetic.heavy"}
    assert [t.sent for t in tasks] == sorted(t.sent for t in tasks)


# -- synth: bad parameters ------------------------------------------------------------

@pytest.mark.parametrize(("shape", "params", "message"), [
    ("steddy", {}, "unknown shape 'steddy': expected one of steady, bursts"),
    ("steady", {"rat": 1}, "steady: unknown parameter 'rat'; its parameters: queue, task, "
                           "rate,"),
    ("steady", {"rate": "fast"}, "steady: rate: expected a number, got 'fast'"),
    ("steady", {"rate": "0"}, "steady: rate: must be > 0"),
    ("steady", {"rate": "nan"}, "steady: rate: expected a finite number"),
    ("steady", {"queue": "gpu"}, "steady: queue: 'gpu' is not a queue of the config "
                                 "(default, io, heavy, xl)"),
    ("steady", {"service": "weibull"}, "steady: service: expected one of lognormal, "
                                       "pareto, exponential, constant"),
    ("steady", {"alpha": 2}, "steady: alpha applies to service=pareto, not "
                             "service=lognormal"),
    ("heavy-tailed", {"alpha": "0.01"}, "heavy-tailed: alpha: must be >= 0.1"),
    ("bursts", {"chunks": "2.5"}, "bursts: chunks: expected a whole number >= 1"),
    ("bursts", {"every": "soon"}, "bursts: every: expected a duration like 30s"),
    ("bursts", {"every": "0s"}, "bursts: every: must be > 0"),
    ("diurnal", {"min_rate": 3, "max_rate": 2}, "diurnal: min_rate (3) is above max_rate"),
    ("bursts", {"every": "10s", "spread": "10s"}, "bursts: spread (10s) must be shorter "
                                                  "than every (10s)"),
    ("mixed", {"heavy_queue": "gpu"}, "mixed: heavy_queue: 'gpu' is not a queue"),
])
def test_a_bad_parameter_is_named(shape, params, message):
    with pytest.raises(SynthError) as caught:
        synthesize(shape, params, duration=60)
    assert message in str(caught.value)
    assert caught.value.exit_code == 2


def test_a_bad_duration_or_seed_is_named():
    with pytest.raises(SynthError, match="steady: duration: must be > 0"):
        synthesize("steady", duration=0)
    with pytest.raises(SynthError, match="steady: seed: expected a whole number"):
        synthesize("steady", seed="x")  # type: ignore[arg-type]


def test_queues_follow_the_config():
    header, tasks = synthesize("steady", {"queue": "gpu"}, duration=60, queues=["gpu"])
    assert header.queues == ["gpu"] and {t.queue for t in tasks} == {"gpu"}


# -- the command and export's times ---------------------------------------------------

def test_trace_synth_writes_a_trace(tmp_path):
    out = tmp_path / "t.jsonl.gz"
    done = CliRunner().invoke(cli, ["trace", "synth", "bursts", "-p", "chunks=10", "-p",
                                    "every=1m", "--duration", "10m", "--seed", "4",
                                    "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert "100 tasks, bursts over 10m (seed 4)" in done.output
    header, tasks = read_trace(out)
    assert header.params["seed"] == 4 and len(list(tasks)) == 100
    with gzip.open(out, "rt") as f:
        assert json.loads(f.readline())["kind"] == "header"


@pytest.mark.parametrize("args", [["-p", "rate"], ["-p", "rate=1", "-p", "rate=2"],
                                  ["--duration", "forever"]])
def test_trace_synth_usage_errors(tmp_path, args):
    done = CliRunner().invoke(cli, ["trace", "synth", "steady", *args, "-o",
                                    str(tmp_path / "t.jsonl")])
    assert done.exit_code == 2, done.output


def test_export_window_times():
    now = 1_800_000_000.0
    assert instant("1h", now) == now - 3600
    assert instant("90", now) == now - 90
    assert instant("1h30m", now) == now - 5400
    assert instant("2026-12-02T14:00:00", now) == datetime(2026, 12, 2, 14, tzinfo=UTC
                                                           ).timestamp()
    assert instant("2026-12-02T15:00:00+01:00", now) == instant("2026-12-02T14:00Z", now)
    with pytest.raises(ValueError, match=r"expected a duration ago .* or an ISO time"):
        instant("yesterday", now)


def _row(**change):
    base = dict(uuid="job-0123456789ab.0", name="t.x", queue="default", state="SUCCESS",
                received=1010.0, started=1011.0, succeeded=1013.0, failed=None,
                runtime=1.5, first_seen=1010.0)
    return SimpleNamespace(**{**base, **change})


def test_an_exported_task_takes_the_ledgers_send_time_and_size():
    skipped: dict[str, int] = {}
    task = task_from_row(_row(), (1004.0, 580, 1), 1000.0, 2000.0, skipped)
    assert (task.sent, task.received, task.started, task.finished) == (4, 10, 11, 13)
    assert (task.service, task.input_bytes, task.task_id) == (1.5, 580, "job-0123456789ab.0")
    # sent again: the ledger's time is the last send's, so the receipt stands in
    assert task_from_row(_row(), (1004.0, 580, 2), 1000.0, 2000.0, skipped).sent == 10
    # a clock that puts the send after the receipt: the receipt
    assert task_from_row(_row(), (1012.0, 580, 1), 1000.0, 2000.0, skipped).sent == 10
    # sent before the window: out (strict), or kept at its receipt (no --since)
    assert task_from_row(_row(), (990.0, 580, 1), 1000.0, 2000.0, skipped) is None
    assert task_from_row(_row(), (990.0, 580, 1), 1000.0, 2000.0, skipped,
                         strict=False).sent == 10
    assert skipped == {}


def test_an_exported_task_without_runtime_queue_or_end():
    skipped: dict[str, int] = {}
    failed = task_from_row(_row(state="FAILURE", succeeded=None, failed=1012.5, runtime=None),
                           None, 1000.0, 2000.0, skipped)
    assert (failed.state, failed.finished, failed.service) == ("FAILURE", 12.5, 1.5)
    running = task_from_row(_row(state="STARTED", succeeded=None, runtime=None), None,
                            1000.0, 2000.0, skipped)
    assert running.service is None and running.finished is None
    revoked = task_from_row(_row(state="REVOKED", received=None, started=None,
                                 succeeded=None, runtime=None, first_seen=1020.0),
                            None, 1000.0, 2000.0, skipped)
    assert revoked.sent == 20 and revoked.received is None
    assert task_from_row(_row(received=2000.0), None, 1000.0, 2000.0, skipped) is None
    assert task_from_row(_row(queue=None), None, 1000.0, 2000.0, skipped) is None
    assert skipped == {"queue unknown": 1}
