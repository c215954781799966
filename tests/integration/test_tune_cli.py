"""`fleet tune` on real files, as a user runs it (a subprocess of the CLI): the table,
the fragment and the merged config that `fleet validate` accepts, the same result for
the same seed, and one clear line with exit 2 for each bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleet.config import parse_config
from tests.conftest import without_module

ROOT = Path(__file__).resolve().parents[2]
QUEUES_YAML = ROOT / "queues.yaml"


def fleet(*args: str, cwd: Path = ROOT, env: dict | None = None
          ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def synth(directory: Path, shape: str, *params: str) -> Path:
    path = directory / f"{shape}.jsonl"
    done = fleet("trace", "synth", shape, *params, "--duration", "15m", "--seed", "1",
                 "-o", str(path))
    assert done.returncode == 0, done.stderr
    return path


@pytest.fixture(scope="module")
def steady(tmp_path_factory) -> Path:
    """Where the shipped config keeps a replica warm it needs only part time."""
    return synth(tmp_path_factory.mktemp("tune"), "steady")


@pytest.fixture(scope="module")
def bursts(tmp_path_factory) -> Path:
    """40 tasks every 2 minutes: no setting keeps their p95 near a millisecond."""
    return synth(tmp_path_factory.mktemp("tune"), "bursts", "-p", "chunks=40",
                 "-p", "every=2m")


def test_tune_writes_a_fragment_and_a_config_that_validate(steady, tmp_path):
    frag, full = tmp_path / "tuned.yaml", tmp_path / "queues.yaml"
    done = fleet("tune", str(steady), "--trials", "8", "--progress", "-o", str(frag),
                 "--write-config", str(full), "--config", str(QUEUES_YAML))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[0] == "run"
    assert lines[1].split()[0] == "current" and lines[2].split()[0] == "keda"
    assert sum("<- recommended" in line for line in lines) == 1
    assert f"recommendation written to {frag}" in done.stdout
    fragment = yaml.safe_load(frag.read_text())
    assert set(fragment) == {"version", "imports", "default_queue", "autoscaler", "queues"}
    assert set(fragment["queues"]) == {"default", "io", "heavy", "xl"}
    for path in (full, frag):
        checked = fleet("validate", str(path))
        assert checked.returncode == 0, checked.stderr
    tuned, source = (parse_config(yaml.safe_load(p.read_text()), "q.yaml")
                     for p in (full, QUEUES_YAML))
    assert tuned.queues["default"].autoscaling != source.queues["default"].autoscaling
    assert tuned.queues["default"].autoscaling == parse_config(
        fragment, "f.yaml").queues["default"].autoscaling
    assert tuned.queues["heavy"] == source.queues["heavy"]
    assert tuned.broker == source.broker and tuned.size_rules == source.size_rules


def test_the_same_seed_gives_the_same_recommendation(steady):
    runs = [fleet("tune", str(steady), "--trials", "6", "--seed", "5", "--json")
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    a, b = (json.loads(r.stdout) for r in runs)
    assert a["fragment"] == b["fragment"] and a["recommendation"] == b["recommendation"]
    assert [c["worker_seconds"] for c in a["front"]] == [c["worker_seconds"] for c in b["front"]]


def test_an_slo_nothing_meets_is_exit_1_naming_the_closest(bursts):
    done = fleet("tune", str(bursts), "--trials", "2", "--slo-wait-p95", "1ms")
    assert done.returncode == 1
    assert "<- closest" in done.stdout
    assert done.stderr.startswith("fleet: error: no trial of 2 met the SLO")
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize(("args", "says"), [
    (["missing.jsonl"], "missing.jsonl"),
    (["{trace}", "--slo-wait-p95", "soon"], "--slo-wait-p95"),
    (["{trace}", "--slo-wait-p95", "0s"], "must be more than 0"),
    (["{trace}", "--trials", "0"], "--trials"),
    (["{trace}", "--startup", "slow"], "start-up delay 'slow'"),
    (["{trace}", "--config", "{other}"], "'default' is not in"),
    (["{trace}", "--slo-wait-p95", "nosuch=30s"], "QUEUE one of default, io, heavy, xl"),
    (["{trace}", "--slo-wait-p95", "default=0s"], "default: '0s': must be more than 0"),
])
def test_bad_input_is_one_line_and_exit_2(steady, tmp_path, args, says):
    other = tmp_path / "other.yaml"
    other.write_text("version: 1\ndefault_queue: other\nqueues: {other: {}}\n")
    argv = [a.format(trace=steady, other=other) for a in args]
    done = fleet("tune", *argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr
    assert "Traceback" not in done.stderr


def test_without_optuna_it_is_exit_2_naming_the_extra(steady, tmp_path):
    import os

    env = {**os.environ, "PYTHONPATH": without_module(tmp_path, "optuna")}
    done = fleet("tune", str(steady), env=env)
    assert done.returncode == 2
    assert "pip install 'fleet[tune]'" in done.stderr
