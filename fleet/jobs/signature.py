"""What a job's task can be called with, read from its signature before anything is sent.

A chunk runs as ``task(records, **kwargs)`` and the aggregate step as
``aggregate(results, **aggregate_kwargs)``. A keyword the task does not take, or a
required one left out, would otherwise fail every chunk on a worker, N times over; the
same goes for JSON lines that are not objects when the task declares it takes mappings
(``records: list[dict]``). Tasks without a readable signature are not second-guessed.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from fleet.errors import JobInputError


def _signature(task: Any) -> inspect.Signature | None:
    """The signature of the task's function (a bound task's without ``self``), with
    string annotations evaluated where they can be, so messages read ``list[dict]``."""
    try:
        return inspect.signature(task.run, eval_str=True)
    except Exception:  # NameError of an annotation, or no signature at all
        try:
            return inspect.signature(task.run)
        except (TypeError, ValueError):
            return None


def check_arguments(task: Any, what: str, kwargs: dict) -> None:
    """JobInputError unless ``task(<the data>, **kwargs)`` binds."""
    signature = _signature(task)
    if signature is None:
        return
    try:
        signature.bind(None, **kwargs)
    except TypeError as exc:
        raise JobInputError(
            f"{what} {task.name!r} cannot be called with "
            f"{', '.join(kwargs) or 'no keyword arguments'}: {exc} (it takes "
            f"{task.name.rsplit('.', 1)[-1]}{signature}); nothing was sent") from None


def mapping_records(task: Any) -> str | None:
    """The annotation of the task's first parameter when it is a collection of mappings
    (``list[dict]``, ``Iterable[Mapping[str, Any]]``), else None."""
    signature = _signature(task)
    if signature is None or not signature.parameters:
        return None
    first = next(iter(signature.parameters.values()))
    try:
        hint = typing.get_type_hints(task.run).get(first.name)
    except Exception:  # an annotation naming something the module never imported
        return None
    origin = typing.get_origin(hint)
    if not (isinstance(origin, type) and issubclass(origin, Iterable)):
        return None
    items = typing.get_args(hint)
    item = typing.get_origin(items[0]) or items[0] if items else None
    if isinstance(item, type) and issubclass(item, Mapping):
        return f"{first.name}: {_text(hint)}"
    return None


def _text(hint: Any) -> str:
    return repr(hint).replace("typing.", "").replace("collections.abc.", "")
