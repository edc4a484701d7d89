"""Benchmark of the Modbus codec: our framing and PDU code against pymodbus 3.16's framer and
PDU classes doing the same job, per read transaction, under our own transport and scheduling
(no sockets, no event loop: only the codec's CPU).

Transactions: read 10 and 125 holding registers (function 3) and 2000 coils (function 1), each
framed as Modbus TCP (MBAP) and as RTU (CRC-16). One transaction is

* **ours** — exactly the drivers' functions: :func:`drivers.modbus.codec.mbap_request` +
  :func:`~drivers.modbus.codec.mbap_split` + :func:`~drivers.modbus.codec.read_reply_data` (what
  ``ModbusTcpClient.read`` and its protocol's ``data_received`` run), or
  :func:`drivers.modbus.rtu_client.rtu_frame` + :func:`~drivers.modbus.rtu_client.find_reply` +
  :func:`~drivers.modbus.codec.read_reply_data` (what ``ModbusRtuClient.read``/``_scan`` run): the
  request frame out, the reply frame in a receive buffer, checked (transaction id or unit id +
  CRC, function code, byte count), the reply's data bytes out;
* **pymodbus** — its public classes: ``ReadHoldingRegistersRequest``/``ReadCoilsRequest`` +
  ``FramerSocket``/``FramerRTU(DecodePDU(is_server=False))``: ``buildFrame(request)``, then
  ``handleFrame(reply, dev_id, tid)`` -> a response PDU whose function code is checked
  (``isError()``), its ``registers`` (list of int) or ``bits`` (list of bool) out.

Level ``frame`` stops there (ours hands data bytes to the value decoder, pymodbus a list of
registers or bits). Level ``values`` goes on to the point values of a typical profile (10
registers = 5 float32; 125 = 62 float32 + 1 uint16; 2000 coils = 2000 bool points) with the one
value decoder both would use, our :class:`drivers.modbus.codec.RequestDecoder` (pymodbus's
``convert_from_registers`` knows word order only, not ``BADC``, scale, offset or valid ranges):
pymodbus's registers are packed back to bytes for it; for coils pymodbus's bit list is indexed per
point where ours unpacks the bits itself.

Two measures, since the machine is shared with busy processes:

* ``time.process_time`` per transaction: best of ``--runs`` runs of ``--n`` transactions;
* instructions per transaction counted by ``valgrind --tool=callgrind`` (``--callgrind``):
  the difference between a run of ``--cg-n`` + 200 transactions and one of 200, divided by
  ``--cg-n`` (start-up, imports and warm-up cancel out). Repeatable whatever else runs
  (``PYTHONHASHSEED=0``).

A third table measures CRC-16/MODBUS alone (:func:`drivers.wire.crc16`, the one shared
implementation, against the serial driver's former copy and pymodbus's ``FramerRTU.compute_CRC``),
and a last check feeds both RTU framers a reply behind two bytes of line noise.

    .venv/bin/python bench/modbus_codec.py [--n 20000] [--runs 7] [--callgrind] [--crc-only]

Prints figures; asserts only that both sides decode the same values.
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pymodbus.framer import FramerRTU, FramerSocket  # noqa: E402
from pymodbus.pdu import DecodePDU, ModbusPDU, ReadCoilsRequest, ReadHoldingRegistersRequest  # noqa: E402

from drivers.modbus.codec import RequestDecoder, mbap_request, mbap_split, read_reply_data  # noqa: E402
from drivers.modbus.planner import plan  # noqa: E402
from drivers.modbus.profile import Point  # noqa: E402
from drivers.modbus.rtu_client import find_reply  # noqa: E402
from drivers.wire import rtu_frame  # noqa: E402
from drivers.wire import crc16  # noqa: E402

UNIT: Final = 1
TID: Final = 1
CASES: Final = ("tcp-hr10", "tcp-hr125", "tcp-coils2000", "rtu-hr10", "rtu-hr125", "rtu-coils2000")
Transaction = Callable[[], Any]


def _points(what: str) -> list[Point]:
    if what == "hr10":
        return [Point(f"f{i}", "holding", 2 * i, 2, "float32", "ABCD") for i in range(5)]
    if what == "hr125":
        return [Point(f"f{i}", "holding", 2 * i, 2, "float32", "ABCD") for i in range(62)] + \
            [Point("u", "holding", 124, 1, "uint16", "ABCD")]
    return [Point(f"c{i}", "coil", i, 1, "bool", "ABCD") for i in range(2000)]


def _reply_data(function: int, count: int) -> bytes:
    """Deterministic data bytes for a reply: float32 values 0.5, 1.5, ... (and a uint16), or bits."""
    if function == 1:
        return bytes((i * 37) & 0xFF for i in range((count + 7) // 8))
    words = [w for i in range(count // 2) for w in struct.unpack(">2H", struct.pack(">f", i + 0.5))]
    words += [1234] * (count - len(words))
    return struct.pack(f">{count}H", *words)


def _setup(case: str) -> tuple[str, int, int, bytes, RequestDecoder]:
    transport, what = case.split("-")
    (request,) = plan(_points(what))
    function, count = request.function, request.count
    pdu = bytes((function, len(_reply_data(function, count)))) + _reply_data(function, count)
    reply = (struct.pack(">HHHB", TID, 0, len(pdu) + 1, UNIT) + pdu) if transport == "tcp" else rtu_frame(UNIT, pdu)
    return transport, function, count, reply, RequestDecoder(request)


def ours(case: str, level: str) -> Transaction:
    transport, function, count, reply, decoder = _setup(case)
    nbytes = decoder.nbytes
    values = level == "values"

    def finish(data: bytes) -> Any:
        """What the poller does with the client's data bytes: the values, at level ``values``."""
        if not values:
            return data
        out: dict[str, Any] = {}
        decoder.decode(data, out)
        return out

    def tcp() -> Any:
        request = mbap_request(TID, UNIT, function, 0, count)
        buf = bytearray()  # the protocol's receive buffer, as in _Connection.data_received
        buf += reply
        found = mbap_split(buf)
        assert found is not None and found[0] == TID and len(request) == 12
        _tid, end = found
        pdu = bytes(buf[7:end])
        del buf[:end]
        return finish(read_reply_data(pdu, function, count))

    def rtu() -> Any:
        request = rtu_frame(UNIT, struct.pack(">BHH", function, 0, count))
        buf = bytearray()  # ModbusRtuClient._on_data / _scan
        buf += reply
        found = find_reply(buf, UNIT, function, nbytes)
        assert found is not None and len(request) == 8
        start, end = found
        frame = bytes(buf[start + 1:end - 2])
        buf.clear()
        return finish(read_reply_data(frame, function, count))

    return tcp if transport == "tcp" else rtu


def theirs(case: str, level: str) -> Transaction:
    transport, function, count, reply, decoder = _setup(case)
    framer = (FramerSocket if transport == "tcp" else FramerRTU)(DecodePDU(is_server=False))
    request_class: type[ModbusPDU] = ReadCoilsRequest if function == 1 else ReadHoldingRegistersRequest
    tid = TID if transport == "tcp" else 0  # RTU frames carry no transaction id
    values = level == "values"
    coil_steps = [(p.name, p.address) for p in _points(case.split("-")[1])] if function == 1 else []

    def transaction() -> Any:
        request = request_class(address=0, count=count, dev_id=UNIT, transaction_id=tid)
        frame = framer.buildFrame(request)
        used, pdu = framer.handleFrame(reply, UNIT, tid)
        assert pdu is not None and used == len(reply) and len(frame) in (8, 12)
        if pdu.isError() or pdu.function_code != function:
            raise RuntimeError(f"exception reply {pdu}")
        if function == 1:
            bits = pdu.bits
            if not values:
                return bits
            out: dict[str, Any] = {}
            for name, rel in coil_steps:
                out[name] = bits[rel]
            return out
        registers = pdu.registers
        if len(registers) != count:
            raise RuntimeError(f"{len(registers)} registers, expected {count}")
        if not values:
            return registers
        out = {}
        decoder.decode(struct.pack(f">{count}H", *registers), out)
        return out

    return transaction


SIDES: Final[dict[str, Callable[[str, str], Transaction]]] = {"ours": ours, "pymodbus": theirs}


def _same(case: str) -> None:
    """Both sides return the same values, and the same registers/bits at frame level."""
    a, b = ours(case, "values")(), theirs(case, "values")()
    assert a == b, (case, a, b)
    raw, regs = ours(case, "frame")(), theirs(case, "frame")()
    if case.endswith("coils2000"):
        assert [bool((raw[i // 8] >> (i % 8)) & 1) for i in range(2000)] == list(regs[:2000]), case
    else:
        assert list(struct.unpack(f">{len(raw) // 2}H", raw)) == list(regs), case


def run(fn: Transaction, n: int) -> None:
    for _ in range(n):
        fn()


def best_cpu(fn: Transaction, n: int, runs: int) -> float:
    """Best of ``runs`` process-CPU times for ``n`` transactions, in µs per transaction."""
    run(fn, min(n, 1000))
    best = float("inf")
    for _ in range(runs):
        t0 = time.process_time()
        run(fn, n)
        best = min(best, time.process_time() - t0)
    return best / n * 1e6


def callgrind_instructions(side: str, case: str, level: str, n: int) -> int:
    """Instructions executed by a whole run of this script doing ``n`` transactions."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                           sys.executable, __file__, "--one", side, case, level, str(n)],
                          capture_output=True, text=True, env=env, check=True)
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def per_tx_instructions(side: str, case: str, level: str, n: int) -> float:
    base = callgrind_instructions(side, case, level, 200)
    return (callgrind_instructions(side, case, level, 200 + n) - base) / n


# --------------------------------------------------------------------------- CRC alone
def _old_serial_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc & 0xFFFF)
    return table


_MODBUS_TABLE: Final = _old_serial_table()


def old_serial_crc16_modbus(data: bytes) -> int:
    """drivers/serial_sensor.py's (now drivers/serial/framing.py) crc16_modbus before the shared module, verbatim."""
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _MODBUS_TABLE[(crc ^ b) & 0xFF]
    return crc


CRCS: Final[dict[str, Callable[[bytes], int]]] = {
    "drivers.wire.crc16 (shared)": crc16,
    "serial_sensor.crc16_modbus (former copy)": old_serial_crc16_modbus,
    "pymodbus FramerRTU.compute_CRC": FramerRTU.compute_CRC,
}


CRC_FRAMES: Final = {"6 B (request body)": bytes.fromhex("01030000000a"),
                     "253 B (125-register reply body)": _setup("rtu-hr125")[3][:-2]}


def crc_instructions(name: str, size: str, n: int) -> float:
    """Instructions per CRC call, by the same callgrind difference as the transactions."""
    counts = []
    for calls in (200, 200 + n):
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        proc = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                               __file__, "--one-crc", name, size, str(calls)],
                              capture_output=True, text=True, env=env, check=True)
        found = re.search(r"Collected : (\d+)", proc.stderr)
        if found is None:
            raise RuntimeError(f"no instruction count in callgrind's output:\n{proc.stderr[-2000:]}")
        counts.append(int(found.group(1)))
    return (counts[1] - counts[0]) / n


def crc_table(n: int, runs: int, cg_n: int | None) -> None:
    print(f"\nCRC-16/MODBUS alone per call: µs (process CPU, best of {runs} × {n})"
          + (f" and instructions (callgrind, {cg_n} calls)" if cg_n else ""))
    print(f"{'implementation':<44}" + "".join(f"{k:>34}" for k in CRC_FRAMES))
    for name, fn in CRCS.items():
        row = []
        for size, data in CRC_FRAMES.items():
            cpu = best_cpu(lambda fn=fn, data=data: fn(data), n, runs)  # type: ignore[misc]
            text = f"{cpu:.2f} µs"
            if cg_n:
                text += f" {crc_instructions(name, size, cg_n):>10,.0f} instr"
            row.append(text)
        print(f"{name:<44}" + "".join(f"{v:>34}" for v in row), flush=True)


def resync_check() -> None:
    """Two bytes of line noise before a valid RTU reply: does the framer still find the reply?"""
    good = rtu_frame(UNIT, bytes.fromhex("0304") + bytes(4))
    print("\nRTU reply behind line noise (ours: find_reply; pymodbus: FramerRTU.handleFrame)")
    for noise in (bytes.fromhex("0055"), bytes.fromhex("010304"), bytes.fromhex("0703")):
        buf = noise + good
        mine = find_reply(bytearray(buf), UNIT, 3, 4)
        used, pdu = FramerRTU(DecodePDU(is_server=False)).handleFrame(buf, UNIT, 0)
        print(f"  {noise.hex(' ')} + reply: ours {'found at ' + str(mine) if mine else 'lost'}; pymodbus "
              f"{'found' if pdu is not None else f'lost (consumed {used} of {len(buf)} bytes, no PDU)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="transactions per timed run")
    parser.add_argument("--runs", type=int, default=7, help="timed runs; the best counts")
    parser.add_argument("--callgrind", action="store_true", help="also count instructions with callgrind")
    parser.add_argument("--cg-n", type=int, default=2000, help="transactions per callgrind difference")
    parser.add_argument("--crc-only", action="store_true", help="only the CRC table and the resync check")
    parser.add_argument("--one", nargs=4, metavar=("SIDE", "CASE", "LEVEL", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--one-crc", nargs=3, metavar=("NAME", "SIZE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        side, case, level, n = args.one
        run(SIDES[side](case, level), int(n))
        return
    if args.one_crc:
        name, size, n = args.one_crc
        fn, data = CRCS[name], CRC_FRAMES[size]
        run(lambda: fn(data), int(n))
        return
    if args.crc_only:
        crc_table(args.n * 5, args.runs, args.cg_n if args.callgrind else None)
        resync_check()
        return
    for case in CASES:
        _same(case)
    print(f"µs CPU per transaction (process_time, best of {args.runs} × {args.n})"
          + (f"; instructions per transaction (callgrind, {args.cg_n} transactions)" if args.callgrind else ""))
    head = f"{'case':<15}{'level':<8}{'ours µs':>9}{'pymodbus µs':>13}{'ratio':>7}"
    if args.callgrind:
        head += f"{'ours instr':>12}{'pymodbus instr':>16}{'ratio':>7}"
    print(head)
    for level in ("frame", "values"):
        for case in CASES:
            a = best_cpu(ours(case, level), args.n, args.runs)
            b = best_cpu(theirs(case, level), args.n, args.runs)
            line = f"{case:<15}{level:<8}{a:>9.2f}{b:>13.2f}{b / a:>7.2f}"
            if args.callgrind:
                ia = per_tx_instructions("ours", case, level, args.cg_n)
                ib = per_tx_instructions("pymodbus", case, level, args.cg_n)
                line += f"{ia:>12,.0f}{ib:>16,.0f}{ib / ia:>7.2f}"
            print(line, flush=True)
    crc_table(args.n * 5, args.runs, args.cg_n if args.callgrind else None)
    resync_check()


if __name__ == "__main__":
    main()
