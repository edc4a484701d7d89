"""YAML documents that remember where every value came from, so errors can say file:line:col."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode


@dataclass(frozen=True, slots=True)
class ConfigError:
    """One problem in one configuration file, for a person to fix."""

    file: Path
    line: int  # 1-based
    col: int  # 1-based
    message: str
    hint: str = ""
    warning: bool = False  # it works, but probably not as meant: reported, never fatal

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}:{self.col}: {'warning: ' if self.warning else ''}{self.message}"
        return f"{text} — {self.hint}" if self.hint else text


class ConfigErrors(Exception):
    """All the problems found in a configuration, reported together."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self.errors = sorted(errors, key=lambda e: (str(e.file), e.line, e.col))
        super().__init__("\n".join(str(e) for e in self.errors))


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps timestamps as strings. `yes/no/on/off` stay YAML 1.1 booleans (bool
    keys take them); where text is expected, gateway.config reports one with the hint to quote
    it, from :meth:`YamlDoc.plain_scalar`."""


# YAML 1.1 turns `2024-01-01` into a date; config values must be what was written.
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:timestamp",)]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@dataclass(frozen=True, slots=True)
class YamlDoc:
    """A parsed YAML file: its Python data and its node tree (for positions)."""

    path: Path
    data: Any
    node: Node | None

    def position(self, loc: Sequence[str | int]) -> tuple[int, int]:
        """1-based (line, col) of the value at ``loc``; the nearest existing parent if absent.

        Parts of ``loc`` that are not keys of the current mapping (pydantic adds union tags and
        validator names) are skipped rather than treated as missing.
        """
        node = self.node
        if node is None:
            return (1, 1)
        for part in loc:
            child = _child(node, part)
            if child is not None:
                node = child
        return (node.start_mark.line + 1, node.start_mark.column + 1)

    def key_position(self, loc: Sequence[str | int]) -> tuple[int, int]:
        """Position of the *key* at the end of ``loc`` (for unknown-key errors)."""
        if not loc:
            return self.position(loc)
        parent = self.node
        for part in loc[:-1]:
            child = _child(parent, part) if parent is not None else None
            if child is not None:
                parent = child
        if isinstance(parent, MappingNode):
            for key, _value in parent.value:
                if isinstance(key, ScalarNode) and key.value == str(loc[-1]):
                    return (key.start_mark.line + 1, key.start_mark.column + 1)
        return self.position(loc)

    def error(self, loc: Sequence[str | int], message: str, hint: str = "", *, key: bool = False,
              warning: bool = False) -> ConfigError:
        line, col = self.key_position(loc) if key else self.position(loc)
        return ConfigError(self.path, line, col, message, hint, warning)

    def plain_scalar(self, loc: Sequence[str | int]) -> str | None:
        """The text of the unquoted scalar at ``loc`` as written (``no``, ``0755``), or None when
        it is absent, quoted or no scalar: what YAML 1.1 may have turned into a bool or number."""
        node = self.node
        for part in loc:
            node = _child(node, part) if node is not None else None
        if isinstance(node, ScalarNode) and node.style is None:
            return str(node.value)
        return None


def _child(node: Node, part: str | int) -> Node | None:
    if isinstance(node, MappingNode):
        for key, value in node.value:
            if isinstance(key, ScalarNode) and key.value == str(part):
                child: Node = value  # PyYAML's stubs type a node's value as Any
                return child
    elif isinstance(node, SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        item: Node = node.value[part]
        return item
    return None


def load_yaml(path: Path, display: Path | None = None) -> tuple[YamlDoc | None, list[ConfigError]]:
    """Parse one YAML file. Returns the document, or None and the errors that stopped it."""
    shown = display or path
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return None, [ConfigError(shown, 1, 1, f"file is not UTF-8 text ({exc.reason})",
                                  "save the file as UTF-8")]
    except OSError as exc:
        return None, [ConfigError(shown, 1, 1, f"cannot read file: {exc.strerror}",
                                  "check that the file exists and is readable")]
    if "\t" in text:
        for lineno, line in enumerate(text.splitlines(), 1):
            indent = line[: len(line) - len(line.lstrip())]
            if "\t" in indent:
                return None, [ConfigError(shown, lineno, indent.index("\t") + 1,
                                          "tab character used for indentation",
                                          "YAML needs spaces: replace the tab with spaces")]
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        row, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or "invalid YAML"
        if exc.context:
            problem = f"{exc.context}, {problem}"
        return None, [ConfigError(shown, row, col, f"YAML syntax error: {problem}",
                                  _yaml_hint(problem))]
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML error we know is marked
        return None, [ConfigError(shown, 1, 1, f"YAML error: {exc}", "check the file's syntax")]
    finally:
        loader.dispose()
    doc = YamlDoc(shown, data, node)
    return doc, _duplicate_keys(doc)


def _yaml_hint(problem: str) -> str:
    if "indent" in problem or "mapping values are not allowed" in problem or "expected <block end>" in problem:
        return "check the indentation: keys at the same level must start in the same column, using spaces"
    if "could not find expected ':'" in problem:
        return "each setting is written `key: value`; a ':' is missing or a line is indented wrongly"
    if "found character" in problem and "cannot start any token" in problem:
        return "quote the value, e.g. \"@value\""
    return "check the YAML syntax on this line and the one before it"


def _duplicate_keys(doc: YamlDoc) -> list[ConfigError]:
    errors: list[ConfigError] = []
    stack = [doc.node] if doc.node is not None else []
    while stack:
        node = stack.pop()
        if isinstance(node, MappingNode):
            seen: dict[str, Node] = {}
            for key, value in node.value:
                if isinstance(key, ScalarNode):
                    if key.value in seen:
                        first = seen[key.value].start_mark.line + 1
                        errors.append(ConfigError(
                            doc.path, key.start_mark.line + 1, key.start_mark.column + 1,
                            f"key '{key.value}' appears twice in the same block",
                            f"keep only one (the first is on line {first})"))
                    else:
                        seen[key.value] = key
                stack.append(value)
        elif isinstance(node, SequenceNode):
            stack.extend(node.value)
    return errors
