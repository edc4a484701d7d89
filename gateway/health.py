"""Health of the running gateway: the ``/healthz`` and ``/metrics`` answers, and the small
loopback HTTP server that serves them.

Contracts:

* This module renders a :class:`Snapshot` — the figures the running gateway reports about itself
  (``Gateway.snapshot()`` in gateway/app.py builds it) — and knows nothing of the gateway's
  objects; it imports nothing from gateway/app.py. Whether a loop is wedged is the watchdog's
  judgement (gateway/watchdog.py): each loop reports its own state (idle, busy, waiting on the far
  end until its own deadline); the snapshot carries :meth:`gateway.watchdog.Watchdog.states`.
* :func:`render_metrics` and :func:`healthz` read in-memory figures only (plus at most one
  indexed outbox row per sink for its lag); they never contain configuration values other than
  names (device ids, sink names, error kinds), so no secret can reach them.
* :func:`add_metrics` lets a part that runs beside the gateway (the trace feed) add families
  to ``/metrics`` while it runs: names only, as above; in-memory figures or a few small indexed
  queries of its own database (the trace feed: one per sink in the outbox's trace tables).
* :class:`HealthServer` is an async context manager; it answers ``GET /healthz`` and
  ``GET /metrics`` with ``Connection: close`` and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.outbox import OutboxStats
from gateway.sinks.engine import DeliveryStats as ForwarderStats
from gateway.driver import DeviceStatus
from gateway.polling import format_duration
from gateway.watchdog import LoopState, describe

__all__ = ["HealthServer", "MetricFamily", "SinkSnapshot", "Snapshot", "add_metrics", "healthz", "render_metrics",
           "status_line"]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- figures
def process_usage() -> dict[str, float]:
    """This process's CPU seconds (``cpu``) and resident memory in bytes (``rss``)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/statm", encoding="ascii") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"cpu": usage.ru_utime + usage.ru_stime, "rss": float(rss)}


@dataclass
class SinkSnapshot:
    name: str
    connected: bool
    stats: ForwarderStats | None  # None: no forwarder (yet)
    lag: float = 0.0  # seconds: age of the oldest reading not yet acknowledged
    unconfirmed: int = 0  # end_to_end: sent minus acknowledged
    last_error: str | None = None  # a connect/TLS/auth failure, or the broker's reason for refusing publishes
    refused: int = 0  # publishes the far end refused (MQTT 5 reason code >= 0x80)


@dataclass
class Snapshot:
    """What the running gateway reports about itself, at one moment (no secret: names and figures)."""

    gateway_id: str
    site: str
    started_ns: int = 0
    running: bool = False  # started, with an open outbox, not stopping
    devices: list[tuple[str, DeviceStatus]] = field(default_factory=list)
    outbox: OutboxStats | None = None
    max_bytes: int = 0
    received: int | None = None  # the committer's counters (None: no committer yet)
    committed: int = 0
    failed_commits: int = 0
    lost: int = 0
    held: int = 0  # readings held in memory while the outbox cannot be written
    outbox_failing: bool = False
    sinks: list[SinkSnapshot] = field(default_factory=list)
    clock_synced: bool | None = None
    clock_jumps: int = 0
    loops: list[LoopState] = field(default_factory=list)


def healthz(snap: Snapshot) -> tuple[bool, dict[str, Any]]:
    """(healthy, body): live = no wedged loop; ready = running with a writable outbox."""
    reasons: list[str] = []
    warnings: list[str] = []
    states = snap.loops
    wedged = [s for s in states if s.wedged_for is not None]
    for s in wedged:
        reasons.append(f"{s.name}: wedged — {describe(s)}")
    ready = snap.running
    if not ready:
        reasons.append("not running yet (or stopping)")
    if snap.outbox_failing:
        ready = False
        reasons.append(f"outbox not writable: {snap.held} readings held in memory "
                       f"(check free disk space)")
    for sink in snap.sinks:
        why = sink.last_error
        if not sink.connected:
            warnings.append(f"sink {sink.name}: not connected{f' ({why})' if why else ''} (readings are kept in the outbox)")
        elif why and sink.refused:
            warnings.append(f"sink {sink.name}: {why} (readings are kept in the outbox)")
    for dev, st in snap.devices:
        if not st.up:
            warnings.append(f"device {dev}: down")
    if snap.clock_synced is False:
        warnings.append("system clock not synchronised: readings are flagged clock_unsynced")
    for s in states:
        if s.wedged_for is None and s.state == "waiting" and s.until_in is not None:
            warnings.append(f"{s.name}: {describe(s)}")  # waiting on the far end is not a wedge; say so
    live = not wedged
    body = {"live": live, "ready": ready, "reasons": reasons, "warnings": warnings}
    return live and ready, body


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsText:
    """Prometheus text exposition (format 0.0.4) being written: a family's HELP and TYPE, then its
    samples; ``lines`` joined by newlines is the answer. The gateway's and the ingest's metrics."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        text = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
        self.lines.append(f"{name}{{{text}}} {_num(value)}" if text else f"{name} {_num(value)}")


def _num(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


METRICS: dict[str, tuple[str, str]] = {
    # name: (type, help) — the README's metrics table lists the same.
    "sluice_info": ("gauge", "Always 1; labels name the gateway and site"),
    "sluice_uptime_seconds": ("gauge", "Seconds since the gateway started"),
    "sluice_ready": ("gauge", "1 when running with a writable outbox"),
    "sluice_device_up": ("gauge", "1 when the device answered its last poll"),
    "sluice_device_polls_total": ("counter", "Polls of the device (answered or not)"),
    "sluice_device_errors_total": ("counter", "Failed requests of the device, by kind"),
    "sluice_device_last_success_timestamp_seconds": ("gauge", "Unix time of the device's last answer (0: never)"),
    "sluice_outbox_rows": ("gauge", "Readings stored in the outbox"),
    "sluice_outbox_bytes": ("gauge", "Outbox size as bounded by buffer.max_bytes"),
    "sluice_outbox_max_bytes": ("gauge", "buffer.max_bytes"),
    "sluice_outbox_oldest_age_seconds": ("gauge", "Age of the oldest stored reading (0 when empty)"),
    "sluice_outbox_dropped_total": ("counter", "Readings dropped by the when_full policy (persisted in the outbox)"),
    "sluice_outbox_received_total": ("counter", "Readings the pollers handed over: committed + held in memory + lost"),
    "sluice_outbox_committed_total": ("counter", "Readings committed to the outbox by this process"),
    "sluice_outbox_commit_failures_total": ("counter", "Commits that failed (disk full, I/O error)"),
    "sluice_outbox_unstored_readings": ("gauge", "Readings held in memory because the outbox could not be written"),
    "sluice_outbox_lost_total": ("counter", "Readings lost from memory while the outbox could not be written"),
    "sluice_sink_connected": ("gauge", "1 when the sink is connected"),
    "sluice_sink_delivered_total": ("counter", "Readings the sink acknowledged"),
    "sluice_sink_retries_total": ("counter", "Batches that failed and are sent again"),
    "sluice_sink_pending_readings": ("gauge", "Readings in the outbox not yet acknowledged by the sink"),
    "sluice_sink_lag_seconds": ("gauge", "Age of the oldest reading the sink has not acknowledged (0 when none)"),
    "sluice_sink_dead_lettered_total": ("counter", "Readings the far end refused as data, moved to the dead-letter table"),
    "sluice_sink_publishes_refused_total": ("counter", "Batches the broker refused (MQTT 5 reason code), kept and retried"),
    "sluice_sink_unconfirmed_readings": ("gauge", "end_to_end: readings the broker acknowledged that await a receipt"),
    "sluice_sink_receipts_total": ("counter", "end_to_end: batch ids confirmed by receipts"),
    "sluice_sink_receipt_timeouts_total": ("counter", "end_to_end: times no receipt came within receipt_timeout"),
    "sluice_sink_receipt_resent_readings_total": ("counter", "end_to_end: readings published again after a receipt timeout"),
    "sluice_sink_receipts_refused_total": ("counter", "end_to_end: receipts ignored for a missing or wrong mac (receipt_secret)"),
    "sluice_clock_synchronized": ("gauge", "1 synchronised, 0 not (readings flagged clock_unsynced), -1 unknown"),
    "sluice_clock_jumps_total": ("counter", "Jumps of the wall clock against the monotonic clock"),
    "sluice_component_stalled": ("gauge", "1 when a loop is wedged: busy without progress, or waiting past its own deadline"),
    "process_cpu_seconds_total": ("counter", "User and system CPU time of the process"),
    "process_resident_memory_bytes": ("gauge", "Resident set size"),
    "process_start_time_seconds": ("gauge", "Unix time the process started"),
}


MetricFamily = tuple[str, str, str, list[tuple[dict[str, str], float]]]
"""(name, type, help, [(labels, value)]): one family a provider adds to /metrics."""
_providers: list[Callable[[], list[MetricFamily]]] = []


def add_metrics(provider: Callable[[], list[MetricFamily]]) -> Callable[[], None]:
    """Add ``provider``'s families to every /metrics answer (see the module docstring; a provider
    that raises is logged and left out of that answer); returns the function removing it."""
    _providers.append(provider)
    return lambda: _providers.remove(provider) if provider in _providers else None


def _provided(out: MetricsText) -> None:
    for provider in list(_providers):
        try:
            families = provider()
        except Exception:
            log.exception("metrics provider %r failed; its figures are left out of /metrics", provider)
            continue
        for name, kind, help_text, samples in families:
            out.family(name, kind, help_text)
            for labels, value in samples:
                out.sample(name, value, **labels)


def render_metrics(snap: Snapshot) -> str:
    """Prometheus text exposition format 0.0.4."""
    out = MetricsText()
    now_ns = time.time_ns()

    def fam(name: str) -> None:
        kind, help_text = METRICS[name]
        out.family(name, kind, help_text)  # text format 0.0.4: TYPE names the sample, _total included

    fam("sluice_info")
    out.sample("sluice_info", 1, gateway=snap.gateway_id, site=snap.site)
    fam("sluice_uptime_seconds")
    out.sample("sluice_uptime_seconds", (now_ns - snap.started_ns) / 1e9 if snap.started_ns else 0.0)
    _ok, health = healthz(snap)
    fam("sluice_ready")
    out.sample("sluice_ready", health["ready"])

    statuses = snap.devices
    fam("sluice_device_up")
    for dev, st in statuses:
        out.sample("sluice_device_up", st.up, device=dev)
    fam("sluice_device_polls_total")
    for dev, st in statuses:
        out.sample("sluice_device_polls_total", st.polls, device=dev)
    fam("sluice_device_errors_total")
    for dev, st in statuses:
        for kind, n in sorted(st.errors.items()):
            out.sample("sluice_device_errors_total", n, device=dev, kind=kind)
    fam("sluice_device_last_success_timestamp_seconds")
    for dev, st in statuses:
        out.sample("sluice_device_last_success_timestamp_seconds", (st.last_success_ns or 0) / 1e9, device=dev)

    stats = snap.outbox
    if stats is not None:
        fam("sluice_outbox_rows")
        out.sample("sluice_outbox_rows", stats.rows)
        fam("sluice_outbox_bytes")
        out.sample("sluice_outbox_bytes", stats.bytes)
        fam("sluice_outbox_max_bytes")
        out.sample("sluice_outbox_max_bytes", snap.max_bytes)
        fam("sluice_outbox_oldest_age_seconds")
        out.sample("sluice_outbox_oldest_age_seconds", max(0.0, (now_ns - stats.oldest_ns) / 1e9) if stats.oldest_ns else 0.0)
        fam("sluice_outbox_dropped_total")
        out.sample("sluice_outbox_dropped_total", stats.dropped)
    if snap.received is not None:
        fam("sluice_outbox_received_total")
        out.sample("sluice_outbox_received_total", snap.received)
        fam("sluice_outbox_committed_total")
        out.sample("sluice_outbox_committed_total", snap.committed)
        fam("sluice_outbox_commit_failures_total")
        out.sample("sluice_outbox_commit_failures_total", snap.failed_commits)
        fam("sluice_outbox_unstored_readings")
        out.sample("sluice_outbox_unstored_readings", snap.held if snap.outbox_failing else 0)
        fam("sluice_outbox_lost_total")
        out.sample("sluice_outbox_lost_total", snap.lost)

    sinks = [sink for sink in snap.sinks if sink.stats is not None]
    counters = [(sink.name, sink.stats) for sink in snap.sinks if sink.stats is not None]
    if sinks:
        fam("sluice_sink_connected")
        for sink in sinks:
            out.sample("sluice_sink_connected", sink.connected, sink=sink.name)
        fam("sluice_sink_delivered_total")
        for name, counted in counters:
            out.sample("sluice_sink_delivered_total", counted.delivered, sink=name)
        fam("sluice_sink_retries_total")
        for name, counted in counters:
            out.sample("sluice_sink_retries_total", counted.retries, sink=name)
        fam("sluice_sink_pending_readings")
        for sink in sinks:
            out.sample("sluice_sink_pending_readings", stats.pending.get(sink.name, 0) if stats else 0, sink=sink.name)
        fam("sluice_sink_lag_seconds")
        for sink in sinks:
            out.sample("sluice_sink_lag_seconds", sink.lag, sink=sink.name)
        fam("sluice_sink_publishes_refused_total")
        for sink in sinks:
            out.sample("sluice_sink_publishes_refused_total", sink.refused, sink=sink.name)
        fam("sluice_sink_unconfirmed_readings")
        for sink in sinks:
            out.sample("sluice_sink_unconfirmed_readings", sink.unconfirmed, sink=sink.name)
        for metric, attr in (("sluice_sink_dead_lettered_total", "dead_lettered"),
                             ("sluice_sink_receipts_total", "receipts"),
                             ("sluice_sink_receipt_timeouts_total", "receipt_timeouts"),
                             ("sluice_sink_receipt_resent_readings_total", "receipt_resent"),
                             ("sluice_sink_receipts_refused_total", "receipts_refused")):
            fam(metric)
            for sink in sinks:
                out.sample(metric, getattr(sink.stats, attr), sink=sink.name)

    fam("sluice_clock_synchronized")
    out.sample("sluice_clock_synchronized", {True: 1, False: 0, None: -1}[snap.clock_synced])
    fam("sluice_clock_jumps_total")
    out.sample("sluice_clock_jumps_total", snap.clock_jumps)
    fam("sluice_component_stalled")
    for s in snap.loops:
        out.sample("sluice_component_stalled", s.wedged_for is not None, component=s.name)

    _provided(out)
    proc = process_usage()
    fam("process_cpu_seconds_total")
    out.sample("process_cpu_seconds_total", proc["cpu"])
    fam("process_resident_memory_bytes")
    out.sample("process_resident_memory_bytes", proc["rss"])
    fam("process_start_time_seconds")
    out.sample("process_start_time_seconds", _PROCESS_START)
    return "\n".join(out.lines) + "\n"


def _process_start() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        ticks = int(stat[stat.rfind(")") + 2:].split()[19])
        with open("/proc/stat", encoding="ascii") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    return time.time()


_PROCESS_START = _process_start()


def status_line(snap: Snapshot) -> str:
    """The one-line summary for systemd's STATUS= (and the log)."""
    up = sum(1 for _dev, st in snap.devices if st.up)
    parts = [f"{up}/{len(snap.devices)} devices up"]
    stats = snap.outbox
    if stats is not None:
        age = (time.time_ns() - stats.oldest_ns) / 1e9 if stats.oldest_ns else 0.0
        parts.append(f"outbox {stats.rows} readings" + (f" (oldest {age:.0f}s)" if stats.rows else ""))
    for sink in snap.sinks:
        parts.append(f"{sink.name} {'connected' if sink.connected else 'DISCONNECTED'}")
    if snap.outbox_failing:
        parts.append("OUTBOX NOT WRITABLE")
    if snap.clock_synced is False:
        parts.append("clock not synchronised")
    wedged = [s for s in snap.loops if s.wedged_for is not None]
    if wedged:
        parts.append("WEDGED " + ", ".join(s.name for s in wedged))
    return "; ".join(parts)


# --------------------------------------------------------------------------- HTTP
Answer = tuple[str, str, bytes]
"""An HTTP status line, a content type and a body."""
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class LocalHttpServer:
    """A tiny GET-only HTTP/1.1 responder (Connection: close) for local endpoints: ``routes``
    maps a path to a function giving the answer. Used by the gateway's health endpoint and the
    ingest service's metrics; an async context manager, port 0 picks a free port."""

    def __init__(self, routes: dict[str, Callable[[], Answer]], host: str, port: int, name: str) -> None:
        self._routes = routes
        self.host, self.port, self.name = host, port, name
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> LocalHttpServer:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("%s on %s", self.name, ", ".join(f"http://{self.host}:{self.port}{p}" for p in self._routes))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5.0):
                request = await reader.readline()
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    if len(line) > 8192:
                        return
            parts = request.decode("latin-1").split()
            route = self._routes.get(parts[1].split("?", 1)[0]) if len(parts) >= 2 else None
            if len(parts) < 2 or parts[0] != "GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif route is None:
                status, ctype, body = "404 Not Found", "text/plain", ("try " + " or ".join(self._routes) + "\n").encode()
            else:
                status, ctype, body = route()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, OSError, ValueError):
            pass
        except Exception:
            log.exception("%s: failed to answer a request", self.name)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def HealthServer(snapshot: Callable[[], Snapshot], host: str, port: int) -> LocalHttpServer:
    """``async with HealthServer(gateway.snapshot, host, port):`` serves /healthz and /metrics."""

    def metrics() -> Answer:
        return "200 OK", PROMETHEUS_TEXT, render_metrics(snapshot()).encode()

    def health() -> Answer:
        ok, data = healthz(snapshot())
        return ("200 OK" if ok else "503 Service Unavailable"), "application/json", (json.dumps(data) + "\n").encode()

    return LocalHttpServer({"/healthz": health, "/metrics": metrics}, host, port, "health endpoint")


# --------------------------------------------------------------------------- `sluice status`
def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of our own exposition text (the subset :func:`render_metrics` writes)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _sep, value = line.rpartition(" ")
        name, _brace, rest = head.partition("{")
        labels: dict[str, str] = {}
        for key, val in _LABEL.findall(rest):
            labels[key] = val.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        out.append((name, labels, float(value)))
    return out


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _ago(seconds: float) -> str:
    return format_duration(max(0.0, seconds))


_RECEIPT_METRICS = ("sluice_sink_unconfirmed_readings", "sluice_sink_receipts_total", "sluice_sink_receipt_timeouts_total",
                    "sluice_sink_receipt_resent_readings_total", "sluice_sink_receipts_refused_total")


def format_status(health: dict[str, Any], metrics_text: str, now: float | None = None) -> str:
    """The readable table ``sluice status`` prints: the same figures as /healthz and /metrics."""
    now = time.time() if now is None else now
    samples = parse_metrics(metrics_text)
    single = {name: value for name, labels, value in samples if not labels}
    by: dict[str, dict[str, dict[str, float]]] = {}
    errors: dict[str, dict[str, float]] = {}
    info: dict[str, str] = {}
    trace = [(name, labels, value) for name, labels, value in samples if name.startswith("sluice_trace_")]
    for name, labels, value in samples:
        if name.startswith("sluice_trace_"):
            continue  # their own section below
        if name == "sluice_info":
            info = labels
        elif name == "sluice_device_errors_total":
            errors.setdefault(labels["device"], {})[labels["kind"]] = value
        elif "device" in labels or "sink" in labels:
            key = labels.get("device") or labels["sink"]
            table = "device" if "device" in labels else "sink"
            by.setdefault(table, {}).setdefault(key, {})[name] = value
    state = ("live" if health.get("live") else "WEDGED") + ", " + ("ready" if health.get("ready") else "NOT READY")
    lines = [f"gateway {info.get('gateway', '?')} at {info.get('site', '?')} — {state}; "
             f"up {_ago(single.get('sluice_uptime_seconds', 0))}", ""]
    devices = by.get("device", {})
    if devices:
        width = max(8, *(len(d) for d in devices))
        lines.append(f"{'DEVICE':<{width}}  {'STATE':<5}  {'POLLS':>7}  {'LAST ANSWER':<12}  ERRORS")
        for dev, m in sorted(devices.items()):
            last = m.get("sluice_device_last_success_timestamp_seconds", 0)
            errs = ", ".join(f"{k} {v:.0f}" for k, v in sorted(errors.get(dev, {}).items())) or "-"
            lines.append(f"{dev:<{width}}  {'up' if m.get('sluice_device_up') else 'DOWN':<5}  "
                         f"{m.get('sluice_device_polls_total', 0):>7.0f}  "
                         f"{(_ago(now - last) + ' ago') if last else 'never':<12}  {errs}")
        lines.append("")
    if "sluice_outbox_rows" in single:
        lines.append(f"outbox: {single['sluice_outbox_rows']:.0f} readings, "
                     f"{_size(single.get('sluice_outbox_bytes', 0))} of {_size(single.get('sluice_outbox_max_bytes', 0))}, "
                     f"oldest {_ago(single.get('sluice_outbox_oldest_age_seconds', 0))}, "
                     f"dropped {single.get('sluice_outbox_dropped_total', 0):.0f}, "
                     f"held in memory {single.get('sluice_outbox_unstored_readings', 0):.0f}, "
                     f"lost {single.get('sluice_outbox_lost_total', 0):.0f}")
    sinks = by.get("sink", {})
    if sinks:
        width = max(6, *(len(s) for s in sinks))
        lines.append("")
        lines.append(f"{'SINK':<{width}}  {'LINK':<12}  {'DELIVERED':>10}  {'PENDING':>8}  {'LAG':>8}  {'RETRIES':>7}  "
                     "DEAD-LETTERED")
        for name, m in sorted(sinks.items()):
            lines.append(f"{name:<{width}}  {'connected' if m.get('sluice_sink_connected') else 'DISCONNECTED':<12}  "
                         f"{m.get('sluice_sink_delivered_total', 0):>10.0f}  {m.get('sluice_sink_pending_readings', 0):>8.0f}  "
                         f"{_ago(m.get('sluice_sink_lag_seconds', 0)):>8}  {m.get('sluice_sink_retries_total', 0):>7.0f}  "
                         f"{m.get('sluice_sink_dead_lettered_total', 0):.0f}")
        for name, m in sorted(sinks.items()):
            receipts = [m.get(k, 0) for k in _RECEIPT_METRICS]
            if any(receipts):
                lines.append(f"{name}: end-to-end receipts — {receipts[0]:.0f} readings await a receipt, "
                             f"{receipts[1]:.0f} receipts, {receipts[2]:.0f} timeouts ({receipts[3]:.0f} readings "
                             f"re-sent), {receipts[4]:.0f} receipts refused")
    if trace:
        lines += ["", *_trace_status(trace, now)]
    lines.append("")
    lines.append(f"process: cpu {single.get('process_cpu_seconds_total', 0):.1f} s, "
                 f"rss {_size(single.get('process_resident_memory_bytes', 0))}")
    for reason in health.get("reasons", []):
        lines.append(f"problem: {reason}")
    for warning in health.get("warnings", []):
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def _trace_status(samples: list[tuple[str, dict[str, str], float]], now: float) -> list[str]:
    """The traceability feed's lines of ``sluice status`` (``sluice_trace_*``, see gateway/trace/service.py)."""
    single = {name: value for name, labels, value in samples if not labels}
    sinks: dict[str, dict[str, float]] = {}
    for name, labels, value in samples:
        if "sink" in labels:
            sinks.setdefault(labels["sink"], {})[name] = value
    last = single.get("sluice_trace_last_event_timestamp_seconds", 0)
    lines = [f"trace: chain at seq {single.get('sluice_trace_chain_seq', 0):.0f}, last event "
             f"{(_ago(now - last) + ' ago') if last else 'never'}, {single.get('sluice_trace_events_total', 0):.0f} "
             f"events this run, {single.get('sluice_trace_late_readings_total', 0):.0f} late readings"]
    if sinks:
        width = max(10, *(len(s) for s in sinks))
        lines.append(f"{'TRACE SINK':<{width}}  {'DELIVERED':>10}  {'PENDING':>8}  DEAD LETTERS")
        for name, m in sorted(sinks.items()):
            lines.append(f"{name:<{width}}  {m.get('sluice_trace_sink_delivered_total', 0):>10.0f}  "
                         f"{m.get('sluice_trace_sink_pending_events', 0):>8.0f}  "
                         f"{m.get('sluice_trace_sink_dead_letters_total', 0):.0f}")
    return lines


def fetch(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET ``path`` from the health endpoint: (HTTP status, body). Raises OSError if unreachable."""
    # Only `sluice health` and the tests fetch: the gateway process serves, and never loads http.client.
    import http.client  # noqa: PLC0415 - see above

    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()
