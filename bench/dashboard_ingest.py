"""Event ingestion: the fleet dashboard vs Flower's state machine, on the same stream.

In process: the same recorded-shape event stream (Celery 5.7's task-received/started/
succeeded and worker-heartbeat fields, a few failures and retries) is fed to
``flower.events.EventsState`` (Flower's own, its default 100k task cap) and to the
dashboard's ingester with storage on (SQLite file, batched writes, 100k cap). Each side
runs in a fresh process so peak RSS is its own.

End to end: a publisher process sends the stream through Redis with Celery's own event
dispatcher as fast as it can; Flower's receiver + EventsState and the dashboard's
receiver + ingester + SQLite each consume it (one at a time, on a private Redis); the
figure is events stored per second from first to last event, and how many arrived.

    python bench/dashboard_ingest.py                       # 100k and 1M tasks in process
    python bench/dashboard_ingest.py --tasks 200000 --e2e 100000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NAMES = ["tasks.aggregate.sum_by", "tasks.io.fetch", "tasks.heavy.crunch"]
WORKERS = [f"{q}@bench-{i}" for q in ("default", "io", "heavy") for i in range(3)]


def stream(tasks: int, seed: int = 1):
    """Events in arrival order: for each task received, started, then an outcome; every
    50 tasks a heartbeat from each worker. Fields as Celery 5.7 sends them."""
    import random

    rng = random.Random(seed)
    now = time.time() - tasks * 0.001
    for i in range(tasks):
        clock = i + 1
        worker = WORKERS[i % len(WORKERS)]
        name = NAMES[i % len(NAMES)]
        tid = str(uuid.UUID(int=rng.getrandbits(128)))
        now += 0.001
        base = {"hostname": worker, "utcoffset": 0, "pid": 1000 + i % 7, "clock": clock,
                "uuid": tid, "local_received": now}
        yield {**base, "type": "task-received", "name": name, "timestamp": now,
               "args": f"([{{'region': 'north', 'amount': {i}}}],)",
               "kwargs": "{'group_by': 'region'}", "root_id": tid, "parent_id": None,
               "retries": 0, "eta": None, "expires": None}
        yield {**base, "type": "task-started", "timestamp": now + 0.0002}
        if i % 50 == 7:
            yield {**base, "type": "task-failed", "timestamp": now + 0.0005,
                   "exception": "ValueError('bad record')",
                   "traceback": "Traceback (most recent call last):\n  ...\nValueError"}
        else:
            yield {**base, "type": "task-succeeded", "timestamp": now + 0.0005,
                   "result": "{'north': {'count': 1}}", "runtime": 0.0003}
        if i % 50 == 0:
            for w in WORKERS:
                yield {"type": "worker-heartbeat", "hostname": w, "timestamp": now,
                       "local_received": now,
                       "utcoffset": 0, "pid": 99, "clock": clock, "freq": 2.0,
                       "sw_ident": "py-celery", "sw_ver": "5.7.0", "sw_sys": "Linux",
                       "active": 1, "processed": i, "loadavg": [0.5, 0.4, 0.3]}


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited across exec
    from the parent that forked us)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one side, in its own process ------------------------------------------------------


def flower_state():
    from flower.events import EventsState

    return EventsState(max_tasks_in_memory=100_000)


def fleet_ingester(workdir: Path):
    from fleet.config import load_config
    from fleet.dashboard.ingest import Ingester
    from fleet.dashboard.store import Store

    config = load_config(ROOT / "queues.yaml")
    cap = int(os.environ.get("BENCH_CAP", "0"))
    if cap:
        config = config.model_copy(update={"dashboard": config.dashboard.model_copy(
            update={"max_tasks": cap})})
    store = Store(f"sqlite:///{workdir / 'bench.sqlite'}")
    return Ingester(config, store)


def run_inprocess(side: str, tasks: int) -> dict:
    import threading

    # Generated as consumed (about 2 us an event, the same for both sides), so that peak
    # RSS is the consumer's own and not a materialised stream's.
    events = stream(tasks)
    count = 0
    base_rss = peak_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        if side == "flower":
            state = flower_state()
            started = time.perf_counter()
            for e in events:
                state.event(e)
                count += 1
            elapsed = time.perf_counter() - started
            stored = len(state.tasks)
        else:
            ingester = fleet_ingester(Path(tmp))
            stop = threading.Event()
            writer = threading.Thread(target=ingester.run_writer, args=(stop,))
            started = time.perf_counter()
            writer.start()
            for e in events:
                ingester.feed(e)
                count += 1
            stop.set()
            writer.join()
            ingester.housekeeping(force=True)
            elapsed = time.perf_counter() - started
            stored = ingester.store.engine.connect().exec_driver_sql(
                "select count(*) from tasks").scalar()
    return {"side": side, "tasks": tasks, "events": count, "seconds": elapsed,
            "rate": count / elapsed, "peak_rss_mib": peak_rss_mib(),
            "start_rss_mib": base_rss, "stored": stored}


def run_e2e(side: str, tasks: int, url: str) -> dict:
    """Consume from the broker until the stream's last task is seen (or 20 s of quiet)."""
    import threading

    from fleet.config import load_config, with_broker
    from fleet.factory import create_app

    config = with_broker(load_config(ROOT / "queues.yaml"), url=url)
    app = create_app(config)
    expected = sum(1 for _ in stream(tasks))
    seen = {"n": 0, "first": None, "last": None}
    ready = Path(os.environ["BENCH_READY"])
    start_rss = peak_rss_mib()

    with tempfile.TemporaryDirectory() as tmp:
        if side == "flower":
            state = flower_state()

            def handle(event):
                state.event(event)
                seen["n"] += 1
        else:
            ingester = fleet_ingester(Path(tmp))
            stop = threading.Event()
            writer = threading.Thread(target=ingester.run_writer, args=(stop,), daemon=True)
            writer.start()

            def handle(event):
                ingester.feed(event)
                seen["n"] += 1

        def counted(event):
            if seen["first"] is None:
                seen["first"] = time.perf_counter()
            handle(event)
            seen["last"] = time.perf_counter()

        if side == "flower":
            # Flower's own path: Celery's EventReceiver (kombu consumer) into EventsState.
            with app.connection_for_read() as conn:
                receiver = app.events.Receiver(conn, handlers={"*": counted})
                ready.write_text("ready")
                try:
                    for _ in receiver.itercapture(limit=None, timeout=20.0, wakeup=False):
                        if seen["n"] >= expected:
                            break
                except TimeoutError:
                    pass
        else:
            # The dashboard's own path: its Redis pub/sub reader into the ingester.
            import redis

            from fleet.dashboard import eventstream

            done = threading.Event()

            def fleet_counted(event):
                counted(event)
                if seen["n"] >= expected:
                    done.set()

            def quiet():  # stop after 20 s without events, like the Flower side
                last = -1
                while not done.wait(20.0):
                    if seen["n"] == last:
                        done.set()
                    last = seen["n"]

            threading.Thread(target=quiet, daemon=True).start()
            client = redis.Redis.from_url(url)
            reader = threading.Thread(target=eventstream.consume, args=(
                config, client, fleet_counted, done, lambda up: up and ready.write_text("ready")))
            reader.start()
            reader.join()
        if side == "fleet":
            stop.set()
            writer.join()
            seen["last"] = time.perf_counter()
        elapsed = (seen["last"] or 0) - (seen["first"] or 0)
    return {"side": side, "tasks": tasks, "events": expected, "received": seen["n"],
            "seconds": elapsed, "rate": seen["n"] / elapsed if elapsed else 0.0,
            "peak_rss_mib": peak_rss_mib(), "start_rss_mib": start_rss}


def wire_messages(tasks: int) -> Iterator[tuple[str, bytes]]:
    """The stream as kombu's Redis fanout puts it on the wire (channel, message): built
    here and pipelined, publishing runs at 60-100k events/s, far above either consumer
    (Celery's own dispatcher would be the bottleneck at about 3.5k/s)."""
    import base64

    for e in stream(tasks):
        e.pop("local_received", None)
        routing_key = e["type"].replace("-", ".")
        body = base64.b64encode(json.dumps(e).encode()).decode()
        yield (f"/0.celeryev/{routing_key}", json.dumps({
            "body": body, "content-encoding": "utf-8", "content-type": "application/json",
            "headers": {"hostname": e["hostname"]},
            "properties": {"delivery_mode": 1, "delivery_info": {
                "exchange": "celeryev", "routing_key": routing_key}, "priority": 0,
                "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())}}).encode())


def publish(tasks: int, url: str) -> float:
    import itertools

    import redis

    client = redis.Redis.from_url(url)
    messages = wire_messages(tasks)
    sent = 0
    started = time.perf_counter()
    while chunk := list(itertools.islice(messages, 2000)):
        pipe = client.pipeline(transaction=False)
        for channel, payload in chunk:
            pipe.publish(channel, payload)
        pipe.execute()
        sent += len(chunk)
    return sent / (time.perf_counter() - started)


# -- the driver ------------------------------------------------------------------------


def child(args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"benchmark side failed: {' '.join(args)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def e2e(tasks: int) -> list[dict]:
    import redis

    from bench.common import private_redis

    results = []
    redis_server = private_redis()
    # A slow subscriber is disconnected by Redis at 32 MiB of backlog (pubsub's
    # client-output-buffer-limit): lifted here so the figure is the consumer's speed.
    redis.Redis.from_url(redis_server.url).config_set(
        "client-output-buffer-limit", "pubsub 0 0 0")
    try:
        for side in ("flower", "fleet"):
            with tempfile.TemporaryDirectory() as tmp:
                ready = Path(tmp) / "ready"
                proc = subprocess.Popen(
                    [sys.executable, __file__, "--child-e2e", side, str(tasks),
                     redis_server.url], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                    env={**os.environ, "BENCH_READY": str(ready)})
                deadline = time.time() + 60
                while not ready.exists() and time.time() < deadline:
                    time.sleep(0.1)
                time.sleep(0.5)
                sent_rate = publish(tasks, redis_server.url)
                out, _ = proc.communicate(timeout=1800)
                results.append({**json.loads(out.strip().splitlines()[-1]),
                                "sent_rate": sent_rate})
    finally:
        redis_server.stop()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="100000,1000000",
                   help="comma-separated task counts for the in-process run")
    p.add_argument("--e2e", type=int, default=100_000, help="tasks end to end (0: skip)")
    p.add_argument("--fleet-cap", type=int, default=0,
                   help="also run the dashboard alone with this many tasks kept (e.g. "
                        "1000000: memory with every task stored)")
    p.add_argument("--child", nargs=2, metavar=("SIDE", "TASKS"), help=argparse.SUPPRESS)
    p.add_argument("--child-e2e", nargs=3, metavar=("SIDE", "TASKS", "URL"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_inprocess(args.child[0], int(args.child[1]))))
        return
    if args.child_e2e:
        side, tasks, url = args.child_e2e
        print(json.dumps(run_e2e(side, int(tasks), url)))
        return

    print(f"{'run':<22}{'tasks':>9}{'events':>10}{'flower ev/s':>13}{'fleet ev/s':>12}"
          f"{'ratio':>7}{'flower MiB':>12}{'fleet MiB':>11}{'stored f/f':>16}")
    for tasks in [int(t) for t in args.tasks.split(",") if t]:
        f = child(["--child", "flower", str(tasks)])
        d = child(["--child", "fleet", str(tasks)])
        print(f"{'in process':<22}{tasks:>9}{f['events']:>10}{f['rate']:>13,.0f}"
              f"{d['rate']:>12,.0f}{d['rate'] / f['rate']:>6.2f}x{f['peak_rss_mib']:>12.0f}"
              f"{d['peak_rss_mib']:>11.0f}{f['stored']:>8}/{d['stored']:<7}")
        print(f"{'  (RSS at start)':<22}{'':>9}{'':>10}{'':>13}{'':>12}{'':>7}"
              f"{f['start_rss_mib']:>12.0f}{d['start_rss_mib']:>11.0f}")
    if args.fleet_cap:
        tasks = max(int(t) for t in args.tasks.split(",") if t)
        d = child(["--child", "fleet", str(tasks)], {"BENCH_CAP": str(args.fleet_cap)})
        print(f"{'fleet, cap ' + format(args.fleet_cap, ','):<22}{tasks:>9}{d['events']:>10}"
              f"{'':>13}{d['rate']:>12,.0f}{'':>7}{'':>12}{d['peak_rss_mib']:>11.0f}"
              f"{'':>8}/{d['stored']:<7}")
    if args.e2e:
        f, d = e2e(args.e2e)
        print(f"{'through Redis':<22}{args.e2e:>9}{f['events']:>10}{f['rate']:>13,.0f}"
              f"{d['rate']:>12,.0f}{d['rate'] / max(f['rate'], 1e-9):>6.2f}x"
              f"{f['peak_rss_mib']:>12.0f}{d['peak_rss_mib']:>11.0f}"
              f"{f['received']:>8}/{d['received']:<7}")
        print(f"{'  (RSS at start)':<22}{'':>9}{'':>10}{'':>13}{'':>12}{'':>7}"
              f"{f['start_rss_mib']:>12.0f}{d['start_rss_mib']:>11.0f}")
        print(f"  (end to end: events received of those sent, rate from first to last; "
              f"published at {f['sent_rate']:,.0f} and {d['sent_rate']:,.0f} events/s)")


if __name__ == "__main__":
    main()
