"""Mixed workload: a stream of short tasks plus heavy CPU+memory tasks arriving together.

Baseline: plain Celery, default settings, one queue, N worker processes.
Fleet:    the shipped queues.yaml (short tasks -> default, heavy -> heavy), the same N
          worker processes in all (default: 2, heavy: 1).

Short tasks are a group-by over 200 records (tasks.aggregate.sum_by); heavy ones hold
and hash a block of memory (tasks.heavy.crunch). Latency is completion (the result's
date_done) minus the client's send time. Run:  python bench/mixed_workload.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Procs,
    RssSampler,
    client,
    fleet_config_file,
    machine,
    percentile,
    private_redis,
    table,
    tmpdir,
    wait_ready,
)

RECORDS = [{"key": f"k{i % 10}", "value": i} for i in range(200)]


def run_side(name: str, app, send_short, send_heavy, procs: Procs, url: str,
             probe_key: str, args) -> dict:
    r = client(url)
    sent: dict[str, tuple[str, float]] = {}
    with RssSampler(procs) as rss:
        start = time.time()
        for _ in range(args.heavy):
            res = send_heavy()
            sent[res.id] = ("heavy", time.time())
        interval = 1.0 / args.rate
        for i in range(args.short):
            target = start + i * interval
            delay = target - time.time()
            if delay > 0:
                time.sleep(delay)
            res = send_short()
            sent[res.id] = ("short", time.time())
        deadline = time.time() + args.timeout
        done: dict[str, float] = {}
        while time.time() < deadline and len(done) < len(sent):
            for task_id in [t for t in sent if t not in done]:
                meta = app.backend.get_task_meta(task_id)
                if meta.get("status") == "SUCCESS":
                    done[task_id] = datetime.fromisoformat(str(meta["date_done"])).timestamp()
            time.sleep(0.5)
    runs = {k.decode(): int(v) for k, v in r.hgetall(probe_key).items()}
    short = [(done[t] - s) * 1000 for t, (kind, s) in sent.items() if kind == "short" and t in done]
    heavy = [done[t] - s for t, (kind, s) in sent.items() if kind == "heavy" and t in done]
    return {
        "short_p50": percentile(short, 0.50), "short_p95": percentile(short, 0.95),
        "short_p99": percentile(short, 0.99),
        "heavy_mean": sum(heavy) / len(heavy) if heavy else float("nan"),
        "heavy_max": max(heavy) if heavy else float("nan"),
        "makespan": (max(done.values()) - start) if done else float("nan"),
        "peak_rss": rss.peak / 2**20,
        "lost": len(sent) - len(done),
        "twice": sum(1 for t in sent if runs.get(t, 0) > 1),
    }


def baseline(url: str, workdir: Path, args) -> dict:
    from celery import Celery

    env = {**os.environ, "BENCH_BROKER": url, "BENCH_PROBE_URL": url,
           "BENCH_PROBE_KEY": "bench:runs:baseline"}
    procs = Procs()
    procs.start([sys.executable, "-m", "celery", "-A", "bench.baseline_app", "worker",
                 "-c", str(args.processes), "-n", "base@bench", "--loglevel", "WARNING"],
                env, workdir / "baseline.log")
    app = Celery("client", broker=url, backend=url)
    app.conf.update(task_serializer="json", accept_content=["json"], task_default_queue="bench")
    try:
        wait_ready(app, ["base@bench"])
        return run_side(
            "baseline", app,
            lambda: app.send_task("tasks.aggregate.sum_by", args=[RECORDS]),
            lambda: app.send_task("tasks.heavy.crunch",
                                  kwargs={"mb": args.heavy_mb, "rounds": args.heavy_rounds}),
            procs, url, "bench:runs:baseline", args)
    finally:
        procs.stop()
        app.close()


def fleet(url: str, workdir: Path, args) -> dict:
    from fleet.config import load_config
    from fleet.factory import create_app

    cfg_path = fleet_config_file(
        url.replace("/0", "/1"),
        {"imports": ["tasks.aggregate", "tasks.io", "tasks.heavy", "bench.probe"]}, workdir)
    config = load_config(cfg_path)
    env = {**os.environ, "BENCH_PROBE_URL": url, "BENCH_PROBE_KEY": "bench:runs:fleet"}
    env.pop("FLEET_BROKER_URL", None)
    env.pop("FLEET_KEY_PREFIX", None)
    procs = Procs()
    for queue in ("default", "heavy"):
        procs.start([sys.executable, "-m", "fleet.cli", "worker", "--queue", queue,
                     "--config", str(cfg_path), "-n", f"{queue}@bench", "--loglevel",
                     "WARNING"], env, workdir / f"fleet-{queue}.log")
    app = create_app(config)
    try:
        wait_ready(app, ["default@bench", "heavy@bench"])
        return run_side(
            "fleet", app,
            lambda: app.send_task("tasks.aggregate.sum_by", args=[RECORDS]),
            lambda: app.send_task("tasks.heavy.crunch",
                                  kwargs={"mb": args.heavy_mb, "rounds": args.heavy_rounds}),
            procs, url, "bench:runs:fleet", args)
    finally:
        procs.stop()
        app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=300, help="short tasks in the stream")
    parser.add_argument("--rate", type=float, default=20.0, help="short tasks per second")
    parser.add_argument("--heavy", type=int, default=6, help="heavy tasks, sent at t=0")
    parser.add_argument("--heavy-mb", type=int, default=200)
    parser.add_argument("--heavy-rounds", type=int, default=12)
    parser.add_argument("--processes", type=int, default=3,
                        help="baseline worker processes (the fleet's default 2 + heavy 1)")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    workdir = tmpdir("fleet-bench-mixed-")
    server = private_redis()
    try:
        base = baseline(server.url, workdir, args)
        ours = fleet(server.url, workdir, args)
    finally:
        server.stop()

    def row(label, key, fmt):
        b, f = base[key], ours[key]
        counts = isinstance(b, int) and isinstance(f, int)
        ratio = "-" if counts or not f else f"{b / f:.1f}x"
        return (label, fmt.format(b), fmt.format(f), ratio)

    print(f"mixed workload on {machine()}")
    print(f"{args.short} short tasks at {args.rate:g}/s + {args.heavy} heavy tasks "
          f"({args.heavy_mb} MiB, {args.heavy_rounds} rounds) at t=0; "
          f"{args.processes} worker processes each side")
    print(table("", [
        row("short p50 latency (ms)", "short_p50", "{:.0f}"),
        row("short p95 latency (ms)", "short_p95", "{:.0f}"),
        row("short p99 latency (ms)", "short_p99", "{:.0f}"),
        row("heavy mean latency (s)", "heavy_mean", "{:.1f}"),
        row("heavy max latency (s)", "heavy_max", "{:.1f}"),
        row("makespan (s)", "makespan", "{:.1f}"),
        row("peak worker RSS (MiB)", "peak_rss", "{:.0f}"),
        row("tasks lost", "lost", "{}"),
        row("tasks run twice", "twice", "{}"),
    ], header=("metric", "plain Celery", "fleet", "plain/fleet")))


if __name__ == "__main__":
    main()
