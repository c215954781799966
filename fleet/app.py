"""The module-level Celery app: ``celery -A fleet.app worker -Q heavy`` and Flower.

It reads the config from ``$FLEET_CONFIG``, ./queues.yaml or the shipped file when first
imported. Started as ``celery ... worker -Q <one queue>``, it takes that queue's worker
settings from queues.yaml before Celery reads its option defaults from the conf.
"""

from __future__ import annotations

import os
import sys
import warnings

from celery import Celery

from fleet.config import (
    ENV_BROKER_URL,
    ENV_CONFIG,
    ENV_KEY_PREFIX,
    ENV_LEDGER_URL,
    load_config,
)
from fleet.errors import ConfigError
from fleet.factory import create_app
from fleet.worker import queue_from_argv

_READ = (ENV_CONFIG, ENV_BROKER_URL, ENV_KEY_PREFIX, ENV_LEDGER_URL)


def _environment() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in _READ}


def _told_when_stale(app: Celery, read: dict[str, str | None]) -> None:
    """Send through ``app`` as before, but say once (a warning) when the variables it
    was made from have changed since: it keeps the broker of the moment it was made."""
    send = app.send_task
    told = False

    def send_task(*args, **kwargs):
        nonlocal told
        if not told and (now := _environment()) != read:
            told = True
            changed = ", ".join(k for k in _READ if now[k] != read[k])
            warnings.warn(
                f"fleet.app.app was made when fleet.app was first imported; {changed} "
                "changed since, and it still uses the old values: call "
                "fleet.app_for() for an app made from the environment as it is now",
                RuntimeWarning, stacklevel=3)
        return send(*args, **kwargs)

    app.send_task = send_task


def _load_module_app() -> Celery:
    try:
        config = load_config()
        queue = queue_from_argv(sys.argv)
        return create_app(config, queue if queue in config.queues else None)
    except ConfigError as exc:
        # Imported by the plain Celery CLI or Flower: say what is wrong, no traceback.
        print(f"fleet: invalid config:\n{exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


app = _load_module_app()
_told_when_stale(app, _environment())
