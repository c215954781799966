"""From a burst to the first new replica consuming, docker backend beside the local one,
in the same run: ``python bench/docker_burst.py [--bursts N]``.

Each round: the queue is at zero replicas; 10 ``tasks.heavy.sleep(0.2)`` land at once;
the real loop (``autoscaler.interval`` 2 s, as shipped) scales ``heavy`` up through the
backend. Measured from the burst: the first replica created (a container in the
engine's list, a worker process under this one) and the first task started (the
task's own clock, which it returns). Then the loop scales back to zero (stabilization
5 s here) before the next round. Alternating backends, on the test Redis at
127.0.0.1:6379 under a key prefix of its own. Needs the engine (.ci/docker-engine).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import redis

from autoscale.backends.docker import LABEL_FLEET, DockerBackend
from autoscale.backends.local import LocalBackend
from autoscale.loop import Autoscaler
from bench.common import machine, percentile, table, tmpdir
from fleet.keys import broker_client
from fleet.observe.metrics import RedisMetrics
from tests.conftest import REDIS_URL, Fleet, drop_prefix
from tests.docker_util import start_engine

BURST = 10


def overrides(image: str) -> dict:
    return {"autoscaler": {"docker": {"image": image}},
            "queues": {"default": {"autoscaling": {"min_replicas": 0}},
                       "heavy": {"time_limit": {"soft": "20s", "hard": "25s"},
                                 "autoscaling": {"min_replicas": 0, "max_replicas": 3,
                                                 "scale_down_stabilization": "5s",
                                                 "cooldown": "2s"}}}}


def one_round(fleet, backend, first_replica) -> tuple[float, float]:
    scaler = Autoscaler(fleet.config, RedisMetrics(fleet.config, broker_client(fleet.config)),
                        backend, report=lambda _line: None)
    stop = threading.Event()
    loop = threading.Thread(target=scaler.run, args=(stop,), daemon=True)
    loop.start()
    try:
        time.sleep(1.0)  # a poll or so of nothing, as a fleet at rest has seen
        app = fleet.app()
        began = time.time()
        results = [app.send_task("tasks.heavy.sleep", kwargs={"seconds": 0.2})
                   for _ in range(BURST)]
        created = None
        while created is None and time.time() - began < 60:
            if first_replica():
                created = time.time() - began
            time.sleep(0.05)
        started = min(r.get(timeout=120)["started"] for r in results) - began
        deadline = time.time() + 90
        while first_replica() and time.time() < deadline:
            time.sleep(0.5)
        return created if created is not None else float("nan"), started
    finally:
        stop.set()
        loop.join(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=5)
    args = parser.parse_args()
    engine = start_engine()
    client = engine.client()
    prefix = f"db{uuid.uuid4().hex[:8]}:"
    work = tmpdir("docker-burst-")
    fleet = Fleet(work, prefix, overrides(engine.image))
    env = {"FLEET_BROKER_URL": REDIS_URL, "FLEET_KEY_PREFIX": prefix}
    docker_backend = DockerBackend(fleet.config, env=env, config_path=str(fleet.config_path),
                                   client_factory=engine.client)
    local = LocalBackend(fleet.config, str(fleet.config_path), {**fleet.env}, work / "logs")
    me = psutil.Process()
    figures = {"local": ([], []), "docker": ([], [])}
    try:
        for _ in range(args.bursts):
            c, s = one_round(fleet, local, lambda: bool(me.children()))
            figures["local"][0].append(c)
            figures["local"][1].append(s)
            c, s = one_round(fleet, docker_backend, lambda: bool(client.containers.list(
                sparse=True, filters={"label": f"{LABEL_FLEET}={prefix.rstrip(':')}"})))
            figures["docker"][0].append(c)
            figures["docker"][1].append(s)
    finally:
        local.close()
        docker_backend.stop_all(grace=10)
        docker_backend.close()
        drop_prefix(redis.Redis.from_url(REDIS_URL), prefix)
    print(machine())
    rows = []
    for i, what in ((0, "burst to first replica created"), (1, "burst to first task started")):
        for q, name in ((0.5, "p50"), (1.0, "max")):
            lo, do = percentile(figures["local"][i], q), percentile(figures["docker"][i], q)
            rows.append((f"{what} {name}", f"{lo:.2f} s", f"{do:.2f} s", f"{do / lo:.2f}x"))
    print(table(f"{args.bursts} bursts of {BURST} tasks each, autoscaler.interval 2 s", rows,
                header=("metric", "local backend", "docker backend", "ratio")))


if __name__ == "__main__":
    main()
