"""What the docker backend asks the engine for, decided without one
(autoscale.backends.docker.container_spec); the engine's side: tests/containers."""

from __future__ import annotations

from autoscale.backends.docker import (
    CONFIG_IN_CONTAINER,
    LABEL_CONFIG,
    LABEL_FLEET,
    LABEL_QUEUE,
    config_hash,
    container_spec,
)
from fleet.config import parse_config
from tests.conftest import deep_merge, shipped_config

ENV = {"FLEET_BROKER_URL": "redis://127.0.0.1:6379/3", "FLEET_KEY_PREFIX": "t1:",
       "FLEET_LEDGER_URL": "sqlite:////data/ledger.sqlite", "HOME": "/root",
       "AWS_SECRET_ACCESS_KEY": "not for the containers"}


def config(overrides: dict | None = None):
    return parse_config(deep_merge(shipped_config(), overrides or {}), "queues.yaml", {})


def spec(cfg, queue="heavy", seq=3):
    return container_spec(cfg, queue, seq, fleet_id="t1", digest="abc123", node="box",
                          config_path="/etc/q.yaml", env=ENV)


def test_a_replica_is_the_queues_worker_with_the_manifests_limits():
    s = spec(config())
    assert s.name == "fleet-t1-heavy-3"
    assert s.hostname == "fleet-t1-heavy-3@box"
    o = s.options
    assert o["command"] == ["worker", "--queue", "heavy", "--hostname", s.hostname]
    assert o["mem_limit"] == o["memswap_limit"] == 1536 << 20  # no swap, as a kubelet
    assert o["nano_cpus"] == 1_000_000_000
    assert o["labels"] == {LABEL_FLEET: "t1", LABEL_QUEUE: "heavy", LABEL_CONFIG: "abc123"}
    assert o["volumes"] == {"/etc/q.yaml": {"bind": CONFIG_IN_CONTAINER, "mode": "ro"}}
    assert o["network_mode"] == "host"
    assert o["init"] is True  # PID 1 is tini, which passes the stop on to the worker


def test_only_the_fleets_own_variables_go_into_the_container():
    env = spec(config()).options["environment"]
    assert env == {"FLEET_BROKER_URL": ENV["FLEET_BROKER_URL"], "FLEET_KEY_PREFIX": "t1:",
                   "FLEET_LEDGER_URL": ENV["FLEET_LEDGER_URL"],
                   "FLEET_CONFIG": CONFIG_IN_CONTAINER}


def test_millicores_user_and_extra_volumes():
    cfg = config({"autoscaler": {"docker": {"user": "1000:1000", "network": "fleet-net",
                                            "volumes": ["/srv/payloads:/payloads:ro",
                                                        "/scratch"]}},
                  "queues": {"io": {"kubernetes": {"resources": {"limits": {"cpu": "500m"}}}}}})
    o = spec(cfg, "io").options
    assert o["nano_cpus"] == 500_000_000
    assert o["user"] == "1000:1000" and o["network_mode"] == "fleet-net"
    assert o["volumes"]["/srv/payloads"] == {"bind": "/payloads", "mode": "ro"}
    assert o["volumes"]["/scratch"] == {"bind": "/scratch", "mode": "rw"}


def test_the_config_hash_follows_the_mounted_file(tmp_path):
    cfg = config()
    path = tmp_path / "queues.yaml"
    path.write_text("a: 1\n")
    first = config_hash(str(path), cfg)
    assert first == config_hash(str(path), cfg)
    path.write_text("a: 2\n")
    assert config_hash(str(path), cfg) != first
    # No file: the parsed config's own hash, stable.
    assert config_hash(str(tmp_path / "gone.yaml"), cfg) == config_hash(None, cfg)
    # Another broker (a new embedded Redis port) or image: not the same containers.
    env = {"FLEET_BROKER_URL": "redis://127.0.0.1:7001/0", "HOME": "/root"}
    base = config_hash(str(path), cfg, env, "fleet:a")
    assert config_hash(str(path), cfg, {**env, "HOME": "/x"}, "fleet:a") == base
    assert config_hash(str(path), cfg, {**env, "FLEET_BROKER_URL": "redis://h:7002/0"},
                       "fleet:a") != base
    assert config_hash(str(path), cfg, env, "fleet:b") != base
