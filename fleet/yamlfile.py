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
        _Walk(name, lines, problems).visit(node, (), set(), 1)
    return data, lines, problems


def line_of(path: tuple, lines: dict[KeyPath, int]) -> int | None:
    """The line of key ``path``, or of its nearest ancestor in the file: a problem with
    a key left out (a default) or a value pydantic split up points at its parent."""
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


#: A config has hundreds of nodes; aliases of aliases can expand to billions ("billion
#: laughs"), which would hang every command reading the file.
MAX_NODES = 100_000


class _Walk:
    """Records each key path's line and the duplicate keys, refusing the two shapes
    of alias that would otherwise end in a RecursionError or never end at all."""

    def __init__(self, name: str, lines: dict, problems: list):
        self.name, self.lines, self.problems = name, lines, problems
        self.visited = 0

    def refuse(self, reason: str, line: int) -> None:
        raise ConfigError([Problem(self.name, "", f"not valid YAML: {reason}", line)])

    def visit(self, node: yaml.Node, path: KeyPath, above: set[int], line: int) -> None:
        """``above``: the nodes on the way here (an alias to one of them is a cycle);
        ``line``: where this node is used (an alias node's own mark is its anchor's)."""
        if id(node) in above:
            self.refuse("recursive alias (a node that contains itself)", line)
        self.visited += 1
        if self.visited > MAX_NODES:
            self.refuse(f"aliases expand to more than {MAX_NODES:,} nodes", line)
        self.lines.setdefault(path, node.start_mark.line + 1)
        if not isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            return
        above = above | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines[(*path, index)] = item.start_mark.line + 1
                self.visit(item, (*path, index), above, line)
            return
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            key_line = key_node.start_mark.line + 1
            if key in seen:
                dotted = ".".join(str(p) for p in (*path, key))
                reason = f"duplicate key (first defined on line {seen[key]})"
                self.problems.append(Problem(self.name, dotted, reason, key_line))
                continue
            seen[key] = key_line
            self.lines[(*path, key)] = key_line
            self.visit(value_node, (*path, key), above, key_line)
