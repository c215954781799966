"""fleet: a resource-aware batch-processing worker fleet on Celery and Redis."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from celery import Celery

    from fleet.config import FleetConfig

__version__ = "0.1.0"


def app_for(config: FleetConfig | str | Path | None = None) -> Celery:
    """A Celery app for ``config`` (a FleetConfig, a queues.yaml path, or None: the file
    and environment as they are *now*) to send tasks and jobs from your own code.

    ``fleet.app.app`` is made once, when first imported, from the environment of that
    moment; a process that changes ``FLEET_CONFIG`` or ``FLEET_BROKER_URL`` later (a
    test, a notebook, a script serving two fleets) calls this instead."""
    from fleet.config import FleetConfig, load_config
    from fleet.factory import create_app

    if not isinstance(config, FleetConfig):
        config = load_config(config)
    return create_app(config)
