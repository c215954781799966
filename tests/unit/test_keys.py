"""fleet/keys.py owns every Redis key name of fleet's own: scoped by the broker's key
prefix, distinct from each other, and spelled nowhere else."""

from __future__ import annotations

import re

from fleet import keys
from fleet.config import parse_config
from tests.conftest import ROOT, deep_merge, shipped_config

CONFIG = parse_config(deep_merge(shipped_config(), {"broker": {"key_prefix": "t-ab12:"}}), "test")

NAMES = {
    "workers": keys.workers_key(CONFIG),
    "overrides": keys.overrides_key(CONFIG),
    "latest decisions": keys.latest_decisions_key(CONFIG),
    "changes": keys.changes_key(CONFIG),
    "events": keys.events_stream_key(CONFIG),
    "a delivery counter": keys.delivery_counter_key(CONFIG, "tag-1"),
    "a dead-letter list": keys.dead_letter_prefix(CONFIG) + "heavy",
    "a rate bucket": keys.rate_bucket_key(CONFIG, "task", "tasks.heavy.grow"),
}


def test_every_key_is_under_the_broker_key_prefix():
    for what, name in NAMES.items():
        assert name.startswith("t-ab12:fleet:"), (what, name)


def test_no_two_kinds_of_state_share_a_key():
    assert len(set(NAMES.values())) == len(NAMES)


def test_the_transport_and_the_config_agree_on_the_dead_letter_prefix():
    assert keys.dead_letter_prefix_for("t-ab12:") == keys.dead_letter_prefix(CONFIG)


def test_no_module_but_keys_spells_a_fleet_key():
    """A literal "fleet:<name>" or "{prefix}fleet:" outside fleet/keys.py is a key name
    another layer cannot find; the CLI's "fleet: error" messages do not count."""
    pattern = re.compile(r"""["'}]fleet:[a-z{]""")
    found = []
    for path in [*(ROOT / "fleet").rglob("*.py"), *(ROOT / "autoscale").rglob("*.py")]:
        if path == ROOT / "fleet" / "keys.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and "fleet:claim" not in line and "fleet:latest" not in line:
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []
