"""Reading and writing trace files: JSON lines, plain (``.jsonl``) or gzip (``.jsonl.gz``).

Both directions stream: a trace of a million tasks is written and read one line at a
time, so neither export nor simulate holds it in memory. The reader recognises gzip by
its magic bytes, not by the name, so a renamed file still reads.

Every problem with a file is a ``TraceError`` naming ``file:line``, the key path and the
reason, the way queues.yaml's problems are named. Records need not be in time order (an
export writes tasks and then decisions; a merge of two traces interleaves nothing): a
reader that needs an order sorts, and this one checks only what makes a record wrong.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from pydantic import TypeAdapter, ValidationError

from fleet.errors import FleetError
from fleet.trace.model import VERSION, Body, Header, Replicas, Task

#: The versions this code reads (today: the one it writes).
SUPPORTED_VERSIONS = (VERSION,)
KINDS = ("header", "task", "replicas")
_GZIP_MAGIC = b"\x1f\x8b"
_body = TypeAdapter(Body)


class TraceError(FleetError):
    """A trace file that cannot be read (or written): where, which key, and why."""

    exit_code = 2

    def __init__(self, file: str | os.PathLike, reason: str, line: int | None = None,
                 path: str = ""):
        self.file = str(file)
        self.line = line
        self.path = path
        self.reason = reason
        where = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{where}: {path + ': ' if path else ''}{reason}")


def write_trace(path: str | os.PathLike, header: Header,
                records: Iterable[Task | Replicas]) -> int:
    """Write ``header`` and then ``records`` to ``path`` (gzip if it ends in ``.gz``);
    returns how many records were written.

    It writes to a temporary file beside ``path`` and renames it at the end, so a failed
    export (a database gone mid-way) leaves no half trace that reads as a short one. A
    task on a queue the header does not list is refused here, as the reader would."""
    path = Path(path)
    queues = set(header.queues)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with _open_write(tmp, gz=path.name.endswith(".gz")) as out:
            out.write(_line(header))
            for record in records:
                if record.queue not in queues:
                    raise TraceError(path, f"{record.queue!r} is not one of the header's "
                                     f"queues ({', '.join(header.queues)})",
                                     count + 2, "queue")
                out.write(_line(record))
                count += 1
        os.replace(tmp, path)
    except OSError as exc:
        raise TraceError(path, f"cannot write: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return count


def read_trace(path: str | os.PathLike) -> tuple[Header, Iterator[Task | Replicas]]:
    """The header (read and checked now) and the records, read lazily one line at a time.

    The iterator raises ``TraceError`` at the first bad line; it closes the file when it
    is exhausted (or garbage-collected)."""
    name = str(path)
    stream = _open_read(name)
    try:
        lines = _numbered(stream, name)
        number, data = next(lines, (None, None))
        if number is None:
            raise TraceError(name, "empty file: expected a header line first", 1)
        header = _header(name, number, data)
    except BaseException:
        stream.close()
        raise
    return header, _records(name, stream, lines, header, number)


def _records(name: str, stream: IO[str], lines: Iterator[tuple[int, dict]], header: Header,
             header_line: int) -> Iterator[Task | Replicas]:
    queues = set(header.queues)
    with stream:
        for number, data in lines:
            kind = data.get("kind")
            if kind == "header":
                raise TraceError(name, f"a second header (the header is line {header_line})",
                                 number, "kind")
            if kind not in KINDS:
                raise TraceError(name, f"unknown kind {kind!r}: expected one of "
                                 f"{', '.join(KINDS[1:])}", number, "kind")
            try:
                record = _body.validate_python(data)
            except ValidationError as exc:
                raise _invalid(name, number, exc) from None
            if record.queue not in queues:
                raise TraceError(name, f"{record.queue!r} is not one of the header's queues "
                                 f"({', '.join(header.queues)})", number, "queue")
            yield record


def _header(name: str, number: int, data: dict) -> Header:
    kind = data.get("kind")
    if kind != "header":
        raise TraceError(name, f"the first line must be the header (kind \"header\"), "
                         f"not {kind!r}", number, "kind")
    version = data.get("version")
    if version is not None and version not in SUPPORTED_VERSIONS:
        raise TraceError(name, f"version {version!r} is not supported: this fleet reads "
                         f"version {', '.join(map(str, SUPPORTED_VERSIONS))}",
                         number, "version")
    try:
        return Header.model_validate(data)
    except ValidationError as exc:
        raise _invalid(name, number, exc) from None


def _invalid(name: str, number: int, exc: ValidationError) -> TraceError:
    """pydantic's first problem (the one that usually explains the rest), with how many
    more there are."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    # A discriminated union puts the kind in front of the path: "task.sent" -> "sent".
    loc = [str(p) for p in first["loc"]]
    if loc and loc[0] in KINDS:
        loc = loc[1:]
    reason = first["msg"]
    if first["type"] == "extra_forbidden":
        reason = "unknown field"
    if len(errors) > 1:
        reason += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return TraceError(name, reason, number, ".".join(loc) or "(top level)")


def _numbered(stream: IO[str], name: str) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) for each non-blank line."""
    number = 0
    while True:
        try:
            text = stream.readline()
        except (OSError, EOFError, UnicodeDecodeError) as exc:  # a truncated gzip, bytes
            raise TraceError(name, f"unreadable: {exc}", number + 1) from None
        if not text:
            return
        number += 1
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TraceError(name, f"not JSON: {exc}", number) from None
        if not isinstance(data, dict):
            raise TraceError(name, f"expected a JSON object, got {type(data).__name__}",
                             number)
        yield number, data


def _open_read(name: str) -> IO[str]:
    try:
        with open(name, "rb") as probe:
            gz = probe.read(2) == _GZIP_MAGIC
        if gz:
            return gzip.open(name, "rt", encoding="utf-8")
        return open(name, encoding="utf-8")
    except OSError as exc:
        raise TraceError(name, f"cannot read: {exc.strerror or exc}") from None


def _open_write(path: Path, gz: bool) -> IO[str]:
    if gz:
        return gzip.open(path, "wt", encoding="utf-8")
    return open(path, "w", encoding="utf-8")


def _line(record: Header | Task | Replicas) -> str:
    """One compact line; optional fields left at None are left out (a synthetic task is
    then four keys), required ones are always written, even as null (``service``)."""
    data = record.model_dump(mode="json")
    fields = type(record).model_fields
    data = {k: v for k, v in data.items()
            if not (v is None and not fields[k].is_required())}
    return json.dumps(data, separators=(",", ":"), allow_nan=False) + "\n"
