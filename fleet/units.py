"""Human units in queues.yaml: sizes (512Mi), durations (30s, 10m), rates (100/m) and
CPU quantities (500m, 2).

Pure parsing, no I/O. Each parser raises ``ValueError`` with a message that names the
accepted forms, which config validation turns into a file/key/reason problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Case matters, as in Kubernetes quantities: ``m`` is milli there and ``b`` is a bit,
#: so ``512mb`` or ``512Mb`` is refused rather than read as 512 MB.
_SIZE_FACTORS = {
    "": 1, "B": 1,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}
SIZE_UNITS = "Ki, Mi, Gi, Ti (x1024), k, M, G, T (x1000), the same with B (MiB, MB), or none"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

_DURATION_FACTORS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")

#: A CPU quantity as queues.yaml accepts it: cores (``2``, ``0.5``) or millicores
#: (``500m``), the subset of Kubernetes quantities the autoscaler can add up.
CPU_PATTERN = r"^\d+(\.\d+)?m?$"

_RATE_PERIODS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*$")


def parse_size(value: object) -> int:
    """Bytes from ``512Mi``, ``2Gi``, ``100M``, ``1.5Gi`` or a plain integer of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 512Mi or 2Gi, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2) in _SIZE_FACTORS:
            return int(float(match.group(1)) * _SIZE_FACTORS[match.group(2)])
        if match:
            raise ValueError(f"unknown size unit {match.group(2)!r} in {value!r}: use "
                             f"{SIZE_UNITS} (units are case-sensitive: b is a bit, m milli)")
    raise ValueError(f"expected a size like 512Mi, 2Gi or 100M, got {value!r}")


def parse_duration(value: object) -> float:
    """Seconds from ``30s``, ``10m``, ``1h30m``, ``500ms`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s or 10m, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value}")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        parts = _DURATION_PART_RE.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(float(n) * _DURATION_FACTORS[u] for n, u in parts)
    raise ValueError(f"expected a duration like 30s, 10m or 1h30m, got {value!r}")


@dataclass(frozen=True)
class Rate:
    """A rate as tokens per second, plus the text it came from for messages."""

    per_second: float
    text: str

    def __str__(self) -> str:
        return self.text


def parse_rate(value: object) -> Rate:
    """A rate from ``100/m``, ``10/s`` or ``1000/h``."""
    if isinstance(value, Rate):
        return value
    if isinstance(value, str):
        match = _RATE_RE.match(value.lower())
        if match and match.group(2) in _RATE_PERIODS:
            count = float(match.group(1))
            if count > 0:
                return Rate(count / _RATE_PERIODS[match.group(2)], value.strip())
    raise ValueError(f"expected a rate like 100/m, 10/s or 1000/h, got {value!r}")


def cpu_cores(value: str | None) -> float | None:
    """Cores from a CPU quantity already matched by ``CPU_PATTERN`` (``500m`` -> 0.5,
    ``2`` -> 2.0); None (no quantity given) stays None."""
    if value is None:
        return None
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def format_size(n: float) -> str:
    """The shortest binary-unit form of a byte count, for messages (``512.0Mi``)."""
    for unit, factor in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if abs(n) >= factor:
            return f"{n / factor:.1f}{unit}"
    return f"{int(n)}B"


def format_duration(seconds: float) -> str:
    """``90`` -> ``1m30s``; for messages and printed config."""
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    out, rest = [], seconds
    for unit, factor in (("h", 3600), ("m", 60)):
        if rest >= factor:
            out.append(f"{int(rest // factor)}{unit}")
            rest = rest % factor
    if rest or not out:
        out.append(f"{rest:g}s")
    return "".join(out)
