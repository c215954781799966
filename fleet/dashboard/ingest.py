"""Celery events in, batched writes out.

A receiver thread folds each event into the current batch (fleet.dashboard.events); a
writer thread swaps the batch out every ``flush_interval`` (or sooner when it is large)
and writes it in one transaction, then does the bounded housekeeping: offline workers,
the task cap, old history. Memory holds at most one batch being filled and one being
written: when the database falls behind, the receiver waits (back-pressure) instead of
buffering without bound.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from fleet.config import FleetConfig
from fleet.dashboard import eventstream
from fleet.dashboard.events import Batch
from fleet.dashboard.store import Store

logger = logging.getLogger("fleet.dashboard")

#: Unique tasks in one batch above which the receiver waits for the writer.
MAX_BATCH_TASKS = 8_000
#: Unique tasks in one batch at which the writer is woken before its interval is up.
FLUSH_AT = 4_000
PRUNE_EVERY = 2.0
HISTORY_EVERY = 60.0


class Ingester:
    def __init__(self, config: FleetConfig, store: Store,
                 on_batch: Callable[[Batch], None] | None = None,
                 lookup: Callable[[list[str]], dict[str, str | None]] | None = None):
        self.config = config
        self.lookup = lookup
        self._unknown_at: dict[str, float] = {}
        self.on_batch = on_batch
        self.settings = config.dashboard
        self.store = store
        self._queues = frozenset(config.queues)
        #: hostname -> queue from the workers' self-reports (the sampler fills it in).
        self.worker_queues: dict[str, str | None] = {}
        self._batch = self._new_batch()
        #: A batch whose write failed, written again before the next one.
        self._pending: Batch | None = None
        self._lock = threading.Condition()
        self._written_since_prune = 0
        self._last_prune = 0.0
        self._last_history = 0.0
        self.events = 0
        self.connected = False

    # -- the receiving side --------------------------------------------------------

    def feed(self, event: dict) -> None:
        with self._lock:
            while len(self._batch.tasks) >= MAX_BATCH_TASKS:
                self._lock.wait(1.0)
            self._batch.add(event)
            if len(self._batch.tasks) == FLUSH_AT:
                self._lock.notify_all()

    def _new_batch(self) -> Batch:
        return Batch(self._queues, self.worker_queues)

    def flush(self) -> int:
        """Write what has been folded so far; returns the number of events written.

        A batch the database refused is kept and written first next time (the database
        is down or busy): nothing is dropped, and while it is held the receiver fills at
        most one more batch before it waits.
        """
        written = 0
        if self._pending is not None:
            self._write(self._pending)
            written, self._pending = self._pending.events, None
        with self._lock:
            batch, self._batch = self._batch, self._new_batch()
            self._lock.notify_all()
        if batch.events:
            try:
                self._write(batch)
            except Exception:
                self._pending = batch
                raise
            written += batch.events
        return written

    def _write(self, batch: Batch) -> None:
        self._resolve_queues(batch)
        self.store.write(list(batch.tasks.values()), batch.workers.values())
        self.events += batch.events
        self._written_since_prune += len(batch.tasks)
        if self.on_batch is not None:
            self.on_batch(batch)

    def _resolve_queues(self, batch: Batch) -> None:
        """Tasks of workers the sampler has not seen yet: ask Redis for their self-reports
        (one round trip, only when a new worker shows up; misses are asked again in 30 s)."""
        rows = [r for r in batch.tasks.values() if not r["queue"] and r["worker"]]
        if not rows or self.lookup is None:
            return
        now = time.monotonic()
        ask = sorted({r["worker"] for r in rows if r["worker"] not in self.worker_queues
                      and now - self._unknown_at.get(r["worker"], -60.0) > 30.0})
        if ask:
            try:
                found = self.lookup(ask)
            except Exception:  # Redis down: the rows go in without a queue
                found = {}
            for hostname in ask:
                if found.get(hostname):
                    self.worker_queues[hostname] = found[hostname]
                else:
                    self._unknown_at[hostname] = now
        for row in rows:
            row["queue"] = self.worker_queues.get(row["worker"])

    def housekeeping(self, now: float | None = None, force: bool = False) -> None:
        now = time.time() if now is None else now
        s = self.settings
        self.store.mark_offline(now, s.offline_after)
        self.store.purge_offline(now, s.purge_offline_after)
        due = now - self._last_prune >= PRUNE_EVERY
        if force or (due and self._written_since_prune) or \
                self._written_since_prune > s.max_tasks // 10:
            self.store.prune_tasks(s.max_tasks, s.max_task_age, now)
            self._written_since_prune = 0
            self._last_prune = now
        if force or now - self._last_history >= HISTORY_EVERY:
            self.store.prune_history(now, s.history)
            self._last_history = now

    # -- threads -------------------------------------------------------------------

    def run_writer(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._lock:
                if len(self._batch.tasks) < FLUSH_AT:
                    self._lock.wait(self.settings.flush_interval)
            self._step()
        self._step()

    def _step(self) -> None:
        try:
            self.flush()
            self.housekeeping()
        except Exception:  # the database is down: keep the batch coming, say so
            logger.exception("dashboard: writing events failed; retrying")

    def run_receiver(self, app, stop: threading.Event) -> None:
        """Capture every event from the broker, reconnecting with backoff when it drops:
        straight off Redis pub/sub (eventstream.py), else through Celery's Receiver."""
        if self.config.broker.url.startswith(("redis://", "rediss://", "unix://")):
            self._retrying(stop, lambda: self._from_redis(stop))
        else:
            self._retrying(stop, lambda: self._from_receiver(app, stop))

    def _set_connected(self, value: bool) -> None:
        self.connected = value

    def _from_redis(self, stop: threading.Event) -> None:
        client = redis.Redis.from_url(self.config.broker.url, socket_connect_timeout=5,
                                      socket_keepalive=True, health_check_interval=30)
        try:
            eventstream.consume(self.config, client, self.feed, stop, self._set_connected)
        finally:
            client.close()

    def _from_receiver(self, app, stop: threading.Event) -> None:
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": self.feed})
            relay = threading.Thread(target=_relay, args=(stop, receiver), daemon=True)
            relay.start()
            self.connected = True
            try:
                receiver.capture(limit=None, timeout=None, wakeup=False)
            finally:
                self.connected = False

    def _retrying(self, stop: threading.Event, run: Callable[[], None]) -> None:
        wait = 1.0
        while not stop.is_set():
            started = time.monotonic()
            try:
                run()
            except Exception as exc:  # broker down or gone away: retry, never die
                self.connected = False
                if stop.is_set():
                    break
                if time.monotonic() - started > 60:
                    wait = 1.0  # it ran for a while: this is a new outage
                logger.warning("dashboard: event stream lost (%s); reconnecting in %.0fs",
                               exc, wait)
                stop.wait(wait)
                wait = min(30.0, wait * 2)
        self.connected = False


def _relay(stop: threading.Event, receiver) -> None:
    """kombu's consumer loop checks ``should_stop`` every second: relay the stop there."""
    while not stop.wait(1.0):
        if receiver.should_stop:
            return
    receiver.should_stop = True
