"""Fixtures: a key prefix of our own in the real Redis, a config file, real workers.

Every test gets a fresh ``global_keyprefix`` (kombu prefixes queues, unacked, results
and pub/sub channels with it; fleet's own keys follow), so tests never share a queue
with each other or with anything else using the same Redis, and cleanup deletes only
what the test made.
"""

from __future__ import annotations

import copy
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
import requests
import yaml

from fleet.config import ENV_KEY_PREFIX, FleetConfig, load_config
from fleet.processes import WorkerProcess, stop_all

if TYPE_CHECKING:
    import docker

    from tests.docker_util import DockerEngine

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("FLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def deep_merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def without_module(tmp_path: Path, module: str) -> str:
    """A PYTHONPATH (this repository last) on which ``module`` cannot be imported, as
    after a ``pip install fleet`` without the extra that brings it."""
    shadow = tmp_path / "shadow" / module
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{module}'\", name={module!r})\n")
    return f"{shadow.parent}{os.pathsep}{ROOT}"


def shipped_config() -> dict:
    return yaml.safe_load((ROOT / "queues.yaml").read_text())


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.1,
             what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http_answers(url: str) -> bool:
    """True once ``url`` answers 2xx; a server still starting (refused, reset) is False,
    so a wait can poll a server a subprocess is bringing up."""
    try:
        return requests.get(url, timeout=5).ok
    except requests.RequestException:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"the tests need Redis at {REDIS_URL} (.ci/test starts one)")
    yield client
    client.close()


def drop_prefix(client: redis.Redis, prefix: str) -> None:
    """Every key under ``prefix`` gone (a test's or a bench's own fleet), in batches."""
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        client.unlink(*keys[start:start + 500])


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    value = f"t{uuid.uuid4().hex[:10]}:"
    yield value
    drop_prefix(redis_client, value)


class Fleet:
    """A test's own fleet: config file, key prefix, app, and the workers it started."""

    def __init__(self, tmp_path: Path, prefix: str, overrides: dict | None = None):
        self.tmp_path = tmp_path
        self.prefix = prefix
        self.workers: list[WorkerProcess] = []
        self._apps = []
        self.configure(overrides or {})

    def configure(self, overrides: dict) -> FleetConfig:
        data = deep_merge(shipped_config(), {
            "broker": {"url": REDIS_URL},
            "payloads": {"path": str(self.tmp_path / "payloads")},
            "jobs": {"ledger": f"sqlite:///{self.tmp_path / 'ledger.sqlite'}"},
        })
        data = deep_merge(data, overrides)
        self.config_path = self.tmp_path / "queues.yaml"
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        self.config = load_config(self.config_path, key_prefix=self.prefix)
        return self.config

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("FLEET_") or k == "FLEET_FAULT_REPORT"}
        env[ENV_KEY_PREFIX] = self.prefix
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def app(self, queue: str | None = None):
        from fleet.factory import create_app

        app = create_app(self.config, queue)
        self._apps.append(app)
        return app

    def start_worker(self, queue: str, *, wait: bool = True, name: str | None = None,
                     timeout: float = 60.0, extra: tuple[str, ...] = ()) -> WorkerProcess:
        node = f"{name or queue}-{len(self.workers)}@{self.prefix.rstrip(':')}"
        log = self.tmp_path / "logs" / f"{node.replace('@', '_')}.log"
        worker = WorkerProcess(queue, str(self.config_path), log, self.env, hostname=node,
                               extra=extra)
        self.workers.append(worker)
        if wait:
            self.wait_ready(worker, timeout)
        return worker

    def wait_ready(self, worker: WorkerProcess, timeout: float = 60.0) -> None:
        app = self.app()

        def ready():
            if not worker.alive():
                raise AssertionError(f"worker exited early:\n{self.log_of(worker)}")
            return app.control.ping(destination=[worker.hostname], timeout=0.5)

        wait_for(ready, timeout, interval=0.2, what=f"worker {worker.hostname} to answer")

    def log_of(self, worker: WorkerProcess) -> str:
        return worker.log.read_text(errors="replace") if worker.log.exists() else ""

    def close(self) -> None:
        stop_all(self.workers, grace=15)
        for app in self._apps:
            app.close()


@pytest.fixture
def fleet(tmp_path: Path, prefix: str) -> Iterator[Fleet]:
    """A config in tmp_path under the test's key prefix; workers started are stopped."""
    f = Fleet(tmp_path, prefix)
    yield f
    f.close()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server (a real subprocess on a free port); yields its endpoint URL.

    Dummy AWS credentials go into this process's environment for the session, so boto3
    here and every worker a test starts (``Fleet.env`` copies os.environ) can sign.
    """
    from tests.fakes.s3server import AWS_ENV, MotoServer

    log_dir = tmp_path_factory.mktemp("moto")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in AWS_ENV.items():
            mp.setenv(name, value)
        server = None
        for _attempt in range(3):  # another process may take the free port first
            server = MotoServer(free_port(), log_dir / "moto.log")
            try:
                server.wait_ready()
                break
            except RuntimeError:
                server.stop()
                server = None
        if server is None:
            pytest.fail(f"moto server did not start; see {log_dir / 'moto.log'}")
        try:
            yield server.endpoint_url
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(moto_s3: str) -> Iterator[str]:
    """A fresh bucket on the moto server, emptied and removed after the test."""
    import boto3

    from tests.fakes.s3server import empty_bucket

    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    name = f"fleet-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name
    empty_bucket(client, name)


@pytest.fixture
def postgres_url():
    """A database of its own on the machine's PostgreSQL, dropped afterwards."""
    import psycopg

    name = f"fleet_t{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect("postgresql://postgres@127.0.0.1/test", autocommit=True,
                                connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is needed for this test: {exc}")
    admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://postgres@127.0.0.1/{name}"
    admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(scope="session")
def docker_engine() -> DockerEngine:
    """A Docker engine and the fleet image of this tree, from .ci/docker-engine (installs
    and starts the engine when root, reuses what runs); fails with its message if not."""
    from tests.docker_util import start_engine

    return start_engine()


@pytest.fixture(scope="session")
def docker_client(docker_engine: DockerEngine) -> Iterator[docker.DockerClient]:
    client = docker_engine.client()
    yield client
    client.close()
