"""API requests per autoscaler poll, and the poll's time, at 10, 100 and 1,000 queues.

Against the emulated API server (tests/fakes/k8s_api.py) with 20 ms added to every
request (a round trip to a real API server under load): the Kubernetes backend as it
is (one LIST of the worker Deployments per poll) beside the same backend reading each
queue with a GET of its own (its fallback when the Role may not list Deployments, and
how every poll worked before), in one run. A poll here is what the loop asks of the
backend: ``replicas()``, then ``scale()`` for each queue whose count changes (scale-ups,
so no pod lists or annotations; a scale-down adds one pod list and a patch per pod
whose cost changes). The client-side rate limit is the shipped default (20/s, burst 30).

    python bench/k8s_api.py [--latency 0.02] [--sizes 10,100,1000]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autoscale.backends.kubernetes import KubernetesBackend  # noqa: E402
from fleet.config import parse_config  # noqa: E402
from fleet.render.k8s import worker_labels  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.fakes.k8s_api import FakeKubernetes  # noqa: E402

NS = "fleet"
INTERVAL = 2.0


def config(queues: int):
    names = [f"q{i:04d}" for i in range(queues)]
    return parse_config({"version": 1, "default_queue": names[0],
                         "queues": {n: {"concurrency": 1} for n in names}}, "bench.yaml")


def poll(k8s: KubernetesBackend, fake: FakeKubernetes, changed: list[str],
         step: int) -> tuple[int, float]:
    """One poll: read every queue, scale ``changed`` up by one; (requests, seconds)."""
    mark = len(fake.requests)
    started = time.perf_counter()
    current = k8s.replicas()
    for queue in changed:
        k8s.scale(queue, current[queue] + step, [])
    return len(fake.requests) - mark, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--sizes", default="10,100,1000")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the fallback's own warning, once per size
    print(f"emulated API server, {args.latency * 1000:.0f} ms per request; poll interval "
          f"{INTERVAL:.0f} s; rate limit 20/s, burst 30")
    print(f"{'queues':>7} {'changed':>8} {'mode':<14} {'requests':>9} {'poll':>8} "
          f"{'within':>7}")
    for size in (int(n) for n in args.sizes.split(",")):
        cfg = config(size)
        fake = FakeKubernetes(free_port(), latency=args.latency).start()
        fake.validate_bodies = False  # the emulator's own schema checks: not the backend's
        try:
            for queue in cfg.queues:
                fake.add_deployment(NS, f"fleet-worker-{queue}", replicas=1,
                                    labels=worker_labels(queue))
            for mode in ("one LIST", "GET per queue"):
                if mode == "GET per queue":
                    fake.forbid("list", "deployments")
                k8s = KubernetesBackend(cfg, fake.api_client())
                k8s.replicas()  # the first poll (the fallback learns it may not list)
                time.sleep(1.5)  # let the rate limit's burst fill, as between polls
                names = list(cfg.queues)
                for changed in sorted({0, 1, min(10, size)}):
                    requests, seconds = poll(k8s, fake, names[:changed], 1)
                    print(f"{size:>7} {changed:>8} {mode:<14} {requests:>9} "
                          f"{seconds:>7.2f}s {'yes' if seconds <= INTERVAL else 'NO':>7}")
                    time.sleep(1.5)
                k8s.close()
                fake.allow("list", "deployments")
        finally:
            fake.stop()


if __name__ == "__main__":
    main()
