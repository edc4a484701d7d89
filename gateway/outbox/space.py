"""How much disk the outbox takes, and keeping it so: the bound of its ``-wal``, the settings that
keep every connection within it, and whether ``buffer.max_bytes`` fits the filesystem at all.

SQLite's WAL grows until a checkpoint (by default at 1000 pages, ~4 MiB) and is not truncated by
default: on a small disk it alone refilled the disk right after another program freed it, and no
write succeeded again. The outbox therefore accounts for its WAL (:func:`wal_bound`), every
connection that writes the file applies :func:`limit_wal` (both settings belong to the
connection, not to the file), and ``gateway/outbox/queue.py`` commits a backlog in slices of at most a
quarter of the bound and truncates the WAL after a write fails for want of space. What must fit
the disk then is :func:`disk_budget`'s sum.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

__all__ = ["SHM_BYTES", "WAL_MAX", "WAL_MIN", "disk_budget", "filesystem_bytes", "limit_wal", "wal_bound"]

WAL_MIN = 128 * 1024
WAL_MAX = 16 * 1024**2
"""The range of :func:`wal_bound` (16 MiB was the journal_size_limit before the bound existed)."""
SHM_BYTES = 32 * 1024
"""The ``-shm`` file of a WAL within :data:`WAL_MAX` (one 32 KiB index block holds 4096 frames)."""


def filesystem_bytes(directory: Path) -> int | None:
    """The size of the filesystem holding ``directory`` (None if it cannot be told)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize or None


def disk_budget(path: Path, max_bytes: int) -> tuple[str, str] | None:
    """Why an outbox at ``path`` bounded by ``max_bytes`` cannot fit the filesystem that holds it,
    and what to do (None when it can, or when the filesystem cannot be told): the readings
    (``max_bytes``), dead letters (up to a quarter of it), the WAL (:func:`wal_bound`) and its
    index must all fit. ``sluice check`` prints it and ``sluice run`` logs it (a located warning)."""
    directory = Path(path).parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    disk = filesystem_bytes(directory)
    if disk is None:
        return None
    wal = wal_bound(max_bytes, disk)
    need = max_bytes + max_bytes // 4 + wal + SHM_BYTES
    if need <= disk:
        return None
    fit = int((disk - wal - SHM_BYTES) * 0.9 / 1.25)  # 10 % left for the trace feed and SQLite's own pages
    return (f"buffer.max_bytes {_size(max_bytes)} needs about {_size(need)} of disk (with dead letters, at most a "
            f"quarter of it, and the WAL, {_size(wal)}), more than the whole filesystem holding {path} "
            f"({_size(disk)}): once it is full, readings wait in memory (at most 100,000) and are then lost",
            f"set buffer.max_bytes to at most {_size(fit)}, or put the outbox on a larger filesystem")


def _size(n: int) -> str:
    """``n`` bytes as it would be written in gateway.yaml (KiB/MiB/GiB, rounded down)."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n * 10 // scale / 10:g}{unit}"
    return f"{n}B"


def wal_bound(max_bytes: int | None, disk_bytes: int | None) -> int:
    """Bytes an outbox's ``-wal`` stays within: 1/16 of ``max_bytes`` or of the filesystem's size
    (``disk_bytes``), whichever is smaller, kept between :data:`WAL_MIN` and :data:`WAL_MAX`."""
    base = min(b for b in (max_bytes, disk_bytes, WAL_MAX * 16) if b is not None)
    return max(WAL_MIN, min(WAL_MAX, base // 16))


def limit_wal(conn: sqlite3.Connection, bound: int) -> None:
    """Keep the WAL within ``bound`` bytes on ``conn`` (every connection that writes to an outbox):
    checkpoint once it holds half of it, cut it back to ``bound`` when it restarts. Both settings
    belong to the connection, not the file, so each connection needs them."""
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.execute(f"PRAGMA wal_autocheckpoint={max(1, min(1000, bound // 2 // page))}")
    conn.execute(f"PRAGMA journal_size_limit={int(bound)}")
