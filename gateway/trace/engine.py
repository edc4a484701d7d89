"""The trace engine's core: readings and binding commands in, unsealed EPCIS 2.0 events out.

Pure and synchronous (no I/O, no clock; only the system's time-zone rules are read, for
``eventTimeZoneOffset``): :class:`TraceCore` is fed readings (:meth:`feed`),
binding commands (:meth:`command`) and the time (:meth:`tick`), and returns the events those
produce, in order. The service (``gateway/trace/service.py``) seals, stores and delivers them.

Per lot present in a location, readings of the location's traced points are aggregated per
window aligned to the wall clock (``window: 15m`` -> :00, :15, ...). A window closes at its end
plus ``grace``, or early when the lot leaves. Its event carries, per device, each point's
min/max/mean/last; per excursion outside the lot's thresholds an ``ALARM_CONDITION`` report with
the excursion's span (first to last out-of-range reading) that names the limit it crossed
(``sensorMetadata.bizRules`` and ``sluice:limitMin``/``sluice:limitMax``); per gap longer than
``outage_after`` in a point's readings (device down, or the point failing) an ``ERROR_CONDITION``
report spanning the whole gap: from the last reading before it — in an earlier window, if it
began there — to the first reading after it, or to the window's end while it lasts. An outage
across windows is thus reported in every window it touches, the last report with its full
length. A reading for a window already closed is counted in ``late`` and not used.

Every event built from readings carries ``sluice:quality`` when any of them was not ``good``:
the union of their quality flags (``clock_unsynced``: taken while the system clock was not
synchronised, so its times may be wrong; ``uncertain``), in the readings' canonical form.
Events carry the CBV ``disposition`` of their step (the location's, or the usual one for the
bizStep) and ``eventTimeZoneOffset`` from ``timezone_offset``, or the system's zone at the
event's time.

Weighings and codes are discrete events of the lot that entered the location last (at a packing
station: the lot whose label was scanned last; a lot that entered after the reading's time does
not count). A location's ``scales`` record each *stable* weight above zero (``weight`` and
``unit`` from a ``format: scale`` device; unstable and overload readings never) as an event with
the weight in ``quantityList`` (``quantity``, Rec 20 ``uom``) and as a ``Mass`` sensor report
whose ``sensorMetadata`` names the scale. A scale prints its stable weight again and again while
the load rests: a weighing is recorded once, and the next one needs another weight or an
unstable/overload/zero reading in between. With ``record_codes``, a scanner's code that is no
known lot (a packaging code) becomes an event of the lot present, with ``sluice:code``.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from gateway.reading import GOOD, Reading, quality
from gateway.trace.config import SENSOR_TYPES, STEP_DISPOSITION, UNIT_MAP, LotConfig, Range, TraceConfig, TracedPoint

__all__ = ["CONTEXT", "NS", "Command", "TraceCore", "iso", "lot_uri", "zone_offset"]

log = logging.getLogger(__name__)

NS = "https://ns.sluice.dev/trace/"
"""Namespace of Sluice's extension fields (``sluice:seq``, ``sluice:prev`` ...)."""
CONTEXT: list[Any] = ["https://ref.gs1.org/standards/epcis/2.0.0/epcis-context.jsonld", {"sluice": NS}]

ENTER, LEAVE, END, WINDOW, WEIGHT, CODE = "enter", "leave", "end", "window", "weight", "code"
_STEP = {ENTER: "arriving", LEAVE: "departing", END: "shipping"}


def iso(time_ns: int) -> str:
    """UTC, millisecond precision, ``Z``: the form the event hash keeps unchanged."""
    when = dt.datetime.fromtimestamp(time_ns // 1_000_000 / 1000, dt.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def zone_offset(time_ns: int) -> str:
    """The system's UTC offset at ``time_ns`` as EPCIS writes it (``+02:00``); seconds are dropped."""
    offset = dt.datetime.fromtimestamp(time_ns // 1_000_000_000, dt.UTC).astimezone().utcoffset() or dt.timedelta()
    minutes = int(offset.total_seconds()) // 60
    return f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def lot_uri(lot_id: str, lot: LotConfig, template: str) -> str:
    """The lot's EPC class: a GS1 Digital Link URI when it has a GTIN, else ``lot_uri``."""
    if lot.gtin and lot.lot_number:
        return f"https://id.gs1.org/01/{lot.gtin}/10/{lot.lot_number}"
    return template.format(producer=lot.producer or "unknown", lot=lot_id)


@dataclass(frozen=True)
class Command:
    """A binding change: ``start`` (enter a location), ``move`` (leave one, enter another),
    ``end`` (leave the gateway's watch: shipped). ``source``: config, cli, scan:<device>."""

    kind: str
    lot: str
    location: str | None
    time_ns: int
    source: str = "cli"
    code: str | None = None  # the scanned code, for a scan


@dataclass
class _Acc:
    n: int = 0
    total: float = 0.0
    lo: float = float("inf")
    hi: float = float("-inf")
    last: float = 0.0
    last_ns: int = 0
    seen_ns: int = 0  # last reading (in this window or an earlier one; else the window's start): gaps start here
    gaps: list[tuple[int, int]] = field(default_factory=list)
    excursions: list[list[Any]] = field(default_factory=list)  # [start_ns, end_ns, lo, hi, open]
    quality: str = GOOD  # the union of the used readings' flags


@dataclass
class _Lot:
    id: str
    config: LotConfig
    location: str
    since_ns: int
    start_ns: int  # start of the open window (>= since_ns)
    accs: dict[TracedPoint, _Acc] = field(default_factory=dict)
    seen: dict[TracedPoint, int] = field(default_factory=dict)  # last reading per point, across windows, here

    def acc(self, point: TracedPoint) -> _Acc:
        """The open window's figures of ``point`` (empty ones if it has none yet: not stored)."""
        return self.accs.get(point) or _Acc(seen_ns=self.seen.get(point, self.start_ns))


def _code_forms(lot_id: str, lot: LotConfig, template: str) -> set[str]:
    forms = {lot_id, lot_uri(lot_id, lot, template)}
    if lot.gtin and lot.lot_number:
        forms |= {f"(01){lot.gtin}(10){lot.lot_number}", f"01{lot.gtin}10{lot.lot_number}"}
    return forms


class TraceCore:
    """See the module docstring. ``bindings`` restores lot -> (location, since_ns, window start_ns)
    after a restart: the readings of the open window before the restart are lost, and the
    window reports that gap as ERROR_CONDITION."""

    def __init__(self, cfg: TraceConfig, bindings: dict[str, tuple[str, int, int]] | None = None) -> None:
        self.lots: dict[str, _Lot] = {}
        self.late = 0
        self.unknown_codes = 0
        self.unbound = 0  # weighings and codes with no lot present: not recorded
        self._weighing: dict[str, float | None] = {}  # scale -> the stable weight on it now (recorded once)
        self._unit_warned: set[tuple[str, str]] = set()
        self.reconfigure(cfg)
        for lot_id, (location, since, start) in (bindings or {}).items():
            if location in cfg.file.locations:
                self._enter(lot_id, location, since).start_ns = start

    def reconfigure(self, cfg: TraceConfig) -> None:
        """Use ``cfg`` from now on (a reload; checked by ``check_reload``): lots stay where they are
        with their open window and what it gathered; the window length, grace, points, thresholds
        and lot details of ``cfg`` apply from now (a lot no longer in it keeps its details)."""
        self.cfg = cfg
        self.window_ns = int(cfg.file.window * 1e9)
        self.grace_ns = int(cfg.file.grace * 1e9)
        self._scales = {dev: name for name, loc in cfg.file.locations.items() for dev in loc.scales}
        self._scanners = {dev: name for name, loc in cfg.file.locations.items() for dev in loc.scanners}
        self._location_of = {dev: name for name, loc in cfg.file.locations.items() for dev in loc.devices}
        for lot in self.lots.values():
            lot.config = cfg.file.lots.get(lot.id, lot.config)

    def state(self) -> dict[str, tuple[str, int, int]]:
        """lot -> (location, since_ns, open window start_ns): what the journal persists."""
        return {lot.id: (lot.location, lot.since_ns, lot.start_ns) for lot in self.lots.values()}

    # -- inputs --------------------------------------------------------------------------
    def feed(self, reading: Reading) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        where = self._scanners.get(reading.device)
        code = reading.fields.get("code")
        if where is not None and isinstance(code, str):
            scanned = code.strip().replace("\x1d", "")
            lot_id = self._match(scanned)
            present = self._present(where, reading.time_ns) if self.cfg.file.locations[where].record_codes else None
            if lot_id is None and present is not None:
                events += self._discrete(present, CODE, reading, code=scanned)
            elif lot_id is None:
                self.unknown_codes += 1
                log.warning("code reader %s scanned '%s', which is no known lot — add the lot to trace.yaml "
                            "or start it with `sluice lot start`", reading.device, code)
            else:
                kind = "move" if lot_id in self.lots else "start"
                moved = self.command(Command(kind, lot_id, where, reading.time_ns, f"scan:{reading.device}", scanned))
                if moved and reading.quality != GOOD:
                    moved[-1]["sluice:quality"] = quality(moved[-1].get("sluice:quality", GOOD), reading.quality)
                events += moved
        if reading.device in self._scales:
            events += self._weigh(reading, self._scales[reading.device])
        location = self._location_of.get(reading.device)
        if location is None:
            return events
        points = [p for p in self.cfg.points.get(location, ()) if p.device == reading.device]
        for lot in self.lots.values():
            if lot.location != location or reading.time_ns < lot.start_ns:
                if lot.location == location:
                    self.late += 1
                continue
            if reading.time_ns >= self._end(lot):
                events += self._close_until(lot, reading.time_ns)
            for point in points:
                value = reading.fields.get(point.field)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                    continue
                self._add(lot, point, float(value), reading.time_ns, reading.quality)
        return events

    def command(self, cmd: Command) -> list[dict[str, Any]]:
        """Apply a binding change; raises ValueError for an impossible one (the message is for people)."""
        lots = self.cfg.file.lots
        current = self.lots.get(cmd.lot)
        if cmd.kind in ("start", "move"):
            if cmd.location not in self.cfg.file.locations:
                raise ValueError(f"unknown location '{cmd.location}' — use one of " + ", ".join(self.cfg.file.locations))
            if current is not None and current.location == cmd.location:
                return []
            events = self._leave(current, cmd, LEAVE) if current is not None else []
            config = lots.get(cmd.lot, LotConfig())
            lot = self._enter(cmd.lot, cmd.location, cmd.time_ns, config)
            enter = self._event(lot, ENTER, cmd.time_ns, cmd.time_ns, cmd.time_ns, source=cmd.source)
            if cmd.code is not None:
                enter["sluice:code"] = cmd.code  # what the reader read: the evidence of the binding
            return [*events, enter]
        if cmd.kind == "end":
            if current is None:
                raise ValueError(f"lot '{cmd.lot}' is in no location — nothing to end")
            return self._leave(current, cmd, END)
        raise ValueError(f"unknown command '{cmd.kind}' — use start, move or end")

    def tick(self, now_ns: int) -> list[dict[str, Any]]:
        """Close every window whose end plus grace has passed."""
        events: list[dict[str, Any]] = []
        for lot in list(self.lots.values()):
            events += self._close_until(lot, now_ns - self.grace_ns)
        return events

    # -- internals -----------------------------------------------------------------------
    def _match(self, code: str) -> str | None:
        template = self.cfg.file.lot_uri
        known = {**{k: v for k, v in self.cfg.file.lots.items()}, **{k: v.config for k, v in self.lots.items()}}
        for lot_id, lot in known.items():
            if code in _code_forms(lot_id, lot, template):
                return lot_id
        # A GS1 element string may carry more AIs after the lot (10 is variable length: it ends the string or a GS)
        m = re.match(r"^\(?01\)?(\d{14})\(?10\)?([A-Za-z0-9._-]{1,20})", code)
        if m:
            for lot_id, lot in known.items():
                if (lot.gtin, lot.lot_number) == m.groups():
                    return lot_id
        return None

    def _present(self, location: str, t: int) -> _Lot | None:
        """The lot that entered ``location`` last, at or before ``t``."""
        here = [lot for lot in self.lots.values() if lot.location == location and lot.since_ns <= t]
        return max(reversed(here), key=lambda lot: lot.since_ns) if here else None

    def _weigh(self, reading: Reading, location: str) -> list[dict[str, Any]]:
        fields, dev = reading.fields, reading.device
        weight = fields.get("weight")
        if (fields.get("overload") is True or fields.get("stable") is not True or isinstance(weight, bool)
                or not isinstance(weight, (int, float)) or weight != weight):
            self._weighing[dev] = None  # moving or overloaded: the next stable weight is a new weighing
            return []
        if self._weighing.get(dev) == weight:
            return []  # the same load, still resting on the scale
        self._weighing[dev] = weight
        if weight <= 0:
            return []  # empty (or tared) scale
        unit = fields.get("unit")
        mapped = self.cfg.file.points.get("weight")
        kind = (mapped.type, mapped.uom) if mapped else UNIT_MAP.get(unit) if isinstance(unit, str) else None
        if kind is None or kind[0] != "Mass":
            if (dev, str(unit)) not in self._unit_warned:
                self._unit_warned.add((dev, str(unit)))
                log.warning("scale %s: weight in unit %r is not recorded — use kg, g, t or lb, or map the field in "
                            "trace.yaml: `points: {weight: {type: Mass, uom: KGM}}`", dev, unit)
            return []
        lot = self._present(location, reading.time_ns)
        if lot is None:
            self.unbound += 1
            log.info("scale %s: %s %s with no lot in %s — not recorded", dev, weight, unit, location)
            return []
        return self._discrete(lot, WEIGHT, reading, weight=(float(weight), kind[1]))

    def _discrete(self, lot: _Lot, reason: str, reading: Reading, code: str | None = None,
                  weight: tuple[float, str] | None = None) -> list[dict[str, Any]]:
        """A weighing or a code: one event of ``lot``, at once (it leaves the open window alone: the
        window's event follows when the window closes, as always)."""
        t = reading.time_ns
        sensors = None
        if weight is not None:
            report: dict[str, Any] = {"type": "Mass", "value": _exact(weight[0]), "uom": weight[1], "sluice:point": "weight"}
            if isinstance(reading.fields.get("net"), bool):
                report["sluice:net"] = reading.fields["net"]
            sensors = [{"sensorMetadata": {"time": iso(t), "deviceID": self._device_uri(reading.device)},
                        "sensorReport": [report]}]
        event = self._event(lot, reason, t, t, t, source=f"{'scan' if code is not None else 'scale'}:{reading.device}",
                            sensors=sensors, quantity=weight, flags=reading.quality)
        if code is not None:
            event["sluice:code"] = code
        return [event]

    def _end(self, lot: _Lot) -> int:
        return lot.start_ns - lot.start_ns % self.window_ns + self.window_ns

    def _enter(self, lot_id: str, location: str, since: int, config: LotConfig | None = None) -> _Lot:
        config = config or self.cfg.file.lots.get(lot_id, LotConfig())
        lot = self.lots[lot_id] = _Lot(lot_id, config, location, since, since)
        return lot

    def _leave(self, lot: _Lot, cmd: Command, reason: str) -> list[dict[str, Any]]:
        events = self._close_until(lot, cmd.time_ns)
        event = self._event(lot, reason, lot.start_ns, cmd.time_ns, cmd.time_ns, source=cmd.source)
        del self.lots[lot.id]
        return [*events, event]

    def _close_until(self, lot: _Lot, until_ns: int) -> list[dict[str, Any]]:
        events = []
        while self._end(lot) <= until_ns:
            end = self._end(lot)
            events.append(self._event(lot, WINDOW, lot.start_ns, end, end))
            lot.start_ns = end
            lot.accs = {}
        return events

    def _add(self, lot: _Lot, point: TracedPoint, value: float, t: int, flags: str) -> None:
        acc = lot.accs.get(point)
        if acc is None:
            acc = lot.accs[point] = lot.acc(point)
        if t - acc.seen_ns > self.cfg.outage_after(point.device) * 1e9:
            acc.gaps.append((acc.seen_ns, t))  # may start in an earlier window: the outage's whole span
        acc.seen_ns = lot.seen[point] = t
        if flags != GOOD and flags != acc.quality:
            acc.quality = quality(acc.quality, flags)
        acc.n += 1
        acc.total += value
        acc.lo, acc.hi = min(acc.lo, value), max(acc.hi, value)
        acc.last, acc.last_ns = value, t
        limits = self._limits(lot, point.type)
        if limits is not None:
            lo, hi = limits[1].min, limits[1].max
            out = (lo is not None and value < lo) or (hi is not None and value > hi)
            current = acc.excursions[-1] if acc.excursions and acc.excursions[-1][4] else None
            if out and current is None:
                acc.excursions.append([t, t, value, value, True])
            elif out and current is not None:
                current[1], current[2], current[3] = t, min(current[2], value), max(current[3], value)
            elif current is not None:
                current[4] = False

    def _limits(self, lot: _Lot, gs1_type: str) -> tuple[str, Range] | None:
        """The threshold that applies to ``gs1_type`` for ``lot`` (the lot's own, else its product's)
        and the URI of the rule it comes from (its ``biz_rules``, or one naming where it is set)."""
        products = self.cfg.file.products
        sources = [(f"lot:{lot.id}", lot.config.thresholds)]
        if lot.config.product in products:
            sources.append((f"product:{lot.config.product}", products[lot.config.product].thresholds))
        for where, thresholds in sources:
            for key, rng in thresholds.items():
                if SENSOR_TYPES[key] == gs1_type:
                    return rng.biz_rules or f"urn:sluice:threshold:{where}:{key}", rng
        return None

    def _device_uri(self, device: str) -> str:
        return self.cfg.file.device_uri.format(site=self.cfg.site, gateway=self.cfg.gateway_id, device=device)

    def _sensors(self, lot: _Lot, start: int, end: int) -> list[dict[str, Any]]:
        points = self.cfg.points.get(lot.location, ())
        outage = {p: self.cfg.outage_after(p.device) * 1e9 for p in points}
        stats: dict[str, list[dict[str, Any]]] = {}
        alarms: list[dict[str, Any]] = []
        errors: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
        for p in points:
            acc = lot.acc(p)
            gaps = list(acc.gaps)
            if end - acc.seen_ns > outage[p] or (acc.n == 0 and end > start):
                gaps.append((acc.seen_ns, end))
            for g0, g1 in gaps:
                errors.setdefault((p.device, g0, g1), []).append(
                    {"type": p.type, "exception": "ERROR_CONDITION", "sluice:point": p.field})
            if acc.n:
                stats.setdefault(p.device, []).append({
                    "type": p.type, "time": iso(acc.last_ns), "value": _num(acc.last), "minValue": _num(acc.lo),
                    "maxValue": _num(acc.hi), "meanValue": _num(acc.total / acc.n), "uom": p.uom, "sluice:point": p.field})
            limits = self._limits(lot, p.type) if acc.excursions else None
            for x0, x1, lo, hi, _open in acc.excursions:
                assert limits is not None  # an excursion needs a limit
                rule, rng = limits
                report = {"type": p.type, "exception": "ALARM_CONDITION", "minValue": _num(lo), "maxValue": _num(hi),
                          "uom": p.uom, "sluice:point": p.field}
                if rng.min is not None:
                    report["sluice:limitMin"] = _num(rng.min)
                if rng.max is not None:
                    report["sluice:limitMax"] = _num(rng.max)
                alarms.append({"sensorMetadata": {"deviceID": self._device_uri(p.device), "startTime": iso(x0), "endTime": iso(x1),
                                                  "bizRules": rule},
                               "sensorReport": [report]})
        out = [{"sensorMetadata": {"deviceID": self._device_uri(dev), "startTime": iso(start), "endTime": iso(end)},
                "sensorReport": reports} for dev, reports in stats.items()]
        out += alarms
        out += [{"sensorMetadata": {"deviceID": self._device_uri(dev), "startTime": iso(g0), "endTime": iso(g1)},
                 "sensorReport": reports} for (dev, g0, g1), reports in errors.items()]
        return out

    def _event(self, lot: _Lot, reason: str, start: int, end: int, at: int, source: str | None = None,
               sensors: list[dict[str, Any]] | None = None, quantity: tuple[float, str] | None = None,
               flags: str = GOOD) -> dict[str, Any]:
        loc = self.cfg.file.locations[lot.location]
        element: dict[str, Any] = {"epcClass": lot_uri(lot.id, lot.config, self.cfg.file.lot_uri)}
        if quantity is not None:
            element["quantity"], element["uom"] = _exact(quantity[0]), quantity[1]
        step = _STEP.get(reason, loc.biz_step)
        disposition = (loc.disposition if reason not in _STEP else None) or STEP_DISPOSITION.get(step, "unknown")
        event: dict[str, Any] = {
            "type": "ObjectEvent", "eventTime": iso(at), "eventTimeZoneOffset": self.cfg.file.timezone_offset or zone_offset(at),
            "quantityList": [element],
            "action": "OBSERVE", "bizStep": step, "disposition": disposition,
            "readPoint": {"id": loc.read_point}, "bizLocation": {"id": loc.biz_location or loc.read_point},
        }
        if reason != ENTER and end > start:
            sensors = self._sensors(lot, start, end)
            flags = quality(flags, *(acc.quality for acc in lot.accs.values()))
        if sensors:
            event["sensorElementList"] = sensors
        if flags != GOOD:
            event["sluice:quality"] = flags
        event["sluice:lot"] = lot.id
        event["sluice:location"] = lot.location
        event["sluice:reason"] = reason
        if source is not None:
            event["sluice:source"] = source
        if reason == ENTER:
            cfg = lot.config
            if cfg.product:
                event["sluice:product"] = cfg.product
            if cfg.producer:
                event["sluice:producer"] = cfg.producer
            if cfg.attributes:
                event["sluice:attributes"] = {k: cfg.attributes[k] for k in sorted(cfg.attributes)}
        return event


def _exact(value: float) -> float | int:
    """A weight as the scale printed it (no rounding), integral ones without ``.0``."""
    return int(value) if value == int(value) else value


def _num(value: float) -> float | int:
    value = round(value, 4)
    return int(value) if value == int(value) else value
