"""What the kernel says about a process and a file: POSIX locks (/proc/locks) and open descriptors."""

from __future__ import annotations

import os
from pathlib import Path

from gateway.outbox import file as outbox_file


def posix_locks(path: Path, pid: int) -> list[str]:
    """The POSIX record locks ``pid`` holds (not waits for) on the file at ``path`` now."""
    return [line for owner, line in outbox_file.posix_locks(path) if owner == pid]


def deleted_files(pid: int, name: str) -> list[str]:
    """Files ``pid`` has open or mapped whose name contains ``name`` and that were deleted under it."""
    found = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if name in target and target.endswith(" (deleted)"):
                found.append(f"fd {fd}: {target}")
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            if name in line and line.endswith(" (deleted)"):
                found.append(f"map: {line.split(None, 5)[-1]}")
    except FileNotFoundError:  # the process is gone
        pass
    return found
