"""The Reading: what one poll of one device produced, the only thing drivers hand to the core."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

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
