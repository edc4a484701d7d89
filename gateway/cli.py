"""The `sluice` command: run, check, once, status, sim, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.config import Config, ConfigErrors, load_config
from gateway.logs import setup_logging

log = logging.getLogger("sluice")

EXIT_CONFIG = 2


def default_config_dir() -> Path:
    """$SLUICE_CONFIG, systemd's $CONFIGURATION_DIRECTORY, /etc/sluice if it exists, else ./config."""
    for var in ("SLUICE_CONFIG", "CONFIGURATION_DIRECTORY"):
        if os.environ.get(var):
            return Path(os.environ[var].split(":")[0])
    return Path("/etc/sluice") if Path("/etc/sluice/gateway.yaml").exists() else Path("config")


def _load(path: Path) -> Config | None:
    try:
        return load_config(path)
    except ConfigErrors as exc:
        for err in exc.errors:
            print(err, file=sys.stderr)
        n = len(exc.errors)
        print(f"{n} error{'s' if n != 1 else ''} in the configuration at {path}; nothing was started",
              file=sys.stderr)
        return None


def _install_stop_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    setup_logging(args.log_level or config.gateway.logging.level, config.gateway.logging.format)
    from gateway.app import Gateway
    from gateway.trace.config import load_trace_config

    try:
        trace = load_trace_config(config)
    except ConfigErrors as exc:
        for err in exc.errors:
            print(err, file=sys.stderr)
        return EXIT_CONFIG

    async def main() -> None:
        stop = asyncio.Event()
        _install_stop_signals(asyncio.get_running_loop(), stop)
        gateway = Gateway(config)
        if trace is None:
            await gateway.run(stop)
            return
        from gateway.trace.service import TraceService

        async with TraceService(trace) as service:
            gateway.on_reading = service.observe
            task = asyncio.create_task(service.run(), name="trace")
            try:
                await gateway.run(stop)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    print(f"{config.path}: OK — gateway {config.gateway_id} at {config.site}, "
          f"{len(config.devices)} devices, {len(config.profiles)} profiles, "
          f"{len(config.gateway.sinks)} sinks")
    for dev in config.devices:
        print(f"  {dev.id:<24} {dev.config.protocol:<12} profile {dev.profile_name}, every {dev.config.interval:g}s")
    return 0


def cmd_once(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    setup_logging(args.log_level or "warning", "text")
    from gateway.app import make_pollers

    async def main() -> list:
        readings = []
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
        for r in readings:
            print(f"{r.device} ({r.quality})")
            for name, value in r.fields.items():
                print(f"  {name:<28} {value!r}")
    silent = [d.id for d in config.devices if d.id not in answered]
    for dev_id in silent:
        print(f"{dev_id}: no answer", file=sys.stderr)
    return 1 if silent else 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the running service's health as a table; exit 0 healthy, 1 unhealthy, 3 unreachable."""
    from gateway.health import fetch, format_status

    if args.url:
        host, _sep, port = args.url.removeprefix("http://").rstrip("/").rpartition(":")
        host = host.strip("[]")
    else:
        config = _load(args.config)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="Sluice edge gateway: field devices -> durable outbox -> MQTT")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", type=Path, default=None,
                       help="configuration directory holding gateway.yaml "
                            "(default: $SLUICE_CONFIG, $CONFIGURATION_DIRECTORY, /etc/sluice, ./config)")
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)

    p = sub.add_parser("run", help="run the gateway until SIGTERM/SIGINT")
    with_config(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check", help="validate a configuration; non-zero exit on errors")
    with_config(p)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("once", help="poll every device once and print the readings; publishes nothing")
    with_config(p)
    p.add_argument("--json", action="store_true", help="one JSON object per reading")
    p.set_defaults(func=cmd_once)
    p = sub.add_parser("status", help="show the running service's devices, outbox and sinks (from its health endpoint)")
    with_config(p)
    p.add_argument("--url", default=None, help="the endpoint's host:port instead of health.listen from the configuration")
    p.set_defaults(func=cmd_status)
    sub.add_parser("sim", help="simulate Modbus devices from their profiles (see `sluice sim --help`; "
                   "an RTU bus on a pty: `sluice sim rtu --help`)")
    p = sub.add_parser("demo", help="simulated devices -> gateway -> outbox -> MQTT, live in the terminal")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--config", type=Path, default=None, help="demo configuration (default: the shipped config/)")
    p.set_defaults(func=cmd_demo)
    from gateway.trace.cli import add_parsers as add_trace_parsers

    add_trace_parsers(sub, with_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["sim", "serial"]:
        # `sluice sim serial PROFILE`: a serial sensor on a pty (its own parser, --help).
        from simulators.serial_sensor import main_serial_sim

        return main_serial_sim(argv[2:])
    if argv[:2] == ["sim", "rtu"]:
        # A Modbus RTU bus on a pseudo-terminal (`sluice sim rtu --help`).
        from simulators.modbus_rtu import main_sim_rtu

        return main_sim_rtu(argv[2:])
    if argv[:1] == ["sim"]:
        # The simulator has its own parser (`sluice sim --help`); hand it everything after `sim`.
        from simulators.modbus_tcp import main_sim

        return main_sim(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "config", "unset") is None and args.command != "demo":
        args.config = default_config_dir()
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
