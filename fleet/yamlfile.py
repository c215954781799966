"""Read a YAML file into plain data plus a map from key path to line number.

PyYAML silently keeps the last of two equal keys; a duplicated queue name would then
vanish without a word, so duplicates are reported here as problems with their lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fleet.errors import ConfigError, Problem

KeyPath = tuple[str | int, ...]


def load_yaml(path: Path) -> tuple[Any, dict[KeyPath, int], list[Problem]]:
    """Parse ``path``; return (data, lines by key path, duplicate-key problems).

    Raises ConfigError when the file is missing or is not YAML at all.
    """
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem(name, "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(name, "", f"cannot read file: {exc}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem(name, "", f"not valid YAML: {reason}", line)]) from None
    lines: dict[KeyPath, int] = {}
    problems: list[Problem] = []
    if node is not None:
        _walk(node, (), lines, problems, name)
    return data, lines, problems


def _walk(node: yaml.Node, path: KeyPath, lines: dict, problems: list, name: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = ".".join(str(p) for p in (*path, key))
                reason = f"duplicate key (first defined on line {seen[key]})"
                problems.append(Problem(name, dotted, reason, line))
                continue
            seen[key] = line
            lines[(*path, key)] = line
            _walk(value_node, (*path, key), lines, problems, name)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _walk(item, (*path, index), lines, problems, name)
