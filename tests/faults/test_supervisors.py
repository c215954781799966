"""Supervisors never orphan workers: ``fleet up`` and ``fleet autoscale --backend local``
stopped by SIGTERM, SIGINT and SIGHUP while a worker runs a task, SIGKILLed, restarted on
the workdir of a killed run, and watching their embedded Redis; processes counted with
psutil (every descendant ever seen, plus anything naming the supervisor in its
environment or command line, so a reparented orphan is still found)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from fleet.config import with_broker
from fleet.embedded import EmbeddedRedis
from fleet.factory import create_app
from fleet.keys import broker_client, list_keys
from fleet.observe import overrides
from tests.conftest import ROOT, free_port, shipped_config, wait_for
from tests.faults.figures import Figures, report
from tests.probe_tasks import events, executions

pytestmark = pytest.mark.slow

IMPORTS = [*shipped_config()["imports"], "tests.probe_tasks"]
#: heavy's grace period in these tests: hard limit 60 s + soft shutdown 5 s + 10 s margin.
HEAVY_GRACE = 75.0
TASK_S = 8.0


def configure(fleet, *, heavy_min: int = 1, heavy_max: int = 1):
    """One heavy worker (the probe tasks' queue), nothing else running."""
    return fleet.configure(_overrides(heavy_min=heavy_min, heavy_max=heavy_max))


def _overrides(*, heavy_min: int = 1, heavy_max: int = 1) -> dict:
    return {
        "imports": IMPORTS,
        "autoscaler": {"interval": "1s", "worker_metrics_interval": "1s"},
        "queues": {
            "default": {"autoscaling": {"min_replicas": 0, "max_replicas": 1}},
            "heavy": {"tasks": ["tasks.heavy.*", "tests.probe.*"], "concurrency": 1,
                      "time_limit": {"soft": "50s", "hard": "60s"},
                      "soft_shutdown_timeout": "5s",
                      "autoscaling": {"min_replicas": heavy_min, "max_replicas": heavy_max,
                                      "scale_down_stabilization": "5s", "cooldown": "1s"}},
        },
    }


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def named_by(pid: int) -> list[psutil.Process]:
    """Processes that name supervisor ``pid``: its workers (and their pool children) in
    their environment, its Redis keeper on its command line, and the keeper's children."""
    found = []
    for proc in psutil.process_iter():
        try:
            if f"--supervisor {pid}:" in " ".join(proc.cmdline()):
                found.append(proc)
                found += proc.children(recursive=True)
            elif proc.environ().get("FLEET_SUPERVISOR", "").startswith(f"{pid}:"):
                found.append(proc)
        except psutil.Error:
            continue
    return found


class Supervised:
    """A ``fleet up`` or ``fleet autoscale`` subprocess and every process it started."""

    count = 0

    def __init__(self, fleet, command: str, *, embedded: bool = False,
                 workdir: Path | None = None, extra: tuple[str, ...] = ()):
        Supervised.count += 1
        self.workdir = workdir or fleet.tmp_path / "work"
        argv = [sys.executable, "-m", "fleet.cli", command, "--workdir", str(self.workdir),
                "--config", str(fleet.config_path), *extra]
        argv += ["--dashboard-port", "0"] if command == "up" else ["--backend", "local"]
        env = dict(fleet.env)
        if embedded:  # nothing answers there: fleet up starts its embedded Redis
            env["FLEET_BROKER_URL"] = f"redis://127.0.0.1:{free_port()}/0"
        self.log = fleet.tmp_path / f"{command}-{Supervised.count}.out"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.seen: dict[int, psutil.Process] = {}
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._done.is_set() and self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(self.pid).children(recursive=True):
                    self.seen.setdefault(child.pid, child)
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ours(self) -> list[psutil.Process]:
        """Every process it started that still runs (the supervisor itself excluded)."""
        procs = {p.pid: p for p in [*self.seen.values(), *named_by(self.pid)]}
        return [p for pid, p in procs.items() if pid != self.pid and _alive(p)]

    def workers(self) -> list[psutil.Process]:
        """Its worker main processes (a prefork pool child, forked without exec, has the
        same command line, and its worker as parent)."""
        out = []
        for proc in self.ours():
            with contextlib.suppress(psutil.Error):
                parent = proc.parent()
                if ("fleet.cli worker" in _cmdline(proc)
                        and (parent is None or "fleet.cli worker" not in _cmdline(parent))):
                    out.append(proc)
        return out

    def broker_url(self, timeout: float = 60) -> str:
        def find():
            for line in self.output().splitlines():
                if line.startswith("broker redis://"):
                    return line.split()[1].rstrip(";")
            if self.proc.poll() is not None:
                raise AssertionError(f"exited early:\n{self.output()}")
            return None

        return wait_for(find, timeout, what="the broker line")

    def close(self) -> None:
        self._done.set()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for proc in self.ours():  # never leak into the next test, whatever failed
            with contextlib.suppress(psutil.Error):
                proc.kill()


def started_runs(client, config) -> list[dict]:
    return [e for e in events(client, config) if e["event"] == "start"]


def running_task(app, client, config, seconds: float, sup: Supervised):
    """Send a probe task and wait until a worker runs it."""
    result = app.send_task("tests.probe.slow", kwargs={"seconds": seconds})

    def running():
        if sup.proc.poll() is not None:
            raise AssertionError(f"the supervisor exited:\n{sup.output()}")
        return started_runs(client, config)

    wait_for(running, 120, interval=0.2, what="a worker to start the task")
    return result


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("command", ["up", "autoscale"])
@pytest.mark.timeout(300)
def test_a_stop_signal_lets_the_running_task_finish_and_leaves_no_orphan(fleet, command, sig):
    config = configure(fleet)
    sup = Supervised(fleet, command)
    try:
        app, client = fleet.app(), broker_client(config)
        result = running_task(app, client, config, TASK_S, sup)
        assert sup.workers(), sup.output()
        signalled = time.monotonic()
        sup.proc.send_signal(sig)
        code = sup.proc.wait(timeout=TASK_S + HEAVY_GRACE)
        exit_s = time.monotonic() - signalled
        orphans = sup.ours()
        value = result.get(timeout=10)
        runs = executions(client, config, result.id)
        report(Figures(case=f"{command}-{sig.name}-during-a-task", submitted=1,
                       completed=int(value["slept"] == TASK_S), lost=0, duplicated=runs - 1,
                       recovery_s=exit_s, extra={"orphans": len(orphans)}))
        out = sup.output()
        assert code == 0, out
        assert value["slept"] == TASK_S and runs == 1
        assert not orphans, [(p.pid, _cmdline(p)) for p in orphans]
        assert exit_s < TASK_S + 20, exit_s  # the task's rest, then a prompt exit
        assert f"stopping ({sig.name} received)" in out
        assert "Traceback" not in out
        if command == "up":
            assert out.strip().endswith("stopped.")
    finally:
        sup.close()


@pytest.mark.timeout(300)
def test_a_second_signal_kills_the_workers_now_and_their_task_comes_back(fleet):
    config = fleet.configure({**_overrides(), "broker": {"visibility_timeout": "8s",
                                                         "lease": {"interval": "2s"}}})
    sup = Supervised(fleet, "up")
    try:
        app, client = fleet.app(), broker_client(config)
        result = running_task(app, client, config, 40, sup)
        signalled = time.monotonic()
        sup.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping 1 worker(s) warm" in sup.output(), 30,
                 what="the warm stop to begin")
        sup.proc.send_signal(signal.SIGINT)
        code = sup.proc.wait(timeout=30)
        exit_s = time.monotonic() - signalled
        orphans = sup.ours()
        out = sup.output()
        assert code == 0, out
        assert "second signal: killing 1 worker(s) now" in out
        assert exit_s < 20, exit_s  # not the task's 40 s
        assert not orphans, [(p.pid, _cmdline(p)) for p in orphans]
        # acks_late: the killed task is still Redis's, and comes back to the next worker.
        back = time.monotonic()
        fleet.start_worker("heavy")
        value = result.get(timeout=120)
        runs = executions(client, config, result.id)
        report(Figures(case="up-second-signal-kills-now", submitted=1,
                       completed=int(value["slept"] == 40), lost=0, duplicated=0,
                       recovery_s=time.monotonic() - back,
                       extra={"orphans": len(orphans), "exit_s": round(exit_s, 1),
                              "runs": runs}))
        assert runs == 2  # once cut short by the kill, once to the end
    finally:
        sup.close()


@pytest.mark.parametrize("command", ["up", "autoscale"])
@pytest.mark.timeout(300)
def test_a_sigkilled_supervisors_workers_finish_their_task_and_stop_by_themselves(fleet,
                                                                                   command):
    config = configure(fleet)
    sup = Supervised(fleet, command)
    try:
        app, client = fleet.app(), broker_client(config)
        result = running_task(app, client, config, TASK_S, sup)
        before = sup.ours()
        assert sup.workers(), sup.output()
        killed = time.monotonic()
        sup.proc.kill()  # not reaped yet: the workers see a zombie parent first
        bound = TASK_S + 20
        wait_for(lambda: not sup.ours(), bound, interval=0.2,
                 what="every process of the killed supervisor to exit")
        gone_s = time.monotonic() - killed
        value = result.get(timeout=10)
        runs = executions(client, config, result.id)
        report(Figures(case=f"{command}-SIGKILL-during-a-task", submitted=1,
                       completed=int(value["slept"] == TASK_S), lost=0, duplicated=runs - 1,
                       recovery_s=gone_s, extra={"orphans": 0, "processes": len(before)}))
        assert value["slept"] == TASK_S and runs == 1  # finished warm, not killed
        assert gone_s >= 1  # the task was still running: they waited for it
        logs = "".join(p.read_text() for p in (sup.workdir / "logs").glob("heavy-*.log"))
        assert f"supervisor (pid {sup.pid}) is gone: stopping warm" in logs
    finally:
        sup.close()


@pytest.mark.timeout(400)
def test_a_second_fleet_up_stops_what_a_sigkilled_one_left_before_starting_a_worker(fleet):
    config = configure(fleet)
    work = fleet.tmp_path / "work"
    first = Supervised(fleet, "up", embedded=True, workdir=work)
    second = None
    try:
        url = first.broker_url()
        embedded = with_broker(config, url=url)
        app, client = create_app(embedded), broker_client(embedded)
        # Only the id: an AsyncResult left over Redis's end unsubscribes noisily at exit.
        task_id = running_task(app, client, embedded, 12, first).id
        assert any(_name(p) == "redis-server" for p in first.ours())
        assert any("fleet.keeper" in _cmdline(p) for p in first.ours())
        killed = time.monotonic()
        first.proc.kill()
        first.proc.wait()
        second = Supervised(fleet, "up", embedded=True, workdir=work)
        overlap = []

        def second_is_up():
            old, new = first.ours(), second.workers()
            old_workers = [p for p in old if "fleet.cli worker" in _cmdline(p)]
            if old_workers and new:
                overlap.append((old_workers, new))
            if second.proc.poll() is not None:
                raise AssertionError(f"the second fleet up exited:\n{second.output()}")
            return new and "the fleet is running" in second.output()

        wait_for(second_is_up, 120, interval=0.2, what="the second fleet up and its worker")
        recovery_s = time.monotonic() - killed
        left = first.ours()
        url2 = second.broker_url()
        app.close()
        embedded2 = with_broker(config, url=url2)
        app2, client2 = create_app(embedded2), broker_client(embedded2)
        value = app2.AsyncResult(task_id).get(timeout=10)  # kept in the AOF
        runs = executions(client2, embedded2, task_id)
        report(Figures(case="up-SIGKILL-then-up-again-on-its-workdir", submitted=1,
                       completed=int(value["slept"] == 12), lost=0, duplicated=runs - 1,
                       recovery_s=recovery_s,
                       extra={"orphans": len(left), "overlap": len(overlap)}))
        out = second.output()
        assert not overlap, "a new worker ran beside a stale one"
        assert not left, [(p.pid, _cmdline(p)) for p in left]
        assert f"an earlier run (pid {first.pid}) was killed and left 1 worker(s)" in out
        assert "stopping the embedded Redis of the earlier run" in out
        assert url2 == url  # the same port: a FLEET_BROKER_URL printed before still works
        assert value["slept"] == 12 and runs == 1
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(timeout=60) == 0, second.output()
        assert not second.ours()
        app2.close()
    finally:
        first.close()
        if second is not None:
            second.close()


@pytest.mark.timeout(300)
def test_ctrl_c_of_fleet_up_lets_a_task_longer_than_30s_finish_and_keeps_its_result(fleet):
    config = configure(fleet)
    sup = Supervised(fleet, "up", embedded=True)
    seconds = 35.0
    try:
        url = sup.broker_url()
        embedded = with_broker(config, url=url)
        app, client = create_app(embedded), broker_client(embedded)
        task_id = running_task(app, client, embedded, seconds, sup).id
        signalled = time.monotonic()
        sup.proc.send_signal(signal.SIGINT)
        code = sup.proc.wait(timeout=seconds + HEAVY_GRACE)
        exit_s = time.monotonic() - signalled
        orphans = sup.ours()
        app.close()
        # Everything is stopped: the result must be in the append-only file.
        with EmbeddedRedis(data_dir=sup.workdir / "redis") as server:
            again = with_broker(config, url=server.url)
            reader = create_app(again)
            value = reader.AsyncResult(task_id).get(timeout=10)
            runs = executions(broker_client(again), again, task_id)
            reader.close()
        report(Figures(case="up-ctrl-c-during-a-35s-task", submitted=1,
                       completed=int(value["slept"] == seconds), lost=0, duplicated=runs - 1,
                       recovery_s=exit_s, extra={"orphans": len(orphans)}))
        assert code == 0, sup.output()
        assert value["slept"] == seconds and runs == 1
        assert exit_s > 30 - 5  # it waited for the task, past the old 30 s cut-off
        assert not orphans, [(p.pid, _cmdline(p)) for p in orphans]
        assert "stopping 1 worker(s) warm (up to 75s" in sup.output()
    finally:
        sup.close()


@pytest.mark.timeout(300)
def test_fleet_up_restarts_a_killed_embedded_redis_and_no_queued_message_is_lost(fleet):
    config = configure(fleet, heavy_min=0, heavy_max=1)
    sup = Supervised(fleet, "up", embedded=True)
    sent = 20
    try:
        url = sup.broker_url()
        embedded = with_broker(config, url=url)
        app, client = create_app(embedded), broker_client(embedded)
        overrides.write(client, embedded, "heavy", overrides.Override(paused=True))
        ids = [app.send_task("tests.probe.slow", kwargs={"seconds": 0.1}).id
               for _ in range(sent)]
        app.close()

        def depth() -> int:
            return sum(client.llen(k) for k in list_keys(embedded, "heavy"))

        assert depth() == sent
        [server] = [p for p in sup.ours() if _name(p) == "redis-server"]
        killed = time.monotonic()
        server.kill()
        wait_for(lambda: "restarted the embedded Redis" in sup.output(), 30,
                 what="the supervisor to restart Redis")

        def answering():
            try:
                return client.ping()
            except Exception:
                return False

        wait_for(answering, 30, what="Redis to answer again")
        recovery_s = time.monotonic() - killed
        kept = depth()
        overrides.write(client, embedded, "heavy", overrides.Override())
        reader = create_app(embedded)  # the sender's result consumer saw Redis go away
        values = [reader.AsyncResult(i).get(timeout=120) for i in ids]
        runs = [executions(client, embedded, i) for i in ids]
        reader.close()
        report(Figures(case="up-embedded-redis-SIGKILLed", submitted=sent,
                       completed=len(values), lost=sent - kept,
                       duplicated=sum(n - 1 for n in runs), recovery_s=recovery_s))
        out = sup.output()
        assert "the embedded Redis exited (killed by SIGKILL)" in out
        assert kept == sent
        assert runs == [1] * sent
        assert recovery_s < 15
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(timeout=60) == 0, sup.output()
        assert not sup.ours()
    finally:
        sup.close()


@pytest.mark.timeout(1800)
def test_the_readme_demo_on_an_embedded_redis_completes_five_times_in_a_row(fleet):
    """`fleet up --demo --exit-when-done`, the README's main command, on one workdir (so
    each run also restarts an embedded Redis on the last run's append-only file). Five,
    not ten: each run is about 13 s of CI's 40 minutes."""
    runs, completions, durations, leftovers = 5, 0, [], 0
    work = fleet.tmp_path / "work"
    for _ in range(runs):
        sup = Supervised(fleet, "up", embedded=True, workdir=work,
                         extra=("--demo", "--exit-when-done", "--records", "400"))
        try:
            started = time.monotonic()
            code = sup.proc.wait(timeout=300)
            durations.append(time.monotonic() - started)
            out = sup.output()
            leftovers += len(sup.ours())
            if code == 0 and out.count(" succeeded: result at file://") == 2:
                completions += 1
            else:
                print(out)
        finally:
            sup.close()
    report(Figures(case="readme-demo-5-runs", submitted=2 * runs, completed=2 * completions,
                   lost=2 * (runs - completions), recovery_s=max(durations),
                   extra={"orphans": leftovers,
                          "mean_run_s": round(sum(durations) / len(durations), 1)}))
    assert completions == runs
    assert leftovers == 0


def test_named_by_finds_a_process_by_its_supervisor_variable(fleet):
    """The orphan count's own check: a process naming a supervisor in its environment
    is found even when it is nobody's child we know of."""
    fake = 999_999_999
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            env={**os.environ, "FLEET_SUPERVISOR": f"{fake}:1.0:5"})
    try:
        wait_for(lambda: proc.pid in {p.pid for p in named_by(fake)}, 5,
                 what="the process to be found")
    finally:
        proc.kill()
        proc.wait()
