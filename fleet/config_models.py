"""The typed model of queues.yaml: pydantic models, immutable once parsed.

Structure and units are checked here by pydantic (unknown keys, wrong types, bad units).
This module is a leaf: it imports nothing of fleet but the leaf helpers ``fleet.units``
and ``fleet.errors`` (the ``[tool.importlinter]`` contract in pyproject.toml checks it),
so any module may import the models without an import cycle. Reading the file and the
environment (``fleet.config``) and the rules that span several keys (``fleet.validation``)
sit above it and import it, never the reverse.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
)

from fleet.errors import ConfigError, Problem
from fleet.units import (
    CPU_PATTERN,
    Rate,
    cpu_cores,
    format_duration,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)

Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size)]
Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
RateLimit = Annotated[Rate, BeforeValidator(parse_rate), PlainSerializer(str)]


def _more_than_zero(value: float) -> float:
    if value <= 0:
        raise ValueError("must be more than 0 (leave the key out where none is meant)")
    return value


#: Where 0 means nothing (a memory limit every task exceeds, a time limit no task
#: meets, a poll that never sleeps), it is an error rather than taken at its word.
PositiveSize = Annotated[int, BeforeValidator(parse_size), AfterValidator(_more_than_zero),
                         PlainSerializer(format_size)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration),
                             AfterValidator(_more_than_zero), PlainSerializer(format_duration)]

#: What redis-py (and so kombu's Redis transport) can open.
REDIS_SCHEMES = ("redis", "rediss", "unix")


def redis_url_problem(url: str) -> str | None:
    """Why ``url`` is no Redis URL, or None. redis-py says so only at the first connect,
    as a ValueError traceback; the scheme alone is named, never the URL (a password)."""
    scheme, sep, _ = url.partition("://")
    if sep and scheme.lower() in REDIS_SCHEMES:
        return None
    got = f"{scheme}://" if sep else "no scheme"
    return f"must be a redis://, rediss:// or unix:// URL, got {got}"


def _redis_url(url: str) -> str:
    if problem := redis_url_problem(url):
        raise ValueError(problem)
    return url


RedisUrl = Annotated[str, AfterValidator(_redis_url)]


def _ip_or_network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"must be an IP address or CIDR range like 10.0.0.0/8, got {value!r}"
                         ) from None
    return value


IpOrNetwork = Annotated[str, AfterValidator(_ip_or_network)]

#: Records in one chunk at most: a chunk is one task message, and the ledger's integers
#: are 64-bit (a chunk size of 2**63 was a traceback from SQLite).
MAX_CHUNK_SIZE = 10_000_000

#: A queue's max_deliveries when queues.yaml does not say (and for queues it does not know).
DEFAULT_MAX_DELIVERIES = 3


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Lease(Model):
    """Workers refresh the delivery time of every message they hold (see fleet.lease)."""

    enabled: bool = True
    interval: PositiveDuration = 10.0


class Broker(Model):
    url: RedisUrl = "redis://127.0.0.1:6379/0"
    #: kombu's global_keyprefix: every broker, result and fleet key starts with it.
    key_prefix: str = ""
    #: With acks_late on Redis, a message unacked for this long is delivered again.
    visibility_timeout: PositiveDuration = 60.0
    lease: Lease = Lease()


class EventStream(Model):
    """Workers also append every Celery event to a capped Redis Stream (fleet.eventlog).

    Celery's events on Redis are PUBLISH: a monitor that is not subscribed at that
    moment (reconnecting after a Redis restart) never sees them. The stream keeps the
    newest ``maxlen`` entries for the dashboard's consumer group; pub/sub stays for
    Flower and ``celery events``.
    """

    enabled: bool = True
    #: Entries kept (XADD MAXLEN ~): how far behind the dashboard may fall (or how long
    #: it may be away) before events are trimmed unread. An entry is one event or one
    #: group of task events: about 1 KB of Redis memory for a task's three events,
    #: 350 bytes for a heartbeat (docs/dashboard.md).
    maxlen: int = Field(50_000, ge=1_000)
    #: Entries a worker holds while Redis is unreachable, appended once it is back;
    #: beyond this the oldest are dropped and the dashboard is told (a gap marker).
    offline_buffer: int = Field(10_000, ge=1)


class Results(Model):
    #: Defaults to the broker URL.
    url: RedisUrl | None = None
    expires: PositiveDuration = 86400.0


class Payloads(Model):
    """Claim-check: arguments and results above ``threshold`` travel as references."""

    #: A name in the ``fleet.payload_stores`` registry (fleet.plugins): ``local``,
    #: ``s3``, ``stub`` (memory, one process: tests), or a plug-in's; checked at load.
    store: str = Field("local", min_length=1)
    path: str = ".fleet/payloads"
    bucket: str | None = None
    prefix: str = "fleet/"
    endpoint_url: str | None = None
    region: str | None = None
    threshold: Size = 256 * 1024
    #: Delete argument payloads once the task has succeeded.
    cleanup: bool = True


class Reconciler(Model):
    """Finds job chunks that nobody has (done, failed, queued, held or running: none of
    them) and sends them again; see autoscale.reconcile."""

    enabled: bool = True
    #: How often to compare the ledger with what Redis and the workers hold.
    interval: Duration = Field(5.0, gt=0)
    #: A chunk sent less than this long ago is never suspected (it may be on its way).
    grace: Duration = 10.0
    #: Redis's lists are scanned for the chunks' ids when the counts do not add up, and
    #: at least this often while chunks are pending (a lost one hidden by a surplus).
    full_scan_every: PositiveDuration = 30.0


class Jobs(Model):
    default_chunk_size: int = Field(1000, ge=1, le=MAX_CHUNK_SIZE)
    #: The job ledger (SQLAlchemy URL): what each job is, its chunks and which of them
    #: completed, outside the broker, so a Redis that restarts empty loses no job.
    #: SQLite on one machine; PostgreSQL when workers run on several (Kubernetes).
    ledger: str = "sqlite:///.fleet/jobs.sqlite"
    #: How long a job stays in the ledger after its last change.
    ttl: PositiveDuration = 7 * 86400.0
    #: Messages per Redis pipeline when fanning out a job.
    publish_batch: int = Field(500, ge=1)
    reconciler: Reconciler = Reconciler()


class SizeRule(Model):
    """Tasks (globs) whose input is larger than ``over`` bytes go to ``queue``."""

    over: Size
    queue: str
    tasks: list[str] = ["*"]


class TimeLimit(Model):
    soft: PositiveDuration | None = None
    hard: PositiveDuration | None = None


class Retry(Model):
    """Celery autoretry for the queue's tasks; exceptions by builtin or dotted name."""

    max_retries: int = Field(3, ge=0)
    exceptions: list[str] = ["Exception"]
    backoff: Duration = 2.0
    backoff_max: Duration = 600.0
    jitter: bool = True


class OnMemoryExceeded(Model):
    #: Re-send the task to this (larger) queue instead of failing it.
    retry_on: str | None = None
    #: Attempts in all, the first one included.
    max_attempts: int = Field(2, ge=1)


class ResourceList(Model):
    cpu: str | None = Field(None, pattern=CPU_PATTERN)
    memory: PositiveSize | None = None


class Resources(Model):
    requests: ResourceList = ResourceList()
    limits: ResourceList = ResourceList()

    def per_replica(self) -> tuple[float, int]:
        """CPU cores and memory bytes one replica takes from the capacity budget: its
        requests, else its limits (what the scheduler reserves), else nothing."""
        cpu = cpu_cores(self.requests.cpu) or cpu_cores(self.limits.cpu) or 0.0
        return cpu, self.requests.memory or self.limits.memory or 0


class Kubernetes(Model):
    resources: Resources = Resources()


class Autoscaling(Model):
    """Parsed and validated now; the autoscaler uses it (autoscale/)."""

    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(4, ge=0)
    #: Drain the backlog within this time.
    target_wait: PositiveDuration = 30.0
    #: Waiting messages below this keep a queue at zero replicas.
    activation_threshold: int = Field(1, ge=0)
    scale_up_stabilization: Duration = 0.0
    scale_down_stabilization: Duration = 300.0
    scale_down_step: int = Field(1, ge=1)
    cooldown: Duration = 30.0


class Capacity(Model):
    """What all worker replicas together may request (the autoscaler's budget)."""

    cpu: str | None = Field(None, pattern=CPU_PATTERN)
    memory: PositiveSize | None = None


class KubernetesTarget(Model):
    #: Where the worker Deployments are, for an autoscaler outside the cluster; inside
    #: it, the namespace it runs in (FLEET_K8S_NAMESPACE from the downward API) wins.
    namespace: str = "fleet"
    #: Deployment of each queue's workers; {queue} is replaced by the queue name.
    deployment: str = "fleet-worker-{queue}"
    #: The container image the rendered manifests use.
    image: str = "fleet:latest"
    #: Explicit, not Kubernetes' default (Always for a :latest tag, which fails where
    #: the image was loaded onto the nodes rather than pushed to a registry).
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    #: The autoscaler's own limit on API requests (a token bucket, as client-go's):
    #: sustained requests per second, and how many may go at once after a quiet spell.
    #: KEDA's operator defaults (--kube-api-qps 20, --kube-api-burst 30): a poll is one
    #: LIST plus a request per queue that changes, so a burst covers a busy poll.
    api_qps: float = Field(20.0, gt=0)
    api_burst: int = Field(30, ge=1)
    #: A count the fleet did not write (``kubectl scale``, another autoscaler) is left
    #: alone this long before the fleet scales that queue again; the annotation
    #: ``fleet.io/autoscaling: manual`` on the Deployment leaves it alone for good.
    foreign_write_hold: PositiveDuration = 600.0
    #: The longest termination grace the platform honours: Cluster Autoscaler's
    #: --max-graceful-termination-sec (600 s by default) when it drains a node. A queue
    #: whose pods need longer (its hard time limit + 30 s) is refused by validation.
    max_termination_grace: PositiveDuration = 600.0
    #: Where autoscaler.capacity leaves CPU or memory out, take it from today's nodes'
    #: allocatable. Set false under Cluster Autoscaler or Karpenter: they add nodes for
    #: pending pods, so today's nodes are no limit (put the node group's real maximum in
    #: autoscaler.capacity instead).
    budget_from_nodes: bool = True

    def deployment_name(self, queue: str) -> str:
        """The Deployment of ``queue``'s workers: what the manifests create, the
        autoscaler scales and validation checks against Kubernetes' name rules."""
        return self.deployment.replace("{queue}", queue)


class DockerTarget(Model):
    """Where the ``docker`` backend runs each replica: a container of ``image`` on one
    Docker host (autoscale/backends/docker.py, docs/docker.md)."""

    #: The fleet image (k8s/Dockerfile); it must be on the engine already.
    image: str = "fleet:latest"
    #: The engine's address (``unix:///var/run/docker.sock``, ``tcp://host:2376``);
    #: None: the environment's DOCKER_HOST, else the default socket.
    host: str | None = None
    #: ``host`` reaches a Redis on the machine's loopback; or a network's name.
    network: str = "host"
    #: ``uid:gid`` the workers run as (None: the image's, uid 10001).
    user: str | None = None
    #: Extra bind mounts, ``/host/path:/container/path[:ro]`` (payloads on disk).
    volumes: list[str] = []


class Autoscaler(Model):
    interval: PositiveDuration = 2.0
    #: A name in the ``fleet.autoscaler_backends`` registry (fleet.plugins): ``local``,
    #: ``kubernetes``, ``stub`` (numbers in memory), or a plug-in's; checked at load.
    backend: str = Field("local", min_length=1)
    #: Total for all queues; on Kubernetes, the nodes' allocatable when left out.
    capacity: Capacity = Capacity()
    kubernetes: KubernetesTarget = KubernetesTarget()
    docker: DockerTarget = DockerTarget()
    #: How often each worker publishes its CPU and memory (psutil).
    worker_metrics_interval: PositiveDuration = 2.0


Role = Literal["viewer", "operator", "admin"]


class DashboardUser(Model):
    """A basic-auth user; the password comes from the environment, never from this file."""

    name: str = Field(min_length=1)
    role: Role = "viewer"
    password_env: str = Field(min_length=1)


class DashboardToken(Model):
    """An API token for scripts (``Authorization: Bearer ...``), read from the environment."""

    name: str = Field(min_length=1)
    role: Role = "viewer"
    token_env: str = Field(min_length=1)


class Oidc(Model):
    """Any OpenID Connect provider with discovery (``ISSUER/.well-known/openid-configuration``)."""

    issuer: str
    client_id: str
    client_secret_env: str | None = None
    #: The ID-token claim naming the user's groups, and which group gets which role.
    groups_claim: str = "groups"
    roles: dict[str, Role] = {}
    #: The role of a signed-in user in none of ``roles`` (None: refused).
    default_role: Role | None = None


class RabbitMQ(Model):
    """A RabbitMQ broker whose queues the broker page also shows (Celery apps beside the
    fleet). Depths come from passive queue declares over AMQP: no management plugin."""

    url: str = Field(pattern=r"^amqps?://")
    #: Queue names to show (default: the fleet's queue names).
    queues: list[str] = []


class Dashboard(Model):
    #: SQLAlchemy URL: SQLite by default (embedded), PostgreSQL for a team running it.
    database: str = "sqlite:///.fleet/dashboard.sqlite"
    #: Stored tasks are capped by count and by age; the oldest go first.
    max_tasks: int = Field(100_000, ge=1)
    max_task_age: PositiveDuration = 7 * 86400.0
    #: A worker silent this long is shown offline (Celery's heartbeat window is 2x freq).
    offline_after: PositiveDuration = 10.0
    #: An offline worker leaves pages and metrics after this long.
    purge_offline_after: Duration = 600.0
    #: Events are written in batches at least this often.
    flush_interval: PositiveDuration = 0.5
    #: Queue depth, rates, replicas and worker memory are sampled this often for plots.
    sample_interval: PositiveDuration = 5.0
    #: Samples, decisions and the audit log are kept this long.
    history: PositiveDuration = 7 * 86400.0
    users: list[DashboardUser] = []
    tokens: list[DashboardToken] = []
    oidc: Oidc | None = None
    rabbitmq: RabbitMQ | None = None
    #: The Redis Stream consumer group the dashboard reads events with: one per
    #: dashboard database (two dashboards in one group would each see half the events).
    event_group: str = Field("dashboard", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    #: Environment variable with the key that signs session cookies (random if unset:
    #: sessions then end when the dashboard restarts).
    session_secret_env: str | None = None
    #: Addresses (or CIDR ranges) of the proxies in front (an ingress): only their
    #: X-Forwarded-For and X-Forwarded-Proto are believed, for the client address that
    #: sign-in throttling counts and for Secure cookies behind a TLS-terminating proxy.
    trusted_proxies: list[IpOrNetwork] = ["127.0.0.1"]


class QueueClass(Model):
    """One queue and the resource class of the workers that consume it."""

    tasks: list[str] = []
    pool: Literal["prefork", "threads", "solo"] = "prefork"
    concurrency: int = Field(2, ge=1)
    prefetch_multiplier: int = Field(4, ge=1)
    #: Celery's worker_disable_prefetch: take a message only when a slot is free.
    disable_prefetch: bool = False
    acks_late: bool = True
    reject_on_worker_lost: bool = False
    #: RSS of one pool process above which the guard stops its task mid-flight.
    memory_limit: PositiveSize | None = None
    on_memory_exceeded: OnMemoryExceeded = OnMemoryExceeded()
    time_limit: TimeLimit = TimeLimit()
    max_tasks_per_child: int | None = Field(None, ge=1)
    soft_shutdown_timeout: Duration = 0.0
    #: Fleet-wide (all workers) rate for the whole queue, and per task name.
    rate_limit: RateLimit | None = None
    task_rate_limits: dict[str, RateLimit] = {}
    retry: Retry | None = None
    #: Deliveries of one message (the first included) before it goes to the queue's
    #: dead-letter list instead: a task that kills its pool process is otherwise
    #: requeued forever under acks_late + reject_on_worker_lost (see fleet.deliveries).
    max_deliveries: int = Field(DEFAULT_MAX_DELIVERIES, ge=1)
    priority: int | None = Field(None, ge=0, le=9)
    kubernetes: Kubernetes = Kubernetes()
    autoscaling: Autoscaling = Autoscaling()


class FleetConfig(Model):
    version: Literal[1] = 1
    broker: Broker = Broker()
    #: Workers send Celery task events (the dashboard and Flower need them). They cost
    #: three Redis publishes per task: about a third of a no-op task's cost here.
    events: bool = True
    event_stream: EventStream = EventStream()
    results: Results = Results()
    payloads: Payloads = Payloads()
    jobs: Jobs = Jobs()
    #: Modules whose tasks the workers register.
    imports: list[str] = ["tasks.aggregate", "tasks.io", "tasks.heavy"]
    default_queue: str = "default"
    size_rules: list[SizeRule] = []
    autoscaler: Autoscaler = Autoscaler()
    dashboard: Dashboard = Dashboard()
    queues: dict[str, QueueClass] = Field(min_length=1)
    #: Where the file was read from, for messages; not a YAML key.
    source: str = Field("queues.yaml", exclude=True)

    @property
    def result_url(self) -> str:
        return self.results.url or self.broker.url

    def queue(self, name: str) -> QueueClass:
        try:
            return self.queues[name]
        except KeyError:
            known = ", ".join(sorted(self.queues))
            raise ConfigError(
                [Problem(self.source, f"queues.{name}", f"no such queue (known: {known})")]
            ) from None
