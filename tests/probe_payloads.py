"""Probe tasks for the claim-check tests: what did the task code really receive?

Workers import this module when a test adds it to the config's ``imports``.
"""

from __future__ import annotations

import hashlib

from celery import shared_task


def fingerprint(blob: str) -> dict:
    return {"len": len(blob), "sha256": hashlib.sha256(blob.encode()).hexdigest()}


def make_blob(size: int, seed: str) -> str:
    """``size`` characters determined by ``seed`` (hex of chained sha256 digests)."""
    parts = []
    digest = seed.encode()
    while sum(map(len, parts)) < size:
        digest = hashlib.sha256(digest).digest()
        parts.append(digest.hex())
    return "".join(parts)[:size]


@shared_task(name="tests.probe_payloads.digest")
def digest(blob: str, label: str | None = None) -> dict:
    """The size and hash of the argument, and the keyword argument, as received."""
    return {**fingerprint(blob), "label": label}


@shared_task(name="tests.probe_payloads.blob")
def blob(size: int, seed: str) -> str:
    """A result of ``size`` characters: large results travel by reference too."""
    return make_blob(size, seed)


@shared_task(name="tests.probe_payloads.flaky", bind=True)
def flaky(self, blob: str, fail_times: int = 1) -> dict:
    """Fails with a ConnectionError (retried by the default queue's policy) at first."""
    if self.request.retries < fail_times:
        raise ConnectionError(f"transient failure {self.request.retries + 1} of {fail_times}")
    return {**fingerprint(blob), "retries": self.request.retries}


@shared_task(name="tests.probe_payloads.typed")
def typed(when, blob: str = "") -> dict:
    """Echoes a non-JSON-native value (kombu's JSON carries datetime, UUID, Decimal)."""
    return {"type": type(when).__name__, "when": when, **fingerprint(blob)}


@shared_task(name="tests.probe_payloads.fail")
def fail(blob: str) -> None:
    """Fails for good (ValueError is not in the default queue's retry list)."""
    raise ValueError(f"refused a blob of {len(blob)} characters")
