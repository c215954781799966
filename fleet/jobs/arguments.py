"""``-k KEY=VALUE`` and ``-k KEY:=JSON``: keyword arguments typed on a command line.

``KEY=VALUE`` reads VALUE as JSON when it is JSON (``64``, ``true``, ``["a"]``) and as a
string otherwise (``region``), which is what people type. The one guess that would go
wrong silently is a value meant as JSON with a typo in it (``[1,2``): it would reach the
task as the string ``"[1,2"`` and fail N chunks later. So a value that *starts* like JSON
(``[``, ``{``, ``"``) must parse, and the error says where it does not. ``KEY:=JSON`` is
JSON, always (``-k 'code:="007"'`` passes the string ``007``).
"""

from __future__ import annotations

import json
from typing import Any

from fleet.errors import FleetError

LOOKS_LIKE_JSON = ("[", "{", '"')


class ArgumentError(FleetError):
    exit_code = 2


def parse_kwarg(pair: str) -> tuple[str, Any]:
    """(key, value) of one ``KEY=VALUE`` or ``KEY:=JSON``."""
    key, sep, value = pair.partition("=")
    explicit = key.endswith(":")
    key = key.removesuffix(":")
    if not sep or not key.isidentifier():
        raise ArgumentError(f"expected KEY=VALUE or KEY:=JSON, got {pair!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError as exc:
        if explicit or value.lstrip().startswith(LOOKS_LIKE_JSON):
            hint = "" if explicit else f" (for the text itself, pass {key}:='\"...\"')"
            raise ArgumentError(
                f"{key}: {value!r} is not valid JSON: {exc.msg} at column {exc.colno}"
                f"{hint}") from None
        return key, value


def parse_kwargs(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Every pair, the last one winning for a key given twice (as a shell user expects)."""
    return dict(parse_kwarg(pair) for pair in pairs)
