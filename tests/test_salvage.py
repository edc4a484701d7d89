"""`sluice outbox salvage`: what a really damaged outbox still holds comes back, and what it cannot
give is reported. The damaged file is a real outbox (readings, dead letter, trace chain, a pending
lot command) with pages overwritten by garbage; the gateway's own start moves it aside; the
salvage runs as a separate `sluice` process while the live outbox is open, and twice.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.outbox import Outbox
from gateway.outbox.deadletters import encode_letter
from gateway.reading import Reading
from gateway.salvage import salvage
from gateway.trace.journal import Journal
from gateway.trace.seal import Sealer, load_or_create_key, load_public_key, public_pem, verify_lines
from gateway.outbox.deadletters import list_dead_letters, open_for_dead_letters
import asyncio
import contextlib
import re
import signal
from e2e_support import counter_servers, device_ports, write_config
from servers import subscriber

REPO = Path(__file__).resolve().parent.parent
T0 = 1_764_000_000_000_000_000
READINGS = 575
EVENTS = 40


def _reading(seq: int) -> Reading:
    return Reading(f"dev-{seq % 3}", T0 + seq * 1_000_000_000, {"count": seq, "temp": seq / 7, "ok": seq % 2 == 0},
                   {"site": "lab"}, "good", "counters")


def _event(n: int) -> dict:
    return {"type": "ObjectEvent", "eventTime": f"2026-12-01T10:{n // 60:02d}:{n % 60:02d}.000Z",
            "eventTimeZoneOffset": "+00:00", "action": "OBSERVE", "epcList": ["urn:epc:id:sgtin:4012345.011111.1"],
            "bizStep": "sensor_reporting", "sluice:lot": "LOT-1", "sluice:n": n}


def _damaged_outbox(path: Path, key_path: Path) -> tuple[list[str], dict[str, list[int]]]:
    """A real outbox: 575 readings (sink `broker` acknowledged 1-100, `influx` none), one dead letter,
    40 sealed events (the feed acknowledged 25), one pending lot command; then one readings page and
    one events page overwritten with garbage. Returns the event lines and the pages of each table."""
    with Outbox(path, ["broker", "influx"]) as ob:
        for start in range(1, READINGS + 1, 25):
            ob.append([_reading(s) for s in range(start, min(start + 25, READINGS + 1))])
        ob.ack("broker", 100)
        ob.reject("influx", ob.fetch("influx", 2, 10**6), "field type conflict")  # letter of seq 1-2
    sealer = Sealer(load_or_create_key(key_path), "gw-test")
    lines = [sealer.seal(_event(n)) for n in range(EVENTS)]
    with Journal(path) as j:
        for i, line in enumerate(lines):
            j.commit([(i + 1, "LOT-1", T0 + i, line)], (sealer.seq, sealer.head), {})
        j.position("feed")
        j.ack("feed", 25)
        j.queue("move", "LOT-1", "room-b")
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = {}
        for table in ("readings", "trace_events"):
            pages[table] = [p for (p,) in conn.execute("SELECT pageno FROM dbstat WHERE name=? AND pagetype='leaf' "
                                                       "ORDER BY pageno", (table,))]
    finally:
        conn.close()
    rng = random.Random(11)
    damaged = [pages["readings"][len(pages["readings"]) // 2], pages["trace_events"][len(pages["trace_events"]) // 2]]
    with open(path, "r+b") as f:  # no connection is open in this process: garbage over two pages
        for page in damaged:
            f.seek((page - 1) * 4096)
            f.write(bytes(rng.randrange(256) for _ in range(4096)))
    return lines, pages


def _letters(ob: Outbox, sink: str) -> list[Reading]:
    return [r for letter in ob.dead_letters(sink, with_readings=True) if "salvaged from" in letter.message
            and "[salvaged" not in letter.message for r in letter.readings]


def test_salvage_brings_back_what_a_damaged_outbox_still_holds(tmp_path: Path) -> None:
    config = tmp_path / "config"
    (config / "devices").mkdir(parents=True)
    (config / "profiles").mkdir()
    state = tmp_path / "state"
    state.mkdir()
    live = state / "outbox.db"
    (config / "gateway.yaml").write_text(
        f"gateway: {{id: gw-test, site: lab}}\nbuffer: {{path: {live}}}\n"
        "sinks:\n  broker: {type: mqtt, host: 127.0.0.1, port: 1}\n  influx: {type: mqtt, host: 127.0.0.1, port: 1}\n")
    lines, pages = _damaged_outbox(live, state / "key")
    total_pages = os.path.getsize(live) // 4096
    assert 2 <= total_pages  # the file as the issue saw it: a few pages, two of them garbage

    # the gateway's start: the journal first, then the outbox; the unusable file goes aside alone
    with Journal(live, check=True), Outbox(live, ["broker", "influx"]) as ob:
        asides = sorted(state.glob("outbox.db.corrupt-*"))
        assert len(asides) == 1, asides  # no empty -wal, no -shm left beside it
        aside = asides[0]
        assert ob.stats().rows == 0
        ob.append([Reading("live", T0, {"count": 0})])  # the live outbox goes on while the salvage runs

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "gateway.cli", "outbox", "salvage", str(aside), "-c", str(config),
                                   "--events", str(tmp_path / "old-chain.jsonl")],
                                  capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
        first = run()
        assert first.returncode == 1, first  # something was unreadable: said, and the exit code says so too
        assert "Traceback" not in first.stderr
        report = first.stdout
        broker, influx = _letters(ob, "broker"), _letters(ob, "influx")
        letter = ob.next_resend("broker")  # what the running gateway's forwarder sends before its next batch
        assert letter is not None and letter.message.startswith("salvaged from")
        letters = len(ob.dead_letters())
        ob.resolve(letter.id)  # delivered: gone, and the count (in /metrics) follows letters it did not write
        assert ob.stats().dead_letters == letters - 1
        broker = [r for r in broker if r not in letter.readings] + list(letter.readings)
        broker.sort(key=lambda r: r.fields["count"])
        ob.append([Reading("live", T0 + 1, {"count": 1})])
        assert ob.stats().rows == 2 and ob.last_seq == 2  # its own sequence untouched

    # readings: every readable one, to each sink that had not acknowledged it, exactly as it was read
    read_seqs = {r.fields["count"] for r in influx}
    lost = set(range(3, READINGS + 1)) - read_seqs  # 1-2 left with the dead letter (acknowledged by both sinks)
    assert 0 < len(lost) < 100, f"{len(lost)} readings lost for one damaged page of {len(pages['readings'])}"
    assert [r for r in influx] == [_reading(s) for s in sorted(read_seqs)]  # time, fields, tags, quality kept
    assert [r.fields["count"] for r in broker] == [s for s in sorted(read_seqs) if s > 100]
    assert all(d.resend for d in ob_letters(live) if "[salvaged" not in d.message)  # marked: the running gateway sends them
    first_lost, last_lost = min(lost), max(lost)
    assert lost == set(range(first_lost, last_lost + 1)), "one damaged page loses one run of readings"
    assert f"{READINGS - 2 - len(lost)} read, {len(lost)} unreadable (seq {first_lost}–{last_lost})" in report
    assert "damaged: page " in report and "(readings)" in report and "(trace_events)" in report
    # the damaged file's own dead letter came along as it was
    old = [d for d in ob_letters(live) if "[salvaged" in d.message]
    assert len(old) == 1 and old[0].message.startswith("field type conflict") and old[0].count == 2

    # trace events: the old chain byte for byte beside the live one, never in it
    conn = sqlite3.connect(live)
    try:
        salvaged = conn.execute("SELECT seq, line FROM trace_salvaged ORDER BY seq").fetchall()
        assert conn.execute("SELECT count(*) FROM trace_events").fetchone()[0] == 0
    finally:
        conn.close()
    assert salvaged and all(line == lines[seq - 1] for seq, line in salvaged)
    lost_events = set(range(1, EVENTS + 1)) - {seq for seq, _line in salvaged}
    assert 0 < len(lost_events) < EVENTS
    assert f"{EVENTS - len(lost_events)} read, {len(lost_events)} unreadable" in report
    assert "old sink feed had not received events 26–40" in report
    assert "lot command 1 (move LOT-1 room-b" in report
    exported = (tmp_path / "old-chain.jsonl").read_text().splitlines()
    assert exported == [line for _seq, line in salvaged]
    (tmp_path / "pub.pem").write_text(public_pem(load_or_create_key(state / "key")))
    verified, problem = verify_lines(exported, load_public_key(tmp_path / "pub.pem"))
    assert verified == min(lost_events) - 1  # the chain holds up to the first unreadable event
    assert problem is not None

    # twice: nothing copied again
    with Outbox(live, ["broker", "influx"]) as ob:
        letters_before = len(ob.dead_letters())
    second = subprocess.run([sys.executable, "-m", "gateway.cli", "outbox", "salvage", str(aside), "-c", str(config)],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert second.returncode == 1 and "copied by an earlier run (not again)" in second.stdout, second
    assert ", 0 copied now into trace_salvaged" in second.stdout
    with Outbox(live, ["broker", "influx"]) as ob:
        assert len(ob.dead_letters()) == letters_before
    # the damaged file is left as it was, and nothing beside it (no -wal/-shm of the read-only reads)
    assert sorted(p.name for p in state.glob("outbox.db.corrupt-*")) == [aside.name]


def ob_letters(live: Path):
    conn = open_for_dead_letters(live)
    try:
        return list_dead_letters(conn)
    finally:
        conn.close()


def test_salvage_within_the_dead_letter_budget_leaves_the_rest_for_the_next_run(tmp_path: Path) -> None:
    damaged, live = tmp_path / "old.db", tmp_path / "outbox.db"
    with Outbox(damaged, ["broker"]) as ob:
        ob.append([_reading(s) for s in range(1, 1201)])
    with Outbox(live, ["broker"]):
        pass
    budget = len(encode_letter([_reading(s) for s in range(1, 501)])) + 100  # room for one letter of 500
    report = salvage(damaged, live, ["broker"], letter_budget=budget)
    assert report.readings_copied["broker"] == 500 and report.readings_left["broker"] == 1200 - report.readings_copied["broker"]
    assert not report.complete and any("budget is full" in line for line in report.lines())
    with Outbox(live, ["broker"]) as ob:  # the letters were delivered: the room is back
        for letter in ob.dead_letters():
            ob.resolve(letter.id)
    again = salvage(damaged, live, ["broker"], letter_budget=10**9)
    assert again.readings_copied["broker"] == report.readings_left["broker"]
    assert again.readings_already == report.readings_copied["broker"] and again.complete
    assert json.dumps(again.readings_lost) == "[]"


@pytest.mark.slow
async def test_a_running_gateway_delivers_what_salvage_brings_back(tmp_path: Path, mosquitto,
                                                                  close_default_executor) -> None:
    """`sluice run` finds a damaged outbox at start, moves it aside and goes on; `sluice outbox salvage`
    from another process hands it the readable backlog, which reaches the broker with its read times."""

    state = tmp_path / "state"
    state.mkdir()
    live = state / "outbox.db"
    with Outbox(live, ["broker"]) as ob:  # the backlog of a gateway whose broker was away
        for start in range(1, READINGS + 1, 25):
            ob.append([Reading("old", T0 + s * 1_000_000_000, {"count": s}, {"device": "old"}, "good", "counters")
                       for s in range(start, min(start + 25, READINGS + 1))])
    conn = sqlite3.connect(live)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        leaves = [p for (p,) in conn.execute("SELECT pageno FROM dbstat WHERE name='readings' AND pagetype='leaf'")]
    finally:
        conn.close()
    with open(live, "r+b") as f:  # no connection open here: one page of readings becomes garbage
        f.seek((leaves[len(leaves) // 2] - 1) * 4096)
        f.write(random.Random(5).randbytes(4096))
    servers = counter_servers({0: [("a", 1)]})
    log = tmp_path / "gateway.log"
    env = {**os.environ, "STATE_DIRECTORY": str(state), "PYTHONPATH": str(REPO)}
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        config = write_config(tmp_path / "config", devices=device_ports({0: [("a", 1)]}, servers),
                              broker_port=mosquitto.port, interval="200ms", outbox=live)
        collector = await stack.enter_async_context(subscriber(mosquitto.host, mosquitto.port, "sluice/lab/gw-test/#"))
        with log.open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(config)], stdout=out,
                                    stderr=out, stdin=subprocess.DEVNULL, env=env)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while " running: " not in log.read_text():
                assert proc.poll() is None and loop.time() < deadline, log.read_text()[-3000:]
                await asyncio.sleep(0.05)
            asides = [p for p in state.glob("outbox.db.corrupt-*")]
            assert len(asides) == 1, asides
            done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway.cli", "outbox", "salvage",
                                                            str(asides[0]), "-c", str(config)],
                                           capture_output=True, text=True, timeout=120, env=env)
            lost = re.search(r"(\d+) unreadable \(seq (\d+)–(\d+)\)", done.stdout)
            assert done.returncode == 1 and lost, done
            readable = set(range(1, READINGS + 1)) - set(range(int(lost[2]), int(lost[3]) + 1))
            line = re.compile(rb"^counters,\S*device=old\S* count=(\d+)i (\d+)$")

            def old_points() -> dict[int, int]:
                return {int(m[1]): int(m[2]) for msg in collector.messages for raw in msg.payload.splitlines()
                        if (m := line.match(raw))}
            await collector.wait_until(lambda _m: set(old_points()) >= readable, timeout=90)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text()[-3000:]
    points = old_points()
    assert set(points) == readable  # nothing unreadable invented, nothing readable missing
    assert all(ts == T0 + n * 1_000_000_000 for n, ts in points.items())  # delivered with the time it was read
    assert "dead letter" in log.read_text() and "Traceback" not in log.read_text()


def test_salvage_copies_the_readings_letters_of_the_one_store_and_leaves_its_trace_letters(tmp_path: Path) -> None:
    """A trace letter names an event of the old chain (copied into trace_salvaged): it holds no
    readings, so it is neither copied as a readings letter nor reported as unreadable."""
    damaged, live = tmp_path / "old.db", tmp_path / "outbox.db"
    with Outbox(damaged, ["broker"]) as ob:
        ob.append([_reading(s) for s in range(1, 11)])
        ob.reject("broker", ob.fetch("broker", 2, 10**6), "field type conflict")
    with Journal(damaged) as j:
        j.commit([(1, "LOT-1", T0, '{"seq": 1}')], (1, "ni:///sha-256;x"), {})
        j.dead_letter("repo", 1, "HTTP 400: bad document")
    with Outbox(live, ["broker"]):
        pass
    report = salvage(damaged, live, ["broker"], letter_budget=10**9)
    assert report.old_letters_copied == 1 and report.events_copied == 1
    assert report.problems == [] and report.complete
    with Outbox(live, ["broker"]) as ob:
        old = [d for d in ob.dead_letters(with_readings=True) if "[salvaged" in d.message]
        assert [(d.count, d.message.split(" [")[0]) for d in old] == [(2, "field type conflict")]
    with Journal(live) as j:
        assert j.dead_letters() == []  # the old chain's letters stay with the old file
