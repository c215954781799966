"""The example alert rules: well-formed as a Prometheus rule file (what ``promtool check
rules`` checks: structure, durations, PromQL that parses, templates), and every metric
they use is one the dashboard really exports."""

from __future__ import annotations

import re
from pathlib import Path

import promql_parser
import yaml
from prometheus_client import generate_latest

from tests.conftest import ROOT

RULES = ROOT / "docs" / "prometheus" / "fleet-alerts.yml"
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
KEYS = {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}


def test_rule_file_is_valid():
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    names = set()
    for group in doc["groups"]:
        assert set(group) <= {"name", "rules", "interval"} and group["rules"]
        assert group["name"] not in names
        names.add(group["name"])
        for rule in group["rules"]:
            assert set(rule) <= KEYS, rule
            assert re.match(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$", rule["alert"])
            promql_parser.parse(rule["expr"])  # raises on bad PromQL
            if "for" in rule:
                assert DURATION.match(rule["for"]), rule["for"]
            for text in {**rule.get("labels", {}), **rule.get("annotations", {})}.values():
                assert text.count("{{") == text.count("}}")


def test_every_metric_used_is_exported(fleet, tmp_path):
    from fleet.dashboard.service import DashboardService

    svc = DashboardService(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}")
    try:
        svc.sampler.poll()
        exported = generate_latest(svc.registry).decode()
    finally:
        svc.stop()
    families = set(re.findall(r"^# TYPE (\w+) (\w+)", exported, re.M))
    known = set()
    for name, kind in families:
        known.add(name)
        if kind == "counter":
            known.add(name + "_total")
    used = set()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            used |= set(re.findall(r"\b((?:celery|fleet)_[a-z_]+)\b", rule["expr"]))
    assert used and used <= known, used - known


def test_every_metric_is_documented():
    from fleet.dashboard import metrics

    doc = (ROOT / "docs" / "dashboard.md").read_text()
    source = Path(metrics.__file__).read_text()
    names = set(re.findall(r'"((?:celery|fleet)_[a-z_]+)"', source))
    missing = sorted(n for n in names if n not in doc)
    assert not missing, missing
