"""The outbox's dead-letter table on real SQLite files: reject, list, mark for resend, resolve, cap."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.outbox import Outbox, OutboxError
from gateway.outbox.deadletters import list_dead_letters, mark_resend, open_for_dead_letters
from gateway.reading import UNCERTAIN, Reading
from gateway.cli.commands import main


def readings(n: int, start: int = 0, device: str = "冷库-1") -> list[Reading]:
    return [Reading(device, 1_700_000_000_000_000_000 + i, {"i": i, "t": 20.5 + i / 8, "s": "a \"b\"\n"},
                    {"site": "农场", "device": device}, measurement="env") for i in range(start, start + n)]


def test_reject_moves_the_batch_and_the_position_in_one_step(tmp_path: Path) -> None:
    sent = readings(10)
    sent[3] = Reading("冷库-1", sent[3].time_ns, {"big": 2**80, "x": True}, {"k": "v"}, UNCERTAIN, "other")
    with Outbox(tmp_path / "o.db", ["influx", "mqtt"]) as ob:
        ob.append(sent)
        batch = ob.fetch("influx", 6, 10**6)
        letter = ob.reject("influx", batch, "partial write: field type conflict")
        assert [e.seq for e in ob.fetch("influx", 100, 10**6)] == list(range(7, 11))  # acked past it
        assert ob.stats().pending == {"influx": 4, "mqtt": 10}  # the other sink still has all
        assert ob.stats().dead_letters == 1
    with Outbox(tmp_path / "o.db", ["influx", "mqtt"]) as ob:  # persisted, decoded from disk
        (got,) = ob.dead_letters(with_readings=True)
        assert ob.stats().dead_letters == 1
    assert (got.id, got.sink, got.count, got.resend, got.attempts) == (letter, "influx", 6, False, 1)
    assert got.message == "partial write: field type conflict"
    assert list(got.readings) == sent[:6]  # every value, tag, quality, measurement, time exact


def test_rows_leave_once_every_sink_has_them_or_dead_lettered_them(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", ["a", "b"]) as ob:
        ob.append(readings(5))
        ob.ack("b", 5)
        assert ob.stats().rows == 5
        ob.reject("a", ob.fetch("a", 100, 10**6), "bad")
        assert ob.stats().rows == 0
        assert ob.fetch("a", 100, 10**6) == [] and ob.fetch("b", 100, 10**6) == []


def test_resend_marked_from_another_connection_while_open(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, ["a"]) as ob:
        ob.append(readings(6))
        first = ob.reject("a", ob.fetch("a", 3, 10**6), "one")
        second = ob.reject("a", ob.fetch("a", 3, 10**6), "two")
        assert ob.next_resend("a") is None
        other = open_for_dead_letters(path)  # what `sluice deadletter resend` does
        try:
            assert [d.id for d in list_dead_letters(other)] == [first, second]
            assert mark_resend(other, [second, 999]) == 1
        finally:
            other.close()
        letter = ob.next_resend("a")
        assert letter is not None and letter.id == second and list(letter.readings) == readings(3, 3)
        ob.refused_again(second, "still bad")
        assert ob.next_resend("a") is None
        (_one, again) = ob.dead_letters()
        assert (again.message, again.attempts, again.resend) == ("still bad", 2, False)
        assert ob.mark_resend() == 2
        assert ob.next_resend("a").id == first  # type: ignore[union-attr]
        ob.resolve(first)
        ob.resolve(second)
        assert ob.dead_letters() == [] and ob.stats().dead_letters == 0


def test_cap_deletes_the_oldest_letters_never_the_newest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Outbox(tmp_path / "o.db", ["a"], dead_letter_max_bytes=1500) as ob:
        ob.append(readings(60))
        ids = [ob.reject("a", ob.fetch("a", 10, 10**6), f"bad {n}") for n in range(6)]
        kept = [d.id for d in ob.dead_letters()]
        assert kept[-1] == ids[-1] and len(kept) < len(ids) and kept == ids[-len(kept):]
        assert ob.stats().dead_letters == len(kept)
        assert ob.stats().pending["a"] == 0
    assert "dead letters exceed" in caplog.text


def test_an_outbox_from_before_dead_letters_gets_the_table(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, ["a"]) as ob:
        ob.append(readings(2))
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE dead_letters")
    conn.execute("PRAGMA user_version=1")  # what such a file says: schema version 1
    conn.commit()
    conn.close()
    other = open_for_dead_letters(path)  # the CLI on an old file: creates it too
    assert list_dead_letters(other) == []
    other.execute("DROP TABLE dead_letters")
    other.execute("PRAGMA user_version=1")
    other.close()
    with Outbox(path, ["a"]) as ob:
        assert [e.seq for e in ob.fetch("a", 10, 10**6)] == [1, 2]
        ob.reject("a", ob.fetch("a", 10, 10**6), "bad")
        assert len(ob.dead_letters()) == 1


def test_cli_side_refuses_a_missing_or_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(OutboxError, match="does not exist"):
        open_for_dead_letters(tmp_path / "nope.db")
    foreign = tmp_path / "other.db"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(OutboxError, match="not a Sluice outbox"):
        open_for_dead_letters(foreign)


def test_cli_lists_and_marks_for_resend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config"
    for sub in ("devices", "profiles"):
        (config / sub).mkdir(parents=True)
    box = tmp_path / "state" / "outbox.db"
    (config / "gateway.yaml").write_text(f"gateway: {{id: gw1, site: farm}}\nbuffer: {{path: {box}}}\n"
                                         "sinks:\n  db: {type: influxdb, url: 'http://127.0.0.1:8086', bucket: b}\n")
    assert main(["deadletter", "list", "-c", str(config)]) == 1  # no outbox yet: said so, not a traceback
    assert "does not exist" in capsys.readouterr().err
    with Outbox(box, ["db"]) as ob:
        ob.append(readings(4))
        letter = ob.reject("db", ob.fetch("db", 4, 10**6), 'partial write: field type conflict: "s"')
    assert main(["deadletter", "list", "-c", str(config), "--readings"]) == 0
    out = capsys.readouterr().out
    assert f"{letter:>6}  db" in out and "4 readings, refused 1×" in out and "field type conflict" in out
    assert "冷库-1 env 1700000000000000000" in out
    assert main(["deadletter", "resend", "-c", str(config)]) == 2  # neither ids nor --all
    assert main(["deadletter", "resend", "-c", str(config), str(letter), "77"]) == 1
    assert "1 dead letter marked" in capsys.readouterr().out
    assert main(["deadletter", "list", "-c", str(config), "--json"]) == 0
    assert '"resend": true' in capsys.readouterr().out
    with Outbox(box, ["db"]) as ob:
        assert ob.next_resend("db").id == letter  # type: ignore[union-attr]
