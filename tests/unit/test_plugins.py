"""The seams: backends and payload stores by name, from entry points (the fleet's own and
a team's), checked when the config loads; the stub backend and store that ship beside
the real ones; the dashboard as an extra. No services: entry points are real ones, in a
dist-info directory the test writes and puts on sys.path, as pip would install it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from autoscale.backends.base import (
    BackendContext,
    BackendError,
    BackendPlugin,
    BudgetedBackend,
    PlanningBackend,
)
from autoscale.backends.local import LocalBackend
from autoscale.backends.stub import StubBackend
from autoscale.build import backend_plugin, build_autoscaler
from autoscale.policy import Budget
from fleet.config import Payloads, load_config
from fleet.errors import ConfigError, PayloadError
from fleet.observe.model import WorkerSample
from fleet.payloads import LocalStore, open_store
from fleet.plugins import BACKENDS, PAYLOAD_STORES, PluginError
from fleet.stubstore import StubStore
from tests.conftest import ROOT, shipped_config, without_module


def write_config(tmp_path: Path, change) -> Path:
    data = shipped_config()
    change(data)
    path = tmp_path / "queues.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def install_plugin(tmp_path: Path, monkeypatch, entry_points: str, module: str) -> None:
    """A distribution named acme-fleet, as pip leaves it: a module and its dist-info."""
    site = tmp_path / "site"
    info = site / "acme_fleet-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-fleet\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    (site / "acme_fleet.py").write_text(textwrap.dedent(module))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "acme_fleet", raising=False)


ACME = """
    from autoscale.backends.base import BackendPlugin
    from autoscale.backends.stub import StubBackend
    from fleet.stubstore import StubStore

    class AcmeBackend(StubBackend):
        name = "acme"

    def create(ctx):
        return AcmeBackend(list(ctx.config.queues), {"default": 3})

    PLUGIN = BackendPlugin(create)
    NOT_A_PLUGIN = 42

    class AcmeStore(StubStore):
        pass

    def store(settings):
        return AcmeStore(settings.prefix)
"""


# -- the registries ---------------------------------------------------------------------

def test_the_fleets_own_plugins_are_registered_by_entry_point():
    assert {"local", "kubernetes", "stub"} <= set(BACKENDS.names())
    assert {"local", "s3", "stub"} <= set(PAYLOAD_STORES.names())
    assert all(isinstance(backend_plugin(n), BackendPlugin) for n in BACKENDS.names())
    assert backend_plugin("local").workers_live_here
    assert not backend_plugin("kubernetes").workers_live_here


def test_an_unknown_backend_is_a_config_problem_with_its_line_and_the_known_names(tmp_path):
    path = write_config(tmp_path, lambda d: d["autoscaler"].update(backend="nomad"))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1)
                if "backend: nomad" in text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    assert (problem.path, problem.line) == ("autoscaler.backend", line)
    assert "unknown autoscaler backend 'nomad'" in problem.reason
    assert "kubernetes, local, stub" in problem.reason
    assert "fleet.autoscaler_backends" in problem.reason


def test_an_unknown_payload_store_is_a_config_problem(tmp_path):
    path = write_config(tmp_path, lambda d: d.setdefault("payloads", {}).update(store="gcs"))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    assert problem.path == "payloads.store" and problem.line
    assert "unknown payload store 'gcs' (registered: local, s3, stub" in problem.reason


def test_a_teams_backend_from_its_own_package_is_validated_and_built(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, """
        [fleet.autoscaler_backends]
        acme = acme_fleet:PLUGIN
        """, ACME)
    path = write_config(tmp_path, lambda d: d["autoscaler"].update(backend="acme"))
    config = load_config(path)
    assert "acme" in BACKENDS.names()
    scaler = build_autoscaler(BackendContext(config, {}, tmp_path / "work"))
    assert type(scaler.backend).__name__ == "AcmeBackend"
    assert scaler.backend.replicas()["default"] == 3
    assert not (tmp_path / "work").exists()  # nothing local was claimed or started


def test_an_entry_point_that_does_not_load_or_is_no_plugin_is_refused(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, """
        [fleet.autoscaler_backends]
        gone = acme_fleet_missing:PLUGIN
        wrong = acme_fleet:NOT_A_PLUGIN
        """, ACME)
    with pytest.raises(PluginError, match=r"'gone' is registered as "
                                          r"'acme_fleet_missing:PLUGIN', which does not load"):
        backend_plugin("gone")
    with pytest.raises(PluginError, match=r"'wrong' .* which is not a BackendPlugin"):
        backend_plugin("wrong")
    with pytest.raises(PluginError, match=r"unknown autoscaler backend 'nope'"):
        backend_plugin("nope")


def test_a_teams_payload_store_is_opened_by_name(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, """
        [fleet.payload_stores]
        acme = acme_fleet:store
        """, ACME)
    store = open_store(Payloads(store="acme", prefix="p/"))
    assert type(store).__name__ == "AcmeStore"
    assert store.put("k", b"x") == "stub://p/k"


# -- the stub backend -------------------------------------------------------------------

def sample(hostname: str) -> WorkerSample:
    return WorkerSample(hostname=hostname, queue="default", pod="pod", pid=1, concurrency=1,
                        active=0, reserved=0, processed=0, cpu_percent=0.0, rss_main=0,
                        rss_children=0, memory_available=0, at=0.0)


def test_the_stub_backend_remembers_what_it_was_asked_and_fails_on_cue():
    stub = StubBackend(["default", "heavy"], {"heavy": 2}, fail={"heavy"})
    assert stub.replicas() == {"default": 0, "heavy": 2}
    stub.scale("default", 4, [sample("w1")])
    with pytest.raises(BackendError, match="on purpose"):
        stub.scale("heavy", 0, [])
    with pytest.raises(BackendError, match="no queue 'xl'"):
        stub.scale("xl", 1, [])
    assert stub.replicas() == {"default": 4, "heavy": 2}
    assert [(c.queue, c.replicas, c.workers) for c in stub.calls] == [
        ("default", 4, ["w1"]), ("heavy", 0, [])]
    assert stub.plan("default", 1, []) == ["set default from 4 to 1"]
    stub.close()
    with pytest.raises(BackendError, match="closed"):
        stub.replicas()


def test_the_stub_backend_has_the_optional_abilities_as_named_protocols():
    stub = StubBackend(["default"])
    assert isinstance(stub, BudgetedBackend) and isinstance(stub, PlanningBackend)
    with pytest.raises(BackendError, match="no capacity"):
        stub.budget()
    assert StubBackend(["default"], capacity=Budget(cpu=4.0)).budget() == Budget(cpu=4.0)
    with pytest.raises(ValueError, match="not in"):
        StubBackend(["default"], {"xl": 1})


def test_the_registered_stub_starts_every_queue_at_its_minimum(tmp_path):
    config = load_config(write_config(tmp_path, lambda d: d["queues"]["default"].update(
        autoscaling={**d["queues"]["default"].get("autoscaling", {}), "min_replicas": 1})))
    scaler = build_autoscaler(BackendContext(config, {}, tmp_path), backend_plugin("stub"))
    assert isinstance(scaler.backend, StubBackend)
    assert scaler.backend.replicas() == {
        q: c.autoscaling.min_replicas for q, c in config.queues.items()}
    assert scaler.backend.replicas()["default"] == 1


def test_the_local_backend_claims_the_workdir_only_when_it_acts(tmp_path):
    config = load_config(ROOT / "queues.yaml")
    claims = []
    ctx = BackendContext(config, {}, tmp_path, dry_run=True,
                         claim=lambda: claims.append(1) or None)
    backend = backend_plugin("local").create(ctx)
    assert isinstance(backend, LocalBackend) and backend.logdir == tmp_path / "logs"
    assert claims == [] and backend.registry is None
    backend.close()


# -- the stub store ---------------------------------------------------------------------

def test_the_stub_store_keeps_the_payload_store_contract(tmp_path):
    store = open_store(Payloads(store="stub", prefix="t/"))
    assert isinstance(store, StubStore)
    url = store.put("a/b.json", b"[1]")
    assert url == store.url_for("a/b.json") == "stub://t/a/b.json"
    assert store.get(url) == b"[1]"
    with store.local_copy(url) as path:
        assert path.read_bytes() == b"[1]"
    source = tmp_path / "in.bin"
    source.write_bytes(b"xyz")
    assert store.get(store.put_file("f", source)) == b"xyz"
    with pytest.raises(PayloadError, match="cannot read"):
        store.put_file("g", tmp_path / "missing")
    store.delete(url)
    store.delete(url)  # twice is fine: cleanup may run twice
    with pytest.raises(PayloadError, match="is gone"):
        store.get(url)
    with pytest.raises(PayloadError, match="not in the stub store"):
        store.get("file:///etc/passwd")


def test_the_local_store_still_comes_by_default(tmp_path):
    store = open_store(Payloads(path=str(tmp_path)))
    assert isinstance(store, LocalStore) and store.root == tmp_path.resolve()


# -- the CLI ----------------------------------------------------------------------------

def cli(tmp_path: Path, *args: str, pythonpath: str = str(ROOT)):
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": pythonpath})


def test_an_unknown_backend_on_the_command_line_is_exit_2_with_the_names(tmp_path):
    done = cli(tmp_path, "autoscale", "--backend", "nomad", "--once",
               "--config", str(ROOT / "queues.yaml"))
    assert done.returncode == 2, done.stderr
    assert "unknown autoscaler backend 'nomad' (registered: docker, kubernetes, local, stub" \
        in done.stderr
    assert "Traceback" not in done.stderr


def test_the_docker_backend_without_its_extra_names_the_extra(tmp_path):
    done = cli(tmp_path, "autoscale", "--backend", "docker", "--once",
               "--config", str(ROOT / "queues.yaml"),
               pythonpath=without_module(tmp_path, "docker"))
    assert done.returncode != 0
    assert "the docker backend needs the Docker SDK" in done.stderr, done.stderr
    assert "pip install 'fleet[docker]'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def no_dashboard_libraries(tmp_path) -> str:
    """FastAPI cannot be imported: `pip install fleet` without the dashboard extra."""
    return without_module(tmp_path, "fastapi")


def test_the_dashboard_without_its_extra_is_exit_2_naming_the_extra(
        tmp_path, no_dashboard_libraries):
    done = cli(tmp_path, "dashboard", "--port", "0", "--config", str(ROOT / "queues.yaml"),
               pythonpath=no_dashboard_libraries)
    assert done.returncode == 2, done.stderr
    assert "the dashboard is not installed here (fastapi is missing): " \
           "pip install 'fleet[dashboard]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_fleet_up_without_the_extra_runs_on_without_a_dashboard(
        tmp_path, no_dashboard_libraries):
    script = ("from pathlib import Path; from rich.console import Console; "
              "from fleet.config import load_config; from fleet.up import _start_dashboard; "
              f"c = load_config({str(ROOT / 'queues.yaml')!r}); "
              "print('board:', _start_dashboard(c, Path('.'), 0, Console(width=200)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": no_dashboard_libraries})
    assert done.returncode == 0, done.stderr
    assert "the dashboard is not installed here" in done.stdout
    assert "the fleet runs without a dashboard" in done.stdout
    assert done.stdout.strip().endswith("board: None")
