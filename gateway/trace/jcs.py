"""RFC 8785 JSON Canonicalization Scheme (JCS): the exact bytes the trace feed signs.

One form for any JSON value, so a verifier in any language gets the same bytes:

* no whitespace; ``null``, ``true``, ``false`` as is;
* strings: UTF-8, with only ``"`` ``\\`` and the control characters U+0000..U+001F escaped
  (``\\b \\t \\n \\f \\r`` by name, the others as ``\\u00xx``, lowercase hex); everything else,
  non-ASCII included, is written as itself (what ECMAScript's ``JSON.stringify`` does);
* numbers: IEEE 754 doubles written as ECMAScript's ``Number.prototype.toString`` writes them
  (shortest digits that read back to the same double; ``1.0`` is ``1``, ``1e-7`` is ``1e-7``,
  ``0.00001`` is ``0.00001``, ``1e21`` is ``1e+21``); NaN and infinities are refused, and so are
  integers beyond 2**53 - 1, which a double cannot hold exactly;
* object members sorted by their names compared as arrays of UTF-16 code units.

Python's ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` agrees on
everything but numbers (``1.0``, ``1e-05``) and names outside the Basic Multilingual Plane.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["canonical", "canonical_bytes"]

_MAX_EXACT = 2**53 - 1  # the "safe" integers: every one a distinct double


def canonical(value: Any) -> str:
    """``value`` (dict, list, tuple, str, int, float, bool, None) in JCS form. Raises ValueError
    for what JCS cannot represent (NaN, infinities, integers beyond 2**53 - 1, non-string names)."""
    out: list[str] = []
    _write(value, out)
    return "".join(out)


def canonical_bytes(value: Any) -> bytes:
    return canonical(value).encode("utf-8")


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, int):
        if abs(value) > _MAX_EXACT:
            raise ValueError(f"integer {value} is beyond 2**53 - 1: JSON numbers are doubles (RFC 8785)")
        out.append(str(int(value)))
    elif isinstance(value, float):
        out.append(number(value))
    elif isinstance(value, dict):
        out.append("{")
        for n, name in enumerate(sorted(value, key=_utf16)):
            if n:
                out.append(",")
            out.append(json.dumps(name, ensure_ascii=False))
            out.append(":")
            _write(value[name], out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for n, item in enumerate(value):
            if n:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise ValueError(f"{type(value).__name__} is not a JSON value")


def _utf16(name: Any) -> bytes:
    if not isinstance(name, str):
        raise ValueError(f"object member name {name!r} is not a string")
    return name.encode("utf-16-be", "surrogatepass")


def number(value: float) -> str:
    """A double as ECMAScript's Number.prototype.toString writes it (ECMA-262, Number::toString)."""
    if not math.isfinite(value):
        raise ValueError(f"{value} is not a JSON number (RFC 8785 has no NaN or infinity)")
    if value == 0:
        return "0"  # -0 too
    sign = "-" if value < 0 else ""
    mantissa, _, exp = repr(abs(value)).partition("e")  # repr: the shortest digits that read back the same
    whole, _, frac = mantissa.partition(".")
    digits = whole + frac
    point = len(whole) + int(exp or 0)  # the value is 0.<digits> * 10**point
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    k, n = len(digits), point
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        e = n - 1
        text = (digits[0] + ("." + digits[1:] if k > 1 else "")) + ("e+" if e >= 0 else "e-") + str(abs(e))
    return sign + text
