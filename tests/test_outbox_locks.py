"""Only SQLite touches the outbox file once a connection to it is open (gateway/outbox/file.py).

Closing any plain descriptor of the file would drop every POSIX lock the process holds on it; a
second process could then delete the -wal/-shm under the first and each would go on with its own
copy. These tests open the file as the gateway does (trace journal first, then the outbox, and the
other way round), check with the kernel that the locks are still held, and have another process
write to it as `sluice lot` does.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.outbox import Outbox
from gateway.outbox.file import connections, move_aside, vet
from gateway.reading import Reading
from gateway.trace.journal import Journal
from proc_support import deleted_files, posix_locks
import gateway.outbox.file as outbox_file
from gateway.outbox import OutboxError

REPO = Path(__file__).resolve().parent.parent
_LOT = """
import sys
from pathlib import Path
from gateway.trace.journal import Journal
with Journal(Path(sys.argv[1])) as j:
    print(j.queue("start", "LOT-9", "room-a"))
"""


def _lot_from_another_process(path: Path) -> int:
    out = subprocess.run([sys.executable, "-c", _LOT, str(path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    return int(out.stdout)


@pytest.mark.parametrize("journal_first", [True, False])
def test_the_gateway_keeps_its_locks_when_journal_and_outbox_share_the_file(tmp_path: Path, journal_first: bool) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, ["broker"]) as ob:  # an existing outbox, vetted again at the next start
        ob.append([Reading("meter", 1, {"kwh": 1.0})])
    first = Journal(path, check=True) if journal_first else Outbox(path, ["broker"])
    with first as a:
        second = Outbox(path, ["broker"]) if journal_first else Journal(path, check=True)
        with second as b:
            journal, outbox = (a, b) if journal_first else (b, a)
            assert isinstance(outbox, Outbox) and isinstance(journal, Journal)
            outbox.append([Reading("meter", 2, {"kwh": 2.0})])
            assert posix_locks(path, os.getpid()), "this process holds no lock on its open outbox"
            command = _lot_from_another_process(path)  # `sluice lot start` while the gateway runs
            assert deleted_files(os.getpid(), path.name) == []
            assert posix_locks(path, os.getpid())
            # one database, not two copies: the other process's command is seen here, and ours there
            assert [c[0] for c in journal.pending_commands()] == [command]
            outbox.append([Reading("meter", 3, {"kwh": 3.0})])
            conn = sqlite3.connect(path)
            try:
                assert conn.execute("SELECT count(*) FROM readings").fetchone()[0] == 3
            finally:
                conn.close()
    assert not list(tmp_path.glob("*.corrupt-*"))
    assert connections(path) == 0


def test_vetting_never_moves_a_file_this_process_has_open(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Journal(path, check=True):
        conn = sqlite3.connect(path)  # behind the outbox's back: a foreign table makes it "not ours"
        conn.execute("PRAGMA application_id=0")
        conn.close()
        assert vet(path) is None  # a connection is open: checked by whoever opened it first, never moved
        assert path.exists() and not list(tmp_path.glob("*.corrupt-*"))
    assert connections(path) == 0


def test_a_moved_aside_file_takes_its_wal_and_leaves_no_empty_companions(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"not a database" * 100)
    Path(f"{path}-wal").write_bytes(b"")
    Path(f"{path}-shm").write_bytes(b"\0" * 32768)
    aside = vet(path)
    assert aside is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == [aside.name]  # no empty -wal, no -shm
    path.write_bytes(b"not a database either" * 100)
    Path(f"{path}-wal").write_bytes(b"frames of the broken file")
    Path(f"{path}-shm").write_bytes(b"\0" * 32768)
    second = move_aside(path)
    assert Path(f"{second}-wal").read_bytes() == b"frames of the broken file"  # a WAL with data follows its file
    assert not Path(f"{second}-shm").exists() and not Path(f"{path}-wal").exists()


def test_a_real_corrupt_outbox_moved_aside_leaves_only_itself(tmp_path: Path) -> None:
    """What the gateway leaves behind after moving a WAL outbox aside: the file and a WAL holding data only."""
    path = tmp_path / "outbox.db"
    with Outbox(path, ["broker"]) as ob:
        for n in range(20):
            ob.append([Reading("meter", n * 100 + i, {"kwh": float(i), "text": "x" * 200}) for i in range(100)])
    with open(path, "r+b") as f:  # no connection is open: damage a page in the middle
        f.seek(os.path.getsize(path) // 2 // 4096 * 4096)
        f.write(b"\xa5" * 4096)
    with Journal(path, check=True), Outbox(path, ["broker"]) as ob:
        assert ob.stats().rows == 0
    asides = sorted(p.name for p in tmp_path.glob("outbox.db.corrupt-*"))
    assert len(asides) == 1, asides  # no empty -wal, no -shm beside it


def test_a_cli_notices_when_a_starting_gateway_moved_the_file_under_it(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Journal(path) as cli:
        cli.queue("start", "LOT-1", "room-a")
        assert not cli.moved()
        os.replace(path, tmp_path / "outbox.db.corrupt-x")  # what a starting gateway does to an unusable file
        with Journal(tmp_path / "fresh.db"):
            pass
        os.replace(tmp_path / "fresh.db", path)
        assert cli.moved()


_HOLD = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1])
conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()  # WAL mode: holds its lock from here on
print("holding", flush=True)
sys.stdin.readline()
conn.close()
"""


def test_an_unusable_file_another_process_has_open_is_not_moved_under_it(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "outbox.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE precious (x)")  # an SQLite file of something else: unusable as an outbox
    conn.close()
    monkeypatch.setattr(outbox_file, "OTHERS_WAIT", 1.0)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        with pytest.raises(OutboxError, match=r"have it open — not moving it aside"), Outbox(path, ["a"]):
            pass
        assert path.exists() and not list(tmp_path.glob("*.corrupt-*"))
    finally:
        holder.communicate("\n", timeout=60)
    with Outbox(path, ["a"]) as ob:  # once it let go, the file goes aside as before
        assert ob.stats().rows == 0
    assert len([p for p in tmp_path.glob("outbox.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))]) == 1
