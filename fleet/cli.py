"""The ``fleet`` command line (click).

Every FleetError becomes one line on stderr and its exit code; a traceback means a bug.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from fleet.config import FleetConfig, load_config
from fleet.errors import ConfigError, FleetError, Problem

pass_config_path = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None,
    help="queues.yaml to use (default: $FLEET_CONFIG, ./queues.yaml, the shipped one).")


def _load(config_path: str | None) -> FleetConfig:
    return load_config(config_path)


def _app(config: FleetConfig, queue: str | None = None):
    from fleet.factory import create_app

    return create_app(config, queue)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fleet")
def cli() -> None:
    """A resource-aware batch-processing worker fleet on Celery and Redis."""


@cli.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False))
def validate(file: str | None) -> None:
    """Check FILE (default: the active queues.yaml); exit 2 listing its problems (the
    first 20, then how many more)."""
    from fleet.imports import import_problems

    config = load_config(file)
    if problems := import_problems(config):
        raise ConfigError(problems)
    click.echo(f"{config.source}: OK ({len(config.queues)} queues: "
               f"{', '.join(config.queues)})")


@cli.command()
@click.option("--queue", "-q", required=True, help="The queue (resource class) to serve.")
@click.option("--print-config", is_flag=True, help="Show the worker's settings and exit.")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), default=None,
              help="Pool processes or threads (default: the queue's concurrency).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--hostname", "-n", default=None, help="Node name (default: QUEUE@%h).")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- CELERY_ARGS]")
@pass_config_path
def worker(queue: str, print_config: bool, concurrency: int | None, loglevel: str,
           hostname: str | None, celery_args: tuple[str, ...], config_path: str | None) -> None:
    """Start a Celery worker with exactly QUEUE's settings from queues.yaml.

    Anything after -- goes to `celery worker` as it is (for example
    -- --max-tasks-per-child 100 --without-heartbeat), except what queues.yaml or
    these options decide (queue, app, pool, concurrency, hostname, log level)."""
    import dataclasses
    import os

    from fleet.watchdog import ENV_SUPERVISOR, SupervisorRef
    from fleet.worker import celery_argv, describe, passthrough_problem, worker_settings

    if problem := passthrough_problem(celery_args):
        raise click.BadParameter(problem, param_hint="CELERY_ARGS")
    config = _load(config_path)
    declared = worker_settings(config, queue)
    settings = declared
    if concurrency is not None:
        settings = dataclasses.replace(declared, concurrency=concurrency)
    argv = [*celery_argv(settings, loglevel=loglevel, hostname=hostname), *celery_args]
    if print_config:
        width = max(len(k) for k, _ in describe(settings))
        click.echo(f"# worker for queue {queue!r} ({config.source})")
        for name, value in describe(settings):
            note = (f"  (--concurrency; queues.yaml: {declared.concurrency})"
                    if name == "concurrency" and settings != declared else "")
            click.echo(f"{name:<{width}}  {value}{note}")
        if celery_args:
            click.echo(f"{'passed through':<{width}}  {' '.join(celery_args)}")
        click.echo(f"\n# equivalent: celery -A fleet.app {' '.join(argv)}")
        return
    from fleet.imports import import_modules

    import_modules(config)  # else Celery's loader raises it as a traceback
    app = _app(config, queue)
    # Set by fleet up / fleet autoscale: the worker stops warm when they are gone.
    if os.environ.get(ENV_SUPERVISOR):
        try:
            app.fleet_supervisor = SupervisorRef.parse(os.environ[ENV_SUPERVISOR])
        except ValueError as exc:
            raise ConfigError([Problem("environment", ENV_SUPERVISOR, str(exc))]) from None
    app.worker_main(argv=argv)


@cli.command()
@click.argument("task")
@click.option("--input", "-i", "input_spec", required=True,
              help="A .jsonl/.csv path, an s3://bucket/key URL, or - for JSON lines on stdin.")
@click.option("--chunk-size", "-c", type=int, default=None,
              help="Records per chunk (default: jobs.default_chunk_size).")
@click.option("--aggregate", "-a", default=None, help="Task that folds the chunk results.")
@click.option("--kwarg", "-k", "kwargs", multiple=True, metavar="KEY=VALUE",
              help="Keyword argument for TASK: VALUE is JSON if it parses (64, true, "
                   "[\"a\"]), else a string; KEY:=JSON is always JSON. Repeatable.")
@click.option("--aggregate-kwarg", "aggregate_kwargs", multiple=True, metavar="KEY=VALUE",
              help="Keyword argument for the aggregate task, as --kwarg.")
@click.option("--watch", "-w", is_flag=True, help="Show a live progress bar until the job ends.")
@pass_config_path
def submit(task: str, input_spec: str, chunk_size: int | None, aggregate: str | None,
           kwargs: tuple[str, ...], aggregate_kwargs: tuple[str, ...], watch: bool,
           config_path: str | None) -> None:
    """Split an input into chunks and run TASK over each, as one batch job."""
    from fleet.jobs.submit import JobSpec
    from fleet.jobs.submit import submit as submit_job

    config = _load(config_path)
    app = _app(config)
    spec = JobSpec(
        task=task, input=input_spec,
        chunk_size=config.jobs.default_chunk_size if chunk_size is None else chunk_size,
        aggregate=aggregate, kwargs=_parse_kwargs(kwargs, "--kwarg"),
        aggregate_kwargs=_parse_kwargs(aggregate_kwargs, "--aggregate-kwarg"))
    started = time.perf_counter()
    done = submit_job(app, spec)
    click.echo(f"job {done.job_id}: {done.records} records in {done.chunks} chunks of "
               f"{spec.chunk_size}, submitted in {time.perf_counter() - started:.2f}s")
    click.echo(f"result will be at {done.result_url}")
    if watch:
        _watch(config, done.job_id)


def _parse_kwargs(pairs: tuple[str, ...], option: str) -> dict:
    from fleet.jobs.arguments import ArgumentError, parse_kwargs

    try:
        return parse_kwargs(pairs)
    except ArgumentError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


@cli.group()
def jobs() -> None:
    """List, inspect, watch and retry batch jobs."""


@jobs.command("list")
@click.option("--limit", "-n", default=20, show_default=True)
@pass_config_path
def jobs_list(limit: int, config_path: str | None) -> None:
    """The most recent jobs."""
    from rich.console import Console
    from rich.table import Table

    from fleet.jobs.state import JobStore

    statuses = JobStore(_load(config_path)).recent(limit)
    tty = sys.stdout.isatty()
    # Piped into a script: no box, no wrapping, one job per line.
    table = Table(box=None if not tty else Table().box, pad_edge=False)
    for column in ("job", "task", "state", "done", "failed", "total", "created"):
        table.add_column(column, no_wrap=True)
    for s in statuses:
        table.add_row(s.id, s.task, s.state, str(s.done), str(s.failed), str(s.total),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created)))
    Console(width=None if tty else 200).print(table)


@jobs.command("status")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_config_path
def jobs_status(job_id: str, as_json: bool, config_path: str | None) -> None:
    """One job's progress, failures, where its pending chunks are, its result."""
    from fleet.jobs.state import JobStore

    config = _load(config_path)
    store = JobStore(config)
    status = store.status(job_id)
    failed = store.failed_chunks(job_id, limit=200) if status.failed else []
    where, where_error = _whereabouts(config, store, status)
    if as_json:
        out = {k: getattr(status, k) for k in (
            "id", "task", "aggregate", "state", "total", "done", "failed", "pending",
            "records", "created", "finished", "input", "result_url", "error",
            "reconciled", "dead")}
        out["failed_chunks"] = [{"index": c.index, "error": c.error, "kind": c.kind}
                                for c in failed]
        out["pending_chunks"] = None if where is None else {
            "waiting": where.waiting, "live": where.live,
            "orphaned": [{"index": i, "back_in": round(b, 1)} for i, b in where.orphaned],
            "lost": where.lost}
        if where_error:
            out["pending_error"] = where_error
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"job       {status.id}\ntask      {status.task}"
               + (f" -> {status.aggregate}" if status.aggregate else "")
               + f"\nstate     {status.state}\ninput     {status.input} ({status.records} "
               f"records)\nchunks    {status.done} done, {status.failed} failed, "
               f"{status.pending} pending, of {status.total}")
    if where is not None:
        parts = [f"{where.waiting} waiting in a queue", f"{where.live} running or held "
                 "by a live worker"]
        if where.orphaned:
            back = max(b for _, b in where.orphaned)
            parts.append(f"{len(where.orphaned)} held by a worker that stopped (back in "
                         f"the queue within {back:.0f}s)")
        if where.lost:
            parts.append(f"{len(where.lost)} lost in flight (the reconciler sends them "
                         "again)")
        click.echo(f"pending   {', '.join(parts)}")
    elif where_error:
        click.echo(f"pending   {where_error}")
    if status.reconciled:
        click.echo(f"healed    {status.reconciled} chunks or steps sent again by the "
                   "reconciler after they were lost in flight")
    if status.dead:
        click.echo(f"dead      {status.dead} chunks dead-lettered (their worker kept "
                   "dying; see fleet dead list)")
    if status.result_url:
        click.echo(f"result    {status.result_url}")
    elif status.state == "failed":
        click.echo("result    none: the job failed (fleet jobs retry re-runs what failed)")
    else:
        click.echo("result    not yet: written when the job succeeds")
    if status.error:
        click.echo(f"error     {status.error}")
    for chunk in failed[:20]:
        click.echo(f"  chunk {chunk.index}: {chunk.error}")
    if status.failed > 20:
        click.echo(f"  ... and {status.failed - 20} more")


def _whereabouts(config: FleetConfig, store, status):
    """Where the pending chunks are (Redis and the workers' reports), or why unknown."""
    import redis

    from fleet.jobs.inflight import locate
    from fleet.keys import broker_client

    if status.is_terminal or not status.pending:
        return None, None
    def pending() -> list[int]:
        return [idx for idx, _, _ in store.pending_chunks(status.id)]

    try:
        return locate(config, broker_client(config), status.id, pending), None
    except (redis.RedisError, OSError) as exc:
        return None, f"{status.pending} (Redis is not answering, so where they are is " \
                     f"unknown: {exc})"


@jobs.command("watch")
@click.argument("job_id")
@pass_config_path
def jobs_watch(job_id: str, config_path: str | None) -> None:
    """A live progress bar until JOB_ID ends; exit 1 if it failed."""
    _watch(_load(config_path), job_id)


@jobs.command("retry")
@click.argument("job_id")
@pass_config_path
def jobs_retry(job_id: str, config_path: str | None) -> None:
    """Re-run only the failed chunks of JOB_ID, its chunks lost in flight (a broker
    restart can lose a message a worker was taking), or its failed aggregate step."""
    from fleet.jobs.submit import retry_failed

    config = _load(config_path)
    retried = _redis_call(lambda: retry_failed(_app(config), job_id))
    if retried.aggregate:
        click.echo(f"job {job_id}: re-running the aggregate step")
    elif retried.lost:
        click.echo(f"job {job_id}: re-sent {retried.lost} chunks lost in flight or "
                   "never sent")
    else:
        cleared = (f" and removed their {retried.dead_letters} dead-letter entries "
                   "(requeued as well, they would run twice)" if retried.dead_letters else "")
        click.echo(f"job {job_id}: re-sent {retried.chunks} failed chunks{cleared}")


def _watch(config: FleetConfig, job_id: str) -> None:
    from fleet.jobs.watch import watch

    status = watch(config, [job_id])[0]
    if status.state == "failed":
        raise FleetError(f"job {job_id} failed: {status.error or f'{status.failed} chunks failed'}"
                         f" (see: fleet jobs status {job_id}; fleet jobs retry {job_id})")
    click.echo(f"result: {status.result_url}")


def _redis_call(call):
    import redis

    from fleet.errors import BrokerUnavailableError

    try:
        return call()
    except redis.ConnectionError as exc:
        raise BrokerUnavailableError(f"Redis is not answering: {exc}") from None


@cli.group()
def dead() -> None:
    """Messages kept instead of delivered again (poison, malformed): list, show, requeue,
    purge."""


@dead.command("list")
@click.argument("queue", required=False)
@click.option("--limit", "-n", default=50, show_default=True, help="Entries per queue.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_config_path
def dead_list(queue: str | None, limit: int, as_json: bool, config_path: str | None) -> None:
    """Dead-letter entries of QUEUE (default: every queue), newest first."""
    from rich.console import Console
    from rich.table import Table

    from fleet.deadletter import DeadLetterList

    config = _load(config_path)
    queues = _queues_named(config, queue)
    dead_letters = DeadLetterList.for_config(config)
    entries = _redis_call(lambda: [e for q in queues for e in dead_letters.entries(q, limit)])
    if as_json:
        click.echo(json.dumps([_entry_summary(e) for e in entries], indent=2))
        return
    if not entries:
        click.echo(f"no dead letters in {', '.join(queues)}")
        return
    tty = sys.stdout.isatty()
    table = Table(box=None if not tty else Table().box, pad_edge=False)
    for column in ("id", "queue", "reason", "task", "task id", "deliveries", "at", "detail"):
        table.add_column(column, no_wrap=column != "detail")
    for e in entries:
        table.add_row(e.id, e.queue, e.reason, e.task or "-", e.task_id or "-",
                      str(e.deliveries), time.strftime("%Y-%m-%d %H:%M:%S",
                                                       time.localtime(e.at)), e.detail)
    Console(width=None if tty else 240).print(table)


def _queues_named(config: FleetConfig, queue: str | None) -> list[str]:
    if queue is None:
        return list(config.queues)
    config.queue(queue)  # a ConfigError (exit 2) for a queue queues.yaml does not define
    return [queue]


def _entry_summary(entry) -> dict:
    return {k: v for k, v in entry.__dict__.items() if k not in ("message", "raw")}


@dead.command("show")
@click.argument("entry_id")
@click.option("--json", "as_json", is_flag=True, help="The whole entry as stored.")
@pass_config_path
def dead_show(entry_id: str, as_json: bool, config_path: str | None) -> None:
    """One entry: why, when, where, and the message itself."""
    from fleet.deadletter import DeadLetterList, decoded_body

    config = _load(config_path)
    _, entry = _redis_call(lambda: DeadLetterList.for_config(config).find(
        entry_id, list(config.queues)))
    if as_json:
        click.echo(json.dumps(entry.__dict__, indent=2))
        return
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.at))
    click.echo(f"entry       {entry.id}\nqueue       {entry.queue}\nreason      "
               f"{entry.reason}: {entry.detail}\ntask        {entry.task or '-'}"
               f"[{entry.task_id or '-'}]\ndeliveries  {entry.deliveries}\nat          "
               f"{when} on {entry.worker or '-'}\nrequeue     "
               f"{entry.requeue_problem or f'fleet dead requeue {entry.id}'}")
    body = decoded_body(entry.message)
    if body is not None:
        click.echo(f"arguments   {json.dumps(body, default=repr)}")
    if entry.message is not None:
        click.echo("message     " + json.dumps(entry.message, indent=2, default=repr))
    if entry.raw is not None:
        click.echo(f"raw         {entry.raw}")


@dead.command("requeue")
@click.argument("target", required=False, metavar="ID | --all [QUEUE]")
@click.option("--all", "every", is_flag=True,
              help="Every entry that is a task message (of QUEUE, or of every queue).")
@pass_config_path
def dead_requeue(target: str | None, every: bool, config_path: str | None) -> None:
    """Send an entry's original message again (its delivery count starts over)."""
    from fleet.deadletter import requeue, requeue_all

    config = _load(config_path)
    if every:
        done, left = _redis_call(lambda: requeue_all(config, target))
        for entry in done:
            click.echo(f"requeued {entry.id}: {entry.task}[{entry.task_id}] onto {entry.queue}")
        click.echo(f"{len(done)} requeued" + (f"; {len(left)} left (not task messages: "
                                              f"{', '.join(e.id for e in left)})"
                                              if left else ""))
        return
    if not target:
        raise click.UsageError("give an entry ID, or --all [QUEUE]")
    entry = _redis_call(lambda: requeue(config, target))
    click.echo(f"requeued {entry.id}: {entry.task}[{entry.task_id}] onto {entry.queue}")


@dead.command("purge")
@click.argument("queue", required=False)
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@pass_config_path
def dead_purge(queue: str | None, yes: bool, config_path: str | None) -> None:
    """Delete the dead-letter entries of QUEUE (default: every queue), for good."""
    from fleet.deadletter import DeadLetterList

    config = _load(config_path)
    queues = _queues_named(config, queue)
    if not yes:
        click.confirm(f"Delete every dead-letter entry of {', '.join(queues)}?", abort=True)
    dead_letters = DeadLetterList.for_config(config)
    removed = _redis_call(lambda: {q: dead_letters.purge(q) for q in queues})
    click.echo(f"purged {sum(removed.values())} entries ("
               + ", ".join(f"{q}: {n}" for q, n in removed.items()) + ")")


@cli.group()
def render() -> None:
    """Generate Kubernetes manifests from queues.yaml."""


@render.command("k8s")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="File to write (default: stdout).")
@pass_config_path
def render_k8s(out: str | None, config_path: str | None) -> None:
    """One worker Deployment per queue (what k8s/base/workers.yaml holds)."""
    from fleet.render.k8s import render_workers
    from fleet.render.yamlout import dump_all

    _emit(dump_all(render_workers(_load(config_path))), out)


@render.command("keda")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="File to write (default: stdout).")
@pass_config_path
def render_keda(out: str | None, config_path: str | None) -> None:
    """KEDA ScaledObjects for teams that already run KEDA (every Redis list of a queue)."""
    from fleet.render.keda import render_scaled_objects
    from fleet.render.yamlout import dump_all

    _emit(dump_all(render_scaled_objects(_load(config_path))), out)


@render.command("sync")
@click.option("--k8s-dir", type=click.Path(file_okay=False), default="k8s", show_default=True)
@pass_config_path
def render_sync(k8s_dir: str, config_path: str | None) -> None:
    """After editing queues.yaml: refresh everything k8s/ derives from it (the base's
    copy of queues.yaml, its worker Deployments, the KEDA overlay's ScaledObjects)."""
    from fleet.render.k8s import render_workers
    from fleet.render.keda import render_scaled_objects
    from fleet.render.yamlout import dump_all

    config = _load(config_path)
    root = Path(k8s_dir)
    _emit(Path(config.source).read_text(), str(root / "base" / "queues.yaml"))
    _emit(dump_all(render_workers(config)), str(root / "base" / "workers.yaml"))
    _emit(dump_all(render_scaled_objects(config)),
          str(root / "overlays" / "keda" / "scaledobjects.yaml"))


def _emit(text: str, out: str | None) -> None:
    if out is None:
        click.echo(text, nl=False)
        return
    Path(out).write_text(text)
    click.echo(f"wrote {out}", err=True)


@cli.command()
@click.option("--demo", is_flag=True, help="Submit a demo aggregation job and a heavy job.")
@click.option("--records", default=50_000, show_default=True, help="Size of the demo input.")
@click.option("--exit-when-done", is_flag=True, help="Stop the fleet once the demo jobs end.")
@click.option("--workdir", type=click.Path(file_okay=False), default=".fleet", show_default=True)
@click.option("--dashboard-port", default=5555, show_default=True, type=int,
              help="Port of the dashboard on 127.0.0.1 (0: no dashboard).")
@click.option("--backend", type=click.Choice(["local", "docker"]), default="local",
              show_default=True,
              help="Workers as processes here, or as containers of "
                   "autoscaler.docker.image on this machine's Docker engine.")
@pass_config_path
def up(demo: bool, records: int, exit_when_done: bool, workdir: str, dashboard_port: int,
       backend: str, config_path: str | None) -> None:
    """The whole fleet here: Redis (embedded if none), autoscaled workers, the dashboard;
    Ctrl-C stops."""
    from fleet.up import run_up

    run_up(_load(config_path), Path(workdir), demo=demo, records=records,
           exit_when_done=exit_when_done, dashboard_port=dashboard_port or None,
           backend=backend)


@cli.command()
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on (anything but loopback needs authentication).")
@click.option("--port", default=5555, show_default=True, type=int,
              help="TCP port (0: a free one, printed once it is bound).")
@click.option("--url-prefix", default="", help="Serve under this path (behind an ingress).")
@click.option("--database", default=None,
              help="SQLAlchemy URL (default: dashboard.database from queues.yaml).")
@click.option("--admin-token-env", default=None, metavar="VAR",
              help="Also accept the API token in $VAR with the admin role (for a "
                   "Kubernetes Secret; the dashboard refuses to start if VAR is unset).")
@click.option("--insecure-no-auth", is_flag=True,
              help="Serve without authentication on a non-loopback address.")
@pass_config_path
def dashboard(address: str, port: int, url_prefix: str, database: str | None,
              admin_token_env: str | None, insecure_no_auth: bool,
              config_path: str | None) -> None:
    """The dashboard: workers, queues, tasks, jobs, autoscaler; REST API and /metrics.

    SIGHUP re-reads the users, tokens and single sign-on settings of queues.yaml (and
    their secrets from the environment): a user removed or demoted there loses access
    at their next request, without a restart."""
    import signal

    from fleet.config import DashboardToken
    from fleet.dashboard import server_module

    DashboardServer = server_module().DashboardServer

    def load():
        config = _load(config_path)
        if admin_token_env:
            board = config.dashboard
            token = DashboardToken(name="admin-token", role="admin", token_env=admin_token_env)
            config = config.model_copy(update={"dashboard": board.model_copy(
                update={"tokens": [*board.tokens, token]})})
        return config

    from autoscale.sim import whatif  # the "what if" view's simulator and tuner

    server = DashboardServer(load(), address=address, port=port,
                             url_prefix=url_prefix, database=database,
                             insecure=insecure_no_auth, log_level="info",
                             whatif=whatif.build())

    def reload(_signum, _frame):
        try:
            server.svc.auth.load(load().dashboard)
        except FleetError as exc:
            click.echo(f"dashboard: not reloaded, the users it had stay: {exc}", err=True)
            return
        click.echo("dashboard: users, tokens and single sign-on re-read", err=True)

    signal.signal(signal.SIGHUP, reload)
    click.echo(f"dashboard on {server.url} (API spec at {server.url}docs)")
    server.serve_forever()


@cli.command(hidden=True)
@click.option("--records", default=50_000, show_default=True)
@click.option("--exit-when-done", is_flag=True)
@click.option("--workdir", type=click.Path(file_okay=False), default=".fleet")
@pass_config_path
def demo(records: int, exit_when_done: bool, workdir: str, config_path: str | None) -> None:
    """Same as `fleet up --demo`."""
    from fleet.up import run_up

    run_up(_load(config_path), Path(workdir), demo=True, records=records,
           exit_when_done=exit_when_done)


@cli.command()
@click.option("--backend", default=None, metavar="NAME",
              help="Where replicas live: local, kubernetes, stub or a plug-in's "
                   "(default: autoscaler.backend in queues.yaml).")
@click.option("--interval", type=float, default=None, help="Seconds between polls.")
@click.option("--once", is_flag=True, help="Poll and decide once, print, exit.")
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
@click.option("--workdir", type=click.Path(file_okay=False), default=".fleet",
              show_default=True, help="Worker logs of the local backend.")
@pass_config_path
def autoscale(backend: str | None, interval: float | None, once: bool, dry_run: bool,
              workdir: str, config_path: str | None) -> None:
    """The autoscaler loop: queue metrics -> policy -> backend. SIGTERM, SIGINT or
    SIGHUP stop it; local workers stop warm first."""
    import os

    from autoscale.backends.base import BackendContext
    from autoscale.build import backend_plugin, build_autoscaler
    from autoscale.service import claim_workdir, run_supervised
    from fleet.supervision import StopSignals

    config = _load(config_path)
    chosen = backend or config.autoscaler.backend
    plugin = backend_plugin(chosen)
    # Once, with workers that live here, would start them only to stop them on exit:
    # decide, don't act.
    dry_run = dry_run or (once and plugin.workers_live_here)
    with StopSignals() as signals:
        ctx = BackendContext(
            config, dict(os.environ), Path(workdir), dry_run=dry_run,
            claim=lambda: claim_workdir(Path(workdir), signals, click.echo,
                                        "fleet autoscale"))
        scaler = build_autoscaler(ctx, plugin, report=click.echo)
        target, registry = scaler.backend, ctx.registry
        if once:
            try:
                for d in _redis_call(scaler.run_once):
                    click.echo(f"{d.queue}: {d.current} -> {d.desired} ({d.reason})")
            finally:
                target.close()
            return
        click.echo(f"autoscaler: {chosen} backend, every "
                   f"{interval or config.autoscaler.interval:g}s"
                   + (" (dry run)" if dry_run else ""))
        units = []
        if config.jobs.reconciler.enabled and not dry_run:
            # Beside the loop, wherever the autoscaler runs (on Kubernetes: its pod).
            from autoscale.reconcile import Reconciler, supervised_reconciler

            units.append(supervised_reconciler(Reconciler(
                config, _app(config), report=lambda line: click.echo(f"reconciler: {line}"))))
        run_supervised(scaler, signals, click.echo, interval, registry, units)


def _plot_files(ctx, param, values: tuple[str, ...]) -> tuple[str, ...]:
    """A usage error before anything runs for a plot file of no known format."""
    if values:
        from autoscale.sim.plot import PlotError, format_of  # matplotlib only when drawn

        for value in values:
            try:
                format_of(value)
            except PlotError as exc:
                raise click.BadParameter(str(exc)) from None
    return values


@cli.command()
@click.argument("trace", type=click.Path(dir_okay=False))
@click.option("--startup", default="local", show_default=True, metavar="KIND|SECONDS",
              help="A new replica's start-up delay: local, container, kubernetes or seconds.")
@click.option("--startup-jitter", type=click.FloatRange(0, 1), default=0.0,
              help="Each start-up delay varies by up to this fraction (drawn with --seed).")
@click.option("--startup-cores", type=click.IntRange(min=1), default=None, metavar="N",
              help="Replicas starting at once share N cores (local workers on one "
                   "machine); default: each starts in its own time (pods on many nodes).")
@click.option("--shutdown", type=click.FloatRange(min=0, max=86_400), default=2.0,
              show_default=True, metavar="SECONDS",
              help="A stopped replica's seconds from its last task to its exit (costed).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--compare", "baselines", default=None, metavar="NAME[,NAME]",
              help="Also run the trace through baselines, side by side with ratios "
                   "(baseline / fleet): keda (KEDA's Redis list scaler with the HPA's "
                   "defaults), fixed (a fixed-size fleet; docs/tuning.md, \"Baselines\").")
@click.option("--fixed-replicas", default=None, metavar="N|QUEUE=N,...",
              help="The fixed fleet's replicas (default per queue: the most the fleet's "
                   "policy ran it at in the same simulation).")
@click.option("--plot", "plots", multiple=True, metavar="FILE", callback=_plot_files,
              help="Draw backlog, replicas and wait per queue over time into FILE "
                   "(.png or .svg; repeatable), for the fleet's policy. Needs fleet[tune].")
@pass_config_path
def simulate(trace: str, startup: str, startup_jitter: float, startup_cores: int | None,
             shutdown: float, seed: int, as_json: bool, baselines: str | None,
             fixed_replicas: str | None, plots: tuple[str, ...],
             config_path: str | None) -> None:
    """Replay a trace against queues.yaml's autoscaling (the real policy, simulated
    replicas): worker-seconds, waits, backlog, SLO violations and scale events.
    --compare keda,fixed runs the same trace under baselines too."""
    from autoscale.sim import startup_delay
    from autoscale.sim.baselines import BASELINES
    from autoscale.sim.compare import compare, parse_fixed
    from autoscale.sim.engine import Simulation
    from autoscale.sim.tracefile import tasks_in_send_order
    from fleet.trace.io import read_trace

    if plots:
        from autoscale.sim import plot

        plot.require()  # before a long run, not after it
    config = _load(config_path)
    delay = startup_delay(startup)
    names: list[str] = []
    if baselines is not None:
        names = [n.strip() for n in baselines.split(",") if n.strip()]
        bad = [n for n in names if n not in BASELINES] or ([] if names else [baselines])
        if bad:
            raise click.BadParameter(f"unknown baseline {bad[0]!r}: expected one or more "
                                     f"of {', '.join(BASELINES)}", param_hint="--compare")
        names = list(dict.fromkeys(names))
    if fixed_replicas is not None and "fixed" not in names:
        raise click.BadParameter("sizes the fixed baseline: give --compare fixed too",
                                 param_hint="--fixed-replicas")
    try:
        fixed_all, fixed = parse_fixed(fixed_replicas, list(config.queues))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fixed-replicas") from None
    header, records = read_trace(trace)
    tasks = tasks_in_send_order(records)
    began = time.monotonic()
    options = {"startup": delay, "startup_jitter": startup_jitter,
               "startup_cores": startup_cores, "shutdown": shutdown, "seed": seed}
    sim = Simulation(header, tasks, config, record=bool(plots), **options)
    report = sim.run()
    compared = (compare(header, tasks, config, names, fixed_all=fixed_all, fixed=fixed,
                        fleet=report, **options) if names else None)
    wall = time.monotonic() - began
    if plots:
        active = [n for n, q in report.queues.items() if q.tasks]
        fig = plot.figure(sim.series, config, duration=report.simulated, active=active,
                          title=f"fleet simulate {Path(trace).name} (start-up {delay:g}s)")
        plot.save(fig, plots)
    if as_json:
        out = {**report.as_dict(), "startup": delay, "shutdown": shutdown, "seed": seed}
        if compared is not None:
            out["compare"] = compared.as_dict()
        click.echo(json.dumps(out))
        return
    if compared is not None:
        _print_comparison(compared)
        click.echo(f"simulated {report.simulated / 3600:.1f}h x {1 + len(names)} in "
                   f"{wall:.1f}s (start-up {delay:g}s; ratios are baseline / fleet"
                   + (f"; fixed replicas {_replica_list(compared.fixed)}" if compared.fixed
                      else "") + ")")
        return
    from rich.console import Console
    from rich.table import Table

    tty = sys.stdout.isatty()
    table = Table(box=None if not tty else Table().box, pad_edge=False)
    columns = ("queue", "tasks", "worker-h", "wait p50", "p95", "p99", "max backlog",
               "SLO viol. s", "scale events", "flaps", "max replicas")
    for column in columns:
        table.add_column(column, no_wrap=True, justify="left" if column == "queue" else "right")
    for q in [*report.queues.values(), report.total]:
        w = q.waits
        table.add_row(q.name, f"{q.tasks:,}", f"{q.worker_seconds / 3600:,.1f}",
                      *(f"{w.quantile(p):.1f}s" for p in (0.5, 0.95, 0.99)),
                      f"{q.max_backlog:,}", f"{q.slo_violation_seconds:,.0f}",
                      str(q.scale_events), str(q.flaps), str(q.max_replicas),
                      end_section=q is not report.total and q.name == list(report.queues)[-1])
    Console(width=None if tty else 200).print(table)
    click.echo(f"simulated {report.simulated / 3600:.1f}h in {wall:.1f}s ({report.polls:,} "
               f"polls, start-up {delay:g}s" + (f", {report.skipped:,} tasks without a "
                                               "service time skipped" if report.skipped else "")
               + ")")
    for path in plots:
        click.echo(f"plot: {path}")


def _replica_list(sizes: dict[str, int]) -> str:
    return ",".join(f"{q}={n}" for q, n in sizes.items())


def _print_comparison(compared) -> None:
    """Per queue (those any run used) and in total, the fleet's row and each
    baseline's, every figure of a baseline with its ratio to the fleet's."""
    from rich.console import Console
    from rich.table import Table

    from autoscale.sim.compare import ratio

    tty = sys.stdout.isatty()
    table = Table(box=None if not tty else Table().box, pad_edge=False)
    columns = ("queue", "policy", "worker-h", "wait p50", "p95", "p99", "max backlog",
               "SLO viol. s", "scale events", "max replicas")
    for column in columns:
        table.add_column(column, no_wrap=True,
                         justify="left" if column in ("queue", "policy") else "right")
    runs = [("fleet", compared.fleet), *compared.baselines.items()]
    # A queue no run used (no task, no replica) is a row of zeros: left out.
    names = [n for n in compared.fleet.queues
             if any(r.queues[n].tasks or r.queues[n].worker_seconds for _, r in runs)]
    names.append("total")

    def figures(q):
        w = q.waits
        return [(q.worker_seconds / 3600, "{:,.1f}"), *((w.quantile(p), "{:.1f}s")
                for p in (0.5, 0.95, 0.99)), (q.max_backlog, "{:,}"),
                (q.slo_violation_seconds, "{:,.0f}"), (q.scale_events, "{}")]

    for i, name in enumerate(names):
        base = None
        for policy, report in runs:
            q = report.total if name == "total" else report.queues[name]
            cells = []
            for j, (value, fmt) in enumerate(figures(q)):
                cell = fmt.format(value)
                if base is not None:
                    r = ratio(value, base[j][0])
                    cell += " (-)" if r is None else f" ({r:.2f}x)"
                cells.append(cell)
            if base is None:
                base = figures(q)
            table.add_row(name if policy == "fleet" else "", policy, *cells,
                          str(q.max_replicas),
                          end_section=policy == runs[-1][0] and i < len(names) - 1)
    Console(width=None if tty else 240).print(table)


@cli.command()
@click.argument("trace", type=click.Path(dir_okay=False))
@click.option("--slo-wait-p95", "slo", default=None, metavar="DURATION|QUEUE=DURATION,...",
              help="The SLO: wait p95 at most this on every queue (30s), or per queue "
                   "(default=10s,heavy=2m). Default: each queue's autoscaling.target_wait.")
@click.option("--trials", type=click.IntRange(min=1), default=60, show_default=True,
              help="Simulations the search runs (each a replay of the whole trace).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the sampler and the simulation: the same seed, the same result.")
@click.option("--startup", default="local", show_default=True, metavar="KIND|SECONDS",
              help="A new replica's start-up delay: local, container, kubernetes or seconds.")
@click.option("--progress", "show_progress", is_flag=True,
              help="A progress bar on stderr.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="Write the recommendation (the tuned keys as a queues.yaml, valid "
                   "alone and to merge into yours) here, not to stdout.")
@click.option("--write-config", type=click.Path(dir_okay=False), default=None,
              metavar="FILE", help="Also write your queues.yaml with the recommendation "
                                   "merged in (validated; its comments are not kept).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_config_path
def tune(trace: str, slo: str | None, trials: int, seed: int, startup: str,
         show_progress: bool, out: str | None, write_config: str | None, as_json: bool,
         config_path: str | None) -> None:
    """Search the autoscaling settings (per queue, and the poll interval) that run
    TRACE cheapest while wait p95 meets the SLO on every queue; print the trade-off
    (the Pareto front of cost and wait, beside the current settings and KEDA) and the
    recommendation as a queues.yaml fragment. Exit 1 when no trial met the SLO."""
    tuning = _tune_module()
    from autoscale.sim import startup_delay
    from autoscale.sim.tracefile import tasks_in_send_order
    from fleet.trace.io import read_trace

    config = _load(config_path)
    seconds = None if slo is None else _tune_slo(slo, list(config.queues))
    delay = startup_delay(startup)
    header, records = read_trace(trace)
    tasks = tasks_in_send_order(records)
    began = time.monotonic()
    with _tune_progress(show_progress) as progress:
        result = tuning.recommend(header, tasks, config, slo_wait_p95=seconds, trials=trials,
                                  seed=seed, startup=delay, progress=progress)
    wall = time.monotonic() - began
    fragment = result.fragment() if result.best is not None else None
    if fragment is not None:
        text = _fragment_text(fragment, trace, result)
        if out is not None:
            Path(out).write_text(text, encoding="utf-8")
        if write_config is not None:
            _write_tuned_config(config, fragment, write_config)
    if as_json:
        click.echo(json.dumps({**result.as_dict(), "wall": round(wall, 3)}))
    else:
        _print_tune(result)
        click.echo(f"{trials} trials of {header.duration / 3600:.1f}h in {wall:.1f}s "
                   f"(seed {seed}, start-up {delay:g}s)")
        if fragment is not None:
            click.echo(f"recommendation written to {out}" if out else text.rstrip("\n"))
            if write_config is not None:
                click.echo(f"merged config written to {write_config}")
    if fragment is None:
        raise tuning.SloNotMet(tuning.no_recommendation(result))


class _MissingExtra(FleetError):
    """An optional dependency of a command is not installed: a usage problem (exit 2)."""

    exit_code = 2


def _tune_slo(text: str, queues: list[str]) -> float | dict[str, float]:
    """``--slo-wait-p95``: a duration for every queue, or ``QUEUE=DURATION,...``."""
    from fleet.units import parse_duration

    def seconds(value: str, what: str) -> float:
        try:
            out = parse_duration(value.strip())
        except ValueError as exc:
            raise click.BadParameter(f"{what}{exc}", param_hint="--slo-wait-p95") from None
        if not out > 0:
            raise click.BadParameter(f"{what}{value.strip()!r}: must be more than 0",
                                     param_hint="--slo-wait-p95")
        return out

    if "=" not in text:
        return seconds(text, "")
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in queues:
            raise click.BadParameter(f"{part.strip()!r}: expected QUEUE=DURATION with QUEUE "
                                     f"one of {', '.join(queues)}", param_hint="--slo-wait-p95")
        out[name.strip()] = seconds(value, f"{name.strip()}: ")
    return out


def _tune_module():
    """autoscale.sim.tune, or exit 2 naming the extra when optuna is missing."""
    try:
        from autoscale.sim import tune as tuning
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "optuna":
            raise
        raise _MissingExtra("fleet tune needs optuna, which is not installed here: "
                         "pip install 'fleet[tune]'") from None
    return tuning


def _tune_progress(show: bool):
    """A rich progress bar on stderr (stdout stays the table or the JSON), or nothing."""
    import contextlib

    if not show:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    @contextlib.contextmanager
    def bar():
        with Progress("tuning", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True), transient=True) as p:
            task = p.add_task("tuning", total=None)
            yield lambda done, total: p.update(task, completed=done, total=total)

    return bar()


def _fragment_text(fragment: dict, trace: str, result) -> str:
    import yaml

    c = result.best
    return (f"# fleet tune {Path(trace).name}: {c.label}, {c.worker_seconds / 3600:,.2f} "
            f"worker-h, wait p95 {c.wait_p95:.1f}s ({result.trials} trials, seed "
            f"{result.seed}); tuned: {', '.join(result.slo)}.\n# A valid queues.yaml "
            "alone; merge it into yours (each key replaces the one at its path; the other "
            "queues' autoscaling is\n# as it was) or use --write-config "
            "(docs/tuning.md, \"Tuning\").\n" + yaml.safe_dump(fragment, sort_keys=False))


def _write_tuned_config(config: FleetConfig, fragment: dict, path: str) -> None:
    """The source file's own keys (not the environment's overrides) with the fragment
    merged in, validated as `fleet validate` would before it is written."""
    import yaml

    from fleet.config import parse_config
    from fleet.yamlfile import load_yaml

    tuning = _tune_module()
    data, _, _ = load_yaml(Path(config.source))
    data = tuning.merged(data, fragment)
    parse_config(data, path)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _print_tune(result) -> None:
    """One row per run: the current settings, KEDA, then the front by cost; the
    recommendation marked. Per queue, its wait p95 against its SLO."""
    from rich.console import Console
    from rich.table import Table

    tty = sys.stdout.isatty()
    table = Table(box=None if not tty else Table().box, pad_edge=False)
    queues = list(result.slo)
    for column in ("run", "worker-h", "vs current", "wait p95",
                   *(f"{q} p95 (<= {result.slo[q]:g}s)" for q in queues), "SLO", ""):
        table.add_column(column, no_wrap=True, justify="left" if column == "run" else "right")
    base = result.current.worker_seconds
    rows = [result.current, result.keda, *result.front]
    if result.best is None and result.closest not in result.front:
        rows.append(result.closest)
    for c in rows:
        mark = ("<- recommended" if c is result.best else
                "<- closest" if result.best is None and c is result.closest else "")
        table.add_row(c.label, f"{c.worker_seconds / 3600:,.2f}",
                      f"{c.worker_seconds / base:.2f}x" if base else "-",
                      f"{c.wait_p95:.1f}s",
                      *(f"{c.queues[q].wait_p95:.1f}s" if not c.queues[q].unstarted
                        else "not drained" for q in queues),
                      "met" if c.meets_slo else "missed", mark,
                      end_section=c is result.keda)
    Console(width=None if tty else 200).print(table)


@cli.command()
@click.option("--once", is_flag=True, help="One pass: say what was lost and re-sent, exit.")
@click.option("--interval", type=float, default=None,
              help="Seconds between passes (default: jobs.reconciler.interval).")
@pass_config_path
def reconcile(once: bool, interval: float | None, config_path: str | None) -> None:
    """Find job chunks that nobody has (not done, failed, queued, held nor running) and
    send them again. `fleet up` and `fleet autoscale` run this loop too."""
    from autoscale.reconcile import Reconciler, supervised_reconciler
    from fleet.supervision import StopSignals, Supervisor

    config = _load(config_path)
    if interval:
        config = config.model_copy(update={"jobs": config.jobs.model_copy(update={
            "reconciler": config.jobs.reconciler.model_copy(update={"interval": interval})})})
    reconciler = Reconciler(config, _app(config), report=click.echo)
    if once:
        done = _redis_call(reconciler.run_once)
        resent = sum(done.resent.values())
        click.echo(f"reconciler: {resent} chunks and {len(done.collects)} collect steps "
                   f"sent again; {done.suspected} suspected (checked again next pass)"
                   + (f"; scanned: {done.scanned}" if done.scanned else ""))
        return
    click.echo(f"reconciler: every {config.jobs.reconciler.interval:g}s")
    with StopSignals() as signals:  # SIGTERM, SIGINT, SIGHUP: stop between passes
        supervisor = Supervisor(signals, click.echo)
        try:
            supervisor.add(supervised_reconciler(reconciler))
            outcome = supervisor.run()
        finally:
            supervisor.stop_all()
    if outcome.code:
        raise FleetError(f"reconciler stopped: {outcome.reason}")


@cli.command()
@click.option("--queue", "-q", required=True, help="The queue this pod's worker serves.")
@click.option("--hostname", default=None, help="Worker node name (default: QUEUE@host).")
@click.option("--max-age", type=float, default=30.0, show_default=True,
              help="Seconds after which the worker's report (or event loop) is stale.")
@click.option("--live", is_flag=True,
              help="Liveness: read the worker's local health file only, not Redis, so a "
                   "broker outage does not fail it (docs/kubernetes.md, \"Probes\").")
@pass_config_path
def probe(queue: str, hostname: str | None, max_age: float, live: bool,
          config_path: str | None) -> None:
    """Readiness: exit 0 if this host's worker reported to Redis recently and its event
    loop runs; with --live, liveness: its process, heartbeat and event loop run, from
    its local health file. Exit 1, saying why, otherwise."""
    import socket

    name = hostname or f"{queue}@{socket.gethostname()}"
    if live:
        _probe_live(name, max_age)
        return
    from fleet.keys import broker_client, workers_key

    config = _load(config_path)
    raw = _redis_call(lambda: broker_client(config).hget(workers_key(config), name))
    if raw is None:
        raise FleetError(f"worker {name} has not reported (not started, or not a fleet worker)")
    from fleet.observe.model import parse_report

    try:
        report = parse_report(raw)
    except ValueError as exc:
        raise FleetError(f"worker {name}'s report is malformed: {exc}") from None
    now = time.time()
    if now - report.at > max_age:
        raise FleetError(f"worker {name} last reported {now - report.at:.0f}s ago")
    if report.loop_at is not None and now - report.loop_at > max_age:
        raise FleetError(f"worker {name}'s event loop last ran {now - report.loop_at:.0f}s ago")
    click.echo(f"worker {name} ok: {report.active} running, reported "
               f"{now - report.at:.1f}s ago")


def _probe_live(name: str, max_age: float) -> None:
    from fleet.health import health_path, liveness, pid_alive, read_health

    path = health_path(name)
    try:
        health = read_health(path)
    except ValueError as exc:
        raise FleetError(f"worker {name}'s health file is malformed: {exc}") from None
    if health is None:
        raise FleetError(f"worker {name} has written no health file at {path} (not "
                         f"started, or not a fleet worker)")
    now = time.time()
    why = liveness(health, now, max_age, pid_alive(health.pid))
    if why is not None:
        raise FleetError(why)
    broker = "" if health.broker_ok else (
        f"; broker unreachable for {now - health.broker_since:.0f}s, reconnecting")
    click.echo(f"worker {name} alive: beat {now - health.at:.1f}s ago{broker}")


@cli.group()
def trace() -> None:
    """Traces: a fleet's tasks and scaling decisions, or a synthetic workload, as JSON
    lines for `fleet simulate` (docs/tuning.md, "Traces")."""


@trace.command("synth")
@click.argument("shape")
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE",
              help="A parameter of SHAPE (rate=2, every=5m, service=pareto). Repeatable.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="The same seed gives the same trace.")
@click.option("--duration", default="1h", show_default=True, help="What the trace covers.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="The trace file (.jsonl, or .jsonl.gz for gzip).")
@pass_config_path
def trace_synth(shape: str, params: tuple[str, ...], seed: int, duration: str, out: str,
                config_path: str | None) -> None:
    """Write a synthetic trace of SHAPE: steady, bursts, diurnal, spike, heavy-tailed or
    mixed (their parameters and defaults: docs/tuning.md). Queue names are checked
    against queues.yaml's."""
    from fleet.trace.io import write_trace
    from fleet.trace.synth import synthesize
    from fleet.units import format_duration, parse_duration

    config = _load(config_path)
    given: dict[str, str] = {}
    for pair in params:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--param")
        if key.strip() in given:
            raise click.BadParameter(f"{key.strip()!r} given twice", param_hint="--param")
        given[key.strip()] = value.strip()
    try:
        seconds = parse_duration(duration)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--duration") from None
    header, tasks = synthesize(shape, given, duration=seconds, seed=seed,
                               queues=list(config.queues))
    written = write_trace(out, header, tasks)
    click.echo(f"{out}: {written} tasks, {shape} over {format_duration(seconds)} "
               f"(seed {seed})")


@trace.command("export")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="The trace file (.jsonl, or .jsonl.gz for gzip).")
@click.option("--since", default=None, metavar="WHEN",
              help="Tasks sent from then: a duration ago (1h, 2d) or an ISO time "
                   "(UTC unless it has an offset). Default: the first one stored.")
@click.option("--until", default=None, metavar="WHEN", help="... until then (default: now).")
@click.option("--queue", "-q", "queues", multiple=True, help="Only this queue. Repeatable.")
@click.option("--database", default=None,
              help="The dashboard's SQLAlchemy URL (default: dashboard.database).")
@pass_config_path
def trace_export(out: str, since: str | None, until: str | None, queues: tuple[str, ...],
                 database: str | None, config_path: str | None) -> None:
    """Write a trace of what the fleet did, from the dashboard's tasks, the job ledger's
    chunks and the autoscaler's decisions (what they cannot know: docs/tuning.md)."""
    from fleet.dashboard import traces  # SQLAlchemy only: no need of the dashboard extra
    from fleet.trace.io import write_trace
    from fleet.trace.model import Task

    config = _load(config_path)
    now = time.time()
    window = {}
    for option, text in (("since", since), ("until", until)):
        if text is not None:
            try:
                window[option] = traces.instant(text, now)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=f"--{option}") from None
    done = traces.export(config, database, queues=queues, now=now,
                  warn=lambda m: click.echo(f"fleet: warning: {m}", err=True), **window)
    counts = {"task": 0, "replicas": 0}

    def counted():
        for record in done.records:
            counts["task" if isinstance(record, Task) else "replicas"] += 1
            yield record

    write_trace(out, done.header, counted())
    left = "".join(f"; {n} left out: {why}" for why, n in done.skipped.items())
    click.echo(f"{out}: {counts['task']} tasks and {counts['replicas']} decisions from "
               f"{done.header.params['since']} to {done.header.params['until']}{left}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        files = sorted({p.file for p in exc.problems})
        count = len(exc.problems)
        click.echo(f"fleet: {count} problem{'s' if count != 1 else ''} in "
                   f"{', '.join(files)}:", err=True)
        for line in exc.lines():
            click.echo(f"  {line}", err=True)
        sys.exit(exc.exit_code)
    except FleetError as exc:
        click.echo(f"fleet: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
