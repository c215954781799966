"""A batch job's input: a local file, an s3:// object or JSON lines on stdin.

The input is read twice: once to check every record (a malformed line N must stop the
job before anything is enqueued) and once to cut chunks, so memory stays bounded by
one chunk however large the input. Stdin and S3 objects are spooled to a temporary
file during the first pass so the second pass can re-read them.

A copy of the checked input is kept in the payload store for the job's life
(``keep_copy``): any chunk can then be cut again (``reopened``) by whoever must send it
again, on any machine, whatever happened to the user's file, stdin or S3 object since.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fleet.config import Payloads
from fleet.errors import JobInputError

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")


@dataclass(frozen=True)
class Chunk:
    index: int
    records: list
    #: Bytes of input the chunk came from: what size routing rules compare.
    size: int


@dataclass(frozen=True)
class CheckedInput:
    """An input that passed the first pass: where it is, its format, how many records."""

    path: Path
    fmt: str  # "jsonl" or "csv"
    description: str
    records: int
    size: int
    #: How to read the same input again (an absolute path or the s3:// URL; None for
    #: stdin), and what it must still look like then (size and mtime, or the ETag).
    source: str | None = None
    fingerprint: str | None = None

    def chunks(self, chunk_size: int) -> Iterator[Chunk]:
        records: list = []
        size = 0
        index = 0
        with self.path.open("rb") as fh:
            for _line, nbytes, record in _parse(fh, self.fmt, self.description):
                records.append(record)
                size += nbytes
                if len(records) == chunk_size:
                    yield Chunk(index, records, size)
                    records, size, index = [], 0, index + 1
        if records:
            yield Chunk(index, records, size)


def _parse(fh: IO[bytes], fmt: str, description: str
           ) -> Iterator[tuple[int, int, object]]:
    """(line, bytes of input, record) for each record; JobInputError names the bad line."""
    if fmt == "csv":
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
        reader = csv.DictReader(text)
        if reader.fieldnames is None:
            return
        for row in reader:
            if None in row:
                raise JobInputError(f"{description}: line {reader.line_num}: more fields "
                                    f"than the header's {len(reader.fieldnames)}")
            yield reader.line_num, sum(len(v or "") + 1 for v in row.values()), row
        return
    for number, raw in enumerate(fh, start=1):
        if not raw.strip():
            continue
        try:
            yield number, len(raw), json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise JobInputError(f"{description}: line {number}: malformed JSON ({reason})"
                                ) from None


def _format_of(name: str) -> str:
    lower = name.lower()
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith(JSON_SUFFIXES) or name == "-":
        return "jsonl"
    raise JobInputError(f"{name}: unknown input format (use .jsonl, .ndjson, .json or .csv)")


def _check(path: Path, fmt: str, description: str, source: str | None = None,
           fingerprint: str | None = None, mappings: str | None = None) -> CheckedInput:
    """Every record parses; with ``mappings`` (why the task needs them), every one is an
    object too."""
    records = 0
    try:
        with path.open("rb") as fh:
            for line, _size, record in _parse(fh, fmt, description):
                records += 1
                if mappings and not isinstance(record, dict):
                    raise JobInputError(
                        f"{description}: line {line}: a JSON {_kind(record)}, not an object, "
                        f"and {mappings}")
    except UnicodeDecodeError:
        raise JobInputError(f"{description}: not UTF-8 text") from None
    except csv.Error as exc:
        raise JobInputError(f"{description}: malformed CSV: {exc}") from None
    if records == 0:
        raise JobInputError(f"{description}: no records in the input")
    return CheckedInput(path, fmt, description, records, path.stat().st_size, source,
                        fingerprint)


def _kind(value: object) -> str:
    names = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"file:{stat.st_size}:{stat.st_mtime_ns}"


@contextmanager
def checked_input(spec: str, payloads: Payloads, stdin: IO[bytes] | None = None,
                  mappings: str | None = None) -> Iterator[CheckedInput]:
    """Open ``spec`` (a path, ``s3://bucket/key`` or ``-``) and check every record (and,
    with ``mappings``, that each is an object: see ``_check``)."""
    if spec == "-":
        with _spooled(stdin or sys.stdin.buffer) as path:
            yield _check(path, "jsonl", "stdin", mappings=mappings)
        return
    if spec.startswith("s3://"):
        fmt = _format_of(spec)
        with _spooled_s3(spec, payloads) as (path, etag):
            yield _check(path, fmt, spec, spec, f"s3:{etag}", mappings)
        return
    path = Path(spec)
    if not path.exists():
        raise JobInputError(f"{spec}: input file not found")
    if not path.is_file():
        raise JobInputError(f"{spec}: not a regular file")
    yield _check(path, _format_of(spec), spec, str(path.resolve()), file_fingerprint(path),
                 mappings)


@contextmanager
def _spooled(stream: IO[bytes]) -> Iterator[Path]:
    with tempfile.NamedTemporaryFile(prefix="fleet-input-", suffix=".jsonl") as tmp:
        shutil.copyfileobj(stream, tmp)
        tmp.flush()
        yield Path(tmp.name)


@contextmanager
def _spooled_s3(url: str, payloads: Payloads) -> Iterator[tuple[Path, str]]:
    from fleet.payloads import S3Store, split_s3_url

    bucket, key = split_s3_url(url)
    store = S3Store(bucket, "", payloads.endpoint_url, payloads.region)
    with tempfile.NamedTemporaryFile(prefix="fleet-input-") as tmp:
        try:
            etag = store.client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
            store.client.download_fileobj(bucket, key, tmp)
        except store._errors as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey", "NoSuchBucket"):
                raise JobInputError(f"{url}: no such object in S3") from None
            raise JobInputError(f"{url}: cannot read input: {exc}{_s3_hint(payloads)}") from None
        tmp.flush()
        yield Path(tmp.name), etag


def _s3_hint(payloads: Payloads) -> str:
    """Why S3 may be unreachable: queues.yaml names no S3 at all (boto3 then tries AWS's
    own, with whatever credentials the environment has)."""
    if payloads.store == "s3" or payloads.endpoint_url or payloads.region:
        return ""
    return (" (queues.yaml configures no S3: payloads.store is local and there is no "
            "payloads.endpoint_url or region; set them, or payloads.store: s3 with its "
            "bucket, or AWS credentials in the environment)")


def keep_copy(payloads: Payloads, job_id: str, checked: CheckedInput) -> str:
    """Store the checked input for the job's life; returns the copy's URL."""
    from fleet.payloads import open_store

    suffix = "csv" if checked.fmt == "csv" else "jsonl"
    return open_store(payloads).put_file(f"jobs/{job_id}/input.{suffix}", checked.path)


@contextmanager
def reopened(payloads: Payloads, url: str, fmt: str, description: str
             ) -> Iterator[CheckedInput]:
    """The job's kept input again, ready to be cut into the same chunks."""
    from fleet.errors import PayloadError
    from fleet.payloads import open_store

    with ExitStack() as stack:
        try:
            path = stack.enter_context(open_store(payloads).local_copy(url))
        except PayloadError as exc:
            raise JobInputError(f"{description}: the job's copy of its input cannot be "
                                f"read ({exc}): its chunks cannot be cut again") from None
        yield CheckedInput(path, fmt, description, 0, path.stat().st_size, url)
