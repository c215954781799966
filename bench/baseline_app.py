"""Plain Celery with default settings, for the benchmarks' baseline side.

One queue, default prefetch (4), acks on receipt, the same task code as the fleet
(tasks/ and bench.probe registered through shared_task). Configured from the
environment by the benchmark that starts it.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery(
    "baseline",
    broker=os.environ["BENCH_BROKER"],
    backend=os.environ["BENCH_BROKER"],
    include=["tasks.aggregate", "tasks.heavy", "bench.probe"],
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=os.environ.get("BENCH_QUEUE", "bench"),
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", "4")),
    task_acks_late=bool(os.environ.get("BENCH_ACKS_LATE")),
)
