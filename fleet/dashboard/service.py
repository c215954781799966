"""One running dashboard: the store, the event ingester, the sampler, the control
adapter and the authenticator, with their threads; ``views`` reads the store, ``live``
joins it with what Redis and the workers say now. The HTTP layer (api.py) only talks
to this object; tests and benchmarks can drive it without HTTP."""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry

from fleet.config import FleetConfig
from fleet.dashboard.auth import Authenticator
from fleet.dashboard.control import Control
from fleet.dashboard.ingest import Ingester
from fleet.dashboard.inspect import WorkerInspector
from fleet.dashboard.live import LiveViews
from fleet.dashboard.metrics import EventCounters, FleetCollector
from fleet.dashboard.sampler import Sampler
from fleet.dashboard.sessions import SessionStore
from fleet.dashboard.store import Store
from fleet.dashboard.throttle import LoginThrottle
from fleet.dashboard.views import Views
from fleet.dashboard.whatif import WhatIfRunner
from fleet.keys import broker_client, workers_key
from fleet.observe.metrics import parse_worker
from fleet.whatif import WhatIf

logger = logging.getLogger("fleet.dashboard")


class DashboardService:
    def __init__(self, config: FleetConfig, database: str | None = None,
                 auth: Authenticator | None = None, whatif: WhatIf | None = None):
        """``whatif``: what replays a window for the "what if" view, given by the
        composition root (the simulator lives in autoscale/, which the dashboard may
        not import); None: the view says it is not configured."""
        from fleet.factory import create_app

        self.config = config
        self.app = create_app(config)
        self.store = Store(database or config.dashboard.database)
        self.views = Views(self.store)
        self.whatif = WhatIfRunner(config, database or config.dashboard.database, whatif)
        self.registry = CollectorRegistry()
        self.counters = EventCounters(self.registry)
        self.ingester = Ingester(config, self.store, on_batch=self.counters.observe,
                                 lookup=self._worker_queues)
        self.sampler = Sampler(config, broker_client(config), self.store,
                               self.ingester.worker_queues)
        self.control = Control(self.app)
        self.inspector = WorkerInspector(self.app)
        self.live = LiveViews(config, self.app, self.views, self.sampler, self.inspector,
                              self.ingester)
        self.auth = auth or Authenticator(config.dashboard)
        self.sessions = SessionStore(self.store.engine, self.auth.session_secret)
        self.throttle = LoginThrottle()
        self.registry.register(FleetCollector(self))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _worker_queues(self, hostnames: list[str]) -> dict[str, str | None]:
        raw = broker_client(self.config).hmget(workers_key(self.config), hostnames)
        out = {}
        for hostname, value in zip(hostnames, raw, strict=True):
            sample = parse_worker(value) if value else None
            out[hostname] = sample.queue if sample else None
        return out

    def start(self) -> DashboardService:
        for name, target, args in (
                ("dashboard-events", self.ingester.run_receiver, (self.app, self._stop)),
                ("dashboard-writer", self.ingester.run_writer, (self._stop,)),
                ("dashboard-sampler", self.sampler.run, (self._stop,))):
            thread = threading.Thread(target=target, args=args, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self.inspector.close()
        self.store.close()
