"""Supervision without Redis: the watch loop over real threads, stop signals sent to this
process, the workdir registry over real processes, and the errors a user can hit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from fleet.errors import WorkdirInUseError
from fleet.registry import ProcessRecord, Registry, RunRecord, load, stop_leftovers
from fleet.supervision import (
    Outcome,
    RestartPolicy,
    StopSignals,
    Supervisor,
    ThreadUnit,
    restart_delay,
)
from fleet.watchdog import SupervisorRef, same_process, supervisor_alive
from tests.conftest import ROOT, wait_for

FAST = RestartPolicy(max_restarts=3, window=60, backoff=0.05, stuck_for=0.5)


def supervisor(lines: list[str], policy: RestartPolicy = FAST) -> tuple[Supervisor, StopSignals]:
    signals = StopSignals()
    return Supervisor(signals, lines.append, policy, check_every=0.02), signals


def run_in_thread(sup: Supervisor, **kwargs) -> tuple[threading.Thread, list[Outcome]]:
    out: list[Outcome] = []
    thread = threading.Thread(target=lambda: out.append(sup.run(**kwargs)), daemon=True)
    thread.start()
    return thread, out


# -- restart policy (pure) ---------------------------------------------------------------

def test_restart_delay_doubles_and_gives_up_after_max_restarts_within_the_window():
    policy = RestartPolicy(max_restarts=3, window=100, backoff=1)
    assert restart_delay([], 1000, policy) == 1
    assert restart_delay([990], 1000, policy) == 2
    assert restart_delay([980, 990], 1000, policy) == 4
    assert restart_delay([970, 980, 990], 1000, policy) is None
    # Restarts older than the window no longer count.
    assert restart_delay([800, 850, 990], 1000, policy) == 2


# -- the watch loop over real threads ----------------------------------------------------

def test_a_thread_that_dies_is_reported_and_restarted_and_then_runs_on():
    runs = []

    def target(stop: threading.Event) -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise ZeroDivisionError("float division by zero")
        stop.wait()

    lines: list[str] = []
    sup, signals = supervisor(lines)
    unit = sup.add(ThreadUnit("autoscaler", target))
    thread, out = run_in_thread(sup)
    wait_for(lambda: len(runs) == 2, 5, what="the restart")
    time.sleep(0.2)
    assert unit.problem() is None and unit.thread.is_alive()
    assert lines[0] == "autoscaler died: ZeroDivisionError: float division by zero"
    assert lines[1].startswith("restarted autoscaler (restart 1")
    assert runs[1] - runs[0] >= FAST.backoff  # backed off, not spun
    signals.received.append(signal.SIGTERM)
    thread.join(5)
    assert out == [Outcome(0, "SIGTERM received")]
    unit.stop()
    assert not unit.thread.is_alive()


def test_a_thread_that_keeps_dying_stops_the_supervisor_with_a_failure():
    def target(_stop: threading.Event) -> None:
        raise RuntimeError("boom")

    lines: list[str] = []
    sup, _ = supervisor(lines)
    sup.add(ThreadUnit("reconciler", target))
    thread, out = run_in_thread(sup)
    thread.join(10)
    assert out and out[0].code == 1
    assert "reconciler died: RuntimeError: boom" in out[0].reason
    assert "restarted 3 times within 60s: giving up" in out[0].reason
    assert sum(line.startswith("restarted reconciler") for line in lines) == 3


def test_a_thread_that_ends_without_being_asked_is_restarted_too():
    runs = []

    def target(stop: threading.Event) -> None:
        runs.append(1)
        if len(runs) > 1:
            stop.wait()

    lines: list[str] = []
    sup, signals = supervisor(lines)
    sup.add(ThreadUnit("dashboard", target))
    thread, _ = run_in_thread(sup)
    wait_for(lambda: len(runs) == 2, 5, what="the restart")
    assert lines[0] == "dashboard ended without being asked to"
    signals.received.append(signal.SIGINT)
    thread.join(5)


def test_a_stalled_loop_is_reported_cannot_be_restarted_and_stops_the_supervisor():
    beat = [time.monotonic()]

    def target(stop: threading.Event) -> None:
        stop.wait()  # alive, but never passes again

    lines: list[str] = []
    sup, _ = supervisor(lines)
    unit = sup.add(ThreadUnit("autoscaler", target, beat=lambda: beat[0], stall_after=0.2))
    thread, out = run_in_thread(sup)
    thread.join(10)
    assert lines[0].startswith("autoscaler stalled: no pass for")
    assert "cannot be restarted" in lines[1]
    assert out[0].code == 1 and "cannot be restarted" in out[0].reason
    unit.stop()


def test_a_stalled_loop_that_turns_again_is_reported_healthy():
    beat = [time.monotonic() - 10]
    lines: list[str] = []
    sup, signals = supervisor(lines, RestartPolicy(stuck_for=30))
    sup.add(ThreadUnit("autoscaler", lambda stop: stop.wait(), beat=lambda: beat[0],
                       stall_after=0.5))
    thread, _ = run_in_thread(sup)
    wait_for(lambda: len(lines) >= 2, 5, what="the stall report")
    beat[0] = time.monotonic() + 3600
    wait_for(lambda: "autoscaler runs again" in lines, 5, what="the recovery report")
    signals.received.append(signal.SIGTERM)
    thread.join(5)


def test_a_oneshot_unit_ends_the_run_when_done_and_its_error_is_kept():
    sup, _ = supervisor([])
    demo = sup.add(ThreadUnit("the demo", lambda stop: time.sleep(0.1), oneshot=True),
                   restart=False)
    assert sup.run(done=[demo]) == Outcome(0, "done")

    class JobFailed(Exception):
        pass

    def failing(_stop):
        raise JobFailed("job 123 failed")

    sup, _ = supervisor([])
    demo = sup.add(ThreadUnit("the demo", failing, oneshot=True), restart=False)
    outcome = sup.run(done=[demo])
    assert outcome.code == 1 and isinstance(outcome.error, JobFailed)
    assert outcome.reason == "the demo died: JobFailed: job 123 failed"


# -- stop signals ------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_each_stop_signal_is_a_flag_and_a_second_one_means_hurry(sig):
    with StopSignals() as signals:
        assert not signals.requested
        os.kill(os.getpid(), sig)
        wait_for(lambda: signals.requested, 2, interval=0.01, what="the handler")
        assert signals.name == sig.name and not signals.hurry
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: signals.hurry, 2, interval=0.01, what="the second signal")
        assert signals.sleep(10) is True  # returns at once once a stop is requested
    assert signal.getsignal(sig) is not signals._handle  # restored


# -- the registry over real processes ----------------------------------------------------

def sleeper(*extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *extra])


def test_a_record_names_its_process_only_while_pid_create_time_and_command_line_match():
    proc = sleeper()
    try:
        record = ProcessRecord.of(proc.pid, proc.args, "worker", "w1")
        assert wait_for(record.find, 5, what="the record to match").pid == proc.pid
        wrong_time = ProcessRecord(**{**record.__dict__, "create_time": record.create_time - 60})
        assert wrong_time.find() is None  # the pid was reused by another process
        wrong_argv = ProcessRecord(**{**record.__dict__, "argv": (sys.executable, "other")})
        assert wrong_argv.find() is None
        proc.kill()
        wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE, 5)
        assert record.find() is None  # a zombie is dead
        assert same_process(proc.pid, record.create_time) is None
    finally:
        proc.kill()
        proc.wait()


def test_a_second_supervisor_on_a_workdir_is_refused_by_name(tmp_path):
    first = Registry(tmp_path)
    assert first.acquire("fleet up") is None
    with pytest.raises(WorkdirInUseError, match=rf"in use by fleet up, pid {os.getpid()}"):
        Registry(tmp_path).acquire("fleet autoscale")
    first.release()
    again = Registry(tmp_path)
    assert again.acquire("fleet up") is None  # a clean end leaves nothing to stop
    again.release()


def test_the_record_survives_its_writer_and_names_what_it_left(tmp_path):
    proc = sleeper()
    try:
        reg = Registry(tmp_path)
        reg.acquire("fleet up")
        reg.add(ProcessRecord.of(proc.pid, proc.args, "worker", "default-1", grace=5))
        reg.set_redis_port(6399)
        # A killed supervisor releases nothing: the next one reads the file as left.
        left = load(tmp_path)
        assert [p.name for p in left.processes] == ["default-1"]
        assert left.supervisor.pid == os.getpid() and left.redis_port == 6399
        reg.remove(proc.pid)
        assert load(tmp_path).processes == []
        reg.release()
        assert load(tmp_path) == RunRecord(redis_port=6399)
    finally:
        proc.kill()
        proc.wait()


def test_leftovers_stop_warm_within_their_grace_then_are_killed_and_strangers_are_spared(
        tmp_path):
    # One stops on SIGTERM (a worker's warm shutdown); one ignores it (a stuck task).
    warm = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                            start_new_session=True)
    stuck = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
         "signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"],
        start_new_session=True, stdout=subprocess.PIPE, text=True)
    stranger = sleeper()
    try:
        assert stuck.stdout.readline().strip() == "ready"
        run = RunRecord(
            supervisor=ProcessRecord("supervisor", "fleet up", 1, 0.0, ("fleet",)),
            processes=[
                ProcessRecord.of(warm.pid, warm.args, "worker", "default-1", grace=10),
                ProcessRecord.of(stuck.pid, stuck.args, "worker", "heavy-2", grace=1),
                # The stranger's pid, but not its command line: never signalled.
                ProcessRecord.of(stranger.pid, [sys.executable, "-m", "fleet.cli"],
                                 "worker", "reused-pid", grace=0),
            ])
        lines: list[str] = []
        started = time.monotonic()
        stopped = stop_leftovers(run, lines.append)
        elapsed = time.monotonic() - started
        assert {r.name for r in stopped} == {"default-1", "heavy-2"}
        assert warm.wait(5) == -signal.SIGTERM
        assert stuck.wait(5) == -signal.SIGKILL
        assert 1 <= elapsed < 8, elapsed
        assert "left 2 worker(s)" in lines[0]
        assert any("heavy-2" in line and "SIGKILL" in line for line in lines)
        assert stranger.poll() is None
    finally:
        for proc in (warm, stuck, stranger):
            proc.kill()
            proc.wait()


def test_a_second_signal_kills_leftovers_at_once(tmp_path):
    stuck = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
         "signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"],
        start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert stuck.stdout.readline().strip() == "ready"
        run = RunRecord(processes=[ProcessRecord.of(stuck.pid, stuck.args, "worker",
                                                    "heavy-1", grace=600)])
        lines: list[str] = []
        asked = time.monotonic() + 0.5
        stop_leftovers(run, lines.append, hurry=lambda: time.monotonic() > asked)
        assert stuck.wait(5) == -signal.SIGKILL
        assert lines[-1] == "killing 1 leftover process(es) now"
    finally:
        stuck.kill()
        stuck.wait()


# -- the watchdog's view of a supervisor -------------------------------------------------

def test_a_supervisor_ref_round_trips_and_a_bad_one_says_what_is_expected():
    ref = SupervisorRef.of_this_process(grace=75)
    assert SupervisorRef.parse(ref.encode()) == SupervisorRef(ref.pid, round(ref.create_time, 2),
                                                              75)
    assert supervisor_alive(ref)
    for bad in ("", "12", "a:b:c", "12:3.5:-1", "0:1:1"):
        with pytest.raises(ValueError, match="expected"):
            SupervisorRef.parse(bad)


def test_a_dead_or_reused_supervisor_is_gone():
    proc = sleeper()
    ref = SupervisorRef(proc.pid, psutil.Process(proc.pid).create_time(), 1)
    assert supervisor_alive(ref)
    assert not supervisor_alive(SupervisorRef(proc.pid, ref.create_time - 100, 1))
    proc.kill()  # not reaped yet: a zombie, still "there" for a naive pid check
    try:
        wait_for(lambda: not supervisor_alive(ref), 5, what="the zombie to count as gone")
    finally:
        proc.wait()


def test_fleet_worker_refuses_a_malformed_supervisor_variable(fleet):
    result = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "worker", "--queue", "default", "--config",
         str(fleet.config_path)], capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**fleet.env, "FLEET_SUPERVISOR": "not-a-pid"})
    assert result.returncode == 2, result.stderr
    assert "FLEET_SUPERVISOR: expected PID:CREATE_TIME:GRACE, got 'not-a-pid'" in result.stderr
    assert "Traceback" not in result.stderr


def test_fleet_up_on_a_workdir_in_use_is_a_clear_error(fleet, tmp_path):
    held = Registry(tmp_path / "work")
    held.acquire("fleet up")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "fleet.cli", "up", "--workdir", str(tmp_path / "work"),
             "--dashboard-port", "0", "--config", str(fleet.config_path)],
            capture_output=True, text=True, cwd=ROOT, timeout=60, env=fleet.env)
        assert result.returncode == 1, result.stdout + result.stderr
        assert (f"fleet: error: workdir {tmp_path / 'work'} is in use by fleet up, pid "
                f"{os.getpid()}: stop it first, or pass another --workdir") in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        held.release()


@pytest.mark.slow
def test_the_dashboard_unit_sees_a_thread_end_and_restarts_it_on_the_same_port(fleet, tmp_path):
    import io

    from rich.console import Console

    from fleet.up import DashboardUnit
    from tests.conftest import free_port, http_answers

    port = free_port()

    def answers() -> bool:
        return http_answers(f"http://127.0.0.1:{port}/api/fleet/jobs")

    unit = DashboardUnit(fleet.config, tmp_path, port, Console(file=io.StringIO()))
    unit.start()
    try:
        wait_for(answers, 30, what="the dashboard to answer")
        assert unit.problem() is None
        unit.server.server.should_exit = True  # uvicorn's own stop: its HTTP thread ends
        problem = wait_for(unit.problem, 15, what="the unit to see the thread end")
        assert problem == "died (thread dashboard-http ended)"
        unit.restart()
        wait_for(answers, 30, what="the restarted dashboard to answer")
        assert unit.problem() is None
    finally:
        unit.stop()
