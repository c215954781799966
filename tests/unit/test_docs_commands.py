"""Every `fleet ...` command the docs and the shipped YAML name exists.

A comment in queues.yaml once sent users to a `fleet demo` that was never a command; a
reader who types what a comment or a page says must find the command there.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

from fleet.cli import cli
from tests.conftest import ROOT

WORD = r"[a-z][a-z0-9-]*"
#: `fleet up --demo` in prose; in a code block, a line that starts with the command.
QUOTED = re.compile(rf"`fleet ({WORD})(?: ({WORD}))?")
SHOWN = re.compile(rf"^\s*(?:\$\s*)?fleet ({WORD})(?: ({WORD}))?")


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "queues.yaml",
            *sorted((ROOT / "k8s").rglob("*.yaml"))]


def named(text: str) -> list[tuple[str, str | None]]:
    """(command, subcommand or None) of every `fleet X [Y]` that ``text`` names."""
    found = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        found += QUOTED.findall(line)
        if fenced and (shown := SHOWN.match(line)):
            found.append(shown.groups())
    return [(name, sub or None) for name, sub in found]


def unknown(text: str) -> list[str]:
    """The `fleet X [Y]` of ``text`` that name no command (or no subcommand of a group);
    a hidden command counts as none: `fleet --help` does not show it."""
    missing = []
    for name, sub in named(text):
        command = cli.commands.get(name)
        if command is None or command.hidden:
            missing.append(f"fleet {name}")
        elif isinstance(command, click.Group) and sub and sub not in command.commands:
            missing.append(f"fleet {name} {sub}")
    return missing


def test_the_check_sees_a_command_that_does_not_exist():
    assert unknown("run `fleet demo` to start\n") == ["fleet demo"]  # hidden
    assert unknown("run `fleet frob` to start\n") == ["fleet frob"]
    assert unknown("```\nfleet jobs frobnicate JOB\n```") == ["fleet jobs frobnicate"]
    assert unknown("`fleet up --demo`, `fleet render k8s`, `fleet jobs status JOB`") == []


def test_every_command_the_docs_and_shipped_yaml_name_exists():
    count = 0
    problems = []
    for path in documents():
        text = path.read_text()
        count += len(named(text))
        problems += [f"{path.relative_to(ROOT)}: {m}" for m in unknown(text)]
    assert count > 50  # the patterns still find the commands the README shows
    assert problems == []
