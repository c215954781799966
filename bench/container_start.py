"""Worker start-up in a container beside a bare worker process, for the simulator's
start-up model (``fleet simulate --startup``): ``python bench/container_start.py``.

Each start: a ``tasks.heavy.sleep(0)`` waits on the ``heavy`` queue, then a worker is
started, and the figure is from the start call to the task's own clock at its start
(the task returns it; the same host clock on both sides). The container is the heavy
Deployment's pod, run from the fleet image as tests/containers/pod.py runs it (the
manifest's command, env, mounts, securityContext, --memory/--cpus); the bare process
is ``fleet worker --queue heavy`` as the local backend starts it. Alternating, on the
test Redis at 127.0.0.1:6379 under a key prefix of its own. Also: the worker's main
process RSS in each. Needs the engine (.ci/docker-engine).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import redis

from bench.common import machine, percentile, table, tmpdir
from fleet.processes import stop_all
from tests.conftest import REDIS_URL, Fleet, drop_prefix
from tests.containers.pod import run_pod
from tests.docker_util import start_engine

MiB = 1 << 20


def first_task(app, start) -> tuple[float, object]:
    """Seconds from ``start()`` to the waiting task's start; and what start returned."""
    result = app.send_task("tasks.heavy.sleep", kwargs={"seconds": 0})
    began = time.time()
    handle = start()
    try:
        return result.get(timeout=120)["started"] - began, handle
    except Exception:
        logs = handle.logs() if hasattr(handle, "logs") else handle.log.read_text()
        sys.exit(f"no first task from {handle}:\n{logs[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=20)
    args = parser.parse_args()
    engine = start_engine()
    client = engine.client()
    prefix = f"cs{uuid.uuid4().hex[:8]}:"
    fleet = Fleet(tmpdir("container-start-"), prefix, {})
    app = fleet.app()
    times = {"container": [], "process": []}
    rss = {"container": [], "process": []}
    try:
        for _ in range(args.starts):
            took, pod = first_task(app, lambda: run_pod(
                client, engine.image, fleet.config, fleet.config_path, "heavy",
                prefix=prefix))
            times["container"].append(took)
            rss["container"].append(psutil.Process(pod.main_pid()).memory_info().rss)
            pod.container.stop(timeout=30)
            pod.remove()
            took, worker = first_task(app, lambda: fleet.start_worker("heavy", wait=False))
            times["process"].append(took)
            rss["process"].append(psutil.Process(worker.pid).memory_info().rss)
            stop_all([worker], grace=30)
    finally:
        fleet.close()
        drop_prefix(redis.Redis.from_url(REDIS_URL), prefix)
    print(machine())
    print(f"image {engine.image}: "
          f"{client.images.get(engine.image).attrs['Size'] / 1e6:.0f} MB")
    rows = []
    for q, name in ((0.5, "p50"), (0.95, "p95")):
        p, c = percentile(times["process"], q), percentile(times["container"], q)
        rows.append((f"start to first task {name}", f"{p:.2f} s", f"{c:.2f} s",
                     f"{c / p:.2f}x"))
    p, c = (sum(rss[k]) / len(rss[k]) / MiB for k in ("process", "container"))
    rows.append(("worker main RSS (mean)", f"{p:.0f} MiB", f"{c:.0f} MiB", f"{c / p:.2f}x"))
    print(table(f"worker start-up over {args.starts} starts each",
                rows, header=("metric", "bare process", "container", "ratio")))


if __name__ == "__main__":
    main()
