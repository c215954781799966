"""``python -m fleet.keeper``: the embedded redis-server's parent, so it is never orphaned.

redis-server cannot watch its supervisor the way a worker does (fleet.watchdog), and
it must not simply die with it either: when ``fleet up`` is SIGKILLed its workers stop
warm, and the tasks they finish still need Redis to store their results and acks.
So ``fleet up`` starts this small process instead, which starts redis-server with a
parent-death signal (``PR_SET_PDEATHSIG``: SIGTERM when the keeper's one thread ends,
however it ends) and then watches:

- SIGTERM, SIGINT or SIGHUP: stop Redis (SIGTERM: it flushes its AOF) and exit.
- Redis exited: exit with its status, so the supervisor sees it and restarts it.
- the supervisor is gone: keep Redis while any worker listed in the workdir's registry
  (fleet.registry) still runs, at most the longest grace period; then stop it and exit.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fleet.watchdog import SupervisorRef, supervisor_alive

PR_SET_PDEATHSIG = 1
REDIS_STOP_GRACE = 30.0


@dataclass(frozen=True)
class Keeper:
    """How a supervisor asks for its embedded Redis to be kept."""

    supervisor: SupervisorRef
    workdir: Path

    def argv(self, server_argv: list[str]) -> list[str]:
        return [sys.executable, "-m", "fleet.keeper", "--supervisor", self.supervisor.encode(),
                "--workdir", str(self.workdir.resolve()), "--", *server_argv]


def workers_running(workdir: Path) -> int:
    from fleet.registry import load

    run = load(workdir)
    if run is None:
        return 0
    return sum(1 for r in run.processes if r.role == "worker" and r.find() is not None)


class _Requested:
    signum: int | None = None


def _on_signal(signum, _frame) -> None:
    _Requested.signum = signum


def _pdeathsig():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

    def set_in_child() -> None:  # between fork and exec; the keeper has one thread
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return set_in_child


def say(text: str) -> None:
    print(f"fleet.keeper[{os.getpid()}]: {text}", flush=True)


def stop(server: subprocess.Popen) -> int:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=REDIS_STOP_GRACE)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return 0


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def keep(ref: SupervisorRef, workdir: Path, server_argv: list[str],
         interval: float = 1.0) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    server = subprocess.Popen(server_argv, preexec_fn=_pdeathsig())
    while supervisor_alive(ref):
        if _Requested.signum is not None:
            return stop(server)
        if server.poll() is not None:
            return exit_status(server.returncode)
        time.sleep(interval)
    say(f"supervisor (pid {ref.pid}) is gone: keeping Redis while its workers finish "
        f"(at most {ref.grace:g}s)")
    deadline = time.monotonic() + ref.grace
    while (_Requested.signum is None and server.poll() is None
           and time.monotonic() < deadline and workers_running(workdir)):
        time.sleep(interval)
    if server.poll() is not None:
        return exit_status(server.returncode)
    say("no worker of it runs any more: stopping Redis")
    return stop(server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleet.keeper")
    parser.add_argument("--supervisor", required=True, help="PID:CREATE_TIME:GRACE")
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("server", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    server = args.server[1:] if args.server[:1] == ["--"] else args.server
    if not server:
        parser.error("no redis-server command line after --")
    try:
        ref = SupervisorRef.parse(args.supervisor)
    except ValueError as exc:
        parser.error(f"--supervisor: {exc}")
    return keep(ref, args.workdir, server)


if __name__ == "__main__":
    sys.exit(main())
