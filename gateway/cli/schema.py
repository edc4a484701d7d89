"""JSON Schemas of every configuration file, generated from the pydantic models ``sluice check``
validates with, and ``sluice schema DIR`` that writes them.

Editors with the YAML language server (VS Code's YAML extension, Neovim, Helix, JetBrains) read a
file's first line ``# yaml-language-server: $schema=<path>`` and then complete keys, show each
key's description and flag unknown keys, wrong types and values outside an enum while typing.
The schemas ship in ``config/schemas/`` (package data of ``gateway.shipped_config``); the checked-in
copies equal what :func:`schemas` generates (a test says so), and ``sluice init`` copies them
next to the files it writes.

:data:`KINDS` is the one table of file kinds: its name, the model, and where such files live in a
configuration directory. A new kind of file is one line there.

What a schema cannot say is left to ``sluice check``: checks across keys (``cert_file`` without
``key_file``), across files (a device's profile exists, two devices on one port), and a value
written as a ``${ENV}`` reference where a number is expected.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Union

from pydantic import Field, TypeAdapter

from gateway import driver
from gateway.polling import format_duration
from gateway.units import DURATION_PATTERN

__all__ = ["KINDS", "MODELINE", "FileKind", "add_parsers", "kind_of", "modeline", "schemas", "write_schemas"]

SCHEMA_DIR: Final = "schemas"
"""Where the schemas live in a configuration directory (``config/schemas/``, ``DIR/schemas/``)."""
MODELINE: Final = "# yaml-language-server: $schema="
"""The start of the first line of every shipped YAML file."""


def _union(models: list[type[Any]], key: str) -> Any:
    """One of ``models``, chosen by the value of ``key`` (``protocol:``)."""
    if len(models) == 1:
        return models[0]
    return Annotated[Union[tuple(models)], Field(discriminator=key)]  # noqa: UP007 (a runtime tuple of types)


def _model(dotted: str) -> Callable[[], Any]:
    """The model named ``module:Class``, imported when a schema is generated: `sluice init` and
    `sluice run` need the table of kinds, not the trace, ingest and simulator models."""
    module, _sep, name = dotted.partition(":")
    return lambda: getattr(importlib.import_module(module), name)


def _device_model() -> Any:
    return _union([m.DeviceModel for m in driver.driver_modules()], "protocol")


def _profile_model() -> Any:
    kinds = driver.known_profile_kinds()
    return _union([driver.driver_for_profile_kind(k).ProfileModel for k in kinds], "protocol")  # type: ignore[union-attr]


@dataclass(frozen=True, slots=True)
class FileKind:
    """One kind of configuration file: ``name`` names its schema (``<name>.schema.json``),
    ``model`` gives the type ``sluice check`` validates it with, ``files`` are where such files
    live in a configuration directory (patterns, relative to the directory of gateway.yaml)."""

    name: str
    title: str
    model: Callable[[], Any]
    files: tuple[str, ...]

    @property
    def filename(self) -> str:
        return f"{self.name}.schema.json"


KINDS: Final = (
    FileKind("gateway", "Sluice gateway.yaml", _model("gateway.config:GatewayFile"), ("gateway.yaml",)),
    FileKind("device", "Sluice device file (devices/*.yaml), one schema per protocol:", _device_model,
             ("devices/*.yaml",)),
    FileKind("profile", "Sluice device profile (profiles/*.yaml), modbus or serial", _profile_model,
             ("profiles/*.yaml",)),
    FileKind("trace", "Sluice trace.yaml (the traceability feed)", _model("gateway.trace.config:TraceFile"),
             ("trace.yaml", "examples/trace.yaml")),
    FileKind("ingest", "Sluice ingest.yaml (`sluice ingest`, the cloud side)", _model("gateway.cloud.config:IngestConfig"),
             ("ingest.yaml",)),
    FileKind("sim", "Sluice sim.yaml (`sluice sim`, simulated devices)", _model("simulators.simulation:SimFile"), ("sim.yaml",)),
)


def kind_of(relative: Path) -> FileKind | None:
    """The kind of the file at ``relative`` (to its configuration directory), or None."""
    text = relative.as_posix()
    return next((k for k in KINDS if any(fnmatch.fnmatchcase(text, pattern) for pattern in k.files)), None)


def modeline(relative: Path, kind: FileKind) -> str:
    """The first line of a file at ``relative`` (to its configuration directory, whose
    ``schemas/`` holds the schemas): ``# yaml-language-server: $schema=../schemas/device.schema.json``."""
    up = "../" * (len(relative.parts) - 1)
    return f"{MODELINE}{up}{SCHEMA_DIR}/{kind.filename}"


def _tidy(node: Any) -> None:
    """Durations as they are written: a default of 0.02 (seconds) is shown as ``20ms``."""
    if isinstance(node, dict):
        if node.get("pattern") == DURATION_PATTERN and isinstance(node.get("default"), (int, float)):
            node["default"] = format_duration(float(node["default"]))
        for value in node.values():
            _tidy(value)
    elif isinstance(node, list):
        for value in node:
            _tidy(value)


def schema_of(kind: FileKind) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one kind of file."""
    body = TypeAdapter(kind.model()).json_schema(mode="validation")
    _tidy(body)
    head = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": kind.title}
    head["description"] = body.pop("description", None) or "Checked by `sluice check`; generated by `sluice schema`."
    body.pop("title", None)
    return {**head, **body}


def schemas() -> dict[str, str]:
    """File name -> text of every schema, exactly as ``sluice schema`` writes it."""
    return {k.filename: json.dumps(schema_of(k), indent=2, ensure_ascii=False) + "\n" for k in KINDS}


def write_schemas(directory: Path) -> list[Path]:
    """Write every schema into ``directory`` (created); returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in schemas().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def cmd_schema(args: argparse.Namespace) -> int:
    try:
        files = write_schemas(args.directory)
    except OSError as exc:
        print(f"sluice schema: cannot write {args.directory}: {exc.strerror or exc} — give a directory you can "
              "write to", file=sys.stderr)
        return 1
    for path in files:
        print(path)
    example = next(k for k in KINDS if k.name == "device")
    print(f"first line of a device file, for completion in your editor: {MODELINE}<path to {args.directory}>/"
          f"{example.filename}", file=sys.stderr)
    return 0


def add_parsers(sub: Any) -> None:
    """``sluice schema DIR`` on the main parser's subcommands."""
    p = sub.add_parser("schema", help="write the JSON Schemas of gateway.yaml, device, profile, trace, ingest and sim "
                       "files into DIR, for completion and checking in editors (VS Code's YAML extension)")
    p.add_argument("directory", type=Path, metavar="DIR", help="where to write the *.schema.json files (created)")
    p.set_defaults(func=cmd_schema)
