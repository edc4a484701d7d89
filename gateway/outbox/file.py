"""The outbox file on disk: how a process opens it, vets it, moves an unusable one aside, and
prepares it (the schema and its migrations: ``gateway/outbox/schema.py``).

The rule (why this module exists)
---------------------------------
POSIX record locks belong to a process and a file, not to a descriptor: closing *any* descriptor of
the database file drops every lock the process holds on it, the locks of its open SQLite
connections included. Another process may then delete the ``-wal``/``-shm`` under them, and each
process goes on with its own copy of the database ("How To Corrupt An SQLite Database File",
§2.2). So, in every process that uses the outbox (the gateway, ``sluice lot``, ``sluice trace``,
``sluice deadletter``, ``sluice outbox salvage``):

* only SQLite opens the database file and its ``-wal``/``-shm`` — no ``open()``, ``read_bytes()``
  or ``shutil`` on them, ever (``os.stat`` is fine: it opens nothing);
* every connection is made by :func:`connect`, which counts the connections of this process per
  file; :func:`vet` — the integrity check and the moving aside of an unusable file — runs only
  while that count is zero, i.e. before this process's first connection to the file, whichever
  module (outbox or trace journal) opens it first. Vetting itself reads the file through a
  read-only SQLite connection (``SQLITE_NOTADB`` means "not a database"), never a plain
  descriptor; SQLite keeps the locks of a process's other connections when one of them closes.

An unusable file another process has open (its SQLite connection holds a POSIX lock, seen in
/proc/locks) is not moved aside under it: :func:`vet` waits up to :data:`OTHERS_WAIT` for it to
let go, then refuses (the gateway exits; systemd starts it again). A process that connects in the
instant before the rename still writes into the old file: :func:`identity` lets it notice — the
file at the path before it connected and after its commit must be the same inode (a moved-aside
file never comes back under the path) — and write again.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path

from gateway.outbox.errors import OutboxError, describe
from gateway.outbox.schema import APPLICATION_ID, SCHEMA_VERSION, NotAnOutbox, migrate, use_wal

log = logging.getLogger(__name__)

FULL_CHECK_BELOW = 32 * 1024**2
"""Files smaller than this get ``PRAGMA integrity_check`` on open; larger ones ``quick_check``."""

CORRUPT_CODES = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})

_live: dict[str, int] = {}  # resolved path -> connections of this process open to it
_counted_as: weakref.WeakKeyDictionary[sqlite3.Connection, str] = weakref.WeakKeyDictionary()  # open ones -> path
_live_lock = threading.Lock()  # guards both


def _key(path: Path) -> str:
    return os.path.realpath(path)  # lstat/readlink only: opens nothing


class _Counted(sqlite3.Connection):
    """A connection counted in ``_live`` until it is closed (a connection never closed stays
    counted: the safe side, the file is then never moved aside by this process)."""

    def close(self) -> None:
        with _live_lock:
            key = _counted_as.pop(self, None)
        try:
            super().close()
        finally:
            if key is not None:
                with _live_lock:
                    _live[key] -= 1
                    if not _live[key]:
                        del _live[key]


def connect(path: Path, *, readonly: bool = False, must_exist: bool = False, timeout: float = 5.0) -> sqlite3.Connection:
    """The one way Sluice connects to an outbox file (autocommit: callers issue BEGIN/COMMIT).
    ``readonly`` opens it ``mode=ro``, ``must_exist`` ``mode=rw`` (never creates it); raises
    ``sqlite3.Error``."""
    key = _key(path)
    mode = "ro" if readonly else "rw" if must_exist else "rwc"
    with _live_lock:  # counted before SQLite opens anything: vet() in another thread then waits for the close
        _live[key] = _live.get(key, 0) + 1
    try:
        conn = sqlite3.connect(f"{Path(key).as_uri()}?mode={mode}", uri=True, isolation_level=None,
                               timeout=timeout, factory=_Counted)
    except BaseException:
        with _live_lock:
            _live[key] -= 1
            if not _live[key]:
                del _live[key]
        raise
    with _live_lock:
        _counted_as[conn] = key
    return conn


def connections(path: Path) -> int:
    """How many connections this process has open to ``path`` (through :func:`connect`)."""
    with _live_lock:
        return _live.get(_key(path), 0)


def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path`` now, or None: ``os.stat`` opens nothing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def vet(path: Path) -> Path | None:
    """Before this process's first connection to ``path``: move it aside (with a clear ERROR) if it
    cannot be used as an outbox; returns where it went, or None. With a connection of this
    process open the file was vetted by whoever opened it first: nothing is checked or moved.
    Raises ``sqlite3.Error``/``OSError`` for a file that is fine but cannot be read now."""
    if connections(path):
        return None
    problem = check_existing(path)
    if problem is None:
        return None
    _wait_for_others(path, problem)
    aside = move_aside(path)
    log.error("outbox %s is unusable (%s): moved it to %s and started an empty outbox; readings not yet "
              "delivered and the trace journal (events, chain) are in the old file, and a trace feed starts a new "
              "chain at seq 1 — `sluice outbox salvage %s` copies what can still be read back into the outbox "
              "(--events FILE exports the old chain's events)", path, problem, aside, aside)
    return aside


class HeldByOthers(OSError):
    """The file is unusable, but another process has it open: it is not moved aside under it."""


OTHERS_WAIT = 10.0
"""Seconds :func:`vet` waits for other processes to let go of an unusable file before giving up."""


def posix_locks(path: Path) -> list[tuple[int, str]]:
    """(pid, line of /proc/locks) for every POSIX lock held (not waited for) on the file at ``path``;
    empty where the kernel does not say. An SQLite connection in WAL mode holds one from its first
    read to its close."""
    try:
        ino = os.stat(path).st_ino
        table = Path("/proc/locks").read_text()
    except OSError:
        return []
    held = []
    for line in table.splitlines():
        fields = line.split()  # "1: POSIX  ADVISORY  READ 1234 fe:00:5678 1073741826 1073742335"; waiters have "->"
        if len(fields) >= 6 and fields[1] == "POSIX" and fields[5].rsplit(":", 1)[-1] == str(ino):
            held.append((int(fields[4]), line))
    return held


def lock_holders(path: Path) -> set[int]:
    """Pids of other processes holding a POSIX lock on the file at ``path``."""
    return {pid for pid, _line in posix_locks(path)} - {os.getpid()}


def _wait_for_others(path: Path, problem: str) -> None:
    """Moving the file aside under another process's connection would leave it writing to the old
    file (e.g. a `sluice lot` queueing a command): wait for it to finish, or refuse."""
    deadline = time.monotonic() + OTHERS_WAIT
    while holders := lock_holders(path):
        if time.monotonic() >= deadline:
            raise HeldByOthers(f"{path} is unusable ({problem}) but process(es) {sorted(holders)} have it open — "
                               "not moving it aside under them; stop them (another gateway on the same "
                               "buffer.path?) and start again")
        time.sleep(0.05)


def check_existing(path: Path) -> str | None:
    """Why the existing file cannot be used as our outbox, or None (missing and empty files are fine).
    Reads it through a read-only SQLite connection only."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None  # an empty file is a valid, empty SQLite database
    # Read-only: a read-write connection would checkpoint the WAL into (and then delete it
    # next to) a file we may be about to move aside, changing the evidence.
    conn = connect(path, readonly=True)
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]  # SQLITE_NOTADB here if it is not SQLite
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
        if app_id != APPLICATION_ID:
            if tables:
                return f"an SQLite database of something else (application_id {app_id:#x})"
            return None
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:  # an older one is migrated when it is opened (gateway/outbox/schema.py)
            raise sqlite3.OperationalError(
                f"outbox schema version {version}, this Sluice reads up to {SCHEMA_VERSION} — "
                "run the Sluice version that wrote it to deliver its readings first")
        check = "integrity_check" if size < FULL_CHECK_BELOW else "quick_check"
        result = [r[0] for r in conn.execute(f"PRAGMA {check}(20)")]
        if result != ["ok"]:
            return f"{check} failed: {'; '.join(result[:3])}"
        if not {"state", "sinks", "series", "readings"} <= tables:
            return "outbox tables missing"
        return None
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorname", None) in CORRUPT_CODES:
            return str(exc)
        raise
    finally:
        conn.close()


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.corrupt-<UTC stamp>``; a ``-wal`` holding data follows it as
    ``…-wal``. An empty ``-wal`` and the ``-shm`` (an index SQLite rebuilds from the WAL) carry no
    data: they are deleted, so nothing is left that looks like part of either file."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
        n += 1
    # The WAL first: the db must never sit next to a WAL that is not its own.
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    try:
        if os.stat(wal).st_size:
            os.replace(wal, Path(f"{aside}-wal"))
        else:
            os.unlink(wal)
    except FileNotFoundError:
        pass
    try:
        os.unlink(shm)
    except FileNotFoundError:
        pass
    os.replace(path, aside)
    fsync_dir(path.parent)
    return aside


def fsync_dir(directory: Path) -> None:
    """Make renames and deletions in ``directory`` durable (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prepare(path: Path, *, check: bool) -> None:
    """Make ``path`` an outbox file of this schema version (:func:`~gateway.outbox.schema.migrate`),
    in WAL mode, that another module may keep its own tables in (the trace journal), before or while
    :class:`~gateway.outbox.queue.Outbox` has it open: a missing or empty file gets the whole
    schema (the Outbox later opens it as a new, empty outbox), an older one is migrated. With
    ``check`` (the gateway's own process) an unusable file is first moved aside exactly as
    ``Outbox.open`` does, if this process has no connection to it yet; without it (a CLI next to a
    running gateway) a file that is not a Sluice outbox raises :class:`OutboxError` and nothing is
    touched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if check:
            vet(path)  # only before this process's first connection
        conn = connect(path, timeout=10.0)
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            if app_id != APPLICATION_ID and conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
                raise OutboxError(f"{path} is not a Sluice outbox (application_id {app_id:#x}) — "
                                  "check buffer.path in gateway.yaml")
            use_wal(conn)
            migrate(conn)
        finally:
            conn.close()
    except NotAnOutbox as exc:  # another process made it something else in between
        raise OutboxError(f"{path} is not a Sluice outbox ({exc}) — check buffer.path in gateway.yaml") from exc
    except (sqlite3.Error, OSError) as exc:
        raise OutboxError(describe(path, "preparing", exc)) from exc
