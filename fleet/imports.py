"""The task modules named in queues.yaml's ``imports:``, imported where they are needed.

Celery imports them inside ``worker_main`` or the first task lookup, so a typo in a
module name surfaced as a ``ModuleNotFoundError`` traceback from the depths of the
loader, after ``fleet validate`` had said OK, and ``fleet up`` restarted workers that
died of it forever. Here a module that cannot be imported is a config problem with its
file and line, exit 2, for every command that needs the modules; ``fleet validate``
tries them in a subprocess, so a module that hangs or exits at import cannot take the
validator with it.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

from fleet.config import FleetConfig
from fleet.errors import ConfigError, Problem

#: How long ``fleet validate`` gives the imports in its subprocess.
TIMEOUT = 60.0
_MARK = "fleet-imports:"

_SCRIPT = f"""
import importlib, json, sys
failed = []
for index, name in enumerate(json.loads(sys.argv[1])):
    try:
        importlib.import_module(name)
    except BaseException as exc:  # SystemExit, KeyboardInterrupt at import: all are news
        reason = str(exc) if isinstance(exc, ModuleNotFoundError) else (
            f"{{type(exc).__name__}}: {{exc}}")
        failed.append([index, name, reason])
print({_MARK!r} + json.dumps(failed), flush=True)
"""


def _line(config: FleetConfig, index: int) -> int | None:
    """The line of ``imports[index]`` (read again: only an error needs it)."""
    from fleet.yamlfile import load_yaml

    try:
        _, lines, _ = load_yaml(Path(config.source))
    except (ConfigError, OSError):
        return None
    return lines.get(("imports", index)) or lines.get(("imports",))


def _problem(config: FleetConfig, index: int, name: str, reason: str) -> Problem:
    return Problem(config.source, f"imports.{index}", f"cannot import {name!r}: {reason}",
                   _line(config, index))


def import_modules(config: FleetConfig) -> None:
    """Import every module of ``imports:`` here; ConfigError (exit 2) naming each one
    that fails."""
    problems = []
    for index, name in enumerate(config.imports):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            problems.append(_problem(config, index, name, str(exc)))
        except Exception as exc:  # the module's own error at import: still the config's
            problems.append(_problem(config, index, name, f"{type(exc).__name__}: {exc}"))
    if problems:
        raise ConfigError(problems)


def import_problems(config: FleetConfig, timeout: float = TIMEOUT) -> list[Problem]:
    """The modules that cannot be imported, tried in a fresh interpreter in this
    directory (what a worker started here sees)."""
    if not config.imports:
        return []
    try:
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT, json.dumps(list(config.imports))],
            capture_output=True, text=True, timeout=timeout, cwd=os.getcwd(),
            stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return [Problem(config.source, "imports", f"importing the modules took over "
                        f"{timeout:g}s (one of them does work at import time)",
                        _line(config, 0))]
    marked = [line for line in done.stdout.splitlines() if line.startswith(_MARK)]
    if not marked:  # the interpreter died before it could say (os._exit at import)
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return [Problem(config.source, "imports", f"importing the modules ended the "
                        f"interpreter: {last}", _line(config, 0))]
    return [_problem(config, index, name, reason)
            for index, name, reason in json.loads(marked[-1].removeprefix(_MARK))]
