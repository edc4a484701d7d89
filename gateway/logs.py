"""Logging set-up: readable text on a terminal, syslog-prefixed lines without timestamps for journald."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, TextIO

# journald reads a "<N>" prefix as the line's priority (SyslogLevelPrefix=yes is systemd's default).
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        text = f"<{priority}>{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info).replace("\n", f"\n<{priority}>")
        return text


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        # UTC timestamps. Set on the instance: as a class attribute a function reads as a method to mypy.
        self.converter = time.gmtime


def setup_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure the root logger once for the process (the CLI calls this; library code never does)."""
    if fmt == "auto":
        fmt = "journal" if os.environ.get("JOURNAL_STREAM") else "text"
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JournalFormatter() if fmt == "journal" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries that log per packet or per retry would drown the once-per-state-change lines.
    for noisy in ("pymodbus", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


LOG_LEVELS = ("debug", "info", "warning", "error")


def add_log_level(parser: Any, default: str | None = None) -> None:
    """``--log-level`` with the same choices and help on every command (argparse parser)."""
    told = f"default {default}" if default else "default: logging.level of the configuration"
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=default, metavar="LEVEL",
                        help=f"what is logged: {', '.join(LOG_LEVELS)} ({told})")
