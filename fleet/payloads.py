"""Payload stores: where large task arguments, results and job outputs live.

Two adapters behind one small protocol: a local directory (the embedded default, all
workers on one machine) and S3 through boto3 (any S3-compatible server via
``endpoint_url``); a stub in memory for tests (fleet.stubstore), and whatever a team
registers under the ``fleet.payload_stores`` entry-point group (fleet.plugins). A
payload is named by a URL (``file:///...`` or ``s3://bucket/key``) so that a reference
found in a message or a job record says where to look.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

from fleet.config import Payloads
from fleet.errors import PayloadError
from fleet.plugins import PAYLOAD_STORES


class PayloadStore(Protocol):
    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key``; return the payload's URL."""

    def get(self, url: str) -> bytes:
        """The bytes at ``url``; PayloadError when missing."""

    def delete(self, url: str) -> None:
        """Remove ``url``; missing is fine (cleanup may run twice)."""

    def url_for(self, key: str) -> str:
        """The URL ``put(key, ...)`` would return."""

    def put_file(self, key: str, path: Path) -> str:
        """Store the file at ``path`` (streamed, not read into memory); return its URL."""

    def local_copy(self, url: str) -> AbstractContextManager[Path]:
        """A local file with the bytes at ``url``, for the duration of the block."""


class LocalStore:
    """A directory on this machine; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path):
        self.root = root.resolve()

    def url_for(self, key: str) -> str:
        return (self.root / key).as_uri()

    def put(self, key: str, data: bytes) -> str:
        path = self.root / key
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            raise PayloadError(f"cannot write payload {path}: {exc.strerror or exc}") from None
        return path.as_uri()

    def put_file(self, key: str, path: Path) -> str:
        target = self.root / key
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            os.close(fd)
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        except OSError as exc:
            raise PayloadError(f"cannot write payload {target}: {exc.strerror or exc}"
                               ) from None
        return target.as_uri()

    @contextmanager
    def local_copy(self, url: str) -> Iterator[Path]:
        path = self._path(url)
        if not path.is_file():
            raise PayloadError(f"payload {url} is gone (deleted or never written)")
        yield path

    def _path(self, url: str) -> Path:
        parsed = urlparse(url)
        if parsed.scheme != "file":
            raise PayloadError(f"payload {url} is not in the local store at {self.root}")
        return Path(unquote(parsed.path))

    def get(self, url: str) -> bytes:
        try:
            return self._path(url).read_bytes()
        except FileNotFoundError:
            raise PayloadError(f"payload {url} is gone (deleted or never written)") from None
        except OSError as exc:
            raise PayloadError(f"cannot read payload {url}: {exc.strerror or exc}") from None

    def delete(self, url: str) -> None:
        self._path(url).unlink(missing_ok=True)


class S3Store:
    """A bucket and prefix on S3 or any S3-compatible server."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None):
        try:
            import boto3
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:
            raise PayloadError("payloads.store is s3 but boto3 is not installed: "
                               "pip install 'fleet[s3]'") from None
        self.bucket = bucket
        self.prefix = prefix
        self._errors = (BotoCoreError, ClientError)
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def put(self, key: str, data: bytes) -> str:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)
        except self._errors as exc:
            raise PayloadError(f"cannot write {self.url_for(key)}: {exc}") from None
        return self.url_for(key)

    def put_file(self, key: str, path: Path) -> str:
        try:
            self.client.upload_file(str(path), self.bucket, self.prefix + key)
        except self._errors as exc:
            raise PayloadError(f"cannot write {self.url_for(key)}: {exc}") from None
        return self.url_for(key)

    @contextmanager
    def local_copy(self, url: str) -> Iterator[Path]:
        bucket, key = split_s3_url(url)
        with tempfile.NamedTemporaryFile(prefix="fleet-payload-") as tmp:
            try:
                self.client.download_fileobj(bucket, key, tmp)
            except self._errors as exc:
                code = getattr(exc, "response", {}).get("Error", {}).get("Code")
                if code in ("NoSuchKey", "404"):
                    raise PayloadError(f"payload {url} is gone (deleted or never written)"
                                       ) from None
                raise PayloadError(f"cannot read {url}: {exc}") from None
            tmp.flush()
            yield Path(tmp.name)

    def get(self, url: str) -> bytes:
        bucket, key = split_s3_url(url)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except self._errors as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404"):
                raise PayloadError(f"payload {url} is gone (deleted or never written)") from None
            raise PayloadError(f"cannot read {url}: {exc}") from None

    def delete(self, url: str) -> None:
        bucket, key = split_s3_url(url)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except self._errors as exc:
            raise PayloadError(f"cannot delete {url}: {exc}") from None


def split_s3_url(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise PayloadError(f"{url!r} is not an s3://bucket/key URL")
    return parsed.netloc, parsed.path.lstrip("/")


_stores: dict[tuple[Payloads, int], PayloadStore] = {}


def local_store(settings: Payloads) -> LocalStore:
    """The ``local`` entry point of ``fleet.payload_stores``."""
    return LocalStore(Path(settings.path))


def s3_store(settings: Payloads) -> S3Store:
    """The ``s3`` entry point of ``fleet.payload_stores``."""
    if not settings.bucket:
        raise PayloadError("payloads.store is s3 but payloads.bucket is not set")
    return S3Store(settings.bucket, settings.prefix, settings.endpoint_url, settings.region)


def open_store(settings: Payloads) -> PayloadStore:
    """The store for ``settings``, one per process: boto3 clients are costly to make and
    must not cross a fork (prefork children get their own). Which store is a name in
    the ``fleet.payload_stores`` registry (fleet.plugins), so a team can add its own."""
    store = _stores.get((settings, os.getpid()))
    if store is None:
        store = PAYLOAD_STORES.load(settings.store)(settings)
        _stores[(settings, os.getpid())] = store
    return store
