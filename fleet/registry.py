"""The workdir's record of a supervisor and the processes it started.

A SIGKILLed ``fleet up`` cleans nothing up: its workers stop by themselves (fleet.watchdog)
but may still be finishing their tasks, and its embedded Redis (fleet.keeper) waits for
them. A second ``fleet up`` on the same workdir must not run beside them: two sets of
workers on one queue, two redis-servers on one append-only file. So every supervisor
holds an exclusive ``flock`` on ``supervisor.lock`` while it runs (the kernel releases
it when the process dies, however it dies) and lists what it started in
``supervisor.json``. The next supervisor that gets the lock reads that list and stops
what is left of it, warm, before it starts anything.

A pid alone is not an identity: pids are reused. A process is taken for one of ours
only if its pid, create time and command line all match the record; anything else is
left alone. (redis-server rewrites its own command line, so the keeper, a Python
process whose command line stays as started, is what the record names.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from fleet.errors import WorkdirInUseError
from fleet.watchdog import same_process

FILE = "supervisor.json"
LOCK = "supervisor.lock"

#: How long a leftover embedded Redis gets to flush its append-only file after SIGTERM.
REDIS_STOP_GRACE = 30.0


@dataclass(frozen=True)
class ProcessRecord:
    role: str  # "supervisor" | "worker" | "redis"
    name: str
    pid: int
    create_time: float
    argv: tuple[str, ...]
    #: How long a warm stop may take before SIGKILL (the queue's grace period).
    grace: float = 0.0

    @classmethod
    def of(cls, pid: int, argv: list[str], role: str, name: str,
           grace: float = 0.0) -> ProcessRecord:
        """The record of a process just started with ``argv`` (between fork and exec its
        command line is still the parent's, so the argv given is the one to expect)."""
        return cls(role, name, pid, psutil.Process(pid).create_time(), tuple(argv), grace)

    @classmethod
    def of_this_process(cls, role: str, name: str) -> ProcessRecord:
        me = psutil.Process()
        return cls(role, name, me.pid, me.create_time(), tuple(me.cmdline()))

    def find(self) -> psutil.Process | None:
        """The live process this record names, or None (gone, or the pid reused)."""
        proc = same_process(self.pid, self.create_time)
        if proc is None:
            return None
        try:
            return proc if matches(self, proc.cmdline()) else None
        except psutil.Error:
            return None


def matches(record: ProcessRecord, cmdline: list[str]) -> bool:
    return tuple(cmdline) == record.argv


@dataclass
class RunRecord:
    supervisor: ProcessRecord | None = None
    processes: list[ProcessRecord] = field(default_factory=list)
    #: The embedded Redis's port, kept across runs so a printed FLEET_BROKER_URL stays valid.
    redis_port: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        data = json.loads(text)

        def rec(d: dict) -> ProcessRecord:
            return ProcessRecord(**{**d, "argv": tuple(d["argv"])})

        return cls(supervisor=rec(data["supervisor"]) if data.get("supervisor") else None,
                   processes=[rec(d) for d in data.get("processes", [])],
                   redis_port=data.get("redis_port"))


def load(workdir: Path) -> RunRecord | None:
    try:
        return RunRecord.from_json((workdir / FILE).read_text())
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None  # a torn or hand-edited file names nothing we could safely signal


class Registry:
    """One supervisor's lock and record in ``workdir``; thread-safe (workers are
    started from the autoscaler thread)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.run = RunRecord()

    def acquire(self, role: str) -> RunRecord | None:
        """Take the workdir; return what an earlier run left behind (None if nothing)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = load(self.workdir)
            who = holder.supervisor if holder else None
            name = f"{who.name}, pid {who.pid}" if who else "another supervisor"
            raise WorkdirInUseError(
                f"workdir {self.workdir} is in use by {name}: stop it first, or pass "
                "another --workdir") from None
        self._fd = fd
        previous = load(self.workdir)
        self.run = RunRecord(supervisor=ProcessRecord.of_this_process("supervisor", role),
                             redis_port=previous.redis_port if previous else None)
        if previous is not None:
            # Keep the leftovers listed until they are stopped: if this run is killed
            # too, the next one still finds them.
            self.run.processes = list(previous.processes)
        self._write()
        return previous if previous and (previous.supervisor or previous.processes) else None

    def add(self, record: ProcessRecord) -> None:
        with self._lock:
            self.run.processes.append(record)
            self._write()

    def remove(self, pid: int) -> None:
        with self._lock:
            self.run.processes = [p for p in self.run.processes if p.pid != pid]
            self._write()

    def forget(self, records: list[ProcessRecord]) -> None:
        gone = {(r.pid, r.create_time) for r in records}
        with self._lock:
            self.run.processes = [p for p in self.run.processes
                                  if (p.pid, p.create_time) not in gone]
            self._write()

    def set_redis_port(self, port: int) -> None:
        with self._lock:
            self.run.redis_port = port
            self._write()

    def release(self) -> None:
        """A clean end: nothing of this run is left, only the Redis port is kept."""
        if self._fd is None:
            return
        with self._lock:
            self.run = RunRecord(redis_port=self.run.redis_port)
            self._write()
        os.close(self._fd)
        self._fd = None

    def _write(self) -> None:
        if self._fd is None:
            return
        tmp = self.workdir / f".{FILE}.tmp"
        tmp.write_text(self.run.to_json())
        os.replace(tmp, self.workdir / FILE)  # readers (the keeper) never see half a file


def leftovers(run: RunRecord) -> list[tuple[ProcessRecord, psutil.Process]]:
    """The processes of ``run`` that still live (verified), workers first."""
    out = []
    for record in sorted(run.processes, key=lambda r: r.role != "worker"):
        proc = record.find()
        if proc is not None:
            out.append((record, proc))
    return out


def stop_leftovers(run: RunRecord, report: Callable[[str], None],
                   hurry: Callable[[], bool] = lambda: False) -> list[ProcessRecord]:
    """Stop what an earlier, killed run left: its workers warm (each within its grace
    period), then its embedded Redis (which flushes its AOF on SIGTERM). ``hurry`` (a
    second signal) SIGKILLs what is left. Returns the records that were still alive."""
    found = leftovers(run)
    if not found:
        return []
    who = f"pid {run.supervisor.pid}" if run.supervisor else "an earlier supervisor"
    workers = [(r, p) for r, p in found if r.role == "worker"]
    others = [(r, p) for r, p in found if r.role != "worker"]
    if workers:
        longest = max(r.grace for r, _ in workers)
        report(f"an earlier run ({who}) was killed and left {len(workers)} worker(s): "
               f"stopping them warm (their running tasks finish; up to {longest:g}s; a "
               "second signal kills them now)")
        _stop(workers, hurry, report)
    if others:
        report(f"stopping the embedded Redis of the earlier run ({who}); its data stays on disk")
        _stop([(r, p) for r, p in others], hurry, report, grace=REDIS_STOP_GRACE)
    return [r for r, _ in found]


def _stop(found: list[tuple[ProcessRecord, psutil.Process]], hurry: Callable[[], bool],
          report: Callable[[str], None], grace: float | None = None) -> None:
    now = time.monotonic()
    deadlines = {}
    for record, proc in found:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
        deadlines[record.pid] = now + (record.grace if grace is None else grace)
    pending = list(found)
    hurried = False
    while pending:
        pending = [(r, p) for r, p in pending if _alive(p)]
        if not pending:
            break
        if not hurried and hurry():
            hurried = True
            report(f"killing {len(pending)} leftover process(es) now")
        late = [(r, p) for r, p in pending if hurried or time.monotonic() > deadlines[r.pid]]
        for record, proc in late:
            if not hurried:
                report(f"{record.name} (pid {record.pid}) still runs after {record.grace:g}s: "
                       "SIGKILL")
            _kill_group(proc)
        time.sleep(0.2)
    for _, proc in found:
        _kill_group(proc)  # a pool child that outlived its worker


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_group(proc: psutil.Process) -> None:
    """SIGKILL ``proc``'s process group if it leads one (workers and the keeper run in
    sessions of their own, so their group is exactly what they started), else ``proc``."""
    try:
        if not proc.is_running():  # gone, or its pid reused: psutil compares create times
            return
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, psutil.Error):
        pass
