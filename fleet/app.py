"""The module-level Celery app: ``celery -A fleet.app worker -Q heavy`` and Flower.

It reads the config from ``$FLEET_CONFIG``, ./queues.yaml or the shipped file when first
imported. Started as ``celery ... worker -Q <one queue>``, it takes that queue's worker
settings from queues.yaml before Celery reads its option defaults from the conf.
"""

from __future__ import annotations

import sys

from celery import Celery

from fleet.config import load_config
from fleet.errors import ConfigError
from fleet.factory import create_app
from fleet.worker import queue_from_argv


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
