"""A new chain at the seams: an outbox moved aside as unusable takes its chain with it, and the fresh
outbox starts a new one at seq 1. Every event of the new chain must reach the feed (the jsonl sink's
exactly-once skip applies within one chain only), each chain's file verifies on its own, and a
verifier tells "a new chain started here" from tampering. The old chain is accounted for by its
feed file (moved aside by the sink) plus what `sluice outbox salvage` exports from the old outbox."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_trace import trace_config

from gateway.trace.journal import Journal
from gateway.sinks.jsonl import JsonlSink
from gateway.trace.seal import Sealer, load_or_create_key, load_public_key, public_pem, read_head, verify_events, verify_lines
from test_trace import _query_answer
from gateway.cli.commands import main
from test_trace_heads import _documented_verifier

REPO = Path(__file__).resolve().parent.parent
T0 = 1_764_000_000_000_000_000


def _event(n: int) -> dict:
    return {"type": "ObjectEvent", "eventTime": f"2026-12-01T10:{n // 60:02d}:{n % 60:02d}.000Z",
            "eventTimeZoneOffset": "+00:00", "action": "OBSERVE",
            "quantityList": [{"epcClass": "urn:sluice:lot:CN-FARM-001:LOT-1"}],
            "bizStep": "sensor_reporting", "sluice:lot": "LOT-1", "sluice:n": n}


def _chain(key_path: Path, chain: str | None, count: int) -> tuple[Sealer, list[tuple[int, str]]]:
    sealer = Sealer(load_or_create_key(key_path), "gw-test", chain=chain)
    return sealer, [(n + 1, sealer.seal(_event(n))) for n in range(count)]


def _chain_of(line: str) -> str | None:
    return json.loads(line)["epcisBody"]["eventList"][0].get("sluice:chain")


# -- the sink ------------------------------------------------------------------------------------


def test_the_sink_moves_the_old_chains_file_aside_and_writes_every_event_of_the_new_one(tmp_path, caplog) -> None:
    key = tmp_path / "key"
    feed = tmp_path / "feed.jsonl"
    (tmp_path / "outbox.db.corrupt-20261202T101500Z").write_bytes(b"")  # where the old chain's tail would be
    old_sealer, old = _chain(key, "20261202T090000Z-aaaaaaaa", 7)
    sink = JsonlSink("feed", feed, tmp_path / "outbox.db")
    sink.write(old[:5])
    sink.write(old[3:])  # sent again after a failure: within the chain, exactly once
    sink.write_head(old_sealer.signed_head(7, json.loads(old[-1][1])["epcisBody"]["eventList"][0]["eventID"], T0))
    assert feed.read_text().splitlines() == [line for _s, line in old]

    new_sealer, new = _chain(key, "20261202T101500Z-bbbbbbbb", 4)  # fewer than the file holds: all would be skipped
    restarted = JsonlSink("feed", feed, tmp_path / "outbox.db")  # the gateway's next start
    with caplog.at_level(logging.WARNING, logger="gateway.trace.service"):
        restarted.write(new[:2])
        restarted.write(new[1:])
    assert feed.read_text().splitlines() == [line for _s, line in new]
    aside = tmp_path / "feed.jsonl.chain-20261202T090000Z-aaaaaaaa"
    assert aside.read_text().splitlines() == [line for _s, line in old]
    assert read_head((tmp_path / (aside.name + ".head")).read_text(), load_public_key(key)).chain == old_sealer.chain
    assert not (tmp_path / "feed.jsonl.head").exists()  # the new chain's first head comes with its first ack
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # one line per change of state
    assert str(feed) in warnings[0] and str(aside) in warnings[0] and "sluice outbox salvage" in warnings[0]
    assert "outbox.db.corrupt-20261202T101500Z" in warnings[0] and new_sealer.chain in warnings[0]
    public = load_public_key(key)
    assert verify_lines(feed.read_text().splitlines(), public) == (4, None)
    assert verify_lines(aside.read_text().splitlines(), public) == (7, None)


def test_a_move_cut_short_by_a_crash_is_finished_under_the_same_name(tmp_path) -> None:
    key, feed = tmp_path / "key", tmp_path / "feed.jsonl"
    old_sealer, old = _chain(key, "20261202T090000Z-aaaaaaaa", 3)
    JsonlSink("feed", feed).write(old)
    head = tmp_path / "feed.jsonl.chain-20261202T090000Z-aaaaaaaa.head"
    head.write_text(old_sealer.signed_head(3, old_sealer.head, T0) + "\n")  # the head went aside, then the crash
    _s, new = _chain(key, "20261202T101500Z-bbbbbbbb", 2)
    JsonlSink("feed", feed).write(new)
    assert sorted(p.name for p in tmp_path.glob("feed.jsonl*")) == [
        "feed.jsonl", "feed.jsonl.chain-20261202T090000Z-aaaaaaaa", head.name]
    assert feed.read_text().splitlines() == [line for _s, line in new]


def test_a_feed_of_a_chain_without_an_id_is_moved_aside_too(tmp_path) -> None:
    key, feed = tmp_path / "key", tmp_path / "feed.jsonl"
    _s, legacy = _chain(key, None, 3)  # written by a Sluice before chain ids
    JsonlSink("feed", feed).write(legacy)
    _s, new = _chain(key, "20261202T101500Z-bbbbbbbb", 2)
    JsonlSink("feed", feed).write(new)
    assert feed.read_text().splitlines() == [line for _s, line in new]
    (aside,) = tmp_path.glob("feed.jsonl.chain-unnamed-*")
    assert aside.read_text().splitlines() == [line for _s, line in legacy]
    # ... and a legacy chain that goes on stays in its file, exactly once
    _sealer, more = _chain(key, None, 3)
    JsonlSink("feed", aside).write(more[1:])
    assert len(aside.read_text().splitlines()) == 3


# -- verifiers ----------------------------------------------------------------------------------


def test_verifiers_tell_a_new_chain_from_tampering(tmp_path) -> None:
    key = tmp_path / "key"
    load_or_create_key(key)
    public = load_public_key(key)
    old_sealer, old = _chain(key, "20261202T090000Z-aaaaaaaa", 5)
    new_sealer, new = _chain(key, "20261202T101500Z-bbbbbbbb", 3)
    spliced = [line for _s, line in old] + [line for _s, line in new]
    count, problem = verify_lines(spliced, public)
    assert count == 5 and problem is not None and problem.position == 6
    assert "new chain started here" in problem.message and "20261202T101500Z-bbbbbbbb" in problem.message
    assert "20261202T090000Z-aaaaaaaa" in problem.message
    count, problem = verify_lines(spliced[:5] + spliced[6:], public)  # the new chain without its first event
    assert count == 5 and problem is not None and "events of two chains were mixed" in problem.message
    # a head of the other chain is named as such, never as events cut off
    old_head = read_head(old_sealer.signed_head(5, old_sealer.head, T0), public)
    new_head = read_head(new_sealer.signed_head(3, new_sealer.head, T0), public)
    assert new_head.chain == "20261202T101500Z-bbbbbbbb"
    count, problem = verify_lines([line for _s, line in new], public, heads=[old_head])
    assert problem is not None and "is of chain 20261202T090000Z-aaaaaaaa" in problem.message
    assert verify_lines([line for _s, line in new], public, heads=[new_head]) == (3, None)
    # a repository holding both chains: each is checked on its own, with its own heads
    events = [json.loads(line)["epcisBody"]["eventList"][0] for line in reversed(spliced)]
    assert verify_events(events, public, heads=[old_head, new_head]) == (8, None)
    count, problem = verify_events(events[1:], public, heads=[old_head, new_head])  # new chain's seq 3 cut off
    assert problem is not None and "chain 20261202T101500Z-bbbbbbbb" in problem.message and "cut off" in problem.message


def test_trace_verify_checks_a_repositorys_answer_chain_by_chain(tmp_path, capsys) -> None:
    key = tmp_path / "key"
    _o, old = _chain(key, "20261202T090000Z-aaaaaaaa", 4)
    _n, new = _chain(key, "20261202T101500Z-bbbbbbbb", 3)
    events = [json.loads(line)["epcisBody"]["eventList"][0] for _s, line in old + new]
    answer = tmp_path / "answer.json"
    answer.write_text(json.dumps(_query_answer(events[::-1])))
    assert main(["trace", "verify", str(answer), "--pubkey", str(key)]) == 0
    out = capsys.readouterr().out
    assert "OK — 7 events, 2 chains (20261202T090000Z-aaaaaaaa, 20261202T101500Z-bbbbbbbb)" in out, out
    answer.write_text(json.dumps(_query_answer([events[0], events[2], events[4], events[6]])))  # one lot's events
    assert main(["trace", "verify", str(answer), "--pubkey", str(key), "--partial"]) == 0
    assert "2 gap(s)" in capsys.readouterr().out  # seq 2 of the old chain, seq 2 of the new one
    answer.write_text(json.dumps(_query_answer([events[0], events[2], events[3], events[4], events[6]])))
    assert main(["trace", "verify", str(answer), "--pubkey", str(key)]) == 1
    err = capsys.readouterr().err
    assert "chain 20261202T090000Z-aaaaaaaa: expected seq 2" in err, err


def test_the_documented_verifier_tells_a_new_chain_from_tampering(tmp_path) -> None:
    key = tmp_path / "key"
    pem = public_pem(load_or_create_key(key)).encode()
    _old, old = _chain(key, "20261202T090000Z-aaaaaaaa", 3)
    new_sealer, new = _chain(key, "20261202T101500Z-bbbbbbbb", 2)
    verify_feed = _documented_verifier()["verify_feed"]
    new_head = new_sealer.signed_head(2, new_sealer.head, T0)
    assert verify_feed([line for _s, line in new], pem, [new_head]) == 2
    with pytest.raises(ValueError, match="line 4: a new chain starts here"):
        verify_feed([line for _s, line in old + new], pem)
    with pytest.raises(ValueError, match="head is of chain 20261202T101500Z-bbbbbbbb"):
        verify_feed([line for _s, line in old], pem, [new_head])


def test_the_chain_id_is_fixed_at_genesis_and_an_old_chain_keeps_going_without_one(tmp_path) -> None:
    path = tmp_path / "outbox.db"
    with Journal(path) as j:
        chain = j.chain_id()
        assert chain is not None and len(chain) == len("20261202T101500Z-3f9a1c2e")
    with Journal(path) as j:
        assert j.chain_id() == chain  # never changes
    old = tmp_path / "old.db"  # the trace_chain of a Sluice before chain ids, with events
    with Journal(old) as j:
        j.commit([(1, "LOT-1", T0, '{"seq": 1}')], (1, "ni:///sha-256;x"), {})
    conn = sqlite3.connect(old)
    conn.executescript("ALTER TABLE trace_chain DROP COLUMN chain; PRAGMA user_version=1;")  # as such a Sluice left it
    conn.close()
    with Journal(old) as j:
        assert j.chain_id() is None and j.chain() == (1, "ni:///sha-256;x")


# -- end to end: `sluice run`, a damaged outbox, a restart ---------------------------------------

GATEWAY = "gateway: {id: gw-1, site: farm-1}\nhealth: {enabled: false}\nlogging: {level: info, format: text}\n"


def _sluice(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def _wait(condition, what: str, log: Path, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{what}: " + log.read_text()[-3000:]
        time.sleep(0.05)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _start(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(config)], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, env=env)
    runs = log.read_text().count(" running: ")
    _wait(lambda: log.read_text().count(" running: ") > runs, "the gateway did not start", log, proc)
    return proc


def _stop(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, log.read_text()[-3000:]


def _damage(outbox: Path) -> None:
    """Garbage over the page of the events' lot index (no connection to the file is open): the outbox
    fails its integrity check, while every event row stays readable for the salvage."""
    conn = sqlite3.connect(outbox)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (page,) = conn.execute("SELECT min(pageno) FROM dbstat WHERE name='trace_events_lot'").fetchone()
    finally:
        conn.close()
    with open(outbox, "r+b") as f:
        f.seek((page - 1) * 4096)
        f.write(random.Random(7).randbytes(4096))


@pytest.mark.slow
def test_a_new_chain_after_a_damaged_outbox_reaches_the_feed_and_the_old_one_is_accounted_for(tmp_path: Path) -> None:
    trace_config(tmp_path)  # config/ with devices (nothing listens on their ports: no readings) and trace.yaml
    config = tmp_path / "config"
    (config / "gateway.yaml").write_text(GATEWAY)
    state = tmp_path / "state"
    (state / "out").mkdir(parents=True)
    outbox, feed = state / "outbox.db", state / "out" / "feed.jsonl"
    env = {**os.environ, "STATE_DIRECTORY": str(state), "PYTHONPATH": str(REPO)}
    log = tmp_path / "gateway.log"
    cfg = ["-c", str(config)]

    proc = _start(config, env, log)
    try:
        for command in (["start", "LOT-A", "cold-room-1"], ["move", "LOT-A", "truck-7"], ["move", "LOT-A", "cold-room-1"]):
            assert _sluice("lot", *command, *cfg, env=env).returncode == 0
        _wait(lambda: len(_lines(feed)) >= 3, "the first chain's events did not reach the feed", log, proc)
    finally:
        _stop(proc, log)
    delivered = _lines(feed)
    # Events sealed into the old outbox that the feed never received (a crash between commit and delivery)
    with Journal(outbox) as j:
        seq, head = j.chain()
        old_chain = j.chain_id()
        assert old_chain is not None and seq == len(delivered)
        sealer = Sealer(load_or_create_key(state / "trace-ed25519.key"), "gw-1", seq, head, old_chain)
        for n in range(2):
            j.commit([(sealer.seq + 1, "LOT-A", T0, sealer.seal(_event(n)))], (sealer.seq, sealer.head), j.bindings())
            seq += 1
    old_total = seq
    _damage(outbox)

    proc = _start(config, env, log)  # moves the outbox aside, starts a new chain
    try:
        (aside,) = [p for p in state.glob("outbox.db.corrupt-*") if not p.name.endswith("-wal")]
        for command in (["start", "LOT-A", "cold-room-1"], ["move", "LOT-A", "truck-7"], ["move", "LOT-A", "cold-room-1"],
                        ["move", "LOT-A", "truck-7"], ["end", "LOT-A"]):
            assert _sluice("lot", *command, *cfg, env=env).returncode == 0
        _wait(lambda: bool(_lines(feed)) and _chain_of(_lines(feed)[0]) != old_chain,
              "the new chain did not reach the feed", log, proc)
    finally:
        _stop(proc, log)

    # every event of the new chain is in the feed file, once, in order
    with Journal(outbox) as j:
        new_chain, new_lines = j.chain_id(), j.all_lines()
    assert new_chain not in (None, old_chain) and len(new_lines) >= 5
    assert _lines(feed) == new_lines
    old_feed = state / "out" / f"feed.jsonl.chain-{old_chain}"
    assert _lines(old_feed) == delivered and Path(f"{old_feed}.head").exists()
    text = log.read_text()
    assert text.count("holds a new chain") == 1 and "Traceback" not in text
    assert "sluice outbox salvage" in text and str(aside) in text
    # each chain's file verifies on its own, with its own signed head beside it
    pubkey = state / "pubkey.pem"
    pubkey.write_text(_sluice("trace", "pubkey", *cfg, env=env).stdout)
    for path, chain in ((feed, new_chain), (old_feed, old_chain)):
        done = _sluice("trace", "verify", str(path), "--pubkey", str(pubkey), env=env)
        assert done.returncode == 0 and "reaches the signed head" in done.stdout and chain in done.stdout, done
    assert read_head(Path(f"{feed}.head").read_text(), load_public_key(pubkey)).chain == new_chain
    assert read_head(_sluice("trace", "head", *cfg, env=env).stdout, load_public_key(pubkey)).chain == new_chain
    # the two files together are two chains, said as such
    both = tmp_path / "both.jsonl"
    both.write_text("".join(line + "\n" for line in [*delivered, *new_lines]))
    done = _sluice("trace", "verify", str(both), "--pubkey", str(pubkey), env=env)
    assert done.returncode == 1 and "new chain started here" in done.stderr, done
    # the old chain: its feed file plus the salvage export account for every one of its events
    export = tmp_path / "old-chain.jsonl"
    done = _sluice("outbox", "salvage", str(aside), *cfg, "--events", str(export), env=env)
    assert export.exists(), done
    salvaged = {json.loads(line)["epcisBody"]["eventList"][0]["sluice:seq"]: line for line in _lines(export)}
    assert set(salvaged) | set(range(1, len(delivered) + 1)) == set(range(1, old_total + 1)), done.stdout
    assert all(salvaged.get(n, line) == line for n, line in enumerate(delivered, 1))  # the same bytes
    assert {_chain_of(line) for line in salvaged.values()} == {old_chain}
    assert verify_lines(_lines(export), load_public_key(pubkey)) == (old_total, None)
