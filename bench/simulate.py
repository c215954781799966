"""Simulation speed: simulated seconds per wall-clock second, for two fleet sizes.

The issue's goal: one day of a 100-queue, 1,000-replica fleet in under 60 s on the
2-core CI machine. The trace is synthetic and made on the fly (Poisson arrivals,
exponential service times, mean 60 s: batch work), sized so that each queue needs
about its share of the replicas (10 per queue at concurrency 2, ~70% busy).
Per-queue bounds leave room (max_replicas 20). The engine reads only ``queue``,
``sent`` and ``service`` of a task, so the trace is light records made on the fly:
what is timed is the simulator. Making a pydantic ``Task`` costs more (the last
line prints it), and reading one from JSON more again: that is the trace reader's
figure, not this one.

Run from the repository root:  python bench/simulate.py [--hours H] [--small-only]
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoscale.sim import simulate
from bench.common import machine
from fleet.config import parse_config
from fleet.trace.model import Header, Task


class Light(NamedTuple):
    """What the engine reads of a trace.Task."""

    queue: str
    sent: float
    service: float

SERVICE = 60.0
BUSY = 0.7


def config(queues: int, replicas_per_queue: int):
    names = [f"q{i:03d}" for i in range(queues)]
    return names, parse_config({
        "version": 1, "default_queue": names[0],
        "queues": {n: {"concurrency": 2, "autoscaling": {
            "min_replicas": 0, "max_replicas": 2 * replicas_per_queue,
            "target_wait": "60s"}} for n in names}}, "bench.yaml")


def trace(names: list[str], replicas_per_queue: int, duration: float, seed: int):
    """Tasks of every queue merged in order of ``sent`` (a heap of one stream each)."""
    rng = random.Random(seed)
    rate = replicas_per_queue * 2 * BUSY / SERVICE  # per queue, tasks/s
    heads = [(rng.expovariate(rate), n) for n in names]
    heapq.heapify(heads)
    while heads:
        sent, name = heapq.heappop(heads)
        if sent >= duration:
            continue
        yield Light(name, sent, rng.expovariate(1 / SERVICE))
        heapq.heappush(heads, (sent + rng.expovariate(rate), name))


def run(queues: int, replicas: int, hours: float) -> tuple[float, float, object]:
    per_queue = replicas // queues
    names, cfg = config(queues, per_queue)
    duration = hours * 3600
    header = Header(version=1, source="synth:bench", duration=duration, queues=names)
    began = time.perf_counter()
    report = simulate(header, trace(names, per_queue, duration, seed=1), cfg, cpu_per_task=0)
    return time.perf_counter() - began, duration, report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--small-only", action="store_true")
    args = parser.parse_args()
    print(machine())
    sizes = [(10, 100)] + ([] if args.small_only else [(100, 1000)])
    print(f"{'fleet':>22} {'simulated':>10} {'wall':>8} {'speed-up':>9} {'tasks':>10}"
          f" {'polls':>7} {'max replicas':>13}")
    for queues, replicas in sizes:
        wall, simulated, report = run(queues, replicas, args.hours)
        total = report.total
        print(f"{queues:>4} queues {replicas:>5} repl {simulated / 3600:>9.1f}h "
              f"{wall:>7.1f}s {simulated / wall:>8.0f}x {total.tasks:>10,} "
              f"{report.polls:>7,} {report.max_total_replicas:>13,}")
    n = 100_000
    began = time.perf_counter()
    for i in range(n):
        Task(queue="q", name="t", sent=float(i), service=1.0)
    print(f"(a validated trace.Task costs {(time.perf_counter() - began) / n * 1e6:.1f} us "
          "to make: add it per task for a trace read from a file)")


if __name__ == "__main__":
    main()
