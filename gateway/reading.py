"""The Reading: what one poll of one device produced, the only thing drivers hand to the core."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Final

FieldValue = float | int | bool | str

GOOD: Final = "good"
"""Every point of the device was read and within its valid range."""
UNCERTAIN: Final = "uncertain"
"""Some points were read, others failed or were outside their valid range (they are omitted)."""
CLOCK_UNSYNCED: Final = "clock_unsynced"
"""Read while the system clock was not known to be synchronised (timestamps may be wrong)."""

QUALITIES: Final = frozenset({GOOD, UNCERTAIN, CLOCK_UNSYNCED})


@dataclass(slots=True)
class Reading:
    """One reading of one device at one instant.

    ``time_ns`` is the wall-clock time of the read in nanoseconds since the Unix epoch (UTC),
    taken when the device answered, never when the reading was stored or sent: a reading that is
    delivered twice is the same point and overwrites itself in InfluxDB.

    ``fields`` maps point names to values (float, int, bool or str); ``tags`` identify the series
    (site, gateway, device, profile and the device's own tags). ``quality`` is one of
    :data:`QUALITIES`.
    """

    device: str
    time_ns: int
    fields: dict[str, FieldValue]
    tags: dict[str, str] = field(default_factory=dict)
    quality: str = GOOD
    measurement: str = "sluice"


_FLOAT32 = struct.Struct("<f")


def shortest_float32(value: float, _pack: Any = _FLOAT32.pack, _unpack: Any = _FLOAT32.unpack) -> float:
    """A short decimal that is the same float32 as ``value`` (a float32 carried in a float64): a
    meter's 230.3 V arrives as the float32 230.3000030517578; we send 230.3 (what the device
    meant, and 6 bytes on the wire instead of 17). Read back as a float32 it gives exactly the
    device's bits.

    7 significant digits (trailing zeros dropped) round-trip almost every float32, 8 most of the
    rest, and 9 every one (14785.4794921875 needs 14785.4795). A value that is no float32 (NaN,
    infinities, or a float64 with more precision) comes back as it is. Hot path: ~2 µs a value."""
    candidate = float("%.7g" % value)  # noqa: UP031 - the fastest formatting here
    if _unpack(_pack(candidate))[0] == value:
        return candidate
    for digits in ("%.8g", "%.9g"):
        candidate = float(digits % value)
        if _unpack(_pack(candidate))[0] == value:
            return candidate
    return value


def float32_text(value: float) -> str:
    """``value`` at float32 precision, for people: the shortest decimal that is the same float32
    as ``value`` rounded to float32 (a scaled float32 such as 1234.5 * 0.1 prints as 123.45)."""
    try:
        single = _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:  # beyond float32's range: it was never a float32
        return repr(value)
    return repr(shortest_float32(single)) if single - single == 0 else repr(value)
