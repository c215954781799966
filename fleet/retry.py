"""A queue's retry policy as Celery task attributes (autoretry_for and friends)."""

from __future__ import annotations

import builtins
import importlib
from typing import Any

from fleet.config_models import Retry


def resolve_exception(name: str) -> type[BaseException]:
    """``ValueError`` or ``botocore.exceptions.ClientError`` -> the class.

    Raises ValueError with a readable reason for a name that is not an exception class.
    """
    if "." not in name:
        found = getattr(builtins, name, None)
    else:
        module_name, _, attr = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), attr, None)
        except ImportError:
            found = None
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        raise ValueError(f"{name!r} is not an exception class (builtin or dotted path)")
    return found


def retry_attributes(retry: Retry) -> dict[str, Any]:
    """Task attributes that make Celery retry with exponential backoff."""
    return {
        "autoretry_for": tuple(resolve_exception(n) for n in retry.exceptions),
        "max_retries": retry.max_retries,
        # Celery draws the jitter with random.randrange: the factor must be whole seconds.
        "retry_backoff": max(1, round(retry.backoff)),
        "retry_backoff_max": int(retry.backoff_max),
        "retry_jitter": retry.jitter,
    }
