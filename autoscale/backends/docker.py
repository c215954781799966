"""The docker backend: each replica a container of the fleet image on one Docker host.

For teams that run one Docker host before (or instead of) Kubernetes. Each container
runs ``fleet worker --queue Q`` as the worker Deployment's pod does: the queue's
``kubernetes.resources.limits`` as ``--memory`` (swap off) and ``--cpus``, queues.yaml
mounted where the ConfigMap goes, the broker and ledger from the environment.

- **Labels** (``fleet.io/fleet``, ``fleet.io/queue``, ``fleet.io/config-hash``) are the
  backend's only record: one label-filtered list per poll (``sparse``: no inspect per
  container) says what runs. A restarted autoscaler adopts the running containers of
  its fleet and config instead of starting twins; those of an older config are
  stopped warm and replaced.
- **Scale-down** stops idle containers first (the workers' own reports say who is
  busy), each with ``docker stop -t <grace>``: SIGTERM starts Celery's warm shutdown,
  running tasks finish, SIGKILL only after the queue's grace (the manifest's
  terminationGracePeriodSeconds). The stop runs on a thread of its own; the loop goes on.
- **A container that exits unasked** is replaced; an engine-reported OOM kill (of the
  worker's main process, so the container exited) is said so, in the loop's report and
  the queue's next decision reason (``notices``). A kernel kill of a pool child is the
  worker's to handle (fleet.guard). A container that exits within ``QUICK_EXIT``
  seconds of its start is not restarted for ``BACKOFF`` seconds: a bad image or config
  would otherwise loop.
- **Errors** (no engine, image missing) are BackendErrors with what to do: the loop
  reports them each poll and goes on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from autoscale.backends.base import BackendContext, BackendError, BackendPlugin

try:
    import docker
    import requests
except ImportError as exc:  # an optional extra: say how to get it, not a traceback
    raise BackendError(f"the docker backend needs the Docker SDK ({exc}): "
                       f"pip install 'fleet[docker]'") from None

from fleet.config import ENV_BROKER_URL, ENV_KEY_PREFIX, ENV_LEDGER_URL, FleetConfig
from fleet.observe.model import WorkerSample
from fleet.shutdown import grace_period
from fleet.units import cpu_cores

logger = logging.getLogger("autoscale.docker")

LABEL_FLEET = "fleet.io/fleet"
LABEL_QUEUE = "fleet.io/queue"
LABEL_CONFIG = "fleet.io/config-hash"
#: Where the container finds queues.yaml (the manifests' ConfigMap mount).
CONFIG_IN_CONTAINER = "/etc/fleet/queues.yaml"
#: What a container gets of the autoscaler's environment: the fleet's own, no secrets
#: of anything else.
FLEET_VARIABLES = (ENV_BROKER_URL, ENV_KEY_PREFIX, ENV_LEDGER_URL)
#: A container gone within this many seconds of its start "exited at once".
QUICK_EXIT = 10.0
#: How long a queue whose container exited at once waits before the next start.
BACKOFF = 30.0
#: Exit codes of the containers this backend stopped, the latest ones.
KEEP_STOPPED = 100


def config_hash(path: str | None, config: FleetConfig, env: dict[str, str] | None = None,
                image: str = "") -> str:
    """What the containers run with: the mounted file's bytes (or the parsed config), the
    fleet's variables they get (a new embedded Redis port is a new broker) and the image.
    A container whose hash differs is replaced, not adopted."""
    try:
        data = Path(path).read_bytes() if path else None
    except OSError:
        data = None
    if data is None:
        data = config.model_dump_json().encode()
    digest = hashlib.sha256(data)
    for name in sorted(n for n in (env or {}) if n in FLEET_VARIABLES):
        digest.update(f"\0{name}={env[name]}".encode())
    digest.update(f"\0image={image}".encode())
    return digest.hexdigest()[:12]


def _name_part(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]+", "-", text).strip("-.") or "fleet"


@dataclass
class Replica:
    queue: str
    name: str
    container_id: str
    started: float
    #: The worker's node name (its heartbeat's hostname).
    hostname: str


@dataclass
class ContainerSpec:
    """A replica's ``containers.run`` arguments, decided without the engine (a pure
    function of the config, so a dry run and a test can read it)."""

    name: str
    hostname: str
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HostShare:
    """What ``fleet up --backend docker`` shares with its containers so that they see
    the machine as its local workers do: directories bind-mounted at the same paths
    (the current one, where relative paths such as ``payloads.path`` point, and the
    workdir with the ledger), the current directory as theirs, the caller's uid:gid (the
    files are the caller's)."""

    paths: tuple[str, ...]
    working_dir: str
    user: str

    @classmethod
    def of_this_process(cls, config: FleetConfig, workdir: Path) -> HostShare:
        """The current directory, the workdir, a local payload store's directory and a
        SQLite ledger's: what the fleet's own files need, created if missing."""
        cwd = Path.cwd().resolve()
        dirs = [cwd, workdir.resolve()]
        if config.payloads.store == "local":
            dirs.append((cwd / config.payloads.path).resolve())
        if config.jobs.ledger.startswith("sqlite:///"):
            dirs.append(Path(config.jobs.ledger.removeprefix("sqlite:///")).resolve().parent)
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        # A directory inside another one shared is shared already.
        kept = [d for d in dirs if not any(o != d and o in d.parents for o in dirs)]
        return cls(tuple(dict.fromkeys(str(d) for d in kept)), str(cwd),
                   f"{os.getuid()}:{os.getgid()}")


def container_spec(config: FleetConfig, queue: str, seq: int, *, fleet_id: str,
                   digest: str, node: str, config_path: str | None,
                   env: dict[str, str], share: HostShare | None = None) -> ContainerSpec:
    target = config.autoscaler.docker
    q = config.queues[queue]
    name = f"fleet-{_name_part(fleet_id)}-{_name_part(queue)}-{seq}"
    hostname = f"{name}@{node}"
    environment = {k: v for k, v in env.items() if k in FLEET_VARIABLES}
    environment["FLEET_CONFIG"] = CONFIG_IN_CONTAINER
    volumes = {}
    if config_path:
        volumes[str(Path(config_path).resolve())] = {"bind": CONFIG_IN_CONTAINER, "mode": "ro"}
    for spec in target.volumes:
        host, _, rest = spec.partition(":")
        inside, _, mode = rest.partition(":")
        volumes[host] = {"bind": inside or host, "mode": mode or "rw"}
    options = {
        "command": ["worker", "--queue", queue, "--hostname", hostname],
        "name": name,
        "environment": environment,
        "volumes": volumes,
        "network_mode": target.network,
        "labels": {LABEL_FLEET: fleet_id, LABEL_QUEUE: queue, LABEL_CONFIG: digest},
        "detach": True,
        "stop_signal": "SIGTERM",
        # An init as PID 1 (the engine's docker-init, tini): the kernel gives PID 1 no
        # default signal actions, so a worker that is PID 1 ignores a stop sent before
        # its handlers are set, and the stop waits out the whole grace.
        "init": True,
    }
    if share is not None:
        for path in share.paths:
            volumes.setdefault(path, {"bind": path, "mode": "rw"})
        options["working_dir"] = share.working_dir
        options["user"] = share.user
    if target.user:
        options["user"] = target.user
    limits = q.kubernetes.resources.limits
    if limits.memory:
        options["mem_limit"] = limits.memory
        options["memswap_limit"] = limits.memory
    cores = cpu_cores(limits.cpu)
    if cores:
        options["nano_cpus"] = int(cores * 1e9)
    return ContainerSpec(name, hostname, options)


class DockerBackend:
    name = "docker"

    def __init__(self, config: FleetConfig, *, env: dict[str, str],
                 config_path: str | None, client_factory: Callable[[], object] | None = None,
                 node: str | None = None, quick_exit: float = QUICK_EXIT,
                 backoff: float = BACKOFF, owns_containers: bool = False,
                 share: HostShare | None = None):
        self.config = config
        self.target = config.autoscaler.docker
        self.env = env
        self.config_path = config_path
        self.fleet_id = config.broker.key_prefix.rstrip(":") or "default"
        self.digest = config_hash(config_path, config, env, self.target.image)
        self.node = node or socket.gethostname()
        self._client_factory = client_factory or self._default_client
        self._client = None
        self.running: dict[str, list[Replica]] = {q: [] for q in config.queues}
        self.draining: dict[str, tuple[Replica, threading.Thread]] = {}
        #: container name -> exit code, for those it stopped (0: warm, 137: killed)
        self.stopped: dict[str, int | None] = {}
        self.restarts = 0
        self.closed = False
        self._adopted = False
        self._have_image = False
        self._seq = 0
        self._backoff: dict[str, tuple[float, str]] = {}
        self._notices: dict[str, list[str]] = {}
        self.quick_exit = quick_exit
        self.backoff = backoff
        #: ``fleet up``'s: its containers stop with it, as its local workers do.
        self.owns_containers = owns_containers
        self.share = share
        self._lock = threading.RLock()

    # -- the engine ------------------------------------------------------------------

    def _default_client(self):
        if self.target.host:
            return docker.DockerClient(base_url=self.target.host, timeout=60)
        return docker.from_env(timeout=60)

    def _where(self) -> str:
        return self.target.host or os.environ.get("DOCKER_HOST") or "the default socket"

    def _engine(self):
        if self._client is None:
            try:
                self._client = self._client_factory()
            except (docker.errors.DockerException, requests.RequestException) as exc:
                raise BackendError(f"no Docker engine answers at {self._where()}: {exc}"
                                   ) from None
        return self._client

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except docker.errors.ImageNotFound:
            raise BackendError(
                f"image {self.target.image!r} is not on the Docker engine at "
                f"{self._where()}: build it (docker build -f k8s/Dockerfile -t "
                f"{self.target.image} .) or set autoscaler.docker.image") from None
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise BackendError(f"{what}: the Docker engine at {self._where()} "
                               f"failed: {exc}") from None

    def _image_present(self, client) -> None:
        """Before a start: ``containers.run`` would try to pull a missing image, which
        fails (or, worse, succeeds with someone else's ``fleet:latest``)."""
        if not self._have_image:
            self._call("looking up the image", client.images.get, self.target.image)
            self._have_image = True

    def _listed(self) -> dict[str, object]:
        client = self._engine()
        found = self._call("listing containers", client.containers.list, all=True,
                           sparse=True, filters={"label": f"{LABEL_FLEET}={self.fleet_id}"})
        return {c.id: c for c in found}

    # -- the backend seam ------------------------------------------------------------

    def check(self) -> None:
        """The engine answers and has the image (CheckingBackend)."""
        with self._lock:
            client = self._engine()
            self._call("asking the engine", client.ping)
            self._image_present(client)

    def grace(self, queue: str) -> float:
        return float(grace_period(self.config.queues[queue]))

    def replicas(self) -> dict[str, int]:
        with self._lock:
            self._sync()
            return {q: len(rs) for q, rs in self.running.items()}

    def notices(self) -> dict[str, list[str]]:
        """What happened to each queue's containers since the last call (exits, OOM
        kills, replacements), for the loop's report and decision reasons."""
        with self._lock:
            out, self._notices = self._notices, {}
            return out

    def _notice(self, queue: str, text: str) -> None:
        logger.warning("%s: %s", queue, text)
        self._notices.setdefault(queue, []).append(text)

    def _sync(self) -> None:
        listed = self._listed()
        self._adopt_once(listed)
        for key, (_, thread) in list(self.draining.items()):
            if not thread.is_alive():
                self.draining.pop(key)
        for replicas in self.running.values():
            for replica in list(replicas):
                container = listed.get(replica.container_id)
                state = (container.attrs.get("State") if container is not None else None)
                if state in ("running", "created", "restarting"):
                    continue
                replicas.remove(replica)
                self._exited(replica, container)

    def _adopt_once(self, listed: dict[str, object] | None = None) -> None:
        """On first contact with the engine, before any container is started: what runs
        already is this fleet's (adopted), an older config's (replaced) or dead."""
        if self._adopted:
            return
        self._adopt(self._listed() if listed is None else listed)
        self._adopted = True

    def _adopt(self, listed: dict[str, object]) -> None:
        seq = self._seq
        for container in listed.values():
            labels = container.attrs.get("Labels") or {}
            queue = labels.get(LABEL_QUEUE)
            name = (container.attrs.get("Names") or ["/?"])[0].lstrip("/")
            found = re.search(r"-(\d+)$", name)
            seq = max(seq, int(found.group(1)) if found else 0)
            if container.attrs.get("State") != "running" or queue not in self.running:
                try:
                    container.remove(force=True)
                except docker.errors.NotFound:
                    pass  # removed meanwhile (another autoscaler, by hand)
                except (docker.errors.DockerException, requests.RequestException) as exc:
                    logger.warning("could not remove container %s: %s", name, exc)
                continue
            replica = Replica(queue, name, container.id, time.monotonic(),
                              f"{name}@{self.node}")
            if labels.get(LABEL_CONFIG) == self.digest:
                self.running[queue].append(replica)
                logger.info("adopted container %s (queue %s)", name, queue)
            else:
                logger.info("container %s runs an older queues.yaml: stopping it warm", name)
                self._drain(replica, container)
        self._seq = seq

    def _exited(self, replica: Replica, container) -> None:
        code, oom, tail = None, False, ""
        if container is not None:
            try:
                container.reload()
                state = container.attrs.get("State", {})
                code, oom = state.get("ExitCode"), bool(state.get("OOMKilled"))
                tail = container.logs(tail=5).decode(errors="replace").strip()
                container.remove(force=True)
            except docker.errors.DockerException:
                pass
        limit = self.config.queues[replica.queue].kubernetes.resources.limits.memory
        if oom:
            what = (f"container {replica.name} was OOM-killed by the engine "
                    f"(memory limit {limit} bytes)" if limit else
                    f"container {replica.name} was OOM-killed by the engine")
        else:
            what = f"container {replica.name} exited (code {code}) without being asked"
        if time.monotonic() - replica.started < self.quick_exit:
            last = tail.splitlines()[-1] if tail else "no output"
            self._backoff[replica.queue] = (time.monotonic() + self.backoff, f"{what}: {last}")
            self._notice(replica.queue, f"{what} within {self.quick_exit:g}s of its start "
                                        f"({last}); next start in {self.backoff:g}s")
            return
        self.restarts += 1
        self._notice(replica.queue, f"{what}: replaced")
        self._start(replica.queue)

    def scale(self, queue: str, replicas: int, workers: list[WorkerSample]) -> None:
        with self._lock:
            running = self.running[queue]
            while len(running) < replicas:
                self._start(queue)
            if len(running) <= replicas:
                return
            listed = self._listed()
            for replica in self._stop_order(running, workers)[: len(running) - replicas]:
                running.remove(replica)
                self._drain(replica, listed.get(replica.container_id))

    def plan(self, queue: str, replicas: int, workers: list[WorkerSample]) -> list[str]:
        running = self.running[queue]
        steps = []
        for seq in range(len(running), replicas):
            spec = self._spec(queue, seq + 1)
            mem = spec.options.get("mem_limit")
            steps.append(f"start container {spec.name} from {self.target.image}"
                         + (f" (--memory {mem})" if mem else ""))
        for replica in self._stop_order(running, workers)[: max(0, len(running) - replicas)]:
            steps.append(f"docker stop -t {self.grace(queue):g} {replica.name}")
        return steps

    @staticmethod
    def _stop_order(running: list[Replica], workers: list[WorkerSample]) -> list[Replica]:
        """Idle first; among equals the youngest (it holds the least)."""
        busy = {w.hostname: w.active + w.reserved for w in workers}
        return [r for _, r in sorted(enumerate(running), key=lambda ir: (
            busy.get(ir[1].hostname, 0), -ir[0]))]

    def _spec(self, queue: str, seq: int) -> ContainerSpec:
        return container_spec(self.config, queue, seq, fleet_id=self.fleet_id,
                              digest=self.digest, node=self.node,
                              config_path=self.config_path, env=self.env, share=self.share)

    def _start(self, queue: str) -> Replica:
        if self.closed:
            raise BackendError("the docker backend is closed: no container is started")
        until, why = self._backoff.get(queue, (0.0, ""))
        if time.monotonic() < until:
            raise BackendError(f"not starting a {queue} container for "
                               f"{until - time.monotonic():.0f}s more: {why}")
        client = self._engine()
        self._adopt_once()
        self._image_present(client)
        self._seq += 1
        spec = self._spec(queue, self._seq)
        container = self._call(f"starting {spec.name}", client.containers.run,
                               self.target.image, **spec.options)
        replica = Replica(queue, spec.name, container.id, time.monotonic(), spec.hostname)
        self.running[queue].append(replica)
        logger.info("started container %s (%s)", spec.name, container.short_id)
        return replica

    def _drain(self, replica: Replica, container, grace: float | None = None) -> None:
        grace = self.grace(replica.queue) if grace is None else grace

        def stop() -> None:
            try:
                target = container or self._engine().containers.get(replica.container_id)
                target.stop(timeout=int(grace))
                target.reload()
                code = target.attrs.get("State", {}).get("ExitCode")
                target.remove(force=True)
            except (docker.errors.DockerException, BackendError) as exc:
                logger.warning("stopping container %s: %s", replica.name, exc)
                return
            with self._lock:
                self.stopped[replica.name] = code
                while len(self.stopped) > KEEP_STOPPED:
                    del self.stopped[next(iter(self.stopped))]
                if code == 137:
                    self._notice(replica.queue, (
                        f"container {replica.name} was still running after its grace of "
                        f"{grace:g}s: killed; its running tasks come back within the "
                        f"visibility timeout"))

        thread = threading.Thread(target=stop, name=f"docker-stop-{replica.name}",
                                  daemon=True)
        self.draining[replica.container_id] = (replica, thread)
        logger.info("stopping container %s (docker stop -t %g)", replica.name, grace)
        thread.start()

    def workers(self) -> list[Replica]:
        with self._lock:
            return ([r for rs in self.running.values() for r in rs]
                    + [r for r, _ in self.draining.values()])

    def wait_drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for _, thread in list(self.draining.values()):
            thread.join(max(0.0, deadline - time.monotonic()))
        return all(not t.is_alive() for _, t in self.draining.values())

    def close(self, grace: float | None = None, *, hurry: Callable[[], bool] | None = None,
              on_hurry: Callable[[list[Replica]], None] | None = None) -> None:
        """Let go of the engine. The containers of ``fleet autoscale`` run on, as pods
        outlive the autoscaler that scaled them: the next one adopts them by label.
        ``fleet up``'s (``owns_containers``) stop first, warm, each within its queue's
        grace; ``hurry`` (a second signal) kills the ones still running at once."""
        if self.owns_containers and self._client is not None:
            try:
                self.stop_all(grace, hurry=hurry, on_hurry=on_hurry)
            except BackendError as exc:
                logger.warning("could not stop the containers: %s", exc)
        with self._lock:
            self.closed = True
            if self._client is not None:
                self._client.close()
                self._client = None

    def stop_all(self, grace: float | None = None, *, hurry: Callable[[], bool] | None = None,
                 on_hurry: Callable[[list[Replica]], None] | None = None) -> None:
        """Stop every container of the fleet warm, each within its queue's grace (or
        ``grace``), in parallel, and wait for them; ``hurry`` kills them now."""
        with self._lock:
            self._sync()
            for replicas in self.running.values():
                for replica in replicas:
                    self._drain(replica, None, grace)
                replicas.clear()
        longest = max([self.grace(r.queue) for r, _ in self.draining.values()], default=0)
        deadline = time.monotonic() + (grace if grace is not None else longest) + 10
        while time.monotonic() < deadline and any(
                t.is_alive() for _, t in self.draining.values()):
            if hurry is not None and hurry():
                left = [r for r, t in self.draining.values() if t.is_alive()]
                if on_hurry is not None:
                    on_hurry(left)
                for replica in left:
                    try:
                        self._engine().containers.get(replica.container_id).kill()
                    except (docker.errors.DockerException, BackendError):
                        pass  # gone meanwhile
                break
            time.sleep(0.2)
        self.wait_drained(10)


def create(ctx: BackendContext) -> DockerBackend:
    """The ``docker`` entry point: the containers mount ``ctx.config``'s own file. Under
    a supervisor (``fleet up``) the containers are its own, and see the machine's files
    as its local workers would (HostShare)."""
    owned = ctx.supervisor is not None
    return DockerBackend(ctx.config, env=dict(ctx.env), config_path=ctx.config.source,
                         owns_containers=owned,
                         share=HostShare.of_this_process(ctx.config, ctx.workdir)
                         if owned else None)


PLUGIN = BackendPlugin(create)
