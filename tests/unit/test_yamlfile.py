"""Key paths to line numbers: what every config problem's ``file:line`` comes from."""

from __future__ import annotations

from fleet.yamlfile import line_of, load_yaml


def test_a_key_path_finds_its_own_line_or_its_nearest_ancestors(tmp_path):
    path = tmp_path / "queues.yaml"
    path.write_text("version: 1\nqueues:\n  io:\n    tasks:\n      - tasks.io.*\n")
    _, lines, duplicates = load_yaml(path)
    assert not duplicates
    assert line_of(("queues", "io", "tasks", 0), lines) == 5
    assert line_of(("queues", "io"), lines) == 3
    # A key left out (a default that a rule objects to) points at the nearest parent.
    assert line_of(("queues", "io", "time_limit", "hard"), lines) == 3
    assert line_of(("jobs", "ledger"), lines) == line_of((), lines) == 1


def test_no_lines_at_all_means_no_line():
    assert line_of(("queues", "io"), {}) is None
