"""`fleet simulate --plot`: the recorded series (bounded, maxima kept, what the backend
had at each poll) and the figures (PNG, SVG), and the errors (a bad suffix, no
matplotlib). No services."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from autoscale.sim.engine import Simulation
from autoscale.sim.series import QueueSeries, Series
from tests.conftest import ROOT, without_module
from tests.unit.test_simulate import SCALING, bursty, config, header


def test_a_series_stays_bounded_and_keeps_the_maxima_and_the_last_replicas():
    s = QueueSeries("a", capacity=100)
    peaks = {1234: 900, 20_000: 700, 43_199: 500}
    for i in range(43_200):
        waiting = peaks.get(i, i % 7)
        s.add(2.0 * i, waiting, i % 5, ready=i // 1000, starting=i % 3,
              oldest=None if i % 2 else float(waiting))
        assert len(s) <= 100
    assert len(s) >= 50
    assert max(s.waiting) == 900 and max(s.held) == 4
    assert max(a for a in s.oldest if a is not None) == 900.0
    for at, value in peaks.items():
        # The point whose span holds the peak carries it.
        j = next(j for j, t in enumerate(s.time) if t >= 2.0 * at)
        assert s.waiting[j] == value
    # Times stay in order, each point at its span's end; replicas are the span's last.
    assert s.time == sorted(s.time) and s.time[-1] == 2.0 * 43_199
    assert (s.ready[-1], s.starting[-1]) == (43, 43_199 % 3)


def test_a_series_short_of_its_capacity_is_every_poll_as_given():
    s = QueueSeries("a", capacity=10)
    for i in range(7):
        s.add(float(i), i, 0, 1, 0, None if i == 3 else float(i))
    assert s.time == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert s.oldest[3] is None and s.waiting == list(range(7))
    # One more than fits: pairs merge, an odd count's last point fills up later.
    for i in range(7, 11):
        s.add(float(i), 0, 0, 2, 0, None)
    assert s.time == [1.0, 3.0, 5.0, 7.0, 9.0, 10.0]
    assert s.waiting == [1, 3, 5, 6, 0, 0] and s.oldest[1] == 2.0
    assert s.span == 2


def test_a_points_p95_is_of_the_waits_started_since_the_last_poll_merged_as_the_max():
    s = QueueSeries("a", capacity=4)
    s.add(0.0, 0, 0, 0, 0, None)
    for w in range(1, 101):
        s.add_wait(float(w))
    s.add(2.0, 0, 0, 0, 0, None)
    s.add(4.0, 0, 0, 0, 0, None)  # nothing started in between
    assert s.wait_p95[0] is None and s.wait_p95[1] == pytest.approx(95, rel=0.01)
    assert s.wait_p95[2] is None
    s.add_wait(500.0)
    s.add(6.0, 0, 0, 0, 0, None)  # full: (0, 2) and (4, 6) merge
    assert s.time == [2.0, 6.0]
    assert s.wait_p95[0] == pytest.approx(95, rel=0.01)
    assert s.wait_p95[1] == pytest.approx(500, rel=0.01)


def test_recording_changes_no_figure_of_the_report():
    runs = [Simulation(header(3600), bursty(), config(SCALING), startup=5.0,
                       record=record) for record in (False, True)]
    plain, recorded = (json.dumps(sim.run().as_dict()) for sim in runs)
    assert plain == recorded
    s = runs[1].series["a"]
    assert max(w for w in s.wait_p95 if w is not None) > 0


def test_a_day_of_100_queues_at_a_2s_poll_is_bounded():
    series = Series([f"q{i}" for i in range(100)])
    q = series["q0"]
    for i in range(43_200):
        q.add(2.0 * i, i, 0, 1, 0, None)
    assert len(q) <= 2000 and q.waiting[-1] == 43_199


def test_recorded_replicas_are_the_backends_at_each_poll():
    sim = Simulation(header(3600), bursty(), config(SCALING), startup=5.0, record=True)
    sim.series = Series(sim.queues, capacity=10**6)  # every poll, to compare each
    seen = []
    poll = sim._poll

    def spy():
        poll()
        seen.append((sim.now, sim.backend.replicas()["a"],
                     sum(1 for r in sim.queues["a"].replicas if r.ready)))

    sim._poll = spy
    report = sim.run()
    s = sim.series["a"]
    assert len(s) == len(seen) == report.polls
    assert [(t, r + st) for t, r, st in zip(s.time, s.ready, s.starting, strict=True)] \
        == [(t, n) for t, n, _ in seen]
    assert s.ready == [ready for _, _, ready in seen]
    assert max(s.ready) + max(s.starting) >= 3 and max(s.waiting) > 0


def test_without_record_nothing_is_recorded():
    sim = Simulation(header(3600), bursty(), config(SCALING), startup=5.0)
    sim.run()
    assert sim.series is None


def _files(tmp_path):
    head = {"kind": "header", "version": 1, "source": "synth:test", "duration": 900,
            "queues": ["alpha", "beta"]}
    lines = [{"kind": "task", "queue": "alpha", "name": "t", "sent": 10 + i * 0.5,
              "service": 5} for i in range(200)]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(x) for x in [head, *lines]) + "\n")
    cfg = tmp_path / "queues.yaml"
    cfg.write_text("version: 1\ndefault_queue: alpha\nqueues:\n"
                   "  alpha: {concurrency: 2, autoscaling: {max_replicas: 6, "
                   "target_wait: 20s}}\n  beta: {concurrency: 2}\n")
    return trace, cfg


def test_plots_as_png_and_svg(tmp_path):
    from click.testing import CliRunner

    from fleet.cli import cli

    trace, cfg = _files(tmp_path)
    png, svg = tmp_path / "out.png", tmp_path / "out.svg"
    done = CliRunner().invoke(cli, ["simulate", str(trace), "--config", str(cfg),
                                    "--plot", str(png), "--plot", str(svg)])
    assert done.exit_code == 0, done.output
    assert f"plot: {png}" in done.output and f"plot: {svg}" in done.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    text = " ".join("".join(e.itertext()) for e in root.iter() if e.tag.endswith("text"))
    for label in ("alpha: backlog", "alpha: replicas", "alpha: wait", "messages",
                  "replicas", "age (s)", "simulated time (min)", "target_wait 20s",
                  "p95 of waits started",
                  "left out, no tasks: beta"):
        assert label in text, label
    assert "beta: backlog" not in text


def test_plots_with_json_keep_stdout_json(tmp_path):
    from click.testing import CliRunner

    from fleet.cli import cli

    trace, cfg = _files(tmp_path)
    done = CliRunner().invoke(cli, ["simulate", str(trace), "--config", str(cfg), "--json",
                                    "--plot", str(tmp_path / "x.svg")])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["total"]["tasks"] == 200
    assert (tmp_path / "x.svg").stat().st_size > 0


def test_plots_beside_a_comparison_draw_the_fleets_run_once(tmp_path):
    from click.testing import CliRunner

    from fleet.cli import cli

    trace, cfg = _files(tmp_path)
    png = tmp_path / "c.png"
    args = ["simulate", str(trace), "--config", str(cfg), "--compare", "keda,fixed"]
    done = CliRunner().invoke(cli, [*args, "--json", "--plot", str(png)])
    assert done.exit_code == 0, done.output
    with_plot = json.loads(done.output)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(with_plot["compare"]) == {"keda", "fixed"}
    # Recording for the plot changes none of the three runs' figures.
    without = json.loads(CliRunner().invoke(cli, [*args, "--json"]).output)
    assert with_plot == without


def _cli(tmp_path, *args, pythonpath=str(ROOT)):
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": pythonpath})


def test_a_plot_file_of_another_format_is_exit_2(tmp_path):
    trace, cfg = _files(tmp_path)
    done = _cli(tmp_path, "simulate", str(trace), "--config", str(cfg),
                "--plot", "out.txt")
    assert done.returncode == 2, done.stderr
    assert "Invalid value for '--plot': out.txt: a plot is a .png or .svg file" \
        in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out.txt").exists()


@pytest.fixture
def no_matplotlib(tmp_path) -> str:
    """matplotlib cannot be imported: `pip install fleet` without the tune extra."""
    return without_module(tmp_path, "matplotlib")


def test_plots_without_matplotlib_are_exit_2_naming_the_extra(tmp_path, no_matplotlib):
    trace, cfg = _files(tmp_path)
    done = _cli(tmp_path, "simulate", str(trace), "--config", str(cfg),
                "--plot", "x.png", pythonpath=no_matplotlib)
    assert done.returncode == 2, done.stderr
    assert "plots need matplotlib, which is not installed here: pip install 'fleet[tune]'" \
        in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x.png").exists()
    # Without --plot the command never imports it.
    done = _cli(tmp_path, "simulate", str(trace), "--config", str(cfg),
                pythonpath=no_matplotlib)
    assert done.returncode == 0, done.stderr


def test_many_queues_are_drawn_with_fixed_margins_all_named(tmp_path):
    from autoscale.sim import plot
    from bench.simulate import config as bench_config

    names, cfg = bench_config(20, 2)
    series = Series(names)
    for i in range(50):
        for n in names:
            series[n].add(2.0 * i, i, 1, 2, 0, float(i))
    fig = plot.figure(series, cfg, duration=100.0, active=names[:-1])
    plot.save(fig, [tmp_path / "many.svg"])
    text = (tmp_path / "many.svg").read_text()
    assert all(f"{n}: replicas" in text for n in names[:-1])
    assert "left out, no tasks: q019" in text and "simulated time (s)" in text
    assert fig.get_layout_engine() is None  # 19 rows: not solved


def test_time_units_follow_the_length():
    from autoscale.sim.plot import PlotError, format_of, time_unit

    assert [time_unit(x)[0] for x in (30, 599, 600, 7200, 5 * 3600, 86400)] == [
        "s", "s", "min", "min", "h", "h"]
    assert (format_of("a.PNG"), format_of("b.svg")) == ("png", "svg")
    with pytest.raises(PlotError, match=r"c\.pdf: a plot is a \.png or \.svg file"):
        format_of("c.pdf")
