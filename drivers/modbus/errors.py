"""The failures of a Modbus read, each with a ``kind`` for counting and logging."""

from __future__ import annotations

from typing import Final


class ModbusError(Exception):
    """A failed read; ``kind`` names the class of failure for counting and logging."""

    kind = "error"


class ModbusTimeout(ModbusError):
    kind = "timeout"


class ModbusProtocolError(ModbusError):
    """The reply was not a valid answer to the request (wrong function, length, framing)."""

    kind = "bad_response"


class ModbusFrameError(ModbusError):
    """A serial (RTU) reply that arrived damaged: ``kind`` is ``crc`` (checksum wrong),
    ``truncated`` (the frame stopped short) or ``garbage`` (bytes that are no frame). The link
    stays usable, so the request is worth another attempt. ``data``: the bytes that came."""

    def __init__(self, kind: str, message: str, data: bytes = b"") -> None:
        super().__init__(message)
        self.kind = kind
        self.data = data


class ModbusConnectionError(ModbusError):
    """Connecting failed or the connection was lost: ``kind`` is ``refused``, ``unreachable``
    or ``disconnected``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


ILLEGAL_ADDRESS: Final = 2
"""The exception a device answers for a read that touches a register it does not have."""

EXCEPTION_CODES: Final[dict[int, tuple[str, str]]] = {
    1: ("illegal function", "the device does not serve this register type — check kind: in the profile"),
    2: ("illegal data address", "the device has no register at some address of this request — check the "
        "profile's addresses against the manual"),
    3: ("illegal data value", "the device refuses this many registers at once — lower max_registers in "
        "the profile"),
    4: ("device failure", "the device reports an internal fault — check it on site"),
    5: ("acknowledge", "the device is busy with a long operation — it should answer later"),
    6: ("device busy", "the device is busy — poll less often if this persists"),
    10: ("gateway path unavailable", "the TCP gateway has no route to this unit id — check the "
         "converter's configuration and the unit id"),
    11: ("gateway target failed to respond", "the device behind the TCP gateway does not answer — check "
         "its unit id, RS485 wiring (A/B, termination), baud rate and power"),
}


class ModbusExceptionResponse(ModbusError):
    """The device answered with a Modbus exception ``code``."""

    kind = "exception"

    def __init__(self, code: int) -> None:
        self.code = code
        name, self.hint = EXCEPTION_CODES.get(code, (f"exception {code}", "see the device's manual"))
        super().__init__(f"exception {code} ({name})")

