"""Batch jobs end to end: the fleet's job (a ledger outside Redis) vs a Celery chord.

1. The same group-by job, N chunks of K records, one worker with 2 prefork processes:
   the fleet (``submit``: manifest and results in the SQLite ledger, input kept in the
   payload store, reconciler-ready) vs a plain Celery chord on a bare worker (chunk
   results and the chord counter in Redis, nothing kept outside it). Seconds from
   submit to the aggregate's result, sides interleaved, median of the runs.
2. The ledger alone: chunk completions recorded per second by one process, on SQLite
   (``synchronous=FULL``: a commit survives a power loss) and on the machine's
   PostgreSQL.

Run:  python bench/jobs.py [--chunks N] [--records K] [--runs R]
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
PG_URL = "postgresql://postgres@127.0.0.1/test"


def write_input(path: Path, chunks: int, records: int) -> list[list[dict]]:
    rows = [{"key": f"k{i % 10}", "value": i} for i in range(chunks * records)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [rows[i:i + records] for i in range(0, len(rows), records)]


def fleet_side(url: str, workdir: Path, data: Path, records: int) -> float:
    from fleet.config import load_config
    from fleet.factory import create_app
    from fleet.jobs.state import JobStore
    from fleet.jobs.submit import JobSpec, submit

    cfg = fleet_config_file(url, {"queues": {"default": {"concurrency": CONCURRENCY}}}, workdir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    procs = Procs()
    procs.start([sys.executable, "-m", "fleet.cli", "worker", "--queue", "default",
                 "--config", str(cfg), "-n", "fleet@bench", "--loglevel", "WARNING"],
                env, workdir / "fleet.log")
    config = load_config(cfg)
    app = create_app(config)
    try:
        wait_ready(app, ["fleet@bench"])
        start = time.perf_counter()
        job = submit(app, JobSpec("tasks.aggregate.sum_by", str(data), records,
                                  aggregate="tasks.aggregate.merge_sums"))
        store = JobStore(config)
        while not store.status(job.job_id).is_terminal:
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
        assert store.status(job.job_id).state == "succeeded"
        return elapsed
    finally:
        procs.stop()
        app.close()


def chord_side(url: str, workdir: Path, chunks: list[list[dict]]) -> float:
    from celery import chord

    env = {**os.environ, "BENCH_BROKER": url, "BENCH_QUEUE": "default"}
    procs = Procs()
    procs.start([sys.executable, "-m", "celery", "-A", "bench.baseline_app", "worker",
                 "-c", str(CONCURRENCY), "-Q", "default", "-n", "bare@bench",
                 "--loglevel", "WARNING", "--without-gossip", "--without-mingle"],
                env, workdir / "bare.log")
    from celery import Celery

    app = Celery("client", broker=url, backend=url)
    app.conf.update(task_serializer="json", result_serializer="json",
                    accept_content=["json"], task_default_queue="default")
    try:
        wait_ready(app, ["bare@bench"])
        start = time.perf_counter()
        result = chord(app.signature("tasks.aggregate.sum_by", args=[c]) for c in chunks)(
            app.signature("tasks.aggregate.merge_sums"))
        result.get(timeout=600)
        return time.perf_counter() - start
    finally:
        procs.stop()
        app.close()


def ledger_rate(url: str, n: int) -> float:
    from fleet.config import load_config, with_ledger
    from fleet.jobs.state import JobStore

    config = with_ledger(load_config(), url)
    store = JobStore(config)
    job_id = f"job-{os.urandom(6).hex()}"
    store.create(job_id, task="t", aggregate=None, total=n, records=n, input_desc="bench",
                 chunk_size=1, kwargs={}, aggregate_kwargs={}, result_url="u")
    store.add_chunks(job_id, [(i, "default", 10) for i in range(n)])
    start = time.perf_counter()
    for i in range(n):
        store.record_success(job_id, i, {"k0": {"count": 1, "value": float(i)}})
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=1000)
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ledger-writes", type=int, default=2000)
    args = parser.parse_args()
    workdir = tmpdir("fleet-bench-jobs-")
    data = workdir / "input.jsonl"
    chunks = write_input(data, args.chunks, args.records)
    server = private_redis()
    times: dict[str, list[float]] = {"chord": [], "fleet": []}
    try:
        for run in range(args.runs):
            times["chord"].append(chord_side(server.url, workdir, chunks))
            client(server.url).flushdb()
            side = workdir / f"fleet-{run}"
            side.mkdir()
            times["fleet"].append(fleet_side(server.url, side, data, args.records))
            client(server.url).flushdb()
    finally:
        server.stop()
    rates = {"sqlite (default)": ledger_rate(f"sqlite:///{workdir / 'full.sqlite'}",
                                                  args.ledger_writes)}
    try:
        rates["postgresql (local)"] = ledger_rate(PG_URL, args.ledger_writes)
    except Exception as exc:  # no PostgreSQL here: say so, keep the rest
        print(f"(no PostgreSQL at {PG_URL}: {exc})")
    med = {k: median(v) for k, v in times.items()}
    print(f"jobs on {machine()}")
    print(table(
        f"\na group-by job, {args.chunks} chunks of {args.records} records, one worker of "
        f"{CONCURRENCY} processes; seconds to the aggregate's result, median of {args.runs}",
        [("seconds", f"{med['chord']:.2f}", f"{med['fleet']:.2f}",
          f"{med['chord'] / med['fleet']:.2f}x"),
         ("chunks/s", f"{args.chunks / med['chord']:.0f}", f"{args.chunks / med['fleet']:.0f}",
          ""),
         ("each run (s)", " ".join(f"{t:.2f}" for t in times["chord"]),
          " ".join(f"{t:.2f}" for t in times["fleet"]), "")],
        header=("metric", "Celery chord", "fleet job", "chord/fleet")))
    print(f"\nledger: chunk completions recorded per second, one process, "
          f"{args.ledger_writes} writes")
    for name, rate in rates.items():
        print(f"  {name:<24} {rate:8.0f}/s  ({1000 / rate:.2f} ms each)")


if __name__ == "__main__":
    main()
