"""The example configuration that ships with Sluice, and ``sluice init DIR``.

The examples live in the checkout's top-level ``config/`` directory and ship in the wheel as the
package data of ``gateway.shipped_config`` (see setup.py), so the same files serve a checkout, an
editable install and an installed wheel:

* ``demo`` — ``config/`` itself: simulated devices on loopback (``sluice sim``, ``sluice demo``),
  with ``sim.yaml``, ``ingest.yaml`` and ``examples/trace.yaml``;
* ``workshop``, ``farm`` — ``config/examples/<name>/``: ``gateway.yaml`` and ``devices/`` for real
  hardware; they use the shipped ``profiles/``.

Contract of :func:`init_config`: it writes into a directory that does not exist or is empty, and
nothing else; it never overwrites a file. What it writes passes ``sluice check``; with it come the
JSON Schemas (``schemas/``), and every YAML file's first line points its editor at its schema.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from gateway.cli.schema import MODELINE, SCHEMA_DIR, kind_of, modeline

__all__ = ["EXAMPLES", "InitError", "init_config", "shipped_config"]

EXAMPLES = ("demo", "workshop", "farm")
_PACKAGE = "gateway.shipped_config"


def shipped_config() -> Path:
    """The directory holding the shipped example configuration (``config/`` of the checkout)."""
    spec = importlib.util.find_spec(_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / "gateway.yaml").is_file():
            return Path(location)
    # Imported from a checkout that was never installed (PYTHONPATH): the directory itself.
    return Path(__file__).resolve().parents[2] / "config"


class InitError(Exception):
    """``sluice init`` refused: the message says why and what to do."""


def _files(example: str) -> list[tuple[Path, Path]]:
    """(source, path relative to the new directory) of every file an example consists of."""
    root = shipped_config()
    out: list[tuple[Path, Path]] = []
    if example == "demo":
        for src in sorted(root.rglob("*.yaml")):
            rel = src.relative_to(root)
            if rel.parts[0] == "examples" and len(rel.parts) > 2:
                continue  # the other examples' own files
            out.append((src, rel))
        return out
    base = root / "examples" / example
    out += [(src, src.relative_to(base)) for src in sorted(base.rglob("*.yaml"))]
    out += [(src, src.relative_to(root)) for src in sorted((root / "profiles").glob("*.yaml"))]
    out.append((root / "examples" / "trace.yaml", Path("examples/trace.yaml")))
    return out


def _schema_files() -> list[tuple[Path, Path]]:
    root = shipped_config()
    return [(src, src.relative_to(root)) for src in sorted((root / SCHEMA_DIR).glob("*.schema.json"))]


def _with_modeline(text: str, rel: Path) -> str:
    """The file's text with its first line pointing at its schema from where it is written."""
    kind = kind_of(rel)
    if kind is None:
        return text
    first, _sep, rest = text.partition("\n")
    return modeline(rel, kind) + "\n" + (rest if first.startswith(MODELINE) else text)


def init_config(target: Path, example: str = "demo") -> list[Path]:
    """Write the ``example`` configuration into ``target`` (created; must be absent or empty).
    Returns the files written, relative to ``target``. Raises :class:`InitError`."""
    if example not in EXAMPLES:
        raise InitError(f"unknown example '{example}' — choose one of {', '.join(EXAMPLES)}")
    if target.exists() and not target.is_dir():
        raise InitError(f"{target} exists and is not a directory — give a new directory")
    if target.is_dir() and any(target.iterdir()):
        raise InitError(f"{target} is not empty — nothing was written; give a new or empty directory "
                        "(an existing configuration is never overwritten)")
    files = _files(example)
    schemas = _schema_files()
    target.mkdir(parents=True, exist_ok=True)
    for src, rel in files:
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(_with_modeline(src.read_text(encoding="utf-8"), rel), encoding="utf-8")
    for src, rel in schemas:
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    return [rel for _src, rel in files + schemas]
