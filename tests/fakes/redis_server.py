"""A redis-server of a test's own, on a free port: for tests that stop, restart or empty it.

The shared Redis on 6379 belongs to every test (and keeps nothing on disk); a test that
injects a broker fault starts one of these instead, with an append-only file when the
case is "Redis restarted with its data" and without one for "Redis restarted empty".
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import redis

from fleet.embedded import redis_server_binary
from tests.conftest import free_port, wait_for


class PersistentRedis:
    def __init__(self, workdir: Path, *, appendonly: bool = True):
        self.port = free_port()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.binary = shutil.which("redis-server") or redis_server_binary()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PersistentRedis:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.dir), "--appendonly", "yes" if self.appendonly else "no",
             "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        wait_for(lambda: pings(client), 10, what="redis-server to answer")
        client.close()
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis-server flushes the AOF and exits
            self.proc.wait(timeout=10)

    def wipe(self) -> None:
        """Forget everything on disk: the next start() is a Redis that lost its data."""
        self.stop()
        for path in self.dir.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
