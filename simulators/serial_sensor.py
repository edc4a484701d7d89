"""Simulated serial sensors on pseudo-terminal pairs, played from the same ``protocol: serial``
profiles the gateway reads, with injectable faults, and the ``sluice sim serial`` entry point.

* :func:`render_frame`: field values -> the bytes a real sensor of that profile would send
  (``lines``/``scale`` from the profile's ``sim.template``; NMEA GGA + RMC; binary frames with
  header, length and checksum; code scans with prefix/suffix).
* :class:`SerialSensorSim`: one pty pair (``os.openpty``); the gateway opens :attr:`path`. A
  streaming profile sends a frame every ``sim.every``; a profile with ``request:`` answers each
  request. Values come from ``sim:`` signals (per field, or ``sim.signals``) or defaults.
* :class:`Faults`: ``silent`` (sends and answers nothing), ``delay`` (slow replies), and per-frame
  faults ``garbage`` (random bytes before the frame), ``bad_checksum`` (NMEA and binary),
  ``truncate`` (half a frame, no end) — each either one-shot (:meth:`Faults.inject`) or at a rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import signal
import struct
import sys
import time
import tty
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.serial.framing import checksum_bytes
from drivers.serial.parsers import nmea_checksum, request_bytes
from drivers.serial.profile import BIN_TYPES as _BIN
from drivers.serial.profile import CHECKSUM_SIZE as _CHECKSUM_SIZE
from drivers.serial.profile import FieldSpec, ProfileModel, parse_hex
from drivers.wire import to_big_endian
from gateway.validation import validate_doc
from gateway.units import parse_duration
from gateway.yamlpos import ConfigError, ConfigErrors, load_yaml
from drivers.signals import Constant, Signal, Step, make_signal

__all__ = ["FAULT_KINDS", "Faults", "SerialSensorSim", "load_profile", "main_serial_sim", "render_frame"]

log = logging.getLogger("sluice.sim")

FAULT_KINDS = ("garbage", "bad_checksum", "truncate")

# Outputs of the fixed formats and what they play when the profile's sim.signals says nothing.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "nmea": {"latitude": 52.0906, "longitude": 5.1214, "altitude": 4.5, "speed_knots": 0.0, "course": 0.0,
             "fix_quality": 1, "satellites": 9, "hdop": 0.9},
    "scale": {"weight": 12.345, "stable": True, "net": False, "unit": "kg"},
    "codes": {},
}
DEFAULT_SCALE_TEMPLATE = "{status},{mode},{weight:+09.3f}{unit}"


@dataclass
class Faults:
    """What goes wrong, now. Rates are per frame (0..1); :meth:`inject` queues one-shot faults."""

    silent: bool = False
    delay: float = 0.0
    rates: dict[str, float] = field(default_factory=dict)
    _once: Counter[str] = field(default_factory=Counter)
    _rng: random.Random = field(default_factory=lambda: random.Random(1))

    def inject(self, kind: str, n: int = 1) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}: use one of {', '.join(FAULT_KINDS)}")
        self._once[kind] += n

    def take(self, kind: str) -> bool:
        if self._once[kind] > 0:
            self._once[kind] -= 1
            return True
        rate = self.rates.get(kind, 0.0)
        return rate > 0 and self._rng.random() < rate


# =========================================================================== rendering
def _nmea_coord(value: float, lat: bool) -> tuple[str, str]:
    hemi = ("N" if value >= 0 else "S") if lat else ("E" if value >= 0 else "W")
    value = abs(value)
    degrees = int(value)
    minutes = (value - degrees) * 60
    return (f"{degrees:02d}" if lat else f"{degrees:03d}") + f"{minutes:07.4f}", hemi


def _sentence(body: str, bad_checksum: bool) -> bytes:
    check = nmea_checksum(body)
    if bad_checksum:
        check = f"{(int(check, 16) ^ 0x5A):02X}"
    return f"${body}*{check}\r\n".encode("ascii")


def render_frame(profile: ProfileModel, values: dict[str, Any], *, bad_checksum: bool = False,
                 now: float | None = None) -> bytes:
    """One complete frame (or, for NMEA, a GGA and an RMC sentence) carrying ``values``."""
    fmt = profile.format
    delim = profile.delimiter.replace("\\r", "\r").replace("\\n", "\n").encode("latin-1")
    if fmt in ("lines", "scale"):
        template = profile.sim.template or (DEFAULT_SCALE_TEMPLATE if fmt == "scale" else None)
        if template is None:
            raise ValueError("the profile has no sim.template — add the line the sensor sends, e.g. "
                             "template: \"T={temperature:.1f}\"")
        if fmt == "scale":
            values = {"status": "ST" if values.get("stable", True) else "US",
                      "mode": "NT" if values.get("net") else "GS", **values}
        return template.format(**values).encode(profile.encoding) + delim
    if fmt == "codes":
        return (profile.strip_prefix + str(values.get("code", "")) + profile.strip_suffix).encode(profile.encoding) + delim
    if fmt == "nmea":
        stamp = time.gmtime(time.time() if now is None else now)
        hms = time.strftime("%H%M%S.00", stamp)
        lat, ns = _nmea_coord(float(values["latitude"]), True)
        lon, ew = _nmea_coord(float(values["longitude"]), False)
        gga = (f"GPGGA,{hms},{lat},{ns},{lon},{ew},{int(values['fix_quality'])},{int(values['satellites']):02d},"
               f"{float(values['hdop']):.1f},{float(values['altitude']):.1f},M,47.0,M,,")
        rmc = (f"GPRMC,{hms},A,{lat},{ns},{lon},{ew},{float(values['speed_knots']):.2f},"
               f"{float(values['course']):.1f},{time.strftime('%d%m%y', stamp)},,,A")
        return _sentence(gga, bad_checksum) + _sentence(rmc, False)
    return _render_binary(profile, values, bad_checksum)


def _render_binary(profile: ProfileModel, values: dict[str, Any], bad_checksum: bool) -> bytes:
    header = parse_hex(profile.header or "")
    csize = _CHECKSUM_SIZE[profile.checksum.type] if profile.checksum else 0
    if profile.frame_length is not None:
        total = profile.frame_length
    else:
        assert profile.length is not None
        len_end = profile.length.byte + (1 if profile.length.type == "uint8" else 2)
        body_end = max([len_end, *(byte + width for byte, _code, width in map(_place, profile.fields.values()))])
        total = body_end + csize
    frame = bytearray(total - csize)
    frame[:len(header)] = header
    if profile.length is not None:
        length = profile.length
        len_end = length.byte + (1 if length.type == "uint8" else 2)
        count = {"frame": total, "rest": total - len_end, "payload": total - len_end - csize}[length.counts]
        frame[length.byte:len_end] = count.to_bytes(len_end - length.byte, "little" if length.byte_order == "DCBA" else "big")
    for name, spec in profile.fields.items():
        byte, code, width = _place(spec)
        value = values.get(name, 0)
        if spec.bit is not None:
            current = int.from_bytes(to_big_endian(bytes(frame[byte:byte + width]), spec.byte_order), "big")
            raw: Any = current | (1 << spec.bit) if value else current & ~(1 << spec.bit)
        else:
            raw = (float(value) - spec.offset) / spec.scale
            if code not in "fd":  # integer types
                lo, hi = _int_range(code, width)
                raw = min(max(round(raw), lo), hi) if math.isfinite(raw) else 0
        packed = struct.pack(">" + code, raw)
        frame[byte:byte + width] = to_big_endian(packed, spec.byte_order)
    if profile.checksum is not None:
        check = checksum_bytes(profile.checksum, bytes(frame[profile.checksum.start:]))
        if bad_checksum:
            check = bytes(b ^ 0x5A for b in check)
        frame += check
    return bytes(frame)


def _place(spec: FieldSpec) -> tuple[int, str, int]:
    """Where a binary profile's field sits: its byte, struct code and width (a binary profile's
    validation requires both ``byte`` and a binary ``type`` of every field)."""
    assert spec.byte is not None and spec.type is not None, "a validated binary profile"
    code, width = _BIN[spec.type]
    return spec.byte, code, width


def _int_range(code: str, width: int) -> tuple[int, int]:
    if code.isupper():
        return 0, (1 << (8 * width)) - 1
    return -(1 << (8 * width - 1)), (1 << (8 * width - 1)) - 1


# =========================================================================== the simulated sensor
def _signals(profile: ProfileModel) -> dict[str, Signal]:
    origin = time.time()
    specs: dict[str, Any] = {}
    if profile.format in ("lines", "binary"):
        for name, spec in profile.fields.items():
            if spec.sim is not None:
                specs[name] = spec.sim
            elif spec.type == "string":
                specs[name] = Constant(signal="constant", value=name)
            elif spec.type == "bool" or spec.bit is not None:
                specs[name] = Constant(signal="constant", value=False)
            else:
                low = spec.valid.min if spec.valid and spec.valid.min is not None else 0
                specs[name] = Constant(signal="constant", value=low)
    else:
        for name, value in _DEFAULTS[profile.format].items():
            specs[name] = Constant(signal="constant", value=value)
        if profile.format == "codes":
            specs["code"] = Step.model_validate({"signal": "step", "every": "1s",  # validated as a profile writes it
                                               "values": ["4006381333931", "5901234123457", "0012345678905"]})
    specs.update(profile.sim.signals)
    return {name: make_signal(spec, origin=origin, seed=n) for n, (name, spec) in enumerate(sorted(specs.items()))}


class SerialSensorSim:
    """One simulated sensor on a pty pair; ``async with`` opens the pair and starts it.

    :attr:`path` is the port for the gateway. :meth:`unplug` closes both ends (the path
    disappears, like a USB adapter pulled out). Counters: ``frames`` sent, ``requests`` seen.
    """

    def __init__(self, profile: ProfileModel, *, every: float | None = None, faults: Faults | None = None,
                 values: dict[str, Any] | None = None) -> None:
        self.profile = profile
        self.every = every if every is not None else profile.sim.every
        self.faults = faults or Faults()
        self.values: dict[str, Any] = dict(values or {})
        """Fixed values that override the signals (tests set them)."""
        self.path = ""
        self.frames = 0
        self.requests = 0
        self._signals = _signals(profile)
        self._request = request_bytes(profile)
        self._master = self._slave = -1
        self._out = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random(7)

    async def __aenter__(self) -> SerialSensorSim:
        self._master, self._slave = os.openpty()
        # Raw and no echo from the start: the gateway may open the port later than we write.
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self._task = asyncio.create_task(self._serve(), name=f"sim[{self.path}]")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.unplug()

    async def unplug(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._out:
            self._out.clear()
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_writer(self._master)
        for fd in (self._master, self._slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = -1

    def sample(self) -> dict[str, Any]:
        now = time.time()
        values = {name: sig.value(now) for name, sig in self._signals.items()}
        values.update(self.values)
        return values

    def frame(self) -> bytes:
        return render_frame(self.profile, self.sample(), bad_checksum=self.faults.take("bad_checksum"))

    def send_raw(self, data: bytes) -> None:
        """Put ``data`` on the line as is (noise, an overlong line, a hand-made frame)."""
        self._write(data)

    def _write(self, data: bytes) -> None:
        """Queue ``data`` for the line; what the pty does not take at once goes when it can. A
        backlog beyond 64 KiB is dropped: nobody reads the port, and a real sensor talks into
        the void too."""
        if self._master < 0:
            return
        if not self._out:
            try:
                data = data[os.write(self._master, data):]
            except BlockingIOError:
                pass
            except OSError as exc:
                log.debug("sim %s: write failed: %s", self.path, exc)
                return
            if not data:
                return
            asyncio.get_running_loop().add_writer(self._master, self._flush)
        if len(self._out) + len(data) <= 65536:
            self._out += data

    def _flush(self) -> None:
        try:
            del self._out[:os.write(self._master, self._out)]
        except BlockingIOError:
            return
        except OSError:
            self._out.clear()
        if not self._out:
            asyncio.get_running_loop().remove_writer(self._master)

    async def _send(self) -> None:
        if self.faults.take("garbage"):
            self._write(bytes(self._rng.randrange(256) for _ in range(self._rng.randint(3, 24))))
        data = self.frame()
        if self.faults.take("truncate"):
            data = data[:max(1, len(data) // 2)]
        self._write(data)
        self.frames += 1

    async def _serve(self) -> None:
        if self._request is None:
            while True:
                if not self.faults.silent:
                    await self._send()
                await asyncio.sleep(self.every)
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self._master, ready.set)
        buf = bytearray()
        try:
            while True:
                await ready.wait()
                ready.clear()
                try:
                    buf += os.read(self._master, 4096)
                except BlockingIOError:
                    continue
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                while (at := buf.find(self._request)) >= 0:
                    del buf[:at + len(self._request)]
                    self.requests += 1
                    if self.faults.silent:
                        continue
                    if self.faults.delay:
                        await asyncio.sleep(self.faults.delay)
                    await self._send()
                if len(buf) > 4096:
                    buf.clear()
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(self._master)


# =========================================================================== CLI
def load_profile(path: Path) -> ProfileModel:
    """A profile file validated like the gateway does; raises ConfigErrors."""
    errors: list[ConfigError] = []
    doc, errs = load_yaml(path, path)
    errors += errs
    model = validate_doc(doc, ProfileModel, errors) if doc is not None else None
    if model is None:
        if not errors:
            errors.append(ConfigError(path, 1, 1, "not a serial profile", "use a profile with protocol: serial"))
        raise ConfigErrors(errors)
    return model


def _fault(text: str) -> tuple[str, float]:
    kind, _sep, rate = text.partition("=")
    if kind not in FAULT_KINDS:
        raise argparse.ArgumentTypeError(f"unknown fault {kind!r}: use {', '.join(FAULT_KINDS)} (e.g. garbage=0.1)")
    try:
        value = float(rate or "1")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the rate is a number from 0 to 1") from None
    return kind, value


def main_serial_sim(argv: Sequence[str] | None = None) -> int:
    """``sluice sim serial PROFILE``: 0 after SIGINT/SIGTERM, 2 for a profile with errors."""
    parser = argparse.ArgumentParser(
        prog="sluice sim serial",
        description="Simulate a serial sensor from its profile on a pseudo-terminal until Ctrl-C; "
                    "prints the port for the gateway's device file.")
    parser.add_argument("profile", type=Path, help="a protocol: serial profile (e.g. config/profiles/gps-nmea.yaml)")
    parser.add_argument("--every", type=parse_duration, default=None, help="output period of a streaming sensor (e.g. 500ms)")
    parser.add_argument("--link", type=Path, default=None,
                        help="also make this symlink to the pty (a stable path for the device file)")
    parser.add_argument("--fault", type=_fault, action="append", default=[], metavar="KIND=RATE",
                        help="per-frame fault rate: garbage, bad_checksum, truncate (e.g. garbage=0.1)")
    parser.add_argument("--delay", type=parse_duration, default=0.0, help="answer requests this late (e.g. 2s)")
    parser.add_argument("--silent", action="store_true", help="send and answer nothing (a dead sensor)")
    args = parser.parse_args(argv)
    try:
        profile = load_profile(args.profile)
    except ConfigErrors as exc:
        for err in exc.errors:
            print(err, file=sys.stderr)
        return 2
    faults = Faults(silent=args.silent, delay=args.delay, rates=dict(args.fault))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with SerialSensorSim(profile, every=args.every, faults=faults) as sim:
            port = sim.path
            if args.link is not None:
                with contextlib.suppress(FileNotFoundError):
                    args.link.unlink()
                args.link.symlink_to(sim.path)
                port = str(args.link)
            print(f"simulating {args.profile.stem} ({profile.format}) on {sim.path}", flush=True)
            print(f"port: {port}", flush=True)
            try:
                await stop.wait()
            finally:
                if args.link is not None:
                    with contextlib.suppress(OSError):
                        args.link.unlink()

    asyncio.run(main())
    return 0
