"""The outbox on real SQLite files: round trips, sink positions, when_full, corruption, SIGKILL, disk full."""

from __future__ import annotations

import enum
import logging
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.outbox import Outbox, OutboxError
from gateway.reading import UNCERTAIN, Reading
from support import STOP

REPO = Path(__file__).resolve().parent.parent


def readings(n: int, start: int = 0, device: str = "dev-1") -> list[Reading]:
    return [Reading(device, 1_700_000_000_000_000_000 + i, {"i": i, "t": 20.5 + i / 8, "ok": i % 2 == 0},
                    {"site": "farm", "device": device}) for i in range(start, start + n)]


def drain(ob: Outbox, sink: str) -> list[int]:
    """The ``i`` field of every entry pending for ``sink``, in seq order (fetch only, no ack)."""
    out: list[int] = []
    entries = ob.fetch(sink, 10**9, 10**12)
    seqs = [e.seq for e in entries]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    out.extend(int(e.reading.fields["i"]) for e in entries)
    return out


def test_round_trip_keeps_every_value_type_exactly(tmp_path: Path) -> None:
    fields = {
        "int": 42, "neg": -7, "big": 2**63 - 1, "huge": -(2**80), "zero": 0,
        "yes": True, "no": False,
        "f": 0.1, "third": 1 / 3, "fint": 3.0, "negf": -1e300, "maxf": 1.7976931348623157e308,
        "tiny": 5e-324, "negzero": -0.0, "inf": math.inf,
        "s": "温度 \"quoted\" \\ back\nslash ✓ 🙂", "empty": "",
    }
    batch = [
        Reading("冷库-1号", 1_700_000_000_123_456_789, fields, {"site": "农场", "房间": "一"}, UNCERTAIN, "冷库"),
        Reading("dev-2", 1, {"a": 1}, {}),
        Reading("冷库-1号", 2, {"b": 2.5}, {"房间": "一", "site": "农场"}),  # same tags, other order
        Reading("dev-2", 3, {"a": 2}, {"x": "y"}),  # same device, other tags: another series
    ]
    with Outbox(tmp_path / "o.db", ["a"]) as ob:
        assert ob.append(batch) == 4
    with Outbox(tmp_path / "o.db", ["a"]) as ob:  # decoded from disk, not from a cache
        entries = ob.fetch("a", 100, 10**6)
    assert [e.seq for e in entries] == [1, 2, 3, 4]
    for entry, orig in zip(entries, batch, strict=True):
        got = entry.reading
        assert (got.device, got.time_ns, got.tags, got.quality, got.measurement) == \
            (orig.device, orig.time_ns, orig.tags, orig.quality, orig.measurement)
        assert list(got.fields) == list(orig.fields)
        for key, value in orig.fields.items():
            assert type(got.fields[key]) is type(value), key
            assert got.fields[key] == value, key
    assert math.copysign(1, entries[0].reading.fields["negzero"]) == -1
    assert type(entries[0].reading.time_ns) is int


class Mode(enum.IntEnum):
    AUTO = 2


class Celsius(float):
    pass


def test_subclassed_values_are_stored_as_their_plain_type(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", ["a"]) as ob:
        ob.append([Reading("d", 1, {"mode": Mode.AUTO, "t": Celsius(21.5), "ok": True}, {})])
        (entry,) = ob.fetch("a", 10, 10**6)
    assert entry.reading.fields == {"mode": 2, "t": 21.5, "ok": True}
    assert [type(v) for v in entry.reading.fields.values()] == [int, float, bool]


def test_two_sinks_have_independent_positions(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, ["a", "b"]) as ob:
        ob.append(readings(10))
        got = ob.fetch("a", 3, 10**6)
        assert [e.seq for e in got] == [1, 2, 3]
        ob.ack("a", 3)
        assert [e.seq for e in ob.fetch("a", 100, 10**6)] == list(range(4, 11))
        assert [e.seq for e in ob.fetch("b", 100, 10**6)] == list(range(1, 11))
        assert ob.stats().rows == 10  # b has not acknowledged anything: nothing leaves
        ob.ack("b", 5)
        st = ob.stats()
        assert (st.rows, st.pending, st.oldest_ns) == (7, {"a": 7, "b": 5}, readings(1, 3)[0].time_ns)
        # max_bytes smaller than one entry still returns exactly one; the byte budget limits the batch
        assert [e.seq for e in ob.fetch("a", 100, 1)] == [4]
        one = len(ob.fetch("a", 100, 1))
        assert one == 1 and 1 < len(ob.fetch("a", 100, 300)) < 7
        ob.ack("a", 2)  # going backwards is a no-op
        with pytest.raises(ValueError, match="beyond"):
            ob.ack("a", 11)
        with pytest.raises(ValueError, match="unknown sink"):
            ob.fetch("nope", 1, 1)

    with Outbox(path, ["a", "b"]) as ob:  # positions survive close/reopen
        assert ob.fetch("a", 1, 10**6)[0].seq == 4
        assert ob.fetch("b", 1, 10**6)[0].seq == 6
        ob.ack("a", 10)
        assert ob.stats().rows == 5  # b still holds 6..10

    with Outbox(path, ["a"]) as ob:  # b removed from the config: its rows are no longer held
        st = ob.stats()
        assert (st.rows, st.bytes, st.pending) == (0, 0, {"a": 0})
        ob.append(readings(4, 100))

    with Outbox(path, ["a", "c"]) as ob:  # a new sink sees everything stored, seqs never reused
        assert [e.seq for e in ob.fetch("c", 100, 10**6)] == [11, 12, 13, 14]
        assert ob.stats().pending == {"a": 4, "c": 4}
        ob.ack("a", 14)
        ob.ack("c", 14)
        assert ob.stats().rows == 0 and ob.stats().oldest_ns is None
    with Outbox(path, ["a"]) as ob:
        ob.append(readings(1))
        assert ob.last_seq == 15
        assert sqlite3.connect(path).execute("SELECT count(*) FROM series").fetchone()[0] == 1


def _file_positions(path: Path) -> dict[str, int]:
    """What another process would read from the file: the positions actually written."""
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT name, acked FROM sinks").fetchall())
    finally:
        conn.close()


def test_acknowledged_positions_reach_the_file_with_the_next_commit_or_at_close(tmp_path: Path) -> None:
    """An ack counts at once in memory and is written with the next commit of readings (one
    transaction and fsync for both), by a later ack after ACK_WRITE_DELAY, or at close."""
    path = tmp_path / "o.db"
    with Outbox(path, ["a", "b"]) as ob:
        ob.append(readings(10))
        ob.ack("a", 4)
        assert ob.position("a") == 4 and ob.fetch("a", 100, 10**6)[0].seq == 5
        assert _file_positions(path) == {"a": 0, "b": 0}  # not written yet: no transaction of its own
        ob.append(readings(2, 10))
        assert _file_positions(path) == {"a": 4, "b": 0}  # went with the commit of readings
        ob.ack("a", 6)
        ob.ack("b", 6)  # every sink has 1..6: deleted in the transaction that writes the positions
        assert _file_positions(path) == {"a": 4, "b": 0}
    assert _file_positions(path) == {"a": 6, "b": 6}  # written at close
    with Outbox(path, ["a", "b"]) as ob:
        assert (ob.position("a"), ob.position("b"), ob.stats().rows) == (6, 6, 6)


def test_an_ack_not_yet_written_is_delivered_again_after_a_crash_never_lost(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    ob = Outbox(path, ["a"])
    ob.open()
    ob.append(readings(5))
    ob.ack("a", 5)
    # A crash now (no close): the file still says nothing was delivered.
    conn, ob._conn = ob._conn, None  # noqa: SLF001 - a crash: the connection goes without Outbox.close
    assert conn is not None
    conn.close()
    with Outbox(path, ["a"]) as again:
        assert drain(again, "a") == [0, 1, 2, 3, 4]  # sent again: duplicates, not loss



@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
def test_full_outbox_counts_every_drop(tmp_path: Path, policy: str, caplog: pytest.LogCaptureFixture) -> None:
    path, produced, max_bytes = tmp_path / "o.db", 3000, 20_000
    caplog.set_level(logging.INFO, logger="gateway.outbox")
    stored = 0
    with Outbox(path, ["a"], max_bytes=max_bytes, when_full=policy) as ob:  # type: ignore[arg-type]
        for start in range(0, produced - 1000, 50):
            stored += ob.append(readings(50, start))
            assert ob.stats().bytes <= max_bytes
        stored += ob.append(readings(1000, produced - 1000))  # a batch bigger than max_bytes
        st = ob.stats()
        assert st.bytes <= max_bytes
        kept = drain(ob, "a")
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "full" in warnings[0].getMessage()  # once, not per row
        caplog.clear()
        ob.ack("a", ob.last_seq - 1)  # the sink catches up: the next append fits
        assert ob.append(readings(1, produced)) == 1
        assert [r.levelno for r in caplog.records] == [logging.INFO]
        assert f"{st.dropped} readings were dropped" in caplog.records[0].getMessage()
    assert len(kept) == st.rows and 0 < len(kept) < produced
    assert len(kept) + st.dropped == produced
    if policy == "drop_oldest":
        assert kept == list(range(produced - len(kept), produced))  # the newest survive
    else:
        assert kept == list(range(len(kept))) and stored == len(kept)  # the oldest survive

    with Outbox(path, ["a"], max_bytes=max_bytes, when_full=policy) as ob:  # type: ignore[arg-type]
        assert ob.stats().dropped == st.dropped  # persisted in the file
        assert drain(ob, "a") == [*kept[-1:], produced]


def _corrupt_cases(tmp_path: Path) -> dict[str, bytes]:
    real = tmp_path / "real.db"
    with Outbox(real, ["a"]) as ob:
        for start in range(0, 3000, 500):
            ob.append(readings(500, start))
    data = real.read_bytes()
    assert len(data) > 100_000
    return {"garbage": b"not a database, just bytes \x00\xff" * 400,
            "truncated": data[: len(data) // 2]}


@pytest.mark.parametrize("case", ["garbage", "truncated"])
def test_corrupt_file_is_moved_aside_and_replaced(tmp_path: Path, case: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    content = _corrupt_cases(tmp_path)[case]
    path = tmp_path / "outbox.db"
    path.write_bytes(content)
    Path(f"{path}-wal").write_bytes(b"wal of the broken file")
    with Outbox(path, ["a"]) as ob:
        assert ob.stats().rows == 0
        assert ob.append(readings(3)) == 3
        assert [e.seq for e in ob.fetch("a", 10, 10**6)] == [1, 2, 3]
    asides = sorted(tmp_path.glob("outbox.db.corrupt-*"))
    main = [p for p in asides if not p.name.endswith(("-wal", "-shm"))]
    assert len(main) == 1 and main[0].read_bytes() == content
    assert Path(f"{main[0]}-wal").read_bytes() == b"wal of the broken file"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(main[0]) in errors[0]
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_foreign_sqlite_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE precious (x)")
    conn.close()
    with Outbox(path, ["a"]) as ob:
        ob.append(readings(1))
    assert len(list(tmp_path.glob("outbox.db.corrupt-*"))) == 1


_WRITER = """
import sys
from pathlib import Path
from gateway.outbox import Outbox
from gateway.reading import Reading
with Outbox(Path(sys.argv[1]), ["a"]) as ob:
    for n in range(2000):
        ob.append([Reading("dev", n * 100 + i, {"i": i, "v": i / 3}, {"site": "s"}) for i in range(100)])
        print(ob.last_seq, flush=True)
"""


def test_sigkill_never_loses_a_committed_row(tmp_path: Path) -> None:
    path, rng = tmp_path / "o.db", random.Random(7)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    confirmed: list[int] = []
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, env=env)
        try:
            first = proc.stdout.readline()  # type: ignore[union-attr]
            time.sleep(rng.uniform(0, 0.15))  # a random moment to kill it at, not a wait
            proc.send_signal(signal.SIGKILL)
            rest, _ = proc.communicate(timeout=STOP)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=STOP)
        assert proc.returncode == -signal.SIGKILL, "the writer finished before it was killed"
        lines = (first + rest).decode().split("\n")
        confirmed.extend(int(line) for line in lines[:-1])  # the last piece may be a cut-off line
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            present = {row[0] for row in conn.execute("SELECT seq FROM readings")}
        finally:
            conn.close()
        assert set(confirmed) <= present
    assert len(confirmed) >= 10
    with Outbox(path, ["a"]) as ob:
        st = ob.stats()
        assert st.rows == len(present) == ob.last_seq  # nothing acknowledged: every seq is stored
        assert ob.fetch("a", 10**6, 10**12)[-1].seq == ob.last_seq


def test_disk_full_raises_outbox_error_and_outbox_stays_usable(tmp_path: Path) -> None:
    path, pages = tmp_path / "o.db", 40  # 40 pages of 4 KiB: a tiny "disk"
    with Outbox(path, ["a"], max_pages=pages) as ob:
        with pytest.raises(OutboxError, match="full") as err:
            for start in range(0, 100_000, 200):
                ob.append(readings(200, start))
        assert "SQLITE_FULL" in str(err.value) and str(path) in str(err.value)
        st = ob.stats()
        assert st.rows == ob.last_seq == len(drain(ob, "a"))  # the failed batch left no trace
        with pytest.raises(OutboxError):
            ob.append(readings(200))
        assert ob.stats() == st
        ob.ack("a", ob.last_seq)  # freeing rows frees pages: writes work again
        assert ob.append(readings(200, 10**6)) == 200
        assert drain(ob, "a") == list(range(10**6, 10**6 + 200))
    with Outbox(path, ["a"], max_pages=pages) as ob:  # the cap holds after reopening too
        with pytest.raises(OutboxError, match="full"):
            for start in range(0, 100_000, 200):
                ob.append(readings(200, start))
    with Outbox(path, ["a"]) as ob:  # the limit raised: room again
        assert ob.append(readings(2000)) == 2000
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_undecodable_row_is_skipped_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, ["a"]) as ob:
        ob.append(readings(3))
    with sqlite3.connect(path) as conn:  # bit rot inside a payload: the page structure is intact
        conn.execute("UPDATE readings SET data = x'ff00ff' WHERE seq = 2")
    conn.close()
    with Outbox(path, ["a"]) as ob:
        assert [e.seq for e in ob.fetch("a", 10, 10**6)] == [1, 3]
        ob.ack("a", 3)
        assert ob.stats().rows == 0
    assert any("entry 2 cannot be decoded" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
