"""The dashboard: Celery events and fleet state kept in a database, pages, a REST API
(Flower's paths included), Prometheus metrics, control actions with an audit log.

Kept apart from the fleet's core: ingest (events in), store (the database adapter),
views (queries shaped for pages and the API), control (actions out), auth, api (HTTP).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from fleet.errors import FleetError

#: The top-level modules of the ``dashboard`` extra (pyproject.toml) and theirs.
EXTRA_MODULES = frozenset({"fastapi", "starlette", "uvicorn", "prometheus_client",
                           "itsdangerous", "jinja2", "authlib", "httpx"})
INSTALL_HINT = "pip install 'fleet[dashboard]'"


class DashboardNotInstalledError(FleetError):
    """The worker image and a plain ``pip install fleet`` leave the dashboard out."""

    exit_code = 2


def server_module() -> ModuleType:
    """``fleet.dashboard.server``, or a clear error naming the extra when its libraries
    are missing (instead of a ModuleNotFoundError traceback from deep in an import)."""
    try:
        # Each library of the extra, not only those server.py imports first: the API
        # and the OIDC routes import theirs when the app is built, after start-up.
        for name in sorted(EXTRA_MODULES):
            importlib.import_module(name)
        from fleet.dashboard import server
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in EXTRA_MODULES:
            raise
        raise DashboardNotInstalledError(
            f"the dashboard is not installed here ({missing} is missing): "
            f"{INSTALL_HINT}") from None
    return server
