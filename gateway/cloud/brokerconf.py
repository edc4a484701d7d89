"""What the broker's own limits mean for ``sluice ingest``: while the database is down, the messages
not yet written wait in the broker's queue for the ingest's session, and Mosquitto keeps at most
``max_queued_messages`` (default 1000, also in Debian's stock ``mosquitto.conf``) and
``max_queued_bytes`` (default 0: no limit) of them per session, then drops newer ones for that
session without telling anyone. Only gateways with ``delivery: end_to_end`` get those back: they
publish again whatever has no receipt.

Contract: :func:`read_mosquitto` reads a ``mosquitto.conf`` (and the ``*.conf`` files of its
``include_dir``s) as Mosquitto does — the last value of an option wins — and never raises (an
unreadable file gives None). :func:`queue_advice` turns the ingest's configuration (and the broker's
file, when the broker is on this machine and its file readable) into ``(level, line)`` pairs that
``sluice ingest check`` prints and ``sluice ingest run`` logs at start-up; no secret is in them.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

from gateway.cloud.config import IngestConfig

__all__ = ["DEBIAN_CONF", "MosquittoLimits", "broker_is_local", "queue_advice", "read_mosquitto"]

DEBIAN_CONF = Path("/etc/mosquitto/mosquitto.conf")
"""Where Debian's (and most distributions') Mosquitto keeps its configuration."""
MOSQUITTO_MAX_QUEUED = 1000
"""Mosquitto's default ``max_queued_messages`` (Debian's stock file does not change it)."""


@dataclass
class MosquittoLimits:
    """The options of a Mosquitto configuration that bound a session's queue (Mosquitto's defaults)."""

    max_queued_messages: int = MOSQUITTO_MAX_QUEUED  # 0: no limit
    max_queued_bytes: int = 0  # 0: no limit
    persistence: bool = False
    files: list[Path] = field(default_factory=list)  # the files read, in order


def read_mosquitto(path: Path) -> MosquittoLimits | None:
    """The queue limits ``path`` sets (with its include_dir files); None if it cannot be read."""
    limits = MosquittoLimits()
    try:
        _read(path, limits, depth=0)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return limits


def _read(path: Path, limits: MosquittoLimits, depth: int) -> None:
    limits.files.append(path)
    for raw in path.read_text(encoding="utf-8").splitlines():
        words = raw.split()
        if not words or words[0].startswith("#") or len(words) < 2:
            continue
        key, value = words[0], words[1]
        if key == "max_queued_messages":
            limits.max_queued_messages = int(value)
        elif key == "max_queued_bytes":
            limits.max_queued_bytes = int(value)
        elif key == "persistence":
            limits.persistence = value.lower() == "true"
        elif key == "include_dir" and depth < 2:
            for included in sorted(Path(value).glob("*.conf")):
                _read(included, limits, depth + 1)


def broker_is_local(host: str) -> bool:
    """The broker runs on this machine (loopback, localhost or this host's own name; no DNS lookup)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    own = socket.gethostname().lower()  # not getfqdn(): it may ask DNS
    return host.lower().rstrip(".") in {"localhost", own, own.split(".")[0]}


def queue_advice(config: IngestConfig) -> list[tuple[int, str]]:
    """``(logging level, line)`` pairs about what survives a database outage (module docstring)."""
    mqtt = config.mqtt
    path = mqtt.broker_config
    if path is None and broker_is_local(mqtt.host):
        path = DEBIAN_CONF
    limits = read_mosquitto(path) if path is not None else None
    receipts = bool(config.receipt_topics)
    gap = ("gateways with `delivery: end_to_end` publish again what has no receipt, so they lose nothing; "
           "others lose what the broker drops")
    out: list[tuple[int, str]] = []
    if limits is None:
        where = f"the broker's configuration ({path}) is not readable here" if path is not None else \
            "the broker is not on this machine"
        level = logging.WARNING if not receipts else logging.INFO
        out.append((level, f"while InfluxDB is down, unwritten messages wait in the broker's queue for session "
                           f"{config.mqtt.effective_client_id!r}; Mosquitto keeps at most max_queued_messages of them "
                           f"(default {MOSQUITTO_MAX_QUEUED}) and max_queued_bytes, then drops newer ones for this "
                           f"session without a word — {where}: check that it sets max_queued_messages 0 (or enough "
                           "for your longest outage: messages per second × seconds), max_queued_bytes to what its "
                           f"disk holds, and persistence true; {gap}"))
    else:
        files = ", ".join(map(str, limits.files))
        count = ("every message (max_queued_messages 0)" if limits.max_queued_messages <= 0
                 else f"at most {limits.max_queued_messages} messages (max_queued_messages)")
        size = "" if limits.max_queued_bytes <= 0 else f", at most {limits.max_queued_bytes} bytes (max_queued_bytes)"
        bounded = limits.max_queued_messages > 0 or limits.max_queued_bytes > 0
        level = logging.WARNING if bounded or not limits.persistence else logging.INFO
        text = (f"the broker ({files}) queues {count}{size} for this ingest's session while InfluxDB is down"
                + ("; newer ones are dropped without a word — set max_queued_messages 0 (or enough for your longest "
                   "outage: messages per second × seconds) and max_queued_bytes to what its disk holds"
                   if bounded else "")
                + ("" if limits.persistence else "; persistence is off: a broker restart loses the queue — set "
                                                 "persistence true")
                + (f"; {gap}" if bounded or not limits.persistence else ""))
        out.append((level, text))
    if not receipts:
        out.append((logging.WARNING, "receipts are off (receipt_topics: []): no gateway can get back what the "
                                     "broker drops; a broker queue limit bounds what survives an InfluxDB outage"))
    return out
