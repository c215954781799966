"""Baselines in the same run (autoscale/sim/baselines.py, compare.py): the KEDA-like and
fixed-size controllers from hand-computed cases, the `--compare` command, and that the
controller seam left the fleet's own results bit for bit as they were. No services."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from autoscale.sim import simulate
from fleet.config import load_config
from fleet.trace.synth import synthesize

QUEUES_YAML = Path(__file__).resolve().parents[2] / "queues.yaml"


def fingerprint(report) -> str:
    """Every figure of a report, unrounded (reprs of the floats, the wait histogram's
    buckets), hashed."""
    out = {"simulated": repr(report.simulated), "polls": report.polls,
           "max_total": report.max_total_replicas, "backlog": report.max_total_backlog}
    for n, q in report.queues.items():
        d = {k: repr(v) for k, v in vars(q).items() if k != "waits"}
        w = q.waits
        d["waits"] = [sorted(w.buckets.items()), w.count, repr(w.total), repr(w.maximum)]
        out[n] = d
    return hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()[:16]


# Computed with the engine before it had controllers (commit 705e3f4), queues.yaml as
# shipped, an hour of each shape, start-up 8 s with 20% jitter, seed 5.
BEFORE = [("bursts", 1, "c4e2d0f53467153f"), ("mixed", 2, "b1dccd98400e699d"),
          ("spike", 3, "2f6e5318736c8fcd"), ("heavy-tailed", 4, "ecff235241033868")]


@pytest.mark.parametrize(("shape", "seed", "expected"), BEFORE)
def test_the_fleets_results_are_bit_identical_to_before_the_controller_seam(
        shape, seed, expected):
    cfg = load_config(QUEUES_YAML)
    h, tasks = synthesize(shape, {}, duration=3600, seed=seed)
    report = simulate(h, list(tasks), cfg, startup=8.0, startup_jitter=0.2, seed=5)
    assert fingerprint(report) == expected
