"""Named plug-ins: autoscaler backends and payload stores, found by name in queues.yaml.

A team adds its own backend or store without forking: it ships a package whose
``pyproject.toml`` names a factory under one of the entry-point groups below, e.g.

    [project.entry-points."fleet.autoscaler_backends"]
    nomad = "acme_fleet.nomad:PLUGIN"

and sets ``autoscaler.backend: nomad``. The fleet's own backends and stores are
registered the same way, in its own ``pyproject.toml``, so there is one path for all of
them and no table here that names a module of ``autoscale/``.

Only names are read to validate a config (an entry point's name costs no import); the
module behind a name is imported when that plug-in is built, by whoever builds it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from fleet.errors import FleetError


class PluginError(FleetError):
    """A plug-in name nobody registered, or an entry point that does not load."""

    exit_code = 2


@dataclass
class PluginRegistry:
    """One kind of plug-in: its entry-point group, read once per ``sys.path``."""

    kind: str
    group: str
    _seen: tuple[tuple[str, ...], dict[str, EntryPoint]] | None = field(
        default=None, repr=False)

    def _entries(self) -> dict[str, EntryPoint]:
        # Scanning every installed distribution takes tens of milliseconds, and configs
        # are loaded often; a new sys.path entry (a test's own dist-info) rescans.
        path = tuple(sys.path)
        if self._seen is None or self._seen[0] != path:
            found = {ep.name: ep for ep in entry_points(group=self.group)}
            self._seen = (path, found)
        return self._seen[1]

    def names(self) -> list[str]:
        return sorted(self._entries())

    def unknown(self, name: str) -> str | None:
        """Why ``name`` cannot be used, or None when it is registered."""
        if name in self._entries():
            return None
        known = ", ".join(self.names()) or (
            "none: is fleet installed? pip install -e . registers its own")
        return (f"unknown {self.kind} {name!r} (registered: {known}; add one with "
                f"an entry point in the {self.group!r} group)")

    def load(self, name: str, expect: type | None = None) -> Any:
        """The object registered as ``name``, imported now; refused unless it is an
        ``expect`` (or, with none given, callable)."""
        reason = self.unknown(name)
        if reason is not None:
            raise PluginError(reason)
        entry = self._entries()[name]
        try:
            made = entry.load()
        except (ImportError, AttributeError) as exc:
            raise PluginError(f"{self.kind} {name!r} is registered as {entry.value!r}, "
                              f"which does not load: {exc}") from None
        if not (isinstance(made, expect) if expect is not None else callable(made)):
            wanted = f"a {expect.__name__}" if expect is not None else "callable"
            raise PluginError(f"{self.kind} {name!r} is registered as {entry.value!r}, "
                              f"which is not {wanted}")
        return made


#: ``autoscale.backends.base.BackendPlugin`` objects: how to build a backend from what
#: the autoscaler's runner has (config, environment, workdir).
BACKENDS = PluginRegistry("autoscaler backend", "fleet.autoscaler_backends")
#: Callables taking the ``payloads`` settings (``fleet.config_models.Payloads``) and
#: returning a ``fleet.payloads.PayloadStore``.
PAYLOAD_STORES = PluginRegistry("payload store", "fleet.payload_stores")
