"""Autoscaler figures: poll latency for 10/100/1000 queues, and reaction to a burst.

1. Poll latency: fleet's poll (one Lua script pipelined with the workers' reports: one
   round trip) vs a naive poller that asks Redis key by key (LLEN of every list of
   every queue, then the unacked hash and the worker reports), on the same data: every
   third queue holds messages in its lists, and 200 messages sit in ``unacked``.
2. Reaction: bursts of messages published at random moments; the time from the burst
   to the first scale-up decision of fleet's loop (``autoscaler.interval`` 2 s) and of
   a KEDA-like poller run side by side on the same bursts (KEDA's Redis scaler
   defaults: LLEN of the queue's main list every 30 s, 5 per replica; not KEDA
   itself, which needs a cluster). A second round sends priority-9 messages, which
   live in a sub-list the KEDA-like poller does not read.

Run from the repository root:  python bench/autoscale.py [--bursts N]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoscale.loop import Autoscaler
from bench.common import client, machine, percentile, private_redis, table, tmpdir
from fleet.config import parse_config
from fleet.factory import create_app
from fleet.keys import list_keys, workers_key
from fleet.observe.metrics import RedisMetrics
from fleet.observe.model import WorkerSample
from tests.conftest import deep_merge, shipped_config


def config_with(url: str, n: int, workdir: Path):
    queues = {f"q{i}": {"tasks": [f"bench.q{i}.*"]} for i in range(n)}
    data = deep_merge(shipped_config(), {"broker": {"url": url},
                                         "payloads": {"path": str(workdir)}})
    data["queues"] = {**queues, **data["queues"]}
    return parse_config(data, "bench")


def seed(r, config, n: int) -> None:
    pipe = r.pipeline(transaction=False)
    message = json.dumps({"body": "e30=", "headers": {"fleet-sent": time.time()}})
    for i in range(0, n, 3):
        for key in list_keys(config, f"q{i}")[:2]:
            pipe.lpush(key, message, message)
    for i in range(200):
        held = json.dumps([json.loads(message), "", f"q{i % max(1, n)}"])
        pipe.hset("unacked", f"tag-{i}", held)
    for i in range(20):
        worker = WorkerSample(f"w{i}@bench", f"q{i}", "pod", 1, 2, 1, 0, 10, 50.0, 1, 1, 1,
                              time.time())
        pipe.hset(workers_key(config), worker.hostname, json.dumps(worker.__dict__))
    pipe.execute()


def naive_poll(r, config) -> dict:
    """What a poller without a pipeline does: one round trip per key."""
    out = {}
    for name in config.queues:
        out[name] = sum(r.llen(key) for key in list_keys(config, name))
    held = r.hvals("unacked")
    r.hgetall(workers_key(config))
    out["held"] = len(held)
    return out


def poll_latency(url: str, sizes: list[int], rounds: int) -> list[tuple[str, str, str, str]]:
    rows = []
    r = client(url)
    for n in sizes:
        r.flushdb()
        config = config_with(url, n, tmpdir("fleet-bench-autoscale-"))
        seed(r, config, n)
        fleet = RedisMetrics(config, r)
        fleet.poll()
        naive_poll(r, config)
        ours, theirs = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            fleet.poll()
            ours.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            naive_poll(r, config)
            theirs.append((time.perf_counter() - t) * 1000)
        rows.append((f"{n} queues (+4 shipped): p50 / p99 ms",
                     f"{percentile(theirs, .5):.2f} / {percentile(theirs, .99):.2f}",
                     f"{percentile(ours, .5):.2f} / {percentile(ours, .99):.2f}",
                     f"{percentile(theirs, .5) / percentile(ours, .5):.0f}x"))
    return rows


class RecordingBackend:
    """A backend that runs nothing and notes when it was asked to scale up."""

    name = "recording"

    def __init__(self, queues):
        self.current = dict.fromkeys(queues, 0)
        self.first_up: dict[str, float] = {}

    def replicas(self) -> dict[str, int]:
        return dict(self.current)

    def scale(self, queue: str, replicas: int, workers) -> None:
        if replicas > self.current[queue]:
            self.first_up.setdefault(queue, time.time())
        self.current[queue] = replicas

    def close(self) -> None:
        pass


def keda_like(r, key: str, stop: threading.Event, seen: dict, period: float = 30.0,
              list_length: int = 5) -> None:
    """KEDA's Redis scaler with its defaults: LLEN of one key every 30 s."""
    while not stop.is_set():
        if r.llen(key) >= 1 and "at" not in seen:  # activation: any message
            seen["at"] = time.time()
            seen["replicas"] = -(-r.llen(key) // list_length)
        stop.wait(period)


def reaction(url: str, bursts: int, priority: int) -> tuple[list[float], list[float | None]]:
    ours, theirs = [], []
    r = client(url)
    for _ in range(bursts):
        r.flushdb()
        config = config_with(url, 0, tmpdir("fleet-bench-autoscale-"))
        app = create_app(config)
        backend = RecordingBackend(config.queues)
        scaler = Autoscaler(config, RedisMetrics(config, r), backend, report=lambda _: None)
        stop = threading.Event()
        keda_seen: dict = {}
        threads = [threading.Thread(target=scaler.run, args=(stop,), daemon=True),
                   threading.Thread(target=keda_like, daemon=True,
                                    args=(r, list_keys(config, "heavy")[0], stop, keda_seen))]
        for t in threads:
            t.start()
        time.sleep(random.uniform(2.0, 32.0))  # a random moment in both poll cycles
        sent = time.time()
        for _ in range(20):
            app.send_task("tasks.heavy.crunch", priority=priority)
        deadline = sent + 35.0
        while time.time() < deadline and ("heavy" not in backend.first_up
                                          or "at" not in keda_seen):
            time.sleep(0.02)
        stop.set()
        ours.append(backend.first_up.get("heavy", float("inf")) - sent)
        theirs.append(keda_seen["at"] - sent if "at" in keda_seen else None)
        app.close()
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=6, help="bursts per round")
    parser.add_argument("--rounds", type=int, default=200, help="polls per size")
    args = parser.parse_args()
    server = private_redis()
    try:
        rows = poll_latency(server.url, [10, 100, 1000], args.rounds)
        normal = reaction(server.url, args.bursts, priority=0)
        urgent = reaction(server.url, max(2, args.bursts // 3), priority=9)
    finally:
        server.stop()
    print(f"autoscaler on {machine()}")
    print(table("\npoll of every queue (lists + priority sub-lists + unacked + workers)",
                rows, header=("", "key by key", "fleet (1 round trip)", "speed-up")))

    def fmt(values):
        found = [v for v in values if v is not None]
        missed = len(values) - len(found)
        if not found:
            return f"never (all {missed} missed)"
        text = f"median {percentile(found, .5):.1f}, max {max(found):.1f}"
        return text + (f"; {missed} never" if missed else "")

    print(table(
        "\nburst of 20 messages -> first scale-up request, seconds (random burst moments)",
        [("priority 0 (main list)", fmt(normal[1]), fmt(normal[0]), ""),
         ("priority 9 (a sub-list)", fmt(urgent[1]), fmt(urgent[0]), "")],
        header=("burst", "KEDA-like poller (30 s, LLEN of Q)", "fleet loop (2 s)", "")))


if __name__ == "__main__":
    main()
