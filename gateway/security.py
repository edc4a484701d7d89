"""Start-up security warnings: links that were explicitly allowed to be insecure, and files holding
secrets (passwords, private keys, ``${file:}`` secrets) that other users can read.

Contract: :func:`startup_warnings` reads file modes and the raw YAML only; it returns messages
that name files and keys, never a secret's value. The gateway logs each at WARNING on every start.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from gateway.config import Config, is_loopback

__all__ = ["startup_warnings"]

_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_key|apikey)$", re.IGNORECASE)
_FILE_REF = re.compile(r"\$\{file:([^}]*)\}")
_ONLY_REF = re.compile(r"^\s*\$\{(?!file:)[^}]*\}\s*$")


def _readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return False


def _walk(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, str(k))
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v, key)
    else:
        yield key, value


def _secret_refs(path: Path) -> tuple[bool, list[Path]]:
    """(the file holds a secret literally, the files its ``${file:...}`` references point at)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False, []
    literal = False
    refs: list[Path] = []
    for key, value in _walk(data):
        if not isinstance(value, str):
            continue
        refs += [Path(p) for p in _FILE_REF.findall(value)]
        if _SECRET_KEY.search(key) and value.strip() and not _ONLY_REF.match(value) and not _FILE_REF.search(value):
            literal = True
    return literal, refs


def startup_warnings(config: Config) -> list[str]:
    out: list[str] = []
    for name, sink in config.gateway.sinks.items():
        if getattr(sink, "insecure", False):
            tls = getattr(sink, "tls", None)
            what = "without TLS" if tls is None else ("with TLS but without certificate verification"
                                                     if not tls.verify else "with `insecure: true`")
            where = getattr(sink, "host", "?")
            local = " (a loopback host)" if is_loopback(where) else ""
            out.append(f"sink {name}: `insecure: true` — connecting to {where}{local} {what}; anyone on the "
                       "path can read or alter the data. Remove `insecure` and configure `tls:` when you can")
        if getattr(sink, "delivery", "broker") == "end_to_end" and getattr(sink, "receipt_secret", None) is None:
            topic = str(getattr(sink, "receipt_topic", "")).format(site=config.site, gateway=config.gateway_id)
            out.append(f"sink {name}: end-to-end receipts are not authenticated — whoever may publish on {topic} "
                       "can make the gateway delete readings; set `receipt_secret` (the same in ingest.yaml) and "
                       "restrict that topic with the broker's ACLs")
    health = config.gateway.health
    if health.enabled and not is_loopback(health.host):
        out.append(f"health.listen is {health.listen}: /healthz and /metrics (device ids, sink names, figures) are "
                   "readable from the network without authentication — prefer 127.0.0.1 and a reverse proxy, "
                   "or firewall the port; the systemd unit only allows binding port 9108")
    files = [config.path, *sorted({d.source for d in config.devices})]
    base = config.path.parent
    secret_files: set[Path] = set()
    for file in files:
        file = file if file.is_absolute() else (Path.cwd() / file)
        literal, refs = _secret_refs(file)
        if literal:
            secret_files.add(file)
        secret_files.update(r if r.is_absolute() else base / r for r in refs)
    for sink in config.gateway.sinks.values():
        tls = getattr(sink, "tls", None)
        if tls is not None and tls.key_file is not None:
            secret_files.add(tls.key_file if tls.key_file.is_absolute() else base / tls.key_file)
    for file in sorted(secret_files):
        if _readable_by_others(file):
            out.append(f"{file} holds a secret and is readable by every user on this machine — "
                       f"run `chmod o-rwx {file}` (and keep it owned by the service's user)")
    return out
