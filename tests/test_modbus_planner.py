"""Planner tables: a device's points -> the fewest read requests within the protocol limits."""

from __future__ import annotations

import pytest

from drivers.modbus.planner import plan, plan_summary
from drivers.modbus.profile import MAX_BITS, MAX_REGISTERS, Point


def reg(name: str, address: int, width: int = 1, kind: str = "holding") -> Point:
    type_ = {1: "uint16", 2: "float32", 4: "float64"}.get(width, "string")
    return Point(name, kind, address, width, type_)


def bit(name: str, address: int, kind: str = "coil") -> Point:
    return Point(name, kind, address, 1, "bool")


def shape(points: list[Point], **kw: int) -> list[tuple[str, int, int, list[str]]]:
    return [(r.kind, r.address, r.count, [p.name for p in r.points]) for r in plan(points, **kw)]


CASES = [
    ("adjacent merge", [reg("a", 0, 2), reg("b", 2, 2)], {}, [("holding", 0, 4, ["a", "b"])]),
    ("gap within max_gap", [reg("a", 0, 2), reg("b", 10, 2)], {"max_gap": 8}, [("holding", 0, 12, ["a", "b"])]),
    ("gap just over max_gap", [reg("a", 0, 2), reg("b", 11, 2)], {"max_gap": 8},
     [("holding", 0, 2, ["a"]), ("holding", 11, 2, ["b"])]),
    ("max_gap 0 merges only neighbours", [reg("a", 0), reg("b", 1), reg("c", 3)], {"max_gap": 0},
     [("holding", 0, 2, ["a", "b"]), ("holding", 3, 1, ["c"])]),
    ("unsorted input", [reg("b", 4), reg("a", 0)], {}, [("holding", 0, 5, ["a", "b"])]),
    ("overlapping points share a request", [reg("f", 0, 2), reg("hi", 0), reg("lo", 1)], {"max_gap": 0},
     [("holding", 0, 2, ["hi", "f", "lo"])]),
    ("kinds never mix", [reg("h", 0), reg("i", 0, kind="input"), bit("c", 0), bit("d", 0, "discrete")], {},
     [("coil", 0, 1, ["c"]), ("discrete", 0, 1, ["d"]), ("holding", 0, 1, ["h"]), ("input", 0, 1, ["i"])]),
    ("125-register limit", [reg("a", 0, 2), reg("b", 123, 2), reg("c", 124, 2)], {"max_gap": 124},
     [("holding", 0, 125, ["a", "b"]), ("holding", 124, 2, ["c"])]),
    ("profile's max_registers", [reg(f"p{i}", 2 * i, 2) for i in range(6)], {"max_registers": 5},
     [("holding", 0, 4, ["p0", "p1"]), ("holding", 4, 4, ["p2", "p3"]), ("holding", 8, 4, ["p4", "p5"])]),
    ("a point is never split: float64 at the limit",
     [reg("a", 0, 2), reg("b", 2, 4)], {"max_registers": 5},
     [("holding", 0, 2, ["a"]), ("holding", 2, 4, ["b"])]),
    ("string spanning many registers", [reg("serial", 100, 10), reg("v", 110, 2)], {},
     [("holding", 100, 12, ["serial", "v"])]),
    ("string alone exceeds what is left", [reg("v", 0, 2), reg("s", 2, 120), reg("w", 122, 4)], {},
     [("holding", 0, 122, ["v", "s"]), ("holding", 122, 4, ["w"])]),
    ("coil gaps count in bits: max_gap * 16", [bit("a", 0), bit("b", 129), bit("c", 300)], {"max_gap": 8},
     [("coil", 0, 130, ["a", "b"]), ("coil", 300, 1, ["c"])]),
    ("2000-bit limit", [bit("a", 0), bit("m", 1000), bit("b", 1999), bit("c", 2000)], {"max_gap": 124},
     [("coil", 0, 2000, ["a", "m", "b"]), ("coil", 2000, 1, ["c"])]),
    ("max_registers does not limit bits", [bit("a", 0), bit("b", 99)], {"max_registers": 10},
     [("coil", 0, 100, ["a", "b"])]),
    ("top of the address space", [reg("a", 65534, 2)], {}, [("holding", 65534, 2, ["a"])]),
]


@pytest.mark.parametrize(("points", "kw", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(points: list[Point], kw: dict[str, int], expected: list[tuple[str, int, int, list[str]]]) -> None:
    assert shape(points, **kw) == expected


def test_plan_respects_limits_on_a_big_map() -> None:
    points = [reg(f"r{a}", a, 2) for a in range(0, 3000, 3)] + [bit(f"c{a}", a) for a in range(0, 9000, 7)]
    requests = plan(points, max_gap=20)
    covered = [p.name for r in requests for p in r.points]
    assert sorted(covered) == sorted(p.name for p in points)
    for r in requests:
        assert r.count <= (MAX_BITS if r.kind == "coil" else MAX_REGISTERS)
        assert all(r.address <= p.address and p.end <= r.address + r.count for p in r.points)


def test_summary_line() -> None:
    points = [reg(f"v{i}", 2 * i, 2, "input") for i in range(38)] + [reg("e", 256, 4), bit("c", 0), bit("d", 7)]
    assert plan_summary("workshop-meter", plan(points)) == (
        "workshop-meter: 3 requests (coil 0+8, holding 256+4, input 0+76) for 41 points")
