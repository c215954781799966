"""One way to put an autoscaler together, for ``fleet autoscale`` and ``fleet up`` alike.

The backend comes from the registry by name (fleet.plugins: the fleet's own and any a
team's package registers), built from a BackendContext, so neither runner knows which
backends exist; the metrics reader and the loop are the same for all of them.
"""

from __future__ import annotations

from collections.abc import Callable

from autoscale.backends.base import BackendContext, BackendPlugin
from autoscale.loop import Autoscaler, logger
from fleet.keys import broker_client
from fleet.observe.metrics import RedisMetrics
from fleet.plugins import BACKENDS


def backend_plugin(name: str) -> BackendPlugin:
    """The registered backend ``name``; PluginError (exit 2) naming the known ones."""
    return BACKENDS.load(name, BackendPlugin)


def build_autoscaler(ctx: BackendContext, plugin: BackendPlugin | None = None, *,
                     report: Callable[[str], None] = logger.info) -> Autoscaler:
    """The loop over ``plugin``'s backend (default: ``autoscaler.backend``), reading the
    broker that ``ctx.config`` names. The backend is the loop's ``backend``."""
    plugin = plugin or backend_plugin(ctx.config.autoscaler.backend)
    backend = plugin.create(ctx)
    metrics = RedisMetrics(ctx.config, broker_client(ctx.config))
    return Autoscaler(ctx.config, metrics, backend, dry_run=ctx.dry_run, report=report)
