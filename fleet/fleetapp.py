"""The fleet's Celery app type: a Celery app that carries its typed config.

A leaf (Celery and the config models only), so every module that is handed an app,
tasks, steps, signal handlers, can ask for its config without an import circle through
the factory. Code that may be handed a plain Celery app (a team's own task running in
a fleet worker, a test's app) asks ``fleet_config_of`` and gets None, instead of
reading a monkey attribute with getattr.
"""

from __future__ import annotations

from celery import Celery

from fleet.config_models import FleetConfig


class FleetApp(Celery):
    """A Celery app that carries its parsed, typed ``FleetConfig``.

    ``config`` does not clash with Celery's ``conf`` or its ``config_from_*`` loaders.
    """

    def __init__(self, main: str, config: FleetConfig, **kwargs) -> None:
        super().__init__(main, **kwargs)
        self.config: FleetConfig = config
        self.fleet_queue: str | None = None
        #: Who supervises this worker (a fleet.watchdog.SupervisorRef, set by
        #: ``fleet worker`` from the environment): it stops warm when they are gone.
        #: Typed loosely so that this module stays a leaf.
        self.fleet_supervisor: object | None = None


def fleet_config_of(app: object) -> FleetConfig | None:
    """The config of a fleet app; None for a plain Celery app (or no app) in our process."""
    return app.config if isinstance(app, FleetApp) else None
