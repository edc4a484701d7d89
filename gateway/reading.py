"""The Reading: what one poll of one device produced, the only thing drivers hand to the core."""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, field
from typing import Any, Final

FieldValue = float | int | bool | str

GOOD: Final = "good"
"""No flag: every point of the device was read and within its valid range, on a trusted clock."""
UNCERTAIN: Final = "uncertain"
"""Some points were read, others failed or were outside their valid range (they are omitted)."""
CLOCK_UNSYNCED: Final = "clock_unsynced"
"""Read while the system clock was not known to be synchronised (timestamps may be wrong)."""

FLAGS: Final = frozenset({UNCERTAIN, CLOCK_UNSYNCED})
"""The quality flags a reading may carry, any number of them at once."""
QUALITIES: Final = frozenset({GOOD, UNCERTAIN, CLOCK_UNSYNCED, f"{CLOCK_UNSYNCED},{UNCERTAIN}"})
"""Every canonical quality string (see :func:`quality`)."""


@functools.lru_cache(maxsize=256)  # a handful of distinct inputs; called for every reading read on an unsynced clock
def quality(*parts: str) -> str:
    """The canonical quality of a reading whose flags are the union of ``parts``.

    A reading's quality is a *set* of flags (:data:`FLAGS`), kept everywhere (``Reading``, the
    outbox, line protocol, JSON) as one string with a stable encoding: the flags sorted and
    joined with commas (``"clock_unsynced,uncertain"``), or ``"good"`` for the empty set. Each part
    is a flag or such a string (``"good"`` adds nothing), so ``quality(r.quality, CLOCK_UNSYNCED)``
    adds a flag and keeps the others. This is the one place flags are combined: never assign a
    flag over a quality. Raises ValueError for an unknown flag."""
    flags: set[str] = set()
    for part in parts:
        flags |= quality_flags(part)
    return ",".join(sorted(flags)) if flags else GOOD


def quality_flags(value: str) -> frozenset[str]:
    """The set of flags a quality string (canonical or not: any order, spaces) stands for; ``good``
    and ``""`` are the empty set. Raises ValueError for an unknown flag."""
    flags = frozenset(f.strip() for f in value.split(",")) - {GOOD, ""}
    unknown = flags - FLAGS
    if unknown:
        raise ValueError(f"unknown quality flag(s) {', '.join(sorted(unknown))} — use {', '.join(sorted(FLAGS))}")
    return flags


@dataclass(slots=True)
class Reading:
    """One reading of one device at one instant.

    ``time_ns`` is the wall-clock time of the read in nanoseconds since the Unix epoch (UTC),
    taken when the device answered, never when the reading was stored or sent: a reading that is
    delivered twice is the same point and overwrites itself in InfluxDB.

    ``fields`` maps point names to values (float, int, bool or str); ``tags`` identify the series
    (site, gateway, device, profile and the device's own tags). ``quality`` is a set of flags in
    its canonical string form (:func:`quality`): ``"good"``, ``"uncertain"``, ``"clock_unsynced"``
    or ``"clock_unsynced,uncertain"``; add a flag with ``quality(r.quality, flag)``.
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
