"""Prometheus ``/metrics``: what celery-exporter and Flower export, under their names,
plus what neither has (queue depth with priorities and prefetched messages, oldest
message age, replicas, memory-limit kills).

Counters are counted as events are written (one dict update per event, no database
read at scrape time); gauges are read from the sampler's newest poll and the (small)
workers table. Offline workers drop out of every series once purged.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fleet.dashboard.events import MEMORY_EVENT, Batch
from fleet.dashboard.gaps import REASONS

#: Event type -> celery-exporter's counter name.
COUNTED = {
    "task-sent": "celery_task_sent_total",
    "task-received": "celery_task_received_total",
    "task-started": "celery_task_started_total",
    "task-succeeded": "celery_task_succeeded_total",
    "task-failed": "celery_task_failed_total",
    "task-retried": "celery_task_retried_total",
    "task-revoked": "celery_task_revoked_total",
    "task-rejected": "celery_task_rejected_total",
}
NAMES_KEPT = 100_000
RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
                   300, 600, 1800, 3600)


class EventCounters:
    """Task counters by (name, queue), fed a batch at a time."""

    def __init__(self, registry: CollectorRegistry):
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.memory_kills: Counter[str] = Counter()
        #: Event gaps recorded (reason -> count): what the event stream could not bring back.
        self.gaps: Counter[str] = Counter()
        #: uuid -> (name, queue) for tasks whose later events carry neither (bounded).
        self._known: dict[str, tuple[str, str]] = {}
        self.runtime = Histogram("celery_task_runtime", "Task runtime in seconds",
                                 ["name", "queue"], buckets=RUNTIME_BUCKETS,
                                 registry=registry)

    def observe(self, batch: Batch) -> None:
        known = self._known
        for uuid, row in batch.tasks.items():
            if row["name"]:
                known[uuid] = (row["name"], row["queue"] or "")
            elif uuid not in known and row["queue"]:
                known[uuid] = ("unknown", row["queue"])
        while len(known) > NAMES_KEPT:
            del known[next(iter(known))]
        for kind, uuid, runtime in batch.outcomes:
            name, queue = known.get(uuid, ("unknown", ""))
            metric = COUNTED.get(kind)
            if metric:
                self.counts[(metric, name, queue)] += 1
            if kind == "task-succeeded" and runtime is not None:
                self.runtime.labels(name, queue).observe(float(runtime))
            if (kind == "task-failed" and batch.tasks[uuid]["memory_kill"]) or \
                    kind == MEMORY_EVENT:
                self.memory_kills[queue] += 1
        for gap in batch.gaps:
            self.gaps[gap["reason"]] += 1


class FleetCollector:
    """Gauges and counters computed at scrape time from in-memory state."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        svc = self.service
        families = {}
        for metric, doc in (
                ("celery_task_sent_total", "Tasks sent"),
                ("celery_task_received_total", "Tasks received by a worker"),
                ("celery_task_started_total", "Tasks started"),
                ("celery_task_succeeded_total", "Tasks succeeded"),
                ("celery_task_failed_total", "Tasks failed"),
                ("celery_task_retried_total", "Tasks retried"),
                ("celery_task_revoked_total", "Tasks revoked"),
                ("celery_task_rejected_total", "Tasks rejected")):
            families[metric] = CounterMetricFamily(metric.removesuffix("_total"), doc,
                                                   labels=["name", "queue_name"])
        for (metric, name, queue), n in list(svc.counters.counts.items()):
            families[metric].add_metric([name, queue], n)
        yield from families.values()
        kills = CounterMetricFamily("fleet_memory_limit_kills",
                                    "Tasks stopped by the memory guard", labels=["queue_name"])
        for queue, n in list(svc.counters.memory_kills.items()):
            kills.add_metric([queue], n)
        yield kills

        snap = svc.sampler.snapshot
        gauges = {
            "celery_queue_length": ("Messages waiting (all priority lists)", "waiting"),
            "fleet_queue_unacked": ("Messages held by workers (running, prefetched)",
                                    "unacked"),
            "fleet_queue_running": ("Tasks running", "running"),
            "fleet_queue_oldest_age_seconds": ("Age of the oldest waiting message",
                                               "oldest_age"),
            "fleet_queue_arrival_rate": ("Messages arriving per second", "arrival_rate"),
            "fleet_queue_completion_rate": ("Tasks completing per second",
                                            "completion_rate"),
        }
        for metric, (doc, attr) in gauges.items():
            g = GaugeMetricFamily(metric, doc, labels=["queue_name"])
            for name, m in snap.queues.items():
                value = getattr(m, attr)
                g.add_metric([name], 0.0 if value is None else float(value))
            yield g
        desired = GaugeMetricFamily("fleet_replicas_desired",
                                    "Replicas the autoscaler wants", labels=["queue_name"])
        actual = GaugeMetricFamily("fleet_replicas_actual", "Replicas running",
                                   labels=["queue_name"])
        for name, d in snap.replicas.items():
            desired.add_metric([name], d.get("desired", 0))
            actual.add_metric([name], d.get("current", 0))
        yield desired
        yield actual

        up = GaugeMetricFamily("celery_worker_up", "1 if the worker is online, 0 if offline "
                               "(purged after dashboard.purge_offline_after)",
                               labels=["hostname"])
        active = GaugeMetricFamily("celery_worker_tasks_active", "Tasks running on a worker",
                                   labels=["hostname"])
        for w in svc.views.workers():
            up.add_metric([w["hostname"]], 1 if w["status"] == "online" else 0)
            if w["status"] == "online":
                active.add_metric([w["hostname"]], w["active"] or 0)
        yield up
        yield active
        cpu = GaugeMetricFamily("fleet_worker_cpu_percent",
                                "Worker CPU (main process and pool), % of one core",
                                labels=["hostname", "queue_name"])
        rss = GaugeMetricFamily("fleet_worker_rss_bytes", "Worker RSS (main process and pool)",
                                labels=["hostname", "queue_name"])
        for w in (snap.observation.workers if snap.observation else []):
            cpu.add_metric([w.hostname, w.queue or ""], w.cpu_percent)
            rss.add_metric([w.hostname, w.queue or ""], w.rss_main + w.rss_children)
        yield cpu
        yield rss
        events = CounterMetricFamily("fleet_dashboard_events", "Celery events stored")
        events.add_metric([], svc.ingester.events)
        yield events
        gaps = CounterMetricFamily("fleet_dashboard_event_gaps",
                                   "Stretches of events the dashboard could not recover",
                                   labels=["reason"])
        for reason in REASONS:
            gaps.add_metric([reason], svc.counters.gaps.get(reason, 0))
        yield gaps
