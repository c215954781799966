"""queues.yaml -> FleetConfig: the only door through which config comes in.

The models themselves live in ``fleet.config_models`` (a leaf that imports nothing of
fleet but units and errors); this module reads the file (``fleet.yamlfile``), turns
pydantic's errors into file:line problems, runs the rules that span several keys
(``fleet.validation``) and applies the environment overrides. It re-exports the models,
so ``from fleet.config import FleetConfig, QueueClass, load_config`` keeps working.
Nothing downstream reads the raw YAML or the environment: ``load_config`` is the only
door.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fleet.config_models import (
    DEFAULT_MAX_DELIVERIES,
    MAX_CHUNK_SIZE,
    REDIS_SCHEMES,
    Autoscaler,
    Autoscaling,
    Broker,
    Capacity,
    Dashboard,
    DashboardToken,
    DashboardUser,
    Duration,
    EventStream,
    FleetConfig,
    IpOrNetwork,
    Jobs,
    Kubernetes,
    KubernetesTarget,
    Lease,
    Model,
    Oidc,
    OnMemoryExceeded,
    Payloads,
    PositiveDuration,
    PositiveSize,
    QueueClass,
    RabbitMQ,
    RateLimit,
    Reconciler,
    RedisUrl,
    ResourceList,
    Resources,
    Results,
    Retry,
    Role,
    Size,
    SizeRule,
    TimeLimit,
    redis_url_problem,
)
from fleet.errors import ConfigError, Problem
from fleet.validation import check
from fleet.yamlfile import line_of, load_yaml

__all__ = [
    "DEFAULT_MAX_DELIVERIES",
    "ENV_BROKER_URL",
    "ENV_CONFIG",
    "ENV_KEY_PREFIX",
    "ENV_LEDGER_URL",
    "MAX_CHUNK_SIZE",
    "REDIS_SCHEMES",
    "Autoscaler",
    "Autoscaling",
    "Broker",
    "Capacity",
    "Dashboard",
    "DashboardToken",
    "DashboardUser",
    "Duration",
    "EventStream",
    "FleetConfig",
    "IpOrNetwork",
    "Jobs",
    "Kubernetes",
    "KubernetesTarget",
    "Lease",
    "Model",
    "Oidc",
    "OnMemoryExceeded",
    "Payloads",
    "PositiveDuration",
    "PositiveSize",
    "QueueClass",
    "RabbitMQ",
    "RateLimit",
    "Reconciler",
    "RedisUrl",
    "ResourceList",
    "Resources",
    "Results",
    "Retry",
    "Role",
    "Size",
    "SizeRule",
    "TimeLimit",
    "default_config_path",
    "load_config",
    "parse_config",
    "redis_url_problem",
    "with_broker",
    "with_ledger",
]

#: Environment variables read at the edge, by ``load_config`` only.
ENV_CONFIG = "FLEET_CONFIG"
ENV_BROKER_URL = "FLEET_BROKER_URL"
ENV_KEY_PREFIX = "FLEET_KEY_PREFIX"
ENV_LEDGER_URL = "FLEET_LEDGER_URL"


def default_config_path() -> Path:
    """``$FLEET_CONFIG``, else ./queues.yaml, else the queues.yaml shipped beside fleet/."""
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    local = Path("queues.yaml")
    if local.exists():
        return local
    return Path(__file__).resolve().parent.parent / "queues.yaml"


def parse_config(data: Any, source: str, lines: dict | None = None) -> FleetConfig:
    """Validate plain data into a FleetConfig or raise ConfigError listing every problem."""
    lines = lines or {}
    if data is None:
        raise ConfigError([Problem(source, "", "file is empty; expected a mapping with queues")])
    if not isinstance(data, dict):
        raise ConfigError([Problem(source, "", "expected a mapping at the top level")])
    try:
        config = FleetConfig.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise ConfigError(_problems_from(exc, source, lines)) from None
    problems = check(config, lines)
    if problems:
        raise ConfigError(problems)
    return config


def load_config(
    path: Path | str | None = None,
    *,
    broker_url: str | None = None,
    key_prefix: str | None = None,
) -> FleetConfig:
    """Read, validate and return the config; env overrides apply to the broker and the
    job ledger only.

    ``FLEET_BROKER_URL``, ``FLEET_KEY_PREFIX`` and ``FLEET_LEDGER_URL`` let one file
    serve every environment (an embedded Redis on a random port, a test's own key
    prefix, a Kubernetes Secret).
    """
    path = Path(path) if path is not None else default_config_path()
    data, lines, duplicates = load_yaml(path)
    if duplicates:
        raise ConfigError(duplicates)
    config = parse_config(data, str(path), lines)
    url = broker_url or os.environ.get(ENV_BROKER_URL)
    if url and (problem := redis_url_problem(url)):
        where = "environment" if not broker_url else "argument"
        raise ConfigError([Problem(where, ENV_BROKER_URL if not broker_url else "broker_url",
                                   problem)])
    prefix = key_prefix if key_prefix is not None else os.environ.get(ENV_KEY_PREFIX)
    config = with_broker(config, url=url, key_prefix=prefix)
    ledger = os.environ.get(ENV_LEDGER_URL)
    return with_ledger(config, ledger) if ledger else config


def with_ledger(config: FleetConfig, url: str) -> FleetConfig:
    """A copy of ``config`` whose job ledger is ``url`` (``fleet up`` keeps it in its
    work directory and passes it to its workers as ``FLEET_LEDGER_URL``)."""
    return config.model_copy(update={"jobs": config.jobs.model_copy(update={"ledger": url})})


def with_broker(
    config: FleetConfig, *, url: str | None = None, key_prefix: str | None = None
) -> FleetConfig:
    """A copy of ``config`` pointing at another Redis and/or key prefix (results follow
    the broker unless ``results.url`` names their own Redis)."""
    broker = config.broker
    if url:
        broker = broker.model_copy(update={"url": url})
    if key_prefix is not None:
        broker = broker.model_copy(update={"key_prefix": key_prefix})
    return config.model_copy(update={"broker": broker})


def _problems_from(exc: ValidationError, source: str, lines: dict) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            reason = "unknown key"
        elif kind == "missing":
            reason = "required key is missing"
        else:
            reason = error["msg"].removeprefix("Value error, ")
            if kind not in ("value_error",) and "input" in error and not isinstance(
                error["input"], dict | list
            ):
                reason += f" (got {error['input']!r})"
        problems.append(Problem(source, _dotted(loc), reason, line_of(loc, lines)))
    return problems


_PLAIN_KEY = re.compile(r"[\w*?\[\]{}@/+-]+")


def _dotted(loc: tuple) -> str:
    """``queues.heavy.memory_limit``; a key with spaces, dots, control or no characters
    is quoted (``queues.'a b'``, ``'\\r'``) so the message shows what the file holds."""
    return ".".join(str(part) if _PLAIN_KEY.fullmatch(str(part)) else repr(str(part))
                    for part in loc)
