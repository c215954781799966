"""The typed app and the explicit hooks call: no services needed."""

from __future__ import annotations

from celery import Celery, signals

from fleet.config import load_config
from fleet.factory import create_app
from fleet.fleetapp import FleetApp, fleet_config_of
from fleet.jobs import hooks
from tests.conftest import ROOT


def test_create_app_returns_a_fleet_app_with_its_typed_config():
    config = load_config(ROOT / "queues.yaml")
    app = create_app(config, queue="heavy")
    assert isinstance(app, FleetApp)
    assert app.config is config
    assert fleet_config_of(app) is config
    assert app.fleet_queue == "heavy"


def test_a_plain_celery_app_has_no_fleet_config():
    assert fleet_config_of(Celery("plain")) is None
    assert fleet_config_of(None) is None


def _failure_receivers() -> list:
    return [r for r in signals.task_failure._live_receivers(None)
            if getattr(r, "__name__", "") == "_on_failure"]


def test_hooks_are_connected_once_however_often_apps_are_made():
    config = load_config(ROOT / "queues.yaml")
    hooks.connect()
    create_app(config)
    create_app(config)
    hooks.connect()
    assert len(_failure_receivers()) == 1
