"""The `sluice` command: run, check, once, status, deadletter, outbox, sim, demo, init (and, from their
modules, lot, trace, ingest, read, scan)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any
from pathlib import Path

from gateway.cli.examples import EXAMPLES, InitError, init_config
from gateway.cli.loading import EXIT_CONFIG, default_config_dir, load_or_report, load_trace
from gateway.config import Config, load_config
from gateway.health import fetch, format_status
from gateway.outbox import OutboxError
from gateway.outbox.deadletters import TRACE, letter_line, list_dead_letters, mark_resend, open_for_dead_letters
from gateway.outbox.file import identity
from gateway.driver import FieldInfo
from gateway.logs import add_log_level, setup_logging
from gateway.reading import Reading, float32_text
from gateway.security import startup_warnings
from gateway.units import duration_arg

log = logging.getLogger("sluice")


def _install_stop_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def cmd_run(args: argparse.Namespace) -> int:
    config = load_or_report(args.config, secrets=True, given=getattr(args, "config_given", True))
    if config is None:
        return EXIT_CONFIG
    setup_logging(args.log_level or config.gateway.logging.level, config.gateway.logging.format)
    for warning in config.warnings:
        log.warning("%s", warning)
    from gateway.app import serve  # noqa: PLC0415 - the runtime (sinks, MQTT) only for the commands that run it

    ok, trace = load_trace(config)
    if not ok:
        return EXIT_CONFIG

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        _install_stop_signals(loop, stop)
        # SIGHUP (systemctl reload): validate the files again; apply them only if they are valid.
        reload = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, reload.set)

        def reloaded(new: Config) -> None:
            setup_logging(args.log_level or new.gateway.logging.level, new.gateway.logging.format)

        def load() -> Config:
            return load_config(args.config)

        if trace is None:
            await serve(config, load, stop, reload, reloaded)
            return
        from gateway.trace.service import TraceService, reloading  # noqa: PLC0415 - cryptography only with trace.yaml

        async with TraceService(trace) as service:
            task = asyncio.create_task(service.run(), name="trace")
            try:  # a reload re-reads and applies trace.yaml too
                await serve(config, reloading(load, service), stop, reload, reloaded, on_reading=service.observe)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = load_or_report(args.config, secrets=getattr(args, "secrets", False), given=getattr(args, "config_given", True))
    if config is None:
        return EXIT_CONFIG
    ok, trace = load_trace(config)
    if not ok:
        return EXIT_CONFIG
    for warning in config.warnings:
        print(warning, file=sys.stderr)
    for text in startup_warnings(config):  # what `run` warns about at every start
        print(f"warning: {text}", file=sys.stderr)
    for note in config.unread:
        print(note, file=sys.stderr)
    if config.unread:
        print("secret references are checked for form only; `sluice check --secrets`, run as the service's user "
              "with its environment and credentials, reads them", file=sys.stderr)
    print(f"{config.path}: OK — gateway {config.gateway_id} at {config.site}, "
          f"{len(config.devices)} devices, {len(config.profiles)} profiles, "
          f"{len(config.gateway.sinks)} sinks")
    for dev in config.devices:
        print(f"  {dev.id:<24} {dev.config.protocol:<12} profile {dev.profile_name}, every {dev.config.interval:g}s")
    if trace is not None:
        print(f"{trace.path}: OK — {len(trace.file.locations)} locations, {len(trace.file.lots)} lots, "
              f"{len(trace.file.sinks)} trace sinks")
    return 0


def cmd_once(args: argparse.Namespace) -> int:
    config = load_or_report(args.config, given=getattr(args, "config_given", True))
    if config is None:
        return EXIT_CONFIG
    setup_logging(args.log_level or "warning", "text")
    from gateway.app import make_pollers  # noqa: PLC0415 - the runtime only for the commands that poll

    async def main() -> list[Reading]:
        readings: list[Reading] = []
        for poller in make_pollers(config.devices):
            async with poller:
                readings.extend(await poller.poll_once())
        return readings

    readings = asyncio.run(main())
    answered = {r.device for r in readings}
    if args.json:
        for r in readings:
            print(json.dumps({"device": r.device, "time_ns": r.time_ns, "quality": r.quality,
                              "fields": r.fields, "tags": r.tags}, ensure_ascii=False))
    else:
        info = {d.id: d.profile.field_info() for d in config.devices}
        for r in readings:
            print(f"{r.device} ({r.quality})")
            for name, value in r.fields.items():
                print(f"  {name:<28} {show_value(value, info[r.device].get(name))}".rstrip())
    silent = [d.id for d in config.devices if d.id not in answered]
    for dev_id in silent:
        print(f"{dev_id}: no answer", file=sys.stderr)
    return 1 if silent else 0


def show_value(value: object, info: FieldInfo | None) -> str:
    """A field's value for people: a float32 at float32 precision (14785.4795, not
    14785.4794921875), a float64 as its shortest repr, integers as integers, then the unit."""
    if isinstance(value, float) and info is not None and info.float32:
        text = float32_text(value)
    elif isinstance(value, str):
        text = repr(value)
    else:
        text = str(value)
    unit = info.unit if info is not None else None
    return f"{text} {unit}" if unit else text


def cmd_status(args: argparse.Namespace) -> int:
    """Print the running service's health as a table; exit 0 healthy, 1 unhealthy, 3 unreachable."""
    if args.url:
        host, _sep, port = args.url.removeprefix("http://").rstrip("/").rpartition(":")
        host = host.strip("[]")
    else:
        config = load_or_report(args.config, given=getattr(args, "config_given", True))
        if config is None:
            return EXIT_CONFIG
        health = config.gateway.health
        if not health.enabled:
            print(f"{config.path}: the health endpoint is disabled (health.enabled: false)", file=sys.stderr)
            return 3
        host, port = health.host, str(health.port)
    try:
        code, body = fetch(host, int(port), "/healthz")
        state = json.loads(body)
        _code, metrics = fetch(host, int(port), "/metrics")
    except (OSError, ValueError) as exc:
        print(f"cannot reach the gateway's health endpoint at {host}:{port}: {exc} — is the service running "
              "(`systemctl status sluice`), and is health.listen the same?", file=sys.stderr)
        return 3
    print(format_status(state, metrics))
    return 0 if code == 200 else 1


def cmd_deadletter(args: argparse.Namespace) -> int:
    """List dead letters, or mark them for re-sending (the running gateway, or the next start, sends them)."""
    config = load_or_report(args.config, given=getattr(args, "config_given", True))
    if config is None:
        return EXIT_CONFIG
    path = config.gateway.buffer.resolved_path()
    ident = identity(path)
    try:
        conn = open_for_dead_letters(path)
    except OutboxError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        if args.action == "list":
            letters = list_dead_letters(conn, args.sink, with_readings=args.readings, stream=args.stream)
            if args.json:
                for d in letters:
                    item: dict[str, object] = {"id": d.id, "stream": d.stream, "sink": d.sink, "time_ns": d.time_ns, "count": d.count,
                            "message": d.message, "resend": d.resend, "attempts": d.attempts}
                    if d.stream == TRACE:
                        item["seq"] = d.seq
                        if args.readings:
                            item["event"] = json.loads(d.event or "null")
                    elif args.readings:
                        item["readings"] = [{"device": r.device, "measurement": r.measurement, "tags": r.tags,
                                             "time_ns": r.time_ns, "quality": r.quality, "fields": r.fields}
                                            for r in d.readings]
                    print(json.dumps(item, ensure_ascii=False))
                return 0
            if not letters:
                print(f"{path}: no dead letters")
                return 0
            for d in letters:
                print(letter_line(d) + ("  [trace event: never re-sent, kept in the journal]" if d.stream == TRACE else ""))
                for r in d.readings:
                    print(f"        {r.device} {r.measurement} {r.time_ns} {r.fields}")
                if d.event is not None:
                    print(f"        {d.event}")
            return 0
        if not args.ids and not args.all:
            print("name the dead letters to re-send (IDs from `sluice deadletter list`), or give --all",
                  file=sys.stderr)
            return EXIT_CONFIG
        marked = mark_resend(conn, args.ids or None, args.sink if args.all else None)
        if identity(path) != ident:  # a starting gateway moved the file aside as unusable while we marked
            print(f"outbox {path} was replaced while marking (the gateway moved it aside at its start: see its "
                  "log) — run this again", file=sys.stderr)
            return 1
        trace = [d for d in list_dead_letters(conn, stream=TRACE) if d.id in set(args.ids)] if args.ids else []
        for d in trace:
            print(f"letter {d.id} is trace event seq {d.seq} refused by trace sink {d.sink}: trace events are not "
                  "re-sent (the event stays in the journal, the chain whole); `sluice trace deadletters` shows it",
                  file=sys.stderr)
        missing = len(args.ids) - marked - len(trace) if args.ids else 0
        print(f"{marked} dead letter{'s' if marked != 1 else ''} marked for re-sending: the running gateway sends "
              "them within seconds (or at its next start); `sluice deadletter list` shows what is left")
        if missing:
            print(f"{missing} of the given IDs do not exist", file=sys.stderr)
        if missing or trace:
            return 1
        return 0
    except sqlite3.Error as exc:
        print(f"outbox {path}: {exc} — is another process holding it locked?", file=sys.stderr)
        return 1
    finally:
        conn.close()


def cmd_salvage(args: argparse.Namespace) -> int:
    """Copy what a damaged outbox still holds into the live one (gateway/salvage.py); 0 when all of it was."""
    from gateway.salvage import salvage  # noqa: PLC0415 - only for `sluice outbox salvage`: `sluice run` need not carry it

    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    buf = config.gateway.buffer
    report = salvage(args.file, buf.resolved_path(), list(config.gateway.sinks), letter_budget=buf.max_bytes // 4,
                     events_out=args.events)
    print("\n".join(report.lines()))
    if args.events is not None:
        print(f"the old chain's events that could be read are in {args.events} (JSON Lines, seq order)")
    return 0 if report.complete else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.cli.demo import run_demo  # noqa: PLC0415 - the demo's simulators and broker only for `sluice demo`

    return run_demo(args)


def cmd_init(args: argparse.Namespace) -> int:
    try:
        files = init_config(args.directory, args.example)
    except InitError as exc:
        print(f"sluice init: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"sluice init: cannot write {args.directory}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    devices = sorted(f.name for f in files if f.parts[0] == "devices")
    print(f"{args.directory}: the '{args.example}' configuration, {len(files)} files: gateway.yaml, "
          f"devices/ ({', '.join(devices)}), profiles/, examples/, schemas/ — every file is commented and names its "
          "JSON Schema on its first line, for completion in your editor (README: Editor completion)")
    print(f"next: edit {args.directory}/gateway.yaml and {args.directory}/devices/, then "
          f"`sluice check -c {args.directory}` and `sluice once -c {args.directory}`")
    if args.example == "demo":
        print(f"      or try it with simulated devices: `sluice demo -c {args.directory}`")
    return 0


SIM_COMMANDS = {
    "serial": ("simulators.serial_sensor", "main_serial_sim"),  # a serial sensor on a pty
    "rtu": ("simulators.modbus_rtu", "main_sim_rtu"),           # a Modbus RTU bus on a pseudo-terminal
    "dtu": ("simulators.modbus_dtu", "main_sim_dtu"),           # a 4G/5G DTU dialling in to the gateway
}
"""``sluice sim KIND ...``: simulators with their own parsers (``sluice sim KIND --help``); plain
``sluice sim`` serves a sim.yaml or a gateway configuration (``simulators.simulation.main_sim``)."""

CORE_COMMANDS = frozenset({"run", "check", "once", "status", "deadletter", "outbox", "demo", "init"})
"""Commands whose parser is built without importing the others' modules (trace: cryptography;
ingest: paho, aiohttp, influxdb-client): `sluice run` should not carry them in memory."""


class CommandParser(argparse.ArgumentParser):
    """The ``sluice`` parser. It keeps its subcommands' parsers by name (argparse keeps its list of
    actions private), so :func:`command_paths` can list every command; ``add_subparsers`` makes
    the subcommands' parsers of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def add_subparsers(self, **kwargs: Any) -> Any:
        action = super().add_subparsers(**kwargs)
        self.commands = action.choices  # filled by each add_parser() that follows
        return action


def build_parser(extensions: bool = True) -> argparse.ArgumentParser:
    parser = CommandParser(prog="sluice", description="Sluice edge gateway: field devices -> durable outbox -> MQTT")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", type=Path, default=None,
                       help="configuration directory holding gateway.yaml "
                            "(default: $SLUICE_CONFIG, $CONFIGURATION_DIRECTORY, /etc/sluice, ./config)")
        add_log_level(p)

    p = sub.add_parser("run", help="run the gateway until SIGTERM/SIGINT")
    with_config(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check", help="validate a configuration; non-zero exit on errors")
    with_config(p)
    p.add_argument("--secrets", action="store_true",
                   help="also read every ${file:...} and ${cred:...} secret (and ${ENV}) as the service would; "
                        "without it they are checked for form only (run it as the service's user)")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("once", help="poll every device once and print the readings; publishes nothing")
    with_config(p)
    p.add_argument("--json", action="store_true", help="one JSON object per reading")
    p.set_defaults(func=cmd_once)
    p = sub.add_parser("status", help="show the running service's devices, outbox and sinks (from its health endpoint)")
    with_config(p)
    p.add_argument("--url", default=None, help="the endpoint's host:port instead of health.listen from the configuration")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("deadletter", help="batches a sink refused as data: list them, or re-send them")
    dl = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = dl.add_parser("list", help="every dead letter (readings and trace events): id, sink, time, what, the server's "
                      "message")
    with_config(q)
    q.add_argument("--sink", default=None, help="only this sink's letters")
    q.add_argument("--readings", action="store_true", help="also print the readings (or trace event) in each letter")
    q.add_argument("--stream", choices=("readings", "trace"), default=None,
                   help="only letters of readings, or of trace events (`sluice trace deadletters`)")
    q.add_argument("--json", action="store_true", help="one JSON object per letter")
    q.set_defaults(func=cmd_deadletter)
    q = dl.add_parser("resend", help="mark readings letters for re-sending; the gateway sends them before new batches "
                      "(trace events are never re-sent)")
    with_config(q)
    q.add_argument("ids", nargs="*", type=int, metavar="ID", help="letter ids from `sluice deadletter list`")
    q.add_argument("--all", action="store_true", help="every letter (of --sink, if given)")
    q.add_argument("--sink", default=None, help="with --all: only this sink's letters")
    q.set_defaults(func=cmd_deadletter)
    p = sub.add_parser("outbox", help="the outbox file: salvage what a damaged one still holds")
    ob = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = ob.add_parser("salvage", help="copy the readings and trace events a damaged outbox (one moved aside as "
                      "<name>.corrupt-<time>) still holds into the live outbox; safe while the gateway runs, and twice")
    with_config(q)
    q.add_argument("file", type=Path, metavar="FILE", help="the damaged outbox file")
    q.add_argument("--events", type=Path, default=None, metavar="JSONL",
                   help="also write the old chain's readable trace events here (JSON Lines, in seq order)")
    q.set_defaults(func=cmd_salvage)
    sub.add_parser("sim", help="simulate Modbus devices from their profiles (see `sluice sim --help`; "
                   "an RTU bus on a pty: `sluice sim rtu --help`; a DTU dialling in: `sluice sim dtu --help`)")
    p = sub.add_parser("demo", help="simulated devices -> gateway -> outbox -> MQTT, live in the terminal")
    p.add_argument("--duration", type=duration_arg, default=None, metavar="DURATION",
                   help="stop after this long, e.g. 30s or 5m (default: until Ctrl-C)")
    p.add_argument("-c", "--config", type=Path, default=None,
                   help="demo configuration: its loopback devices are simulated (default: the shipped example)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("init", help="write a commented starting configuration into a new directory")
    p.add_argument("directory", type=Path, metavar="DIR", help="a new or empty directory (nothing is overwritten)")
    p.add_argument("--example", choices=EXAMPLES, default="demo",
                   help="demo: simulated devices on this machine (default); workshop: energy meters and a scale; "
                        "farm: greenhouse probes, a cold room and a CO2 sensor, to a remote broker")
    p.set_defaults(func=cmd_init)
    if not extensions:
        return parser
    from gateway.cli.trace import add_parsers as add_trace_parsers  # noqa: PLC0415 - cryptography: see CORE_COMMANDS

    add_trace_parsers(sub, with_config)
    from gateway.cli.ingest import add_parsers as add_ingest_parsers  # noqa: PLC0415 - aiohttp, influxdb: see CORE_COMMANDS

    add_ingest_parsers(sub)  # `sluice ingest check|run -c ingest.yaml`: its own config file
    from gateway.cli.commission import add_parsers as add_commission_parsers  # noqa: PLC0415 - see CORE_COMMANDS

    add_commission_parsers(sub)  # sluice read, sluice scan
    from gateway.cli.schema import add_parsers as add_schema_parsers  # noqa: PLC0415 - see CORE_COMMANDS

    add_schema_parsers(sub)  # sluice schema DIR
    from gateway.cli.profiles import add_parsers as add_profile_parsers  # noqa: PLC0415 - see CORE_COMMANDS

    add_profile_parsers(sub)  # sluice profile list|show|test
    return parser


def command_paths() -> list[list[str]]:
    """Every command and subcommand, as the words to type (``["deadletter", "list"]``, ``["sim", "rtu"]``):
    read from the parsers, so a new one is listed (and smoke-tested with ``--help``) by itself."""
    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
        found = [prefix] if prefix else []
        for name, child in (parser.commands if isinstance(parser, CommandParser) else {}).items():
            found += walk(child, [*prefix, name])
        return found

    return walk(build_parser(), []) + [["sim", name] for name in SIM_COMMANDS]


def _stdout_closed() -> int:
    """Whoever read our output stopped (`sluice once | head`): that is no error of ours. Point
    stdout at /dev/null so that the interpreter's final flush cannot fail again, and exit
    quietly with status 1 (the recipe of the Python documentation's note on SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"] and argv[1:2] and argv[1] in SIM_COMMANDS:
        module, func = SIM_COMMANDS[argv[1]]
        return int(getattr(importlib.import_module(module), func)(argv[2:]))
    if argv[:1] == ["sim"]:
        # The simulator has its own parser (`sluice sim --help`); hand it everything after `sim`.
        from simulators.simulation import main_sim  # noqa: PLC0415 - the simulator only for `sluice sim`

        return main_sim(argv[1:], default_config=default_config_dir())
    args = build_parser(extensions=not (argv[:1] and argv[0] in CORE_COMMANDS)).parse_args(argv)
    args.config_given = getattr(args, "config", None) is not None
    if getattr(args, "config", "unset") is None and args.command != "demo":
        args.config = default_config_dir()
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a reader that went away (`| head`) shows up here, not at exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        return 130
    except OutboxError as exc:  # the state directory is unusable: say so, no traceback
        print(f"sluice {args.command}: {exc} — check buffer.path in gateway.yaml and that the state directory "
              "exists and is writable by this user", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
