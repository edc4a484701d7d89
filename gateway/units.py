"""Durations (`500ms`, `10s`), byte sizes (`64KiB`) and identifiers as pydantic types."""

from __future__ import annotations

import argparse
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, WithJsonSchema

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "kB": 1000, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2,
               "GB": 1000**3, "GiB": 1024**3, "TB": 1000**4, "TiB": 1024**4}


def parse_duration(value: Any) -> float:
    """`500ms`, `10s`, `1m30s`, `2h`, `1d` -> seconds. Bare numbers are refused: units are not guessed."""
    if isinstance(value, bool) or isinstance(value, (int, float)):
        raise ValueError(f"duration {value!r} has no unit — write it with one, e.g. '{value}s' or '{value}ms'")
    if not isinstance(value, str):
        raise ValueError("expected a duration such as '500ms', '10s' or '5m'")
    text = value.strip()
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if text[pos:match.start()].strip():
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or text[pos:].strip():
        raise ValueError(f"'{value}' is not a duration — write a number and a unit: ms, s, m, h or d "
                         "(e.g. '500ms', '10s', '1m30s')")
    return total


def duration_arg(text: str) -> float:
    """An argparse ``type=`` for a command-line duration (``--duration 5s``, ``--timeout 500ms``):
    the same units as the configuration, more than zero."""
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def parse_size(value: Any) -> int:
    """`65536`, `64KiB`, `256MiB`, `1GB` -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '64KiB' or '256MiB'")
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"'{value}' is not a size — write a number with B, KiB, MiB or GiB (e.g. '256MiB')")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


DURATION_PATTERN = r"^\s*(\d+(\.\d+)?\s*(ms|s|m|h|d)\s*)+$"
"""What :func:`parse_duration` accepts, for the JSON Schemas of the configuration files."""
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*(B|kB|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?\s*$"
"""What :func:`parse_size` accepts as text."""

# The JSON Schemas (`sluice schema`) describe what is written in the file, not the parsed number.
Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0), WithJsonSchema({
    "type": "string", "pattern": DURATION_PATTERN,
    "description": "a number and a unit: ms, s, m, h or d", "examples": ["500ms", "10s", "1m30s"]})]
"""Seconds, written in config with a unit."""
ByteSize = Annotated[int, BeforeValidator(parse_size), Field(ge=0), WithJsonSchema({
    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": SIZE_PATTERN}],
    "description": "bytes, or a number with B, KiB, MiB or GiB", "examples": ["64KiB", "256MiB"]})]
"""Bytes, written in config as a number or with a unit."""
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]
"""Device, gateway and site ids: letters, digits, `_ . -`; used in topics, tags and file names."""
