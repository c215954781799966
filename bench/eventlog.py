"""The event stream (fleet.eventlog): what it costs a worker, how fast the dashboard
catches up on it.

1. No-op tasks end to end with task events on: a fleet worker with ``event_stream`` on
   (PUBLISH and XADD in one pipeline) vs the same worker with it off (PUBLISH only, as
   before the stream). Sides interleave (A B A B ...), the median counts. Goal: >= 0.95.
2. Sending one event, in process: CPU per ``dispatcher.send`` (Celery's own call, a
   task-succeeded event) with the stream on vs off, against the same private Redis;
   rounds interleave, the median counts.
3. Catching up after an outage: N tasks' events (Celery 5.7's shapes, one entry per
   event as a worker without task grouping writes them) waiting in the stream; the
   dashboard's reader (consumer group, XACK after each written batch) and ingester into
   SQLite, timed until every task is stored, with the process's peak RSS (back-pressure
   keeps it flat however long the backlog).

Run:  python bench/eventlog.py [--noop N] [--runs N] [--send N] [--catchup N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
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
from bench.throughput import CONCURRENCY, PREFETCH, _client, _drain


def noop(url: str, workdir: Path, n: int, stream: bool) -> float:
    cfg = fleet_config_file(url, {
        "events": True,
        "event_stream": {"enabled": stream},
        "imports": ["tasks.aggregate", "tasks.io", "tasks.heavy", "bench.probe"],
        "queues": {"default": {"tasks": ["tasks.aggregate.*", "fleet.*", "bench.*"],
                               "concurrency": CONCURRENCY, "prefetch_multiplier": PREFETCH,
                               "acks_late": True, "max_tasks_per_child": None}},
    }, workdir)
    key = f"bench:noop:{'stream' if stream else 'pubsub'}"
    env = {**os.environ, "BENCH_PROBE_URL": url, "BENCH_PROBE_KEY": key}
    env.pop("FLEET_BROKER_URL", None)
    env.pop("FLEET_KEY_PREFIX", None)
    procs = Procs()
    procs.start([sys.executable, "-m", "fleet.cli", "worker", "--queue", "default",
                 "--config", str(cfg), "-n", "fleet@bench", "--loglevel", "WARNING"],
                env, workdir / "fleet.log")
    app = _client(url)
    try:
        wait_ready(app, ["fleet@bench"])
        seconds = _drain(app, url, key, n, 300)
        if stream and not client(url).xlen("fleet:events"):
            raise RuntimeError("the stream side wrote no stream")
        return seconds
    finally:
        procs.stop()
        app.close()


def send_cost(url: str, n: int, rounds: int = 7) -> dict[str, float]:
    """CPU microseconds per event sent, stream off and on (median of ``rounds``)."""
    from fleet.config import load_config, with_broker
    from fleet.factory import create_app

    config = with_broker(load_config(Path(__file__).resolve().parent.parent / "queues.yaml"),
                         url=url)
    sides = {}
    for name, on in (("pubsub", False), ("stream", True)):
        app = create_app(config.model_copy(update={
            "event_stream": config.event_stream.model_copy(update={"enabled": on})}))
        conn = app.connection_for_write()
        dispatcher = app.events.Dispatcher(conn, hostname="bench@send")
        dispatcher.send("worker-online")
        sides[name] = (app, conn, dispatcher)
    cost: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, (_app, _conn, dispatcher) in sides.items():
            started = time.process_time()
            for i in range(n):
                dispatcher.send("task-succeeded", uuid=f"u{i}", result="1", runtime=0.001)
            cost[name].append((time.process_time() - started) / n * 1e6)
    for app, conn, dispatcher in sides.values():
        dispatcher.close()
        conn.release()
        app.close()
    return {name: median(values) for name, values in cost.items()}


def catchup(tasks: int, url: str) -> dict:
    """Run in a child process, so its peak RSS is its own."""
    from bench.dashboard_ingest import stream as recorded
    from fleet.config import load_config, with_broker
    from fleet.dashboard.ingest import Ingester
    from fleet.dashboard.store import Store
    from fleet.dashboard.views import Views
    from fleet.eventlog import EventLog

    config = with_broker(load_config(Path(__file__).resolve().parent.parent / "queues.yaml"),
                         url=url)
    config = config.model_copy(update={"event_stream": config.event_stream.model_copy(
        update={"maxlen": max(1000, tasks * 4)})})
    log = EventLog.for_config(config)
    r = client(url)
    r.delete(log.key)
    pipe = r.pipeline(transaction=False)
    events = 0
    for event in recorded(tasks):
        event.pop("local_received", None)
        log.add(pipe, log.entry(event))
        events += 1
        if events % 2000 == 0:
            pipe.execute()
    pipe.execute()
    base_rss = peak_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{tmp}/d.sqlite")
        ingester = Ingester(config, store)
        views = Views(store)
        stop = threading.Event()
        threads = [threading.Thread(target=ingester.run_receiver, args=(None, stop)),
                   threading.Thread(target=ingester.run_writer, args=(stop,))]
        started = time.perf_counter()
        for t in threads:
            t.start()
        while ingester.events < events:
            time.sleep(0.05)
            if time.perf_counter() - started > 1800:
                raise RuntimeError(f"only {ingester.events} of {events} events stored")
        elapsed = time.perf_counter() - started
        stop.set()
        for t in threads:
            t.join(timeout=30)
        stored = views.task_count()
        pending = r.xpending(log.key, config.dashboard.event_group)["pending"]
        store.close()
    return {"tasks": tasks, "events": events, "seconds": elapsed, "rate": events / elapsed,
            "stored": stored, "pending_after": pending, "start_rss_mib": base_rss,
            "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noop", type=int, default=5000, help="no-op tasks per run")
    parser.add_argument("--runs", type=int, default=5,
                        help="interleaved runs per side (0: skip)")
    parser.add_argument("--send", type=int, default=5000,
                        help="events per round, in process (0: skip)")
    parser.add_argument("--catchup", type=int, default=100_000,
                        help="tasks waiting in the stream (0: skip)")
    parser.add_argument("--child-catchup", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_catchup:
        print(json.dumps(catchup(int(args.child_catchup[0]), args.child_catchup[1])))
        return
    workdir = tmpdir("fleet-bench-eventlog-")
    server = private_redis()
    try:
        times: dict[str, list[float]] = {"pubsub": [], "stream": []}
        for _ in range(args.runs):
            for name in times:
                times[name].append(noop(server.url, workdir, args.noop, name == "stream"))
                client(server.url).flushdb()
        sent = send_cost(server.url, args.send) if args.send else None
        client(server.url).flushdb()
        caught = None
        if args.catchup:
            out = subprocess.run([sys.executable, __file__, "--child-catchup",
                                  str(args.catchup), server.url],
                                 capture_output=True, text=True, check=True)
            caught = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
    print(f"event stream on {machine()}")
    if args.runs:
        med = {name: median(values) for name, values in times.items()}
        print(table(
            f"\nno-op tasks end to end, task events on: {args.noop} per run, concurrency "
            f"{CONCURRENCY} prefork, prefetch {PREFETCH}, acks_late; tasks/s, median of "
            f"{args.runs} interleaved runs",
            [("tasks/s", f"{args.noop / med['pubsub']:.0f}", f"{args.noop / med['stream']:.0f}",
              f"{med['pubsub'] / med['stream']:.2f}x"),
             ("  each run", " ".join(f"{args.noop / t:.0f}" for t in times["pubsub"]),
              " ".join(f"{args.noop / t:.0f}" for t in times["stream"]), "")],
            header=("", "event_stream off (PUBLISH)", "on (PUBLISH+XADD)", "on/off")))
    if sent:
        print(f"\nsending one event (dispatcher.send, in process, CPU, median of 7 rounds "
              f"of {args.send}): {sent['pubsub']:.0f} us with the stream off, "
              f"{sent['stream']:.0f} us on ({sent['stream'] / sent['pubsub']:.2f}x)")
    if caught:
        print(f"\ncatching up {caught['tasks']:,} tasks ({caught['events']:,} events) "
              f"waiting in the stream: {caught['seconds']:.1f} s, {caught['rate']:,.0f} "
              f"events/s stored; {caught['stored']:,} tasks stored, "
              f"{caught['pending_after']} entries left unacked; RSS "
              f"{caught['start_rss_mib']:.0f} MiB at start, {caught['peak_rss_mib']:.0f} "
              "MiB peak")


if __name__ == "__main__":
    main()
