"""``sluice ingest check|run -c ingest.yaml``: the commands of the ingest service (gateway/cloud/)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from gateway.cli.loading import EXIT_CONFIG, report_config_errors
from gateway.cloud.brokerconf import queue_advice
from gateway.cloud.config import IngestConfig, load_ingest_config
from gateway.cloud.ingest import Ingest
from gateway.logs import add_log_level, setup_logging
from gateway.sdnotify import Notifier
from gateway.yamlpos import ConfigErrors

__all__ = ["add_parsers", "main"]

log = logging.getLogger("gateway.ingest")  # the service's logger (gateway/cloud/ingest.py)

def _load(path: Path, *, secrets: bool = True) -> IngestConfig | None:
    try:
        return load_ingest_config(path, secrets=secrets)
    except ConfigErrors as exc:  # ingest.yaml has no warnings: every one counted is an error
        report_config_errors(exc, f"in {path}; nothing was started")
        return None


def cmd_check(args: argparse.Namespace) -> int:
    # Like `sluice check`: files and credentials are read only with --secrets (gateway/secretref.py).
    config = _load(args.config, secrets=getattr(args, "secrets", True))
    if config is None:
        return EXIT_CONFIG
    m, db = config.mqtt, config.influxdb
    target = f"bucket {db.bucket}" if db.api == "v2" else f"database {db.database}"
    print(f"{args.config}: OK — {', '.join(m.subscriptions())} on {m.host}:{m.effective_port} as "
          f"{args.client_id or m.effective_client_id} → {db.url} ({db.api}, {target}); dead letters to "
          f"{config.dead_letter_topic}")
    for level, line in queue_advice(config):
        print(f"{logging.getLevelName(level).lower()}: {line}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    setup_logging(args.log_level or config.logging.level, config.logging.format)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ingest = Ingest(config, client_id=args.client_id)
        notifier = Notifier()
        status = f"ingesting {', '.join(config.mqtt.subscriptions())} into {config.influxdb.url}"

        def ready() -> None:
            notifier.send(READY=1, STATUS=status)

        def status_line() -> str:
            wedged = ingest.watchdog.wedged()
            return status + (f"; WEDGED: {ingest.pending} messages waiting" if wedged else "")

        watchdog = asyncio.create_task(ingest.watchdog.run(notifier, status_line), name="watchdog[ingest]")
        try:
            await ingest.run(stop, ready=ready)
        finally:
            notifier.send(STOPPING=1)
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
            notifier.close()
        log.info("ingest: stopped — %d points written, %d messages acknowledged, %d dead letters",
                 ingest.stats.points_written, ingest.stats.acked, sum(ingest.stats.dead_letters.values()))

    asyncio.run(main())
    return 0


def add_parsers(sub: Any) -> None:
    """``sluice ingest check|run -c ingest.yaml`` on the ``sluice`` command's subparsers."""
    p = sub.add_parser("ingest", help="MQTT → InfluxDB ingest service (the cloud side): check or run")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, func, text in (("check", cmd_check, "validate ingest.yaml; non-zero exit on errors"),
                             ("run", cmd_run, "run until SIGTERM/SIGINT")):
        q = actions.add_parser(name, help=text)
        q.add_argument("-c", "--config", type=Path, default=Path("/etc/sluice/ingest.yaml"),
                       help="the ingest configuration file (default: /etc/sluice/ingest.yaml)")
        q.add_argument("--client-id", default=None,
                       help="override mqtt.client_id (each worker of a group needs its own, stable id)")
        add_log_level(q)
        if name == "check":
            q.add_argument("--secrets", action="store_true",
                           help="also read every ${file:...} and ${cred:...} secret as the service would")
        q.set_defaults(func=func)


def main(argv: list[str] | None = None) -> int:
    """``python -m gateway.cli.ingest check|run ...`` (the same as ``sluice ingest ...``)."""
    parser = argparse.ArgumentParser(prog="sluice")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ingest", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
