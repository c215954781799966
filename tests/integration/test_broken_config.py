"""Every `fleet` command, given a broken queues.yaml, exits 2 with the problem's file,
line and key, and no traceback. The commands are read from the CLI itself, so a new
command without a row here fails the test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from fleet.cli import cli
from tests.conftest import ROOT, shipped_config

#: Arguments each command needs besides --config (all of them fail before using these).
ARGS = {
    ("validate",): ["{config}"],
    ("worker",): ["--queue", "default"],
    ("submit",): ["tasks.aggregate.sum_by", "-i", "{data}"],
    ("jobs", "list"): [],
    ("jobs", "status"): ["job-000000000000"],
    ("jobs", "watch"): ["job-000000000000"],
    ("jobs", "retry"): ["job-000000000000"],
    ("dead", "list"): [],
    ("dead", "show"): ["x"],
    ("dead", "requeue"): ["x"],
    ("dead", "purge"): ["default"],
    ("render", "k8s"): [],
    ("render", "keda"): [],
    ("render", "sync"): [],
    ("up",): ["--workdir", "{tmp}/work"],
    ("dashboard",): ["--port", "0"],
    ("demo",): ["--workdir", "{tmp}/work"],
    ("autoscale",): ["--backend", "local", "--workdir", "{tmp}/work"],
    ("simulate",): ["{data}"],
    ("tune",): ["{data}"],
    ("reconcile",): ["--once"],
    ("probe",): ["--queue", "default"],
    ("trace", "synth"): ["steady", "-o", "{tmp}/trace.jsonl"],
    ("trace", "export"): ["-o", "{tmp}/trace.jsonl"],
}
#: Those that import the task modules of `imports:` (the others never need them).
IMPORTING = [("validate",), ("worker",), ("submit",), ("up",), ("demo",), ("autoscale",)]


def commands(group: click.Group = cli, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name)


def test_every_command_has_a_row():
    assert sorted(commands()) == sorted(ARGS)


def run(path: tuple[str, ...], config, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"a": 1}\n')
    args = [a.format(config=config, data=data, tmp=tmp_path) for a in ARGS[path]]
    if path != ("validate",):
        args += ["--config", str(config)]
    # In a directory of its own: nothing a command might write lands in the repository.
    return subprocess.run([sys.executable, "-m", "fleet.cli", *path, *args],
                          capture_output=True, text=True, timeout=90, cwd=tmp_path,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def broken(tmp_path, change) -> str:
    data = shipped_config()
    change(data)
    path = tmp_path / "queues.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("path", sorted(ARGS), ids=" ".join)
def test_a_broken_config_is_exit_2_with_file_line_and_key(tmp_path, path):
    config = broken(tmp_path, lambda d: d["queues"]["default"].update(concurrency="many"))
    done = run(path, config, tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert f"{config}:" in done.stderr and "queues.default.concurrency:" in done.stderr, \
        done.stderr


@pytest.mark.parametrize("path", IMPORTING, ids=" ".join)
def test_a_module_that_cannot_be_imported_is_exit_2_naming_it(tmp_path, path):
    config = broken(tmp_path, lambda d: d.update(imports=["tasks.aggregate", "tasks.agregate"]))
    lines = Path(config).read_text().splitlines()
    line = next(n for n, text in enumerate(lines, 1) if "tasks.agregate" in text)
    done = run(path, config, tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert (f"{config}:{line}: imports.1: cannot import 'tasks.agregate': No module named "
            "'tasks.agregate'") in done.stderr, done.stderr


def test_validate_survives_a_module_that_exits_or_raises_at_import(tmp_path):
    (tmp_path / "exits_at_import.py").write_text("import os\nos._exit(7)\n")
    (tmp_path / "raises_at_import.py").write_text("raise RuntimeError('no config here')\n")
    config = broken(tmp_path, lambda d: d.update(imports=["raises_at_import"]))
    done = run(("validate",), config, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "imports.0: cannot import 'raises_at_import': RuntimeError: no config here" \
        in done.stderr
    config = broken(tmp_path, lambda d: d.update(imports=["exits_at_import"]))
    done = run(("validate",), config, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "imports: importing the modules ended the interpreter: exit code 7" in done.stderr
