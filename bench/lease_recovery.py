"""Lease recovery: how soon a SIGKILLed worker's tasks complete elsewhere.

The scenario of the lease-renewal issue, run for three set-ups side by side:

  1. plain Celery on Redis, defaults (early ack, prefetch multiplier 4, 1 h visibility)
  2. plain Celery, acks_late + reject_on_worker_lost + prefetch multiplier 1
  3. the fleet: ``fleet worker --queue heavy`` (acks_late, reject_on_worker_lost,
     disable_prefetch, 60 s visibility timeout kept safe by lease renewal every 10 s)

Each: one worker with a pool of 2, 8 tasks of 5 s each (a sleep: a stand-in for heavy
work that lets the three set-ups share a 2-core machine without skewing each other);
3 s in, the worker and its pool are SIGKILLed (what an OOM kill or a lost node does) and
a new worker starts at once. Then it counts, for 90 s after the kill, the tasks that
completed, when the last one did, and every run (a run that the kill cut short counts).

All three use the Redis at 127.0.0.1:6379 (``--redis``), each under a key prefix of its
own (kombu's global_keyprefix, which covers unacked and unacked_index too); the keys are
deleted at the end. Run from the repository root with the venv active:

    python bench/lease_recovery.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import yaml  # noqa: E402
from celery import Celery, shared_task  # noqa: E402

TASK = "bench.lease.slow"
QUEUE = "heavy"
ENV_VARIANT, ENV_PREFIX, ENV_URL = "LEASE_BENCH_VARIANT", "LEASE_BENCH_PREFIX", "LEASE_BENCH_URL"
PLAIN_VARIANTS = {
    "celery-defaults": {},
    "celery-acks-late": {"task_acks_late": True, "task_reject_on_worker_lost": True,
                         "worker_prefetch_multiplier": 1},
}


def runs_key(prefix: str) -> str:
    return prefix + "bench:lease:runs"


_clients: dict[str, redis.Redis] = {}


def _client(url: str) -> redis.Redis:
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url)
    return _clients[url]


@shared_task(name=TASK, bind=True)
def slow(self, seconds: float) -> float:
    """Note the start (before any work, so a killed run counts), sleep, note the end."""
    prefix = (self.app.conf.broker_transport_options or {}).get("global_keyprefix", "")
    client = _client(self.app.conf.broker_url)
    run = {"task": self.request.id, "host": self.request.hostname, "pid": os.getpid()}
    client.rpush(runs_key(prefix), json.dumps({**run, "event": "start", "at": time.time()}))
    time.sleep(seconds)
    client.rpush(runs_key(prefix), json.dumps({**run, "event": "end", "at": time.time()}))
    return seconds


def plain_app(variant: str, prefix: str, url: str) -> Celery:
    """A minimal Celery app: one queue, JSON, its own key prefix; nothing of fleet."""
    app = Celery("plain", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        broker_transport_options={"global_keyprefix": prefix},
        result_backend_transport_options={"global_keyprefix": prefix},
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_default_queue=QUEUE,
        imports=["bench.lease_recovery"],
        **PLAIN_VARIANTS[variant],
    )
    return app


# The app ``celery -A bench.lease_recovery worker`` finds, configured by the benchmark.
if os.environ.get(ENV_VARIANT) in PLAIN_VARIANTS:
    app = plain_app(os.environ[ENV_VARIANT], os.environ[ENV_PREFIX], os.environ[ENV_URL])


class PlainWorker:
    """``celery -A bench.lease_recovery worker`` in a session of its own."""

    def __init__(self, variant: str, prefix: str, url: str, node: str, log: Path):
        self.hostname = node
        env = {**os.environ, ENV_VARIANT: variant, ENV_PREFIX: prefix, ENV_URL: url,
               "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "celery", "-A", "bench.lease_recovery", "worker",
                "-Q", QUEUE, "-c", "2", "-n", node, "--loglevel", "INFO"]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@dataclass
class Outcome:
    variant: str
    visibility: str
    completed: int
    last_done: float | None  # seconds after the kill, of the last task that completed
    runs: int
    cut_short: int
    run_twice: int
    twice_before_kill: int  # a second run while the first worker lived: a true duplicate
    in_unacked: int  # still waiting there for visibility_timeout when the window closed


def wait_ready(app: Celery, node: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker {node} exited with {proc.returncode}")
        if app.control.ping(destination=[node], timeout=0.5):
            return
    raise RuntimeError(f"worker {node} not ready after {timeout}s")


def fleet_setup(prefix: str, url: str, workdir: Path):
    """A queues.yaml: the shipped one, heavy with a pool of 2 that takes the bench task."""
    from fleet.config import load_config

    data = yaml.safe_load((ROOT / "queues.yaml").read_text())
    data["broker"]["url"] = url
    data["payloads"]["path"] = str(workdir / "payloads")
    data["imports"] = [*data["imports"], "bench.lease_recovery"]
    heavy = data["queues"][QUEUE]
    heavy["tasks"] = [*heavy["tasks"], TASK]
    heavy["concurrency"] = 2
    heavy["memory_limit"] = "512Mi"  # x 2 within the pod limit (validation)
    path = workdir / "queues.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, load_config(path, key_prefix=prefix)


def run_variant(variant: str, args, workdir: Path) -> Outcome:
    prefix = f"bench-lease-{uuid.uuid4().hex[:8]}-{variant}:"
    logs = workdir / variant
    logs.mkdir(parents=True)
    client = redis.Redis.from_url(args.redis)
    workers = []

    if variant == "fleet":
        from fleet.factory import create_app
        from fleet.processes import WorkerProcess

        config_path, config = fleet_setup(prefix, args.redis, logs)
        app = create_app(config)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env.update(FLEET_KEY_PREFIX=prefix, PYTHONUNBUFFERED="1")
        broker = config.broker
        visibility = (f"{broker.visibility_timeout:g} s, lease every "
                      f"{broker.lease.interval:g} s")

        def start(name: str):
            return WorkerProcess(QUEUE, str(config_path), logs / f"{name}.log", env,
                                 hostname=f"{name}@{prefix.rstrip(':')}")
    else:
        app = plain_app(variant, prefix, args.redis)
        visibility = "3600 s (kombu default)"

        def start(name: str):
            return PlainWorker(variant, prefix, args.redis, f"{name}@{prefix.rstrip(':')}",
                               logs / f"{name}.log")

    try:
        first = start("first")
        workers.append(first)
        wait_ready(app, first.hostname, first.proc)
        results = [app.send_task(TASK, args=[args.task_seconds], queue=QUEUE)
                   for _ in range(args.tasks)]
        time.sleep(args.kill_after)
        first.kill()
        killed = time.time()
        workers.append(start("second"))

        deadline = killed + args.window
        done: set[str] = set()
        while time.time() < deadline and len(done) < len(results):
            done |= {r.id for r in results if r.id not in done and r.state == "SUCCESS"}
            time.sleep(0.5)

        events = [json.loads(raw) for raw in client.lrange(runs_key(prefix), 0, -1)]
        starts: dict[str, list[dict]] = {}
        ends: dict[tuple[str, int], float] = {}
        for e in events:
            if e["event"] == "start":
                starts.setdefault(e["task"], []).append(e)
            else:
                ends[(e["task"], e["pid"])] = e["at"]
        finished = [ends[(t, e["pid"])] for t in done for e in starts.get(t, [])
                    if (t, e["pid"]) in ends]
        return Outcome(
            variant=variant,
            visibility=visibility,
            completed=len(done),
            last_done=(max(finished) - killed) if finished else None,
            runs=sum(len(s) for s in starts.values()),
            cut_short=sum(1 for t, s in starts.items() for e in s
                          if (t, e["pid"]) not in ends),
            run_twice=sum(1 for s in starts.values() if len(s) > 1),
            twice_before_kill=sum(1 for s in starts.values()
                                  if len(s) > 1 and sorted(e["at"] for e in s)[1] < killed),
            in_unacked=client.zcard(prefix + "unacked_index"),
        )
    finally:
        for worker in workers:
            worker.kill()
        app.close()
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i:i + 500])
        client.close()


def table(outcomes: list[Outcome], args) -> str:
    header = ("variant", "visibility timeout", f"completed in {args.window:g} s",
              "last done (s after kill)", "runs", "cut short", "tasks run twice",
              "twice while 1st worker lived", f"in unacked at {args.window:g} s")
    rows = [header]
    for o in outcomes:
        last = f"{o.last_done:.1f}" if o.last_done is not None else "-"
        if o.completed < args.tasks:
            last += f" ({args.tasks - o.completed} never)"
        rows.append((o.variant, o.visibility, f"{o.completed}/{args.tasks}", last,
                     str(o.runs), str(o.cut_short), str(o.run_twice),
                     str(o.twice_before_kill), str(o.in_unacked)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--task-seconds", type=float, default=5.0)
    parser.add_argument("--kill-after", type=float, default=3.0)
    parser.add_argument("--window", type=float, default=90.0)
    parser.add_argument("--sequential", action="store_true",
                        help="one variant after the other (about 3x longer)")
    args = parser.parse_args()
    os.chdir(ROOT)  # workers import bench.lease_recovery from here

    variants = [*PLAIN_VARIANTS, "fleet"]
    outcomes: dict[str, Outcome] = {}
    errors: dict[str, BaseException] = {}
    workdir = Path(tempfile.mkdtemp(prefix="lease-bench-"))

    def run(variant: str) -> None:
        try:
            outcomes[variant] = run_variant(variant, args, workdir)
        except BaseException as exc:  # reported below, with the worker logs' place
            errors[variant] = exc

    started = time.monotonic()
    print(f"{args.tasks} tasks x {args.task_seconds:g} s, pool of 2, SIGKILL of worker and "
          f"pool {args.kill_after:g} s in, new worker at once; watching {args.window:g} s "
          f"after the kill ({'one after the other' if args.sequential else 'side by side'})",
          flush=True)
    if args.sequential:
        for variant in variants:
            run(variant)
    else:
        threads = [threading.Thread(target=run, args=(v,)) for v in variants]
        for thread in threads:
            thread.start()
            time.sleep(1.0)  # stagger the start-ups a little on a small machine
        for thread in threads:
            thread.join()
    print(table([outcomes[v] for v in variants if v in outcomes], args))
    print(f"({time.monotonic() - started:.0f} s in all; worker logs in {workdir})")
    for variant, exc in errors.items():
        print(f"{variant}: failed: {exc!r}", file=sys.stderr)
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
