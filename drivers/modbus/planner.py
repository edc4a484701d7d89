"""The request planner: a device's points -> the fewest read requests."""

from __future__ import annotations

from collections.abc import Sequence

from drivers.modbus.codec import Request
from drivers.modbus.profile import BIT_KINDS, MAX_BITS, MAX_REGISTERS, Point


# =========================================================================== planner
def plan(points: Sequence[Point], max_gap: int = 8, max_registers: int = MAX_REGISTERS) -> list[Request]:
    """Group points into the fewest read requests.

    Points are grouped per kind (one unit id per device, so per unit id too), sorted by address
    and merged while the unused registers between two neighbours are at most ``max_gap`` and
    the request stays within ``max_registers`` (at most 125). For coils and discrete inputs the
    gap is ``max_gap * 16`` bits — sixteen bits travel in the space of one register — and the
    limit is 2000 bits. A point is never split across requests; overlapping points share one.
    Requests come out by kind (coil, discrete, holding, input), then address.
    """
    requests: list[Request] = []
    for kind in ("coil", "discrete", "holding", "input"):
        group = sorted((p for p in points if p.kind == kind), key=lambda p: (p.address, p.end))
        if not group:
            continue
        bits = kind in BIT_KINDS
        limit = MAX_BITS if bits else min(max_registers, MAX_REGISTERS)
        gap = max_gap * 16 if bits else max_gap
        start, end, members = group[0].address, group[0].end, [group[0]]
        for point in group[1:]:
            if point.address - end <= gap and max(end, point.end) - start <= limit:
                end = max(end, point.end)
                members.append(point)
                continue
            requests.append(Request(kind, start, end - start, tuple(members)))
            start, end, members = point.address, point.end, [point]
        requests.append(Request(kind, start, end - start, tuple(members)))
    return requests


def plan_summary(device_id: str, requests: Sequence[Request]) -> str:
    """`workshop-meter: 3 requests (input 0+76, holding 256+4, coil 0+8) for 42 points`."""
    npoints = sum(len(r.points) for r in requests)
    noun = "request" if len(requests) == 1 else "requests"
    return f"{device_id}: {len(requests)} {noun} ({', '.join(map(str, requests))}) for {npoints} points"

