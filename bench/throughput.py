"""Throughput, two figures from one run, each against its baseline.

1. No-op tasks end to end: a fleet worker (queue ``default``: its guard, lease renewal,
   FleetTask hooks) vs a bare Celery worker with the same pool, concurrency and prefetch.
   Each side: start the worker, publish N no-ops, time until the last one has run.
   Twice: with Celery's defaults on both sides (task events off, early acks; the
   fleet with ``events: false`` and ``acks_late: false``), and with the Celery features
   the shipped fleet turns on (task events, acks_late) on both sides. Sides interleave
   (A B C D A B C D ...) and the median counts, so drift hits all alike. Goal:
   fleet / bare >= 1.0 (the guards, leases and hooks cost nothing measurable).
2. ``fleet submit`` of a 100k-chunk job (publishing only, no workers) vs a naive
   ``apply_async`` loop over the same chunks. Goal: >= 3x.

Run:  python bench/throughput.py [--noop N] [--chunks N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Procs,
    client,
    fleet_config_file,
    machine,
    median,
    private_redis,
    table,
    tmpdir,
    wait_ready,
)

CONCURRENCY = 2
PREFETCH = 4


def _client(url: str):
    """The publisher for both sides: one plain Celery client, so only workers differ."""
    from celery import Celery

    app = Celery("client", broker=url, backend=url)
    app.conf.update(task_serializer="json", accept_content=["json"],
                    task_default_queue="default")
    return app


def _drain(app, url: str, probe_key: str, n: int, timeout: float) -> float:
    """Publish ``n`` no-ops; seconds from the first publish until all have run."""
    r = client(url)
    r.delete(probe_key)
    start = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            app.send_task("bench.noop", producer=producer, ignore_result=True)
    deadline = time.monotonic() + timeout
    while r.hlen(probe_key) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {r.hlen(probe_key)} of {n} no-ops ran in {timeout}s")
        time.sleep(0.01)
    return time.perf_counter() - start


def noop_bare(url: str, workdir: Path, n: int, same_features: bool = False) -> float:
    """A bare Celery worker; with ``same_features``, with the Celery features a fleet
    queue turns on too (task events, acks_late), so only fleet's own additions differ."""
    env = {**os.environ, "BENCH_BROKER": url, "BENCH_PROBE_URL": url,
           "BENCH_PROBE_KEY": "bench:noop:bare", "BENCH_QUEUE": "default",
           "BENCH_PREFETCH": str(PREFETCH)}
    if same_features:
        env["BENCH_ACKS_LATE"] = "1"
    procs = Procs()
    procs.start([sys.executable, "-m", "celery", "-A", "bench.baseline_app", "worker",
                 "-c", str(CONCURRENCY), "-Q", "default", "-n", "bare@bench",
                 "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
                 *(["--task-events"] if same_features else [])],
                env, workdir / "bare.log")
    app = _client(url)
    try:
        wait_ready(app, ["bare@bench"])
        return _drain(app, url, "bench:noop:bare", n, 300)
    finally:
        procs.stop()
        app.close()


def noop_fleet(url: str, workdir: Path, n: int, same_features: bool = True) -> float:
    """A fleet worker; without ``same_features`` it runs with Celery's defaults too
    (task events off, early acks), like the bare worker it is compared with."""
    cfg = fleet_config_file(url, {
        "events": same_features,
        "imports": ["tasks.aggregate", "tasks.io", "tasks.heavy", "bench.probe"],
        "queues": {"default": {"tasks": ["tasks.aggregate.*", "fleet.*", "bench.*"],
                               "concurrency": CONCURRENCY, "prefetch_multiplier": PREFETCH,
                               "acks_late": same_features, "max_tasks_per_child": None}},
    }, workdir)
    env = {**os.environ, "BENCH_PROBE_URL": url, "BENCH_PROBE_KEY": "bench:noop:fleet"}
    env.pop("FLEET_BROKER_URL", None)
    env.pop("FLEET_KEY_PREFIX", None)
    procs = Procs()
    procs.start([sys.executable, "-m", "fleet.cli", "worker", "--queue", "default",
                 "--config", str(cfg), "-n", "fleet@bench", "--loglevel", "WARNING"],
                env, workdir / "fleet.log")
    app = _client(url)
    try:
        wait_ready(app, ["fleet@bench"])
        return _drain(app, url, "bench:noop:fleet", n, 300)
    finally:
        procs.stop()
        app.close()


def submit_fleet(url: str, workdir: Path, data: Path, chunks: int) -> float:
    from fleet.config import load_config
    from fleet.factory import create_app
    from fleet.jobs.submit import JobSpec, submit

    config = load_config(fleet_config_file(url, {}, workdir))
    app = create_app(config)
    try:
        start = time.perf_counter()
        done = submit(app, JobSpec("tasks.aggregate.sum_by", str(data), 1))
        elapsed = time.perf_counter() - start
        assert done.chunks == chunks, done
        return elapsed
    finally:
        client(url).flushdb()
        app.close()


def submit_naive(url: str, workdir: Path, data: Path, chunks: int, ignore_result: bool
                 ) -> float:
    """What a user writes without fleet: read the file, apply_async per chunk."""
    from fleet.config import load_config
    from fleet.factory import create_app

    config = load_config(fleet_config_file(url, {}, workdir))
    app = create_app(config)
    task = app.tasks["tasks.aggregate.sum_by"]
    try:
        start = time.perf_counter()
        sent = 0
        with data.open() as fh:
            for line in fh:
                task.apply_async(args=[[json.loads(line)]], ignore_result=ignore_result)
                sent += 1
        elapsed = time.perf_counter() - start
        assert sent == chunks
        return elapsed
    finally:
        client(url).flushdb()
        app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noop", type=int, default=5000, help="no-op tasks per run")
    parser.add_argument("--runs", type=int, default=5, help="interleaved runs per side")
    parser.add_argument("--chunks", type=int, default=100_000, help="chunks in the submit test")
    args = parser.parse_args()
    workdir = tmpdir("fleet-bench-throughput-")
    server = private_redis()
    try:
        sides = {
            "bare": lambda: noop_bare(server.url, workdir, args.noop),
            "fleet-quiet": lambda: noop_fleet(server.url, workdir, args.noop,
                                              same_features=False),
            "bare-same": lambda: noop_bare(server.url, workdir, args.noop, same_features=True),
            "fleet": lambda: noop_fleet(server.url, workdir, args.noop),
        }
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.runs):
            for name, run in sides.items():
                times[name].append(run())
                client(server.url).flushdb()
        data = workdir / "chunks.jsonl"
        with data.open("w") as fh:
            for i in range(args.chunks):
                fh.write(json.dumps({"key": f"k{i % 10}", "value": i}) + "\n")
        fleet_s = submit_fleet(server.url, workdir, data, args.chunks)
        naive_s = submit_naive(server.url, workdir, data, args.chunks, ignore_result=False)
        naive_ignore_s = submit_naive(server.url, workdir, data, args.chunks,
                                      ignore_result=True)
    finally:
        server.stop()
    med = {name: median(values) for name, values in times.items()}

    def rate(name: str) -> str:
        return f"{args.noop / med[name]:.0f}"

    def runs(name: str) -> str:
        return " ".join(f"{args.noop / t:.0f}" for t in times[name])

    print(f"throughput on {machine()}")
    print(table(
        f"\nno-op tasks end to end: {args.noop} per run, concurrency {CONCURRENCY} prefork, "
        f"prefetch {PREFETCH}; tasks/s, median of {args.runs} interleaved runs",
        [("defaults: events off, early ack", rate("bare"), rate("fleet-quiet"),
          f"{med['bare'] / med['fleet-quiet']:.2f}x"),
         ("shipped: events on, acks_late", rate("bare-same"), rate("fleet"),
          f"{med['bare-same'] / med['fleet']:.2f}x"),
         ("  each run, events off", runs("bare"), runs("fleet-quiet"), ""),
         ("  each run, events on", runs("bare-same"), runs("fleet"), "")],
        header=("Celery features", "bare Celery worker", "fleet worker", "fleet/bare")))
    print(table(
        f"\npublishing a {args.chunks:,}-chunk job (no workers)",
        [("seconds", f"{naive_s:.1f}", f"{fleet_s:.1f}", f"{naive_s / fleet_s:.1f}x"),
         ("chunks/s", f"{args.chunks / naive_s:,.0f}", f"{args.chunks / fleet_s:,.0f}", ""),
         ("naive, ignore_result=True (s)", f"{naive_ignore_s:.1f}", "",
          f"{naive_ignore_s / fleet_s:.1f}x")],
        header=("metric", "apply_async loop", "fleet submit", "naive/fleet")))


if __name__ == "__main__":
    main()
