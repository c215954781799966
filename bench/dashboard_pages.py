"""Page load times at scale: 1M stored tasks and 1,000 queues, over real HTTP.

Fills a dashboard database (SQLite, the default) with N tasks spread over queues,
workers, names and states, points the dashboard at a private Redis holding 1,000
queues (some messages in each, some on priority lists), then times every API call a
page makes (median of 5, after one warm-up), cold-start included for nothing.

    python bench/dashboard_pages.py                 # 1,000,000 tasks, 1,000 queues
    python bench/dashboard_pages.py --tasks 100000 --queues 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import private_redis  # noqa: E402

STATES = ["SUCCESS"] * 90 + ["FAILURE"] * 3 + ["RETRY"] * 2 + ["STARTED"] * 3 + ["REVOKED"] * 2


def config_with(queues: int, url: str, workdir: Path):
    from fleet.config import parse_config
    from tests.conftest import deep_merge, shipped_config

    data = deep_merge(shipped_config(), {"broker": {"url": url},
                                         "payloads": {"path": str(workdir / "payloads")}})
    for i in range(queues - len(data["queues"])):
        data["queues"][f"q{i:04d}"] = {"tasks": [f"bench.q{i:04d}.*"], "concurrency": 2}
    return parse_config(data, "bench")


def fill(store, config, tasks: int) -> float:
    from fleet.dashboard.events import Batch

    queues = list(config.queues)
    names = [f"bench.{q}.task{j}" for q in queues[:50] for j in range(4)]
    workers = [f"{queues[i % len(queues)]}@bench-{i}" for i in range(50)]
    now = time.time() - tasks * 0.01
    started = time.perf_counter()
    for start in range(0, tasks, 5000):
        batch = Batch(frozenset(queues))
        for i in range(start, min(tasks, start + 5000)):
            w = workers[i % len(workers)]
            state = STATES[i % len(STATES)]
            t = now + i * 0.01
            batch.add({"type": "task-received", "uuid": f"task-{i:08d}", "hostname": w,
                       "name": names[i % len(names)], "timestamp": t,
                       "args": f"([{{'customer': {i % 9973}, 'amount': {i}}}],)",
                       "kwargs": "{'currency': 'EUR'}"})
            kind = {"SUCCESS": "task-succeeded", "FAILURE": "task-failed",
                    "RETRY": "task-retried", "STARTED": "task-started",
                    "REVOKED": "task-revoked"}[state]
            batch.add({"type": kind, "uuid": f"task-{i:08d}", "hostname": w,
                       "timestamp": t + 0.005, "runtime": 0.005, "result": f"{i * 2}",
                       "exception": f"ValueError('bad row {i % 7}')" if state == "FAILURE"
                       else None})
        store.write(list(batch.tasks.values()), batch.workers.values())
    return time.perf_counter() - started


def seed_queues(client, config) -> None:
    from fleet.keys import list_keys

    pipe = client.pipeline(transaction=False)
    for n, queue in enumerate(config.queues):
        keys = list_keys(config, queue)
        pipe.lpush(keys[0], *[f'{{"n": {k}}}' for k in range(n % 5)] or ["{}"])
        if n % 10 == 0:
            pipe.lpush(keys[3], "{}")
    pipe.execute()


def declare_rabbit(url: str, names: list[str], delete: bool) -> None:
    import kombu

    with kombu.Connection(url, connect_timeout=5) as conn:
        channel = conn.channel()
        for name in names:
            if delete:
                channel.queue_delete(queue=name)
            else:
                channel.queue_declare(queue=name, auto_delete=False)


def timed(session, url: str, runs: int = 5) -> tuple[float, int, int]:
    session.get(url, timeout=120)  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        reply = session.get(url, timeout=120)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), reply.status_code, len(reply.content)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=1_000_000)
    p.add_argument("--queues", type=int, default=1000)
    p.add_argument("--rabbitmq", default=None, metavar="URL",
                   help="also show this RabbitMQ's queues on the broker page (the script "
                        "declares --queues of them and deletes them afterwards)")
    args = p.parse_args()

    from fleet.dashboard.server import DashboardServer
    from fleet.dashboard.store import Store
    from tests.conftest import free_port

    redis_server = private_redis()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = config_with(args.queues, redis_server.url, tmp)
        board = {"max_tasks": args.tasks * 2}
        rabbit_names = [f"fleet-bench-{i:04d}" for i in range(args.queues)]
        if args.rabbitmq:
            from fleet.config import RabbitMQ

            declare_rabbit(args.rabbitmq, rabbit_names, delete=False)
            board["rabbitmq"] = RabbitMQ(url=args.rabbitmq, queues=rabbit_names)
        config = config.model_copy(update={"dashboard": config.dashboard.model_copy(
            update=board)})
        url = f"sqlite:///{tmp / 'pages.sqlite'}"
        store = Store(url)
        took = fill(store, config, args.tasks)
        store.close()
        import redis

        seed_queues(redis.Redis.from_url(redis_server.url), config)
        port = free_port()
        server = DashboardServer(config, port=port, database=url).start()
        base = f"http://127.0.0.1:{port}"
        s = requests.Session()
        try:
            time.sleep(1.0)
            newest = s.get(f"{base}/api/fleet/tasks?limit=50", timeout=60).json()
            cursor = newest["tasks"][-1]["seq"]
            pages = [
                ("page HTML + app.js", "/", "/static/app.js"),
                ("workers", "/api/fleet/workers",
                 "/api/fleet/series?what=workers&window=1h"),
                ("worker detail", "/api/fleet/workers/default@bench-0", None),
                ("queues (1,000 rows)", "/api/fleet/queues",
                 "/api/fleet/series?what=queues&window=1h"),
                ("tasks: newest 50", "/api/fleet/tasks?limit=50", None),
                ("tasks: next page", f"/api/fleet/tasks?limit=50&before={cursor}", None),
                ("tasks: page 2,000 deep", f"/api/fleet/tasks?limit=50&before={cursor - 100_000}",
                 None),
                ("tasks: FAILURE+RETRY", "/api/fleet/tasks?state=FAILURE&state=RETRY", None),
                ("tasks: by name", "/api/fleet/tasks?name=bench.default.task1", None),
                ("tasks: by worker", "/api/fleet/tasks?worker=default@bench-0", None),
                ("tasks: last 10 min", f"/api/fleet/tasks?since={time.time() - 600}", None),
                ("tasks: search (common)", "/api/fleet/tasks?search=customer%27:%2042,", None),
                ("tasks: search (no match)", "/api/fleet/tasks?search=zzzz-nothing", None),
                ("task detail", "/api/fleet/tasks/task-00000042", None),
                ("failures by exception", "/api/fleet/failures", None),
                ("jobs", "/api/fleet/jobs", None),
                ("autoscaler", "/api/fleet/autoscaler", None),
                ("broker (1,000 queues" + (", + RabbitMQ's" if args.rabbitmq else "") + ")",
                 "/api/fleet/broker", None),
                ("overview (counts 1M)", "/api/fleet/overview", None),
                ("Flower API /api/tasks?limit=100", "/api/tasks?limit=100", None),
                ("Flower API /api/queues/length", "/api/queues/length", None),
                ("/metrics", "/metrics", None),
            ]
            print(f"{args.tasks:,} tasks stored (filled in {took:.0f} s), {args.queues:,} "
                  f"queues; median of 5 over HTTP\n")
            print(f"{'page':<34}{'ms':>9}{'bytes':>11}")
            for label, first, second in pages:
                ms, status, size = timed(s, base + first)
                if second:
                    ms2, _, size2 = timed(s, base + second)
                    ms, size = ms + ms2, size + size2
                flag = "" if status == 200 else f"  (HTTP {status})"
                print(f"{label:<34}{ms:>9.1f}{size:>11,}{flag}")
        finally:
            server.stop()
            redis_server.stop()
            if args.rabbitmq:
                declare_rabbit(args.rabbitmq, rabbit_names, delete=True)


if __name__ == "__main__":
    main()
