"""The serial sensor poller, one per port, and the driver entry points (``protocol: serial``).

How often a streaming device produces a reading (the rate rule)
    A streaming sensor (no ``request:``) sends at its own pace. At every multiple of the
    device's ``interval`` (aligned to the wall clock) the poller emits **one** reading holding,
    for each field, the **latest value received during that interval**, stamped with the time
    the last good frame of the interval arrived. For most sensors that is simply the latest
    complete frame; for NMEA, GGA and RMC sentences merge (position and altitude from GGA,
    speed from RMC). An interval without a good frame emits nothing. **Code readers** are the
    exception: every scan is emitted at once as its own reading (field ``code``), never merged
    or dropped. Request/response devices (``request:`` set) are polled every ``interval``.

When a device is down
    A streaming device that sent no good frame for its ``timeout`` (set it above the sensor's
    own output period) is *down* (``silent``, or the kind of the bad frames it sent instead);
    a polled device is down when a request gets no good reply after its retries. A code reader
    is never down for being quiet: nobody may be scanning. Health is judged once per interval
    and logged once per state change (:class:`gateway.polling.Health`).

A noisy line
    Bad frames of every kind (garbage, checksum, truncated, overlong) are counted per kind in the
    device's status (``sluice_device_errors_total`` in /metrics), never logged one by one. Bad
    frames between good ones — or, for a polled sensor that has answered, a poll whose replies
    were all spoilt — put the sensor in one state, ``degraded:bad_frames``, logged once with the
    counts; it counts as clean again only after ``NOISE_SETTLE`` (60 s, at least ten intervals)
    without a bad frame, and that line carries the counts of the noisy spell.

A scale's frame is its whole state: the latest frame of an interval replaces the earlier ones
(an overload line has no weight, and the weight before it is not kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from drivers.serial.framing import FrameError
from drivers.serial.parsers import Parsed, make_decoder, request_bytes
from drivers.serial.profile import DeviceModel, ProfileModel, SerialDevice
from gateway.driver import (
    Claim,
    DeviceStatus,
    Emit,
    Problem,
    serial_claim,
    slow_timeout,
)
from gateway.polling import Backoff, Health, Schedule, format_duration, next_aligned
from gateway.reading import GOOD, UNCERTAIN, FieldValue, Reading

__all__ = ["PROFILE_KIND", "PROTOCOLS", "DeviceModel", "ProfileModel", "SerialSensorPoller", "check", "claims",
           "make_pollers"]

PROTOCOLS: Final = frozenset({"serial"})
PROFILE_KIND: Final = "serial"

log = logging.getLogger(__name__)

Format = Literal["lines", "nmea", "scale", "binary", "codes"]
TextType = Literal["float", "int", "string", "bool"]

# =========================================================================== poller
_HINT: Final = {
    "port": "check that the adapter is plugged in, the port path (ls /dev/serial/by-id/), and that no other "
            "program holds the port",
    "silent": "check the cable (TX/RX crossed?), that the sensor is powered and set to send continuously, "
              "and the baud rate",
    "timeout": "check the cable, that the sensor is powered, the baud rate and the profile's request:",
    "garbage": "check the baud rate, parity and data bits against the sensor's manual, and the profile's pattern",
    "checksum": "noise on the line or wrong line settings: check the cable, shielding, baud rate and parity, "
                "and the profile's checksum:",
    "overlong": "check the baud rate and the profile's delimiter",
    "truncated": "bytes are lost: check the cable and the baud rate",
}


NOISE: Final = "bad_frames"
"""The state of a sensor whose line brings bad frames (of any kind): one state, so that garbage
and checksum errors taking turns do not log a line each."""
NOISE_SETTLE: Final = 60.0
"""Seconds without a bad frame (at least ten intervals) before a noisy line counts as clean again."""


@dataclass(slots=True)
class _Noise:
    """Bad and good frames since the sensor's line was last clean (the counts its log lines carry)."""

    bad: Counter[str] = field(default_factory=Counter)
    good: int = 0
    last_bad: float = -math.inf  # monotonic time of the last bad frame

    def text(self) -> str:
        kinds = ", ".join(f"{kind} {n}" for kind, n in self.bad.most_common())
        return f"{sum(self.bad.values())} bad: {kinds}; {self.good} good"

    def example(self, error: FrameError | None) -> str:
        return error.message if error is not None else "none in the last interval"

    def hint(self) -> str:
        return _HINT.get(self.bad.most_common(1)[0][0], "") if self.bad else ""


@dataclass(slots=True)
class _Window:
    """What arrived since the last interval tick (streaming) or the last request (polled)."""

    fields: dict[str, FieldValue] = field(default_factory=dict)
    invalid: set[str] = field(default_factory=set)
    good: int = 0
    time_ns: int = 0
    error: FrameError | None = None
    errors: int = 0


class SerialSensorPoller:
    """Owns one serial port and the one sensor on it (see :class:`gateway.driver.Poller`).

    The port is opened in ``run`` (and reopened with capped backoff when it goes away: a USB
    adapter unplugged and plugged back). Bytes are read by an event-loop reader callback into
    the decoder's bounded buffer; parsed frames go to the current window. Nothing here blocks
    and no fault of the device raises out of ``run`` or ``poll_once``.
    """

    def __init__(self, device: SerialDevice) -> None:
        self.device = device
        cfg = device.config
        self.port = cfg.port
        self.name = f"serial[{cfg.port}]"
        self.status: dict[str, DeviceStatus] = {device.id: DeviceStatus()}
        self._health = Health(device.id, self.status[device.id], log)
        self._link = Health(f"port {cfg.port}", None, log, words=("opened", "reopened"))
        self._decoder = make_decoder(device.profile)
        self._request = request_bytes(device.profile)
        self._codes = device.profile.format == "codes"
        self._reopen = Backoff(min(cfg.interval, 1.0), cfg.backoff_max)
        self._serial: Any = None
        self._fd = -1
        self._lost = asyncio.Event()
        self._arrived = asyncio.Event()
        self._window = _Window()
        self._noise = _Noise()
        self._whole_frames = device.profile.format == "scale"  # each frame is the whole state: replaces
        self._last_good = time.monotonic()
        self._emit: Emit | None = None
        self._where = f"{cfg.port} ({device.profile_name})"

    async def __aenter__(self) -> SerialSensorPoller:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close()

    # ------------------------------------------------------------------ port
    def _open(self) -> bool:
        import serial  # noqa: PLC0415 - pyserial only when a port is opened: loading a configuration needs none

        cfg = self.device.config
        try:
            port = serial.Serial(port=None, baudrate=cfg.baudrate, bytesize=cfg.bytesize,
                                 parity=cfg.parity, stopbits=cfg.stopbits, timeout=0, exclusive=True)
            port.port = cfg.port
            port.open()
        except (OSError, ValueError, serial.SerialException) as exc:
            message = f"cannot open {cfg.port}: {exc}"
            self._link.down("port", f"{message} (device {self.device.id}) — {_HINT['port']}")
            self._health.count("port", message)
            self._health.down("port", "", quiet=True)
            return False
        self._serial = port
        self._fd = port.fileno()
        os.set_blocking(self._fd, False)
        with contextlib.suppress(OSError):
            port.reset_input_buffer()  # what queued while nobody listened is stale
        self._decoder.reset()
        self._lost.clear()
        self._last_good = time.monotonic()
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)
        self._link.ok(detail=f"{cfg.baudrate} baud {cfg.bytesize}{cfg.parity}{cfg.stopbits:g}, "
                      f"device {self.device.id}")
        self._reopen.reset()
        return True

    def _close(self) -> None:
        port, self._serial = self._serial, None
        if port is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._fd)
        self._fd = -1
        with contextlib.suppress(Exception):
            port.close()

    def _port_lost(self, reason: str) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._fd)
        message = f"{self.port} went away ({reason})"
        self._link.down("lost", f"{message}, device {self.device.id}; reopening — {_HINT['port']}")
        self._health.count("port", message)
        self._health.down("port", "", quiet=True)
        self._lost.set()
        self._arrived.set()

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._port_lost(exc.strerror or str(exc))
            return
        if not data:
            self._port_lost("end of file")
            return
        now_ns = time.time_ns()
        for item in self._decoder.feed(data, time.monotonic()):
            self._take(item, now_ns)
        self._arrived.set()

    def _take(self, item: Parsed | FrameError, now_ns: int) -> None:
        w = self._window
        if isinstance(item, FrameError):
            w.errors += 1
            w.error = item
            self._noise.bad[item.kind] += 1
            self._noise.last_bad = time.monotonic()
            self._health.count(item.kind, f"{self._where}: {item.message}")
            return
        fields, invalid = item
        w.good += 1
        self._noise.good += 1
        self._last_good = time.monotonic()
        if invalid:
            self._health.count("invalid", f"invalid values: {', '.join(invalid)}")
        if self._codes and fields and self._emit is not None:
            if not self._settling():
                self._clean(now_ns)
            self._emit(self._reading(fields, now_ns, invalid=()))
            return
        if fields and self._whole_frames:
            w.fields = dict(fields)  # a scale's overload line has no weight: the last one must not stay
            w.time_ns = now_ns
        elif fields:
            w.fields.update(fields)
            w.time_ns = now_ns
        w.invalid.update(invalid)

    def _settling(self) -> bool:
        """The line is noisy and a bad frame arrived too recently for it to count as clean again."""
        settle = max(NOISE_SETTLE, 10 * self.device.config.interval)
        return self._health.state == f"degraded:{NOISE}" and time.monotonic() - self._noise.last_bad < settle

    def _noisy(self, example: str) -> str:
        return (f"{self._where}: bad frames between good ones ({self._noise.text()}), e.g. {example} — "
                f"{self._noise.hint()}; counted in /metrics, logged again when the line is clean")

    def _clean(self, time_ns: int | None) -> None:
        """Everything arrived well: ok (with the counts of the noise it leaves, if any)."""
        noise, self._noise = self._noise, _Noise(last_bad=self._noise.last_bad)
        self._health.ok(time_ns, self._where, summary=noise.text() if noise.bad else "")

    def _reading(self, fields: dict[str, FieldValue], time_ns: int, invalid: Any) -> Reading:
        dev = self.device
        return Reading(dev.id, time_ns, dict(fields), dict(dev.tags), UNCERTAIN if invalid else GOOD, dev.measurement)

    # ------------------------------------------------------------------ running
    async def run(self, emit: Emit) -> None:
        self._emit = emit
        while True:
            if self._serial is None and not self._open():
                await asyncio.sleep(self._reopen.next())
                continue
            if self._request is not None:
                await self._run_polled(emit)
            else:
                await self._run_streaming(emit)
            self._close()  # the port went away: reopen it
            await asyncio.sleep(self._reopen.next())

    async def _wait_lost(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the port goes away first; True if it did."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._lost.wait()
        return self._lost.is_set()

    async def _run_streaming(self, emit: Emit) -> None:
        interval = self.device.config.interval
        self._window = _Window()
        while not await self._wait_lost(next_aligned(interval, time.time()) - time.time()):
            self._judge(emit)

    def _judge(self, emit: Emit) -> None:
        """The end of one streaming interval: emit the window's fields, judge health."""
        w, self._window = self._window, _Window()
        status = self._health.status
        status.polls += 1
        if w.fields:
            emit(self._reading(w.fields, w.time_ns, w.invalid))
        if w.good:
            if w.error is not None or self._settling():
                self._health.degraded(NOISE, self._noisy(self._noise.example(w.error)), w.time_ns or None)
            elif w.invalid:
                self._health.degraded("invalid", f"{self._where}: {', '.join(sorted(w.invalid))} outside the valid "
                                      "range; left out of the reading — check the sensor and the profile's valid:",
                                      w.time_ns or None)
            elif not self._codes or w.fields:
                self._clean(w.time_ns or None)
            return
        quiet = time.monotonic() - self._last_good
        if w.error is not None and (self._codes or quiet >= self.device.config.timeout):
            message = (f"{self._where}: only bad frames for {format_duration(quiet)} ({self._noise.text()}), e.g. "
                       f"{w.error.message} — {self._noise.hint()}")
            if self._codes:
                self._health.degraded(NOISE, message)
            else:
                self._health.down(NOISE, message)
        elif not self._codes and quiet >= self.device.config.timeout:
            self._health.count("silent", "no frame")
            self._health.down("silent", f"{self._where}: no complete frame for {format_duration(quiet)} — "
                              f"{_HINT['silent']}")

    async def _run_polled(self, emit: Emit) -> None:
        cfg = self.device.config
        schedule: Schedule[int] = Schedule()
        schedule.add(0, cfg.interval, cfg.backoff_max)
        while True:
            _key, when = schedule.first()
            if await self._wait_lost(when - time.time()):
                return
            reading = await self._transact(probing=self._health.is_down)
            if self._lost.is_set():
                return
            if reading is None:
                schedule.failed(0)
            else:
                schedule.succeeded(0)
                emit(reading)

    async def _transact(self, *, probing: bool) -> Reading | None:
        """Send the request and read the reply; ``retries`` extra attempts (none while down)."""
        cfg = self.device.config
        self._health.status.polls += 1
        attempts = 1 if probing else 1 + cfg.retries
        problem: FrameError | None = None
        for _attempt in range(attempts):
            with contextlib.suppress(OSError):
                self._serial.reset_input_buffer()  # a late reply to the last request is not this one's
            self._decoder.reset()
            self._window = w = _Window()
            if not await self._write(self._request or b""):
                return None
            deadline = time.monotonic() + cfg.timeout
            while not w.good and w.error is None and not self._lost.is_set():
                self._arrived.clear()
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._arrived.wait()
            if self._lost.is_set():
                return None
            if w.good:
                if w.fields:
                    if w.invalid:
                        self._health.degraded("invalid", f"{self._where}: {', '.join(sorted(w.invalid))} outside "
                                              "the valid range; left out — check the sensor and valid:", w.time_ns)
                    elif self._settling():
                        self._health.degraded(NOISE, self._noisy("none in this reply"), w.time_ns)  # not logged again
                    else:
                        self._clean(w.time_ns)
                    return self._reading(w.fields, w.time_ns, w.invalid)
                problem = FrameError("garbage", "a reply without any value")
            elif w.error is not None:
                problem = w.error
            else:
                partial = self._decoder.framer.pending
                kind = "truncated" if partial else "timeout"
                what = (f"a partial reply ({partial} bytes)" if partial else "no reply") + \
                    f" within {format_duration(cfg.timeout)}"
                problem = FrameError(kind, what)
                self._health.count(kind, f"{self._where}: {what}")
                if partial:
                    self._noise.bad[kind] += 1
                    self._noise.last_bad = time.monotonic()
        assert problem is not None
        tries = "" if attempts == 1 else f" ({attempts} attempts)"
        if problem.kind != "timeout" and self._noise.bad and self._health.state in ("ok", f"degraded:{NOISE}"):
            # It answers, but the line spoils replies: a noisy line (one state), not a device going up and down.
            self._health.degraded(NOISE, self._noisy(f"{problem.message}{tries}"), self._health.status.last_success_ns)
            return None
        self._health.down(problem.kind, f"{self._where}: {problem.message}{tries} — {_HINT.get(problem.kind, '')}")
        return None

    async def _write(self, data: bytes) -> bool:
        view = memoryview(data)
        deadline = time.monotonic() + self.device.config.timeout
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._health.count("timeout", "output buffer full")
                    return False
                await asyncio.sleep(0.005)
                continue
            except OSError as exc:
                self._port_lost(exc.strerror or str(exc))
                return False
            view = view[n:]
        return True

    async def poll_once(self) -> list[Reading]:
        """Open the port if needed; one request/reply, or one interval of a streaming sensor
        (up to its timeout, at least its interval)."""
        if self._serial is None and not self._open():
            return []
        if self._request is not None:
            reading = await self._transact(probing=False)
            return [reading] if reading is not None else []
        out: list[Reading] = []
        self._emit = out.append
        self._window = _Window()
        cfg = self.device.config
        deadline = time.monotonic() + max(cfg.timeout, cfg.interval)
        while not (self._window.fields or out) and time.monotonic() < deadline:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - time.monotonic()):
                    await self._arrived.wait()
            if self._lost.is_set():
                return out
        self._judge(out.append)
        return out


# =========================================================================== driver entry points
def make_pollers(devices: Sequence[SerialDevice]) -> list[SerialSensorPoller]:
    """One poller (one task) per port; :func:`check` makes sure no port has two sensors."""
    return [SerialSensorPoller(dev) for dev in devices]


def claims(device: SerialDevice) -> list[Claim]:
    """The serial port (a sensor owns it: :func:`check` refuses a second one on it)."""
    return [serial_claim(device.config.port)]


def check(devices: Sequence[SerialDevice]) -> list[Problem]:
    """A serial sensor owns its port: two devices on one port is a mistake."""
    problems: list[Problem] = []
    # A streaming sensor's timeout is how long it may stay quiet: longer than its interval is normal.
    problems += filter(None, (slow_timeout(d) for d in devices if d.profile.request is not None))
    seen: dict[str, SerialDevice] = {}
    for dev in devices:
        key = os.path.normpath(dev.config.port)
        other = seen.get(key)
        if other is not None:
            problems.append(Problem(dev, ("port",), f"{dev.config.port} is already used by '{other.id}' ({other.source})",
                                    "a serial sensor needs its own port: give this device its own port, or remove one"))
        else:
            seen[key] = dev
    return problems
