"""What the poison bound and the malformed-message guards cost per message, in-process.

End-to-end no-op throughput (bench/throughput.py) cannot resolve a cost this small on a
shared machine, so this times the per-message code paths themselves, each against
kombu's or Celery's own in the same run:

1. building the Message from a popped envelope: fleet.transport.Message (the envelope
   checks) vs kombu's virtual Message;
2. handing a request on: FleetConsumer's on_task_request wrapper (a first delivery: one
   dict lookup) vs calling the handler directly;
3. the task call: FleetTask.__call__'s try around run (the wrong-arguments check runs
   only after a TypeError) vs a bare call.

Run:  python bench/deadletter_overhead.py [--n N]
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, table


def envelope() -> dict:
    body = json.dumps([[], {"seconds": 0}, {"callbacks": None, "errbacks": None,
                                            "chain": None, "chord": None}])
    return {"body": base64.b64encode(body.encode()).decode(), "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"lang": "py", "task": "bench.noop", "id": "x", "retries": 0},
            "properties": {"correlation_id": "x", "delivery_mode": 2, "priority": 0,
                           "delivery_info": {"exchange": "", "routing_key": "default"},
                           "body_encoding": "base64", "delivery_tag": "tag"}}


class _Channel:
    """What a Message needs of its channel (body codecs), without a Redis connection."""

    from kombu.transport.virtual import Channel as _virtual

    codecs = _virtual.codecs
    decode_body = _virtual.decode_body


def _pair_ns(base, ours, n: int, repeat: int = 21) -> tuple[float, float]:
    """Best per-call time of each, the two timed in turns so that load hits both alike."""
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, stmt in enumerate((base, ours)):
            best[i] = min(best[i], timeit.timeit(stmt, number=n) / n * 1e9)
    return best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50_000)
    n = parser.parse_args().n

    from kombu.transport import virtual

    from fleet.transport import Message

    payload, channel = envelope(), _Channel()
    rows = [("Message from an envelope",
             *_pair_ns(lambda: virtual.Message(payload, channel=channel),
                       lambda: Message(payload, channel=channel), n))]

    class Request:
        delivery_info = {"exchange": "", "routing_key": "default", "redelivered": False}

    def handle(request):
        return request

    def wrapper(request, _run=handle):
        if request.delivery_info.get("redelivered"):
            return None
        return _run(request)

    request = Request()
    rows.append(("on_task_request, first delivery",
                 *_pair_ns(lambda: handle(request), lambda: wrapper(request), n)))

    def run():
        return None

    def guarded():
        try:
            return run()
        except TypeError:
            raise

    rows.append(("task call around run", *_pair_ns(run, guarded, n)))
    print(f"dead-letter guards on {machine()}\n")
    print(table(f"per-message cost in ns (best of 21 x {n:,}, interleaved); a no-op task "
                "costs about "
                "700,000 ns end to end (bench/throughput.py)",
                [(name, f"{base:.0f}", f"{ours:.0f}", f"{ours - base:+.0f}")
                 for name, base, ours in rows],
                header=("path", "kombu/Celery", "fleet", "added")))


if __name__ == "__main__":
    main()
