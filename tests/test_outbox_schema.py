"""The outbox file's schema version (``PRAGMA user_version``) and its migrations, from every older
version, on real SQLite files: a new file, the first outbox (version 1, the readings only), the
version-1 files the code before schema versions made (dead letters, sent positions, the trace
journal with its own dead letters, a chain without an id), a version-2 file; a newer file is
refused and left alone; a migration that fails leaves the file as it was.

The version-1 tables below are written out as the Sluice before schema versions created them
(``gateway/buffer.py``'s and ``gateway/trace/journal.py``'s schema at that time): they are history,
never to be changed with the code."""

from __future__ import annotations

import json
import marshal
import sqlite3
from pathlib import Path

import pytest

from gateway.cli.commands import main
from gateway.outbox import Outbox, OutboxError, prepare, schema
from gateway.outbox.deadletters import TRACE, list_dead_letters, open_for_dead_letters
from gateway.reading import Reading
from gateway.trace.journal import Journal

T0 = 1_700_000_000_000_000_000

V1_READINGS = """
PRAGMA application_id = 1399616867;
PRAGMA user_version = 1;
CREATE TABLE state (id INTEGER PRIMARY KEY CHECK (id = 0), last_seq INTEGER NOT NULL, rows INTEGER NOT NULL,
    bytes INTEGER NOT NULL, dropped INTEGER NOT NULL);
INSERT INTO state VALUES (0, 0, 0, 0, 0);
CREATE TABLE sinks (name TEXT PRIMARY KEY, acked INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE series (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, last_seq INTEGER NOT NULL);
CREATE TABLE readings (seq INTEGER PRIMARY KEY, series INTEGER NOT NULL, data BLOB NOT NULL);
"""
V1_DEAD_LETTERS = """
CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, sink TEXT NOT NULL,
    time_ns INTEGER NOT NULL, count INTEGER NOT NULL, readings BLOB NOT NULL, message TEXT NOT NULL,
    resend INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 1);
CREATE INDEX IF NOT EXISTS dead_letters_by_sink ON dead_letters (sink, resend, id);
CREATE TABLE IF NOT EXISTS sink_sent (name TEXT PRIMARY KEY, sent INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sink_resend (name TEXT PRIMARY KEY, due_ns INTEGER NOT NULL, attempt INTEGER NOT NULL)
    WITHOUT ROWID;
"""
V1_TRACE = """
CREATE TABLE IF NOT EXISTS trace_commands (id INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, kind TEXT NOT NULL,
    lot TEXT NOT NULL, location TEXT, source TEXT NOT NULL, status TEXT);
CREATE TABLE IF NOT EXISTS trace_events (seq INTEGER PRIMARY KEY, lot TEXT NOT NULL, time_ns INTEGER NOT NULL,
    line TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS trace_events_lot ON trace_events (lot, seq);
CREATE TABLE IF NOT EXISTS trace_chain (id INTEGER PRIMARY KEY CHECK (id = 0), seq INTEGER NOT NULL, head TEXT);
INSERT OR IGNORE INTO trace_chain (id, seq, head) VALUES (0, 0, NULL);
CREATE TABLE IF NOT EXISTS trace_bindings (lot TEXT PRIMARY KEY, location TEXT NOT NULL, since_ns INTEGER NOT NULL,
    start_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS trace_sinks (name TEXT PRIMARY KEY, acked INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS trace_applied (lot TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS trace_dead_letters (id INTEGER PRIMARY KEY, sink TEXT NOT NULL, seq INTEGER NOT NULL,
    time_ns INTEGER NOT NULL, message TEXT NOT NULL);
"""


def readings(n: int) -> list[Reading]:
    return [Reading("meter", T0 + i, {"kwh": float(i), "n": i}, {"site": "farm"}, measurement="energy")
            for i in range(n)]


def _old_file(path: Path, *scripts: str) -> None:
    """A version-1 file as the Sluice before schema versions left it: readings 1..5 (sink ``a`` has 1..2)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    for script in (V1_READINGS, *scripts):
        conn.executescript(script)
    conn.execute("INSERT INTO series VALUES (1, ?, 5)", (json.dumps(["meter", "energy", {"site": "farm"}]),))
    conn.executemany("INSERT INTO readings VALUES (?, 1, ?)",
                     [(i + 1, marshal.dumps([T0 + i, "good", {"kwh": float(i), "n": i}], 4)) for i in range(5)])
    size = conn.execute("SELECT sum(length(data)) + count(*) * 16 FROM readings").fetchone()[0]
    conn.execute("UPDATE state SET last_seq=5, rows=5, bytes=? WHERE id=0", (size,))
    conn.execute("INSERT INTO sinks VALUES ('a', 2)")
    conn.close()


def _version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def _tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
    finally:
        conn.close()


def test_the_version_is_the_number_of_steps_and_a_new_file_gets_all_of_them(tmp_path: Path) -> None:
    assert schema.SCHEMA_VERSION == len(schema.STEPS) == 3
    path = tmp_path / "outbox.db"
    with Outbox(path, ["a"]) as ob:
        ob.append(readings(3))
    assert _version(path) == schema.SCHEMA_VERSION
    assert {"state", "sinks", "series", "readings", "dead_letters", "sink_sent", "sink_resend", "trace_events",
            "trace_chain", "trace_sinks", "salvage_log", "trace_salvaged"} <= _tables(path)
    assert "trace_dead_letters" not in _tables(path)  # one dead-letter store


def test_the_first_outbox_version_1_readings_only(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    _old_file(path)
    with Outbox(path, ["a", "b"]) as ob:
        assert [e.seq for e in ob.fetch("a", 10, 10**6)] == [3, 4, 5]
        assert [e.reading for e in ob.fetch("b", 10, 10**6)] == readings(5)  # a new sink: every stored row
        letter = ob.reject("a", ob.fetch("a", 1, 10**6), "bad")
        assert [d.id for d in ob.dead_letters()] == [letter]
        ob.append(readings(1))
        assert ob.last_seq == 6
    assert _version(path) == schema.SCHEMA_VERSION


def test_a_version_1_file_of_the_code_before_versions_keeps_every_letter_and_position(tmp_path: Path,
                                                                                       capsys) -> None:
    path = tmp_path / "outbox.db"
    _old_file(path, V1_DEAD_LETTERS, V1_TRACE)
    conn = sqlite3.connect(path, isolation_level=None)
    blob = marshal.dumps([["meter", "energy", {"site": "farm"}, T0, "good", {"kwh": 1.5}]], 4)
    conn.execute("INSERT INTO dead_letters (sink, time_ns, count, readings, message, resend, attempts) "
                 "VALUES ('a', ?, 1, ?, 'type conflict', 1, 2)", (T0, blob))
    conn.execute("INSERT INTO sink_sent VALUES ('a', 4)")
    conn.execute("INSERT INTO sink_resend VALUES ('a', ?, 3)", (T0 + 5,))
    conn.execute("UPDATE trace_chain SET seq=2, head='ni:///sha-256;x' WHERE id=0")
    conn.executemany("INSERT INTO trace_events VALUES (?, 'LOT-A', ?, ?)", [(1, T0, '{"seq": 1}'), (2, T0, '{"seq": 2}')])
    conn.execute("INSERT INTO trace_sinks VALUES ('repo', 2)")
    conn.executemany("INSERT INTO trace_dead_letters (id, sink, seq, time_ns, message) VALUES (?, 'repo', ?, ?, ?)",
                     [(1, 1, T0 + 1, "HTTP 400: bad document"), (2, 2, T0 + 2, "HTTP 422: no")])
    conn.close()

    with Journal(path) as j:  # whichever opens first migrates: here the trace journal (`sluice lot`)
        assert j.dead_letters() == [(2, "repo", 1, T0 + 1, "HTTP 400: bad document"),
                                    (3, "repo", 2, T0 + 2, "HTTP 422: no")]  # new ids, in their order
        assert j.delivery(["repo"]) == {"repo": (2, 2)}
        assert j.chain() == (2, "ni:///sha-256;x") and j.chain_id() is None  # begun before chain ids
    assert _version(path) == schema.SCHEMA_VERSION and "trace_dead_letters" not in _tables(path)
    with Outbox(path, ["a"]) as ob:
        (letter,) = ob.dead_letters(with_readings=True)
        assert (letter.id, letter.sink, letter.count, letter.message, letter.resend, letter.attempts) == \
            (1, "a", 1, "type conflict", True, 2)
        assert letter.readings == (Reading("meter", T0, {"kwh": 1.5}, {"site": "farm"}, "good", "energy"),)
        assert ob.stats().dead_letters == 1  # the readings' letters only
        assert (ob.position("a"), ob.sent("a"), ob.resend_due("a")) == (2, 4, (T0 + 5, 3))
        assert [e.seq for e in ob.fetch("a", 10, 10**6)] == [3, 4, 5]
    conn = open_for_dead_letters(path)
    try:
        got = [(d.id, d.stream, d.sink, d.seq, d.count) for d in list_dead_letters(conn, with_readings=True)]
    finally:
        conn.close()
    assert got == [(1, "readings", "a", None, 1), (2, "trace", "repo", 1, 1), (3, "trace", "repo", 2, 1)]


def test_a_version_1_file_opened_first_by_the_deadletter_cli_or_the_gateway_journal(tmp_path: Path) -> None:
    for opener in ("cli", "journal", "prepare"):
        path = tmp_path / f"{opener}.db"
        _old_file(path, V1_TRACE)  # trace tables, no readings letters yet
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("INSERT INTO trace_dead_letters (sink, seq, time_ns, message) VALUES ('repo', 7, 1, 'm')")
        conn.close()
        if opener == "cli":
            other = open_for_dead_letters(path)
            other.close()
        elif opener == "journal":
            with Journal(path, check=True):
                pass
        else:
            prepare(path, check=False)
        assert _version(path) == schema.SCHEMA_VERSION, opener
        with Journal(path) as j:
            assert [d[1:3] for d in j.dead_letters()] == [("repo", 7)], opener


def test_a_version_2_file(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    for step in schema.STEPS[:2]:
        step(conn)
    conn.execute(f"PRAGMA application_id = {schema.APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 2")
    conn.execute("INSERT INTO trace_dead_letters (sink, seq, time_ns, message) VALUES ('feed', 3, 1, 'm')")
    conn.execute("COMMIT")
    conn.close()
    with Outbox(path, ["a"]) as ob:
        assert ob.dead_letters() == [] and ob.stats().dead_letters == 0  # the trace letter is not the readings'
    with Journal(path) as j:
        assert [d[1:3] for d in j.dead_letters()] == [("feed", 3)]
    assert _version(path) == 3


def test_a_newer_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, ["a"]) as ob:
        ob.append(readings(2))
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    for open_it in (lambda: Outbox(path, ["a"]).open(), lambda: open_for_dead_letters(path).close(),
                    lambda: prepare(path, check=True)):
        with pytest.raises(OutboxError, match=rf"schema version {schema.SCHEMA_VERSION + 1}.*run the Sluice version"):
            open_it()
    assert not list(tmp_path.glob("*.corrupt-*")) and _version(path) == schema.SCHEMA_VERSION + 1


def test_a_failed_migration_leaves_the_file_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "outbox.db"
    _old_file(path, V1_DEAD_LETTERS, V1_TRACE)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("INSERT INTO trace_dead_letters (sink, seq, time_ns, message) VALUES ('repo', 1, 1, 'm')")
    conn.close()

    step_3 = schema.STEPS[2]

    def broken(conn: sqlite3.Connection) -> None:
        step_3(conn)  # the real step 3, then a failure before the commit
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(schema, "STEPS", (*schema.STEPS[:2], broken))
    with pytest.raises(OutboxError, match="disk I/O error"):
        Outbox(path, ["a"]).open()
    assert _version(path) == 1 and "trace_dead_letters" in _tables(path)
    conn = sqlite3.connect(path)
    assert "stream" not in {r[1] for r in conn.execute("PRAGMA table_info(dead_letters)")}
    conn.close()
    monkeypatch.undo()
    with Outbox(path, ["a"]) as ob:
        assert [e.seq for e in ob.fetch("a", 10, 10**6)] == [3, 4, 5]
    with Journal(path) as j:
        assert [d[1:3] for d in j.dead_letters()] == [("repo", 1)]


def test_trace_letters_are_listed_with_readings_letters_never_marked_nor_trimmed(tmp_path: Path, capsys) -> None:

    config = tmp_path / "config"
    for sub in ("devices", "profiles"):
        (config / sub).mkdir(parents=True)
    box = tmp_path / "state" / "outbox.db"
    (config / "gateway.yaml").write_text(f"gateway: {{id: gw1, site: farm}}\nbuffer: {{path: {box}}}\n"
                                         "sinks:\n  db: {type: influxdb, url: 'http://127.0.0.1:8086', bucket: b}\n")
    with Journal(box) as j:
        j.commit([(1, "LOT-A", T0, '{"seq": 1}')], (1, "ni:///sha-256;x"), {})
        j.dead_letter("repo", 1, "HTTP 400: bad document")
        assert j.position("repo") == 1  # moved in the letter's own transaction
    with Outbox(box, ["db"], dead_letter_max_bytes=10) as ob:
        ob.append(readings(4))
        first = ob.reject("db", ob.fetch("db", 2, 10**6), "type conflict")
        second = ob.reject("db", ob.fetch("db", 2, 10**6), "type conflict")  # over the cap: `first` goes
        assert [d.id for d in ob.dead_letters()] == [second]
    assert first == 2
    capsys.readouterr()
    assert main(["deadletter", "list", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "     1  repo" in out and "event seq 1 refused: HTTP 400: bad document" in out
    assert f"{second:>6}  db" in out and "2 readings, refused 1×" in out
    assert main(["deadletter", "list", "-c", str(config), "--json", "--readings", "--stream", "trace"]) == 0
    (item,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (item["stream"], item["sink"], item["seq"], item["event"]) == ("trace", "repo", 1, {"seq": 1})
    assert main(["deadletter", "resend", "-c", str(config), "--all"]) == 0
    assert "1 dead letter marked" in capsys.readouterr().out  # the readings letter only
    assert main(["deadletter", "resend", "-c", str(config), "1"]) == 1
    assert "trace events are not re-sent" in capsys.readouterr().err
    conn = open_for_dead_letters(box)
    try:
        assert [(d.stream, d.resend) for d in list_dead_letters(conn)] == [("trace", False), ("readings", True)]
        assert [d.seq for d in list_dead_letters(conn, stream=TRACE)] == [1]
    finally:
        conn.close()
