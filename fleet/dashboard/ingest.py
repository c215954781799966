"""Celery events in, batched writes out.

Events come from the workers' event stream (eventstream.consume_stream: a consumer group
that resumes after any reconnect), or off pub/sub where there is no stream. A stream
entry is acknowledged only once the batch holding it is written; the newest entry id
written is kept in the same transaction, so what is stored is exactly what is at or
below it, and an entry delivered again after a lost XACK is not folded twice.

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
from fleet.dashboard.gaps import Gap
from fleet.dashboard.store import Store
from fleet.eventlog import stream_enabled
from fleet.keys import events_stream_key

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
        #: Where events come from: "stream", "pubsub" (no stream) or "receiver" (no Redis).
        self.source = ("stream" if stream_enabled(config) else "pubsub") if _on_redis(config) \
            else "receiver"
        self._stream = (events_stream_key(config), config.dashboard.event_group)
        #: Newest stream id in the store, and newest handed to a batch by this process.
        self._written_id = (store.stream_cursor(*self._stream) if self.source == "stream"
                            else None)
        self._fed_id: str | None = None
        #: Stream entries to XACK: written, or found stored already.
        self._acks: list[str] = []

    # -- the receiving side --------------------------------------------------------

    def feed(self, event: dict) -> None:
        with self._lock:
            while len(self._batch.tasks) >= MAX_BATCH_TASKS:
                self._lock.wait(1.0)
            self._batch.add(event)
            if len(self._batch.tasks) == FLUSH_AT:
                self._lock.notify_all()

    # -- the stream side (eventstream.StreamSink) -------------------------------------

    def stream_written(self) -> str | None:
        return self._written_id

    def stream_fed(self) -> str | None:
        return self._fed_id

    def feed_entries(self, entries: list[tuple[str, list[dict], Gap | None]]) -> None:
        """Stream entries (id, events, gap marker) into the batch, under one lock."""
        with self._lock:
            for entry_id, events, gap in entries:
                while len(self._batch.tasks) >= MAX_BATCH_TASKS:
                    self._lock.notify_all()  # the writer, to swap the full batch out
                    self._lock.wait(1.0)
                batch = self._batch
                for event in events:
                    batch.add(event)
                if gap is not None:
                    batch.gaps.append(_logged(gap).row(time.time()))
                batch.entry_ids.append(entry_id)
                self._fed_id = entry_id
            if len(self._batch.tasks) >= FLUSH_AT:
                self._lock.notify_all()

    def add_gap(self, gap: Gap) -> None:
        with self._lock:
            self._batch.gaps.append(_logged(gap).row(time.time()))
            self._lock.notify_all()

    def ack_now(self, entry_ids: list[str]) -> None:
        with self._lock:
            self._acks.extend(entry_ids)

    def take_acks(self) -> list[str]:
        with self._lock:
            acks, self._acks = self._acks, []
        return acks

    def rebase(self) -> None:
        """The stream is a new one: ids stored or fed belong to the old one."""
        self._written_id = self._fed_id = None

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
        if not batch.empty():
            try:
                self._write(batch)
            except Exception:
                self._pending = batch
                raise
            written += batch.events
        return written

    def _write(self, batch: Batch) -> None:
        self._resolve_queues(batch)
        last = batch.last_id
        self.store.write(list(batch.tasks.values()), batch.workers.values(), batch.gaps,
                         (*self._stream, last) if last else None)
        if last:
            self._written_id = last
            with self._lock:
                self._acks.extend(batch.entry_ids)
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
        if self.connected:
            # Silence means a worker is gone only while the dashboard can hear: cut off
            # itself (Redis restarting), it would call every worker offline and purge
            # their counters, though their events wait in the stream.
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
        the workers' event stream, or Redis pub/sub where there is none (eventstream.py),
        else through Celery's Receiver."""
        if self.source == "stream":
            self._retrying(stop, lambda: self._from_stream(stop))
        elif self.source == "pubsub":
            self._retrying(stop, lambda: self._from_redis(stop))
        else:
            self._retrying(stop, lambda: self._from_receiver(app, stop))

    def _set_connected(self, value: bool) -> None:
        self.connected = value

    def _client(self) -> redis.Redis:
        # A blocking read waits BLOCK_MS: the socket timeout must be longer.
        return redis.Redis.from_url(self.config.broker.url, socket_connect_timeout=5,
                                    socket_timeout=30, socket_keepalive=True,
                                    health_check_interval=30)

    def _from_stream(self, stop: threading.Event) -> None:
        client = self._client()
        try:
            eventstream.consume_stream(self.config, client, self, stop, self._set_connected)
        finally:
            client.close()

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


def _logged(gap: Gap) -> Gap:
    logger.warning("dashboard: events lost between %s and %s: %s (%s)",
                   time.strftime("%H:%M:%S", time.localtime(gap.since)),
                   time.strftime("%H:%M:%S", time.localtime(gap.until)),
                   gap.reason, gap.detail)
    return gap


def _on_redis(config: FleetConfig) -> bool:
    return config.broker.url.startswith(("redis://", "rediss://", "unix://"))


def _relay(stop: threading.Event, receiver) -> None:
    """kombu's consumer loop checks ``should_stop`` every second: relay the stop there."""
    while not stop.wait(1.0):
        if receiver.should_stop:
            return
    receiver.should_stop = True
