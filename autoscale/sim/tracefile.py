"""A stand-in trace reader for ``fleet simulate``, until fleet.trace.io lands.

To be replaced by ``fleet.trace.io.read_trace``; kept tiny and private so that the
swap is one import. It validates every line with the trace models and names the file
and line of the first bad one (exit 2).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from autoscale.sim.errors import SimulationError
from fleet.trace.model import VERSION, Body, Header, Task

_BODY = TypeAdapter(Body)


def read_trace(path: str | Path) -> tuple[Header, Iterator[Task]]:
    """The header, and the tasks as they are read (Replicas records are skipped)."""
    handle = open(path, encoding="utf-8")  # noqa: SIM115 - closed by the generator
    first = handle.readline()
    header = _parse(path, 1, first, Header)
    if header.version != VERSION:
        handle.close()
        raise SimulationError(f"{path}:1: trace version {header.version}; this fleet "
                              f"reads version {VERSION}")
    return header, _tasks(path, handle)


def _tasks(path, handle) -> Iterator[Task]:
    with handle:
        for number, line in enumerate(handle, 2):
            if not line.strip():
                continue
            record = _parse(path, number, line, None)
            if isinstance(record, Task):
                yield record


def _parse(path, number: int, line: str, model):
    try:
        data = json.loads(line)
        return model.model_validate(data) if model else _BODY.validate_python(data)
    except json.JSONDecodeError as exc:
        raise SimulationError(f"{path}:{number}: not JSON ({exc.msg})") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(record)"
        raise SimulationError(f"{path}:{number}: {where}: {err['msg']}") from None
