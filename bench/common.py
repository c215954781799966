"""Shared parts of the benchmarks: a private Redis, worker processes, RSS sampling."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleet.embedded import EmbeddedRedis  # noqa: E402


def private_redis() -> EmbeddedRedis:
    """A redis-server of our own on a free port: other users of :6379 cannot skew us."""
    return EmbeddedRedis().start()


def fleet_config_file(url: str, overrides: dict, workdir: Path) -> Path:
    from tests.conftest import deep_merge, shipped_config

    data = deep_merge(shipped_config(), {
        "broker": {"url": url}, "payloads": {"path": str(workdir / "payloads")},
        "jobs": {"ledger": f"sqlite:///{workdir / 'jobs.sqlite'}"}})
    data = deep_merge(data, overrides)
    path = workdir / "queues.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Procs:
    """Worker processes started for one side of a benchmark, in their own sessions."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], env: dict, log: Path) -> subprocess.Popen:
        out = log.open("ab")
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def tree(self) -> list[psutil.Process]:
        out = []
        for proc in self.procs:
            try:
                parent = psutil.Process(proc.pid)
                out.append(parent)
                out.extend(parent.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self) -> None:
        import signal

        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


class RssSampler:
    """Peak of the summed RSS of a set of process trees, sampled every ``interval``."""

    def __init__(self, procs: Procs, interval: float = 0.1):
        self.procs = procs
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for proc in self.procs.tree():
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def wait_ready(app, nodes: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = app.control.ping(destination=nodes, timeout=0.5) or []
        if {n for r in replies for n in r} >= set(nodes):
            return
    raise RuntimeError(f"workers {nodes} not ready after {timeout}s")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(title: str, rows: list[tuple[str, str, str, str]],
          header=("metric", "baseline", "fleet", "ratio")) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def machine() -> str:
    import platform

    return (f"{platform.node()}: {psutil.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}")


def tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)
