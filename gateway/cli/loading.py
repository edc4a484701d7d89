"""Where a command finds its configuration and how it reports one it cannot load: every ``sluice``
command that reads ``gateway.yaml`` (gateway/cli/commands.py, gateway/cli/trace.py) goes through here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config import Config, ConfigErrors, load_config

if TYPE_CHECKING:
    from gateway.trace.config import TraceConfig

__all__ = ["EXIT_CONFIG", "default_config_dir", "load_or_report", "load_trace", "no_config_message", "report_config_errors"]

EXIT_CONFIG = 2
"""The exit status of a command whose configuration has errors."""


def default_config_dir() -> Path:
    """$SLUICE_CONFIG, systemd's $CONFIGURATION_DIRECTORY, /etc/sluice if it exists, else ./config."""
    for var in ("SLUICE_CONFIG", "CONFIGURATION_DIRECTORY"):
        if os.environ.get(var):
            return Path(os.environ[var].split(":")[0])
    return Path("/etc/sluice") if Path("/etc/sluice/gateway.yaml").exists() else Path("config")


def no_config_message(path: Path, given: bool) -> str | None:
    """None when ``path`` has a gateway.yaml (or is a file); else what was looked at and how to
    point the command at a configuration — instead of a located error in a file that is not there."""
    if path.is_file() or (path / "gateway.yaml").is_file():
        return None
    if given:
        return (f"no gateway.yaml in {path} (given with -c) — give the directory that holds gateway.yaml, or "
                f"create one with `sluice init {path}`")
    looked = ["-c (not given)"]
    for var in ("SLUICE_CONFIG", "CONFIGURATION_DIRECTORY"):
        value = os.environ.get(var)
        looked.append(f"${var} ({value!r}: no gateway.yaml there)" if value else f"${var} (not set)")
    looked += ["/etc/sluice (no gateway.yaml)", f"./config ({Path('config').resolve()}: no gateway.yaml)"]
    return ("no configuration found; looked at " + ", ".join(looked) + " — point to one with -c DIR or "
            "SLUICE_CONFIG=DIR, or create one with `sluice init DIR` (`sluice init --help` lists the examples)")


def report_config_errors(exc: ConfigErrors, where: str) -> None:
    """Every located error on stderr, then one line counting them (``where``: "in <path>; ...")."""
    for err in exc.errors:
        print(err, file=sys.stderr)
    n = sum(not err.warning for err in exc.errors)
    print(f"{n} error{'s' if n != 1 else ''} {where}", file=sys.stderr)


def load_trace(config: Config) -> tuple[bool, TraceConfig | None]:
    """``trace.yaml`` next to the gateway file: ``(True, None)`` when there is none, ``(False, None)``
    after reporting its errors on stderr. Its models cost start-up time: imported only if it exists."""
    path = config.path.parent / "trace.yaml"
    if not path.exists():
        return True, None
    from gateway.trace.config import load_trace_config  # noqa: PLC0415 - its models cost start-up time; only with trace.yaml

    try:
        return True, load_trace_config(config)
    except ConfigErrors as exc:
        report_config_errors(exc, f"in {path}")
        return False, None


def load_or_report(path: Path, *, secrets: bool = False, given: bool = True) -> Config | None:
    """The configuration, or None after saying why on stderr. ``secrets``: read every ``${file:}``
    and ``${cred:}`` now (``run``); otherwise only where a command uses one (gateway/secretref.py)."""
    missing = no_config_message(path, given)
    if missing is not None:
        print(f"sluice: {missing}", file=sys.stderr)
        return None
    try:
        return load_config(path, secrets=secrets)
    except ConfigErrors as exc:
        report_config_errors(exc, f"in the configuration at {path}; nothing was started")
        return None
