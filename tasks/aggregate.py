"""Group-by aggregation over chunks of records (CSV rows or JSON objects).

``sum_by`` runs per chunk; ``merge_sums`` is the aggregate step that folds the chunk
results into one. Both are plain functions of JSON data so they run anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import shared_task


def _number(value: object) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"not a number: {value!r}")


def sum_records(records: Iterable[dict], group_by: str, fields: list[str]) -> dict:
    """{group: {"count": n, field: sum, ...}} over ``records``."""
    out: dict[str, dict[str, float]] = {}
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"record {position} is not an object: {record!r}")
        if group_by not in record:
            raise ValueError(f"record {position} has no field {group_by!r}")
        group = str(record[group_by])
        bucket = out.setdefault(group, {"count": 0, **{f: 0.0 for f in fields}})
        bucket["count"] += 1
        for name in fields:
            bucket[name] += _number(record.get(name, 0))
    return out


def merge(results: Iterable[dict]) -> dict:
    total: dict[str, dict[str, float]] = {}
    for result in results:
        for group, sums in result.items():
            bucket = total.setdefault(group, {})
            for name, value in sums.items():
                bucket[name] = bucket.get(name, 0) + value
    return dict(sorted(total.items()))


@shared_task(name="tasks.aggregate.sum_by")
def sum_by(records: list[dict], group_by: str = "key", fields: list[str] | None = None) -> dict:
    """Per-chunk group-by: counts and sums of ``fields`` by the value of ``group_by``."""
    return sum_records(records, group_by, fields or ["value"])


@shared_task(name="tasks.aggregate.merge_sums")
def merge_sums(results: list[dict]) -> dict:
    """The aggregate step: add up per-chunk group-by results."""
    return merge(r for r in results if r)
