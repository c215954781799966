"""The stub payload store: payloads in this process's memory, for tests.

The same idea as the stub backend (autoscale.backends.stub) and dramatiq's StubBroker: a
store that keeps the PayloadStore contract (URLs that say where a payload is, "gone"
errors for a missing one, a local copy for a block) with no directory or bucket behind
it. Only one process sees it, so it suits unit tests and single-process tools, not a
fleet whose workers are other processes; ``payloads.store: stub`` selects it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fleet.config_models import Payloads
from fleet.errors import PayloadError

SCHEME = "stub://"


class StubStore:
    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.blobs: dict[str, bytes] = {}

    def url_for(self, key: str) -> str:
        return f"{SCHEME}{self.prefix}{key}"

    def put(self, key: str, data: bytes) -> str:
        url = self.url_for(key)
        self.blobs[url] = bytes(data)
        return url

    def put_file(self, key: str, path: Path) -> str:
        try:
            return self.put(key, path.read_bytes())
        except OSError as exc:
            raise PayloadError(f"cannot read {path}: {exc.strerror or exc}") from None

    def get(self, url: str) -> bytes:
        if not url.startswith(SCHEME):
            raise PayloadError(f"payload {url} is not in the stub store")
        try:
            return self.blobs[url]
        except KeyError:
            raise PayloadError(f"payload {url} is gone (deleted or never written)") from None

    def delete(self, url: str) -> None:
        self.blobs.pop(url, None)

    @contextmanager
    def local_copy(self, url: str) -> Iterator[Path]:
        data = self.get(url)
        with tempfile.NamedTemporaryFile(prefix="fleet-stub-") as tmp:
            tmp.write(data)
            tmp.flush()
            yield Path(tmp.name)


def stub_store(settings: Payloads) -> StubStore:
    """The ``stub`` entry point of ``fleet.payload_stores``."""
    return StubStore(settings.prefix)
