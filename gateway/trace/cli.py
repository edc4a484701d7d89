"""``sluice lot start|move|end`` and ``sluice trace verify|show|pubkey``."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from gateway.trace.config import TraceConfig, load_trace_config
from gateway.trace.journal import Journal
from gateway.trace.seal import load_or_create_key, load_public_key, public_pem, verify_lines
from gateway.trace.service import resolve, state_dir

__all__ = ["add_parsers"]


def _trace_config(args: argparse.Namespace) -> TraceConfig | None:
    from gateway.cli import _load

    config = _load(args.config)
    if config is None:
        return None
    from gateway.config import ConfigErrors

    try:
        cfg = load_trace_config(config)
    except ConfigErrors as exc:
        for err in exc.errors:
            print(err, file=sys.stderr)
        return None
    if cfg is None:
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
    with Journal(resolve(cfg.file.database, state_dir())) as journal:
        cid = journal.queue(kind, args.lot, location)
    print(f"queued {kind} of lot {args.lot} (command {cid}); the running gateway records it within a second, "
          "or at its next start")
    return 0


def cmd_pubkey(args: argparse.Namespace) -> int:
    cfg = _trace_config(args)
    if cfg is None:
        return 2
    print(public_pem(load_or_create_key(resolve(cfg.file.key_file, state_dir()))), end="")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    public = load_public_key(args.pubkey)
    validate = None
    if args.schema is not None:
        import jsonschema

        validator = jsonschema.Draft7Validator(json.loads(args.schema.read_text()),
                                               format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)

        def validate(doc: dict) -> list[str]:
            return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
    with args.file.open(encoding="utf-8") as f:
        count, problem = verify_lines(f, public, validate)
    if problem is not None:
        print(f"{args.file}: {problem}", file=sys.stderr)
        print(f"{count} events before it verified", file=sys.stderr)
        return 1
    print(f"{args.file}: OK — {count} events, chain intact, every signature valid"
          + ("" if validate else " (schema not checked: give --schema EPCISDocument.schema.json)"))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    if args.file is not None:
        lines = args.file.read_text(encoding="utf-8").splitlines()
    else:
        cfg = _trace_config(args)
        if cfg is None:
            return 2
        with Journal(resolve(cfg.file.database, state_dir())) as journal:
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
                else:
                    notes.append(f"{r.get('sluice:point', r['type'])} min {r.get('minValue')} max {r.get('maxValue')} "
                                 f"mean {r.get('meanValue')} last {r.get('value')} {r.get('uom', '')}")
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


def add_parsers(sub: argparse._SubParsersAction, with_config) -> None:  # type: ignore[type-arg]
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
    p = traces.add_parser("verify", help="check a JSON Lines feed: canonical form, signatures, event ids, chain")
    p.add_argument("file", type=Path)
    p.add_argument("--pubkey", type=Path, required=True, help="PEM from `sluice trace pubkey`")
    p.add_argument("--schema", type=Path, default=None, help="GS1 EPCISDocument.schema.json to validate against")
    p.set_defaults(func=cmd_verify)
    p = traces.add_parser("show", help="a lot's history as a timeline")
    with_config(p)
    p.add_argument("lot")
    p.add_argument("--file", type=Path, default=None, help="read a JSON Lines feed instead of trace.db")
    p.add_argument("--csv", action="store_true")
    p.set_defaults(func=cmd_show)
    p = traces.add_parser("pubkey", help="print the gateway's public key (PEM); creates the key pair if needed")
    with_config(p)
    p.set_defaults(func=cmd_pubkey)
