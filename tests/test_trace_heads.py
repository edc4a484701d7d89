"""Signed chain heads: events cut off the end of a feed are found by a verifier holding a head
(from `sluice trace head`, the JSON Lines sink's `<feed>.head`, the MQTT head topic); what a
verifier without one cannot see is said, not hidden. Also: `--schema` without jsonschema."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from servers import subscriber
from support import until
from test_trace import REPO, T0, Clock, M, S, _scenario, trace_config
from test_trace_sinks import _config, _lot_a_in_and_one_window

from gateway.trace.jcs import canonical
from gateway.trace.journal import Journal
from gateway.trace.seal import load_public_key, read_head, verify_lines
from gateway.trace.service import TraceService
import rfc8785  # an independent implementation (Trail of Bits), a test dependency
from gateway.reading import Reading
from cryptography.exceptions import InvalidSignature
from gateway.trace.seal import verify_events

pytestmark = pytest.mark.usefixtures("close_default_executor")


@pytest.fixture
def trace_cfg(tmp_path: Path):
    return trace_config(tmp_path)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "STATE_DIRECTORY": str(cwd / "state")})


async def test_events_cut_off_the_end_are_found_with_a_signed_head_and_not_without(trace_cfg, tmp_path):
    (tmp_path / "state" / "out").mkdir(parents=True)
    _docs, feed = await _scenario(trace_cfg, tmp_path)
    lines = feed.read_text().splitlines()
    assert len(lines) == 5
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(line + "\n" for line in lines[:-3]))
    config = str(trace_cfg.gateway_file.parent)
    pem = tmp_path / "gw.pem"
    pem.write_text(_cli("trace", "pubkey", "-c", config, cwd=tmp_path).stdout)

    # Without a head the shortened feed is a valid feed: OK, but the verifier is told the end is not checked.
    plain = _cli("trace", "verify", str(cut), "--pubkey", str(pem), cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert "OK — 2 events" in plain.stdout and "end of the feed is NOT checked" in plain.stdout

    # `sluice trace head` (from the outbox) names seq 5: the cut feed falls short of it.
    head = _cli("trace", "head", "-c", config, cwd=tmp_path)
    assert head.returncode == 0, head.stderr
    checked = read_head(head.stdout, load_public_key(pem))
    assert checked.seq == 5 and checked.event_id == json.loads(lines[-1])["epcisBody"]["eventList"][0]["eventID"]
    short = _cli("trace", "verify", str(cut), "--pubkey", str(pem), "--head", head.stdout.strip(), cwd=tmp_path)
    assert short.returncode == 1
    assert "the feed ends at seq 2, but the signed head seq 5" in short.stderr and "3 event(s) were cut off the end" in short.stderr

    # The JSON Lines sink keeps the head of what it holds next to it: the whole feed reaches it.
    sink_head = feed.with_name(feed.name + ".head")
    assert read_head(sink_head.read_text(), load_public_key(pem)).seq == 5
    whole = _cli("trace", "verify", str(feed), "--pubkey", str(pem), "--head", str(sink_head), cwd=tmp_path)
    assert whole.returncode == 0 and "reaches the signed head seq 5" in whole.stdout, whole.stderr
    assert _cli("trace", "verify", str(cut), "--pubkey", str(pem), "--head", str(sink_head), cwd=tmp_path).returncode == 1
    beside = _cli("trace", "verify", str(feed), "--pubkey", str(pem), cwd=tmp_path)  # <feed>.head is found by itself
    assert beside.returncode == 0 and "reaches the signed head seq 5" in beside.stdout, beside.stderr
    (tmp_path / "cut.jsonl.head").write_text(sink_head.read_text())  # a feed cut short, its head left beside it
    assert "3 event(s) were cut off the end" in _cli("trace", "verify", str(cut), "--pubkey", str(pem), cwd=tmp_path).stderr
    (tmp_path / "cut.jsonl.head").unlink()

    # A head is checked like everything else: altered, or without the key, it is refused in one line.
    altered = json.loads(head.stdout)
    altered["seq"] = 4
    bad = _cli("trace", "verify", str(feed), "--pubkey", str(pem), "--head", json.dumps(altered), cwd=tmp_path)
    assert bad.returncode == 2 and "signature does not verify" in bad.stderr and "Traceback" not in bad.stderr


async def test_the_mqtt_sink_publishes_signed_heads_of_what_the_broker_acknowledged(mosquitto, tmp_path):
    trace = _config(tmp_path, f"  bus: {{type: mqtt, host: 127.0.0.1, port: {mosquitto.port}}}\n")
    state, clock = tmp_path / "state", Clock()
    base = "sluice/farm-1/gw-1/trace"
    async with subscriber(mosquitto.host, mosquitto.port, f"{base}/#", client_id="auditor") as sub:
        async with TraceService(trace, state, clock=clock) as svc:
            _lot_a_in_and_one_window(svc, clock)
            await sub.wait_until(lambda ms: any(m.topic == f"{base}/head" for m in ms), timeout=20)
    public = load_public_key(state / "trace-ed25519.key")
    events = [m.payload.decode() for m in sub.messages if m.topic == f"{base}/events"]
    heads = [read_head(m.payload.decode(), public) for m in sub.messages if m.topic == f"{base}/head"]
    assert heads[-1].seq == 2 and verify_lines(events, public, heads=heads) == (2, None)
    # subscribers can tell chains apart: every event and head names the outbox's chain
    with Journal(state / "outbox.db") as journal:
        chain = journal.chain_id()
    assert chain is not None and {h.chain for h in heads} == {chain}
    assert {json.loads(e)["epcisBody"]["eventList"][0]["sluice:chain"] for e in events} == {chain}
    assert verify_lines(events[:1], public, heads=heads)[1] is not None  # the last event withheld: found
    # the head is retained: a verifier that subscribes after the gateway stopped still gets the newest one
    async with subscriber(mosquitto.host, mosquitto.port, f"{base}/head", client_id="late-auditor") as late:
        await late.wait_until(lambda ms: len(ms) >= 1, timeout=20)
    assert read_head(late.messages[0].payload.decode(), public).seq == heads[-1].seq


def test_verify_schema_without_jsonschema_says_what_to_install_in_one_line(tmp_path):
    feed = tmp_path / "feed.jsonl"
    feed.write_text("")
    blocked = ("import sys; sys.modules['jsonschema'] = None; from gateway.cli.commands import main; "
               f"sys.exit(main(['trace', 'verify', {str(feed)!r}, '--pubkey', 'k.pem', '--schema', 'auto']))")
    done = subprocess.run([sys.executable, "-c", blocked], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "jsonschema" in done.stderr and "pip install" in done.stderr


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.integers(-(2**53 - 1), 2**53 - 1) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                    max_leaves=20))
def test_the_canonical_form_is_rfc_8785_jcs(value):
    assert canonical(value).encode() == rfc8785.dumps(value)


@pytest.mark.parametrize(("value", "text"), [(1.0, "1"), (1e-7, "1e-7"), (0.00001, "0.00001"), (1e21, "1e+21"),
                                             (-0.0, "0"), ({"b": 1, "a": [True, None]}, '{"a":[true,null],"b":1}')])
def test_jcs_numbers_as_ecmascript_writes_them(value, text):
    assert canonical(value) == text


async def test_the_jsonl_sink_writes_the_head_with_each_delivery(trace_cfg, tmp_path):
    """Not only every head_interval: the head follows the events the file holds."""

    state = tmp_path / "state"
    (state / "out").mkdir(parents=True)
    clock = Clock()
    head_file = state / "out" / "feed.jsonl.head"
    async with TraceService(trace_cfg, state, clock=clock) as svc:
        public = load_public_key(state / "trace-ed25519.key")
        svc.observe(Reading("door-scanner", T0 + M, {"code": "(01)04012345123456(10)A1"}))
        svc.step()  # the delivery task writes the event, then its head
        await until(lambda: head_file.exists() and read_head(head_file.read_text(), public).seq == 1)
        first = read_head(head_file.read_text(), public)
        svc.observe(Reading("coldroom-1", T0 + 2 * M, {"room_temperature": 2.0}))
        clock.now = T0 + 15 * M + 6 * S
        svc.step()
        await until(lambda: read_head(head_file.read_text(), public).seq == 2)
        second = read_head(head_file.read_text(), public)
    assert (first.seq, second.seq) == (1, 2)
    assert verify_lines((state / "out" / "feed.jsonl").read_text().splitlines(), public, heads=[second]) == (2, None)


# --------------------------------------------------------------------------- the documented procedure
def _documented_verifier() -> dict:
    """The reference code of docs/trace-verification.md, run as written: the page is the contract."""
    page = (REPO / "docs" / "trace-verification.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert "gateway" not in code  # independent of Sluice: cryptography, rfc8785, GS1's hash generator only
    namespace: dict = {}
    exec(compile(code, "docs/trace-verification.md", "exec"), namespace)
    return namespace


async def test_a_feed_verifies_with_only_what_the_documentation_says(trace_cfg, tmp_path):
    (tmp_path / "state" / "out").mkdir(parents=True)
    _docs, feed = await _scenario(trace_cfg, tmp_path)
    lines = feed.read_text().splitlines()
    pem = _cli("trace", "pubkey", "-c", str(trace_cfg.gateway_file.parent), cwd=tmp_path).stdout.encode()
    head = feed.with_name(feed.name + ".head").read_text()
    verify_feed = _documented_verifier()["verify_feed"]
    assert verify_feed(lines, pem, [head]) == 5
    # ... and it finds what the feed's own verifier finds
    with pytest.raises(ValueError, match="cut off the end"):
        verify_feed(lines[:-3], pem, [head])
    with pytest.raises(ValueError, match="chain is broken"):
        verify_feed([lines[0], *lines[2:]], pem)
    edited = lines[1].replace('"sellable_not_accessible"', '"sellable_accessible"')
    assert edited != lines[1]
    with pytest.raises((ValueError, InvalidSignature)):
        verify_feed([lines[0], edited, *lines[2:]], pem)


async def test_a_query_answer_cut_short_is_found_with_a_head(trace_cfg, tmp_path):
    (tmp_path / "state" / "out").mkdir(parents=True)
    docs, feed = await _scenario(trace_cfg, tmp_path)
    public = load_public_key(tmp_path / "state" / "trace-ed25519.key")
    head = read_head(feed.with_name(feed.name + ".head").read_text(), public)
    events = [{**d["epcisBody"]["eventList"][0], "recordTime": "2026-01-01T00:00:00.000Z"} for d in docs]
    assert verify_events(list(reversed(events)), public, heads=[head]) == (5, None)
    count, problem = verify_events(events[:4], public, heads=[head])
    assert count == 4 and problem is not None and "1 event(s) were cut off the end" in problem.message
