"""The EPCIS event hash (GS1 CBV 2.0 §8.9, ``ni:///sha-256;<hex>?ver=CBV2.0``) of the events Sluice emits.

This follows GS1's reference implementation (PyPI ``epcis-event-hash-generator``, MIT) step by
step, because the hash is only useful if a platform that recomputes it gets the same value:

1. bare CBV/GS1 vocabulary values (``storing``, ``Temperature``, ``ALARM_CONDITION``) are replaced
   by their web-vocabulary URIs, the way the reference finds them by JSON-LD expansion;
2. the event becomes a tree of (name, text, children), lists flattened into repeated children
   and renamed as in the XML binding (``sensorElementList`` -> ``sensorElement`` ...);
3. the standard's property order is walked; values are canonicalised (numbers without trailing
   zeros, times in UTC at millisecond precision, EPC URNs as canonical GS1 Digital Link URIs);
   repeated elements are sorted; extension fields (``{namespace}name=value``) follow, sorted;
4. the concatenation (no separator) is hashed with SHA-256.

Only the identifier forms that :func:`canonical_id` knows are supported; the trace
configuration refuses the others, so every event Sluice writes can be hashed here.
Cross-checked against the reference package in ``tests/test_trace.py``
(``test_every_document_validates_and_event_ids_match_the_reference``) and ``tests/test_trace_scale.py``.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import re
from typing import Any

__all__ = ["canonical_id", "check_digit", "event_hash", "prehash"]

# (name, text, children), as the reference implementation builds it. The name is Any and the
# children list[Any] on purpose: under sourceList/destinationList/bizTransactionList a child is a
# (type node, value) pair, not a node, and the pre-hash walk tells the two apart at run time.
Node = tuple[Any, str, list[Any]]

_VOCAB_PREFIX = {
    "bizStep": "https://ref.gs1.org/cbv/BizStep-",
    "disposition": "https://ref.gs1.org/cbv/Disp-",
}
_VOC = "https://gs1.org/voc/"  # sensorReport type and exception

_PROP_ORDER: list[tuple[str, Any]] = [
    ("eventTime", None), ("eventTimeZoneOffset", None), ("certificationInfo", None), ("parentID", None),
    ("epcList", [("epc", None)]), ("inputEPCList", [("epc", None)]), ("childEPCs", [("epc", None)]),
    ("quantityList", [("quantityElement", [("epcClass", None), ("quantity", None), ("uom", None)])]),
    ("childQuantityList", [("quantityElement", [("epcClass", None), ("quantity", None), ("uom", None)])]),
    ("inputQuantityList", [("quantityElement", [("epcClass", None), ("quantity", None), ("uom", None)])]),
    ("outputEPCList", [("epc", None)]),
    ("outputQuantityList", [("quantityElement", [("epcClass", None), ("quantity", None), ("uom", None)])]),
    ("action", None), ("transformationID", None), ("bizStep", None), ("disposition", None),
    ("persistentDisposition", [("set", None), ("unset", None)]),
    ("readPoint", [("id", None)]), ("bizLocation", [("id", None)]),
    ("sensorElementList", [("sensorElement", [
        ("sensorMetadata", [(k, None) for k in ("time", "startTime", "endTime", "deviceID", "deviceMetadata",
                                                "rawData", "dataProcessingMethod", "bizRules")]),
        ("sensorReport", [(k, None) for k in (
            "type", "exception", "deviceID", "deviceMetadata", "rawData", "dataProcessingMethod", "time",
            "microorganism", "chemicalSubstance", "value", "component", "stringValue", "booleanValue",
            "hexBinaryValue", "uriValue", "minValue", "maxValue", "meanValue", "sDev", "percRank",
            "percValue", "uom", "coordinateReferenceSystem")]),
    ])]),
]
_IGNORED = frozenset({"recordTime", "eventID", "type", "errorDeclaration"})
_UNORDERED_PARENTS = ("bizTransaction", "source", "destination")

# --------------------------------------------------------------------------- identifiers
_SAFE = r"[!')(*+,.0-9:;=A-Za-z_-]|%2[125-9A-Fa-f]|%3[0-9A-Fa-f]|%4[1-9A-Fa-f]|%5[0-9AaFf]|%6[1-9A-Fa-f]|%7[0-9Aa]"
_SGLN = re.compile(r"^urn:epc:id:sgln:(\d{6}\.\d{6}|\d{7}\.\d{5}|\d{8}\.\d{4}|\d{9}\.\d{3}|\d{10}\.\d{2}|"
                   r"\d{11}\.\d{1}|\d{12}\.)\.(?:" + _SAFE + "){1,20}$")
_LGTIN = re.compile(r"^urn:epc:class:lgtin:(\d{6}\.\d{7}|\d{7}\.\d{6}|\d{8}\.\d{5}|\d{9}\.\d{4}|\d{10}\.\d{3}|"
                    r"\d{11}\.\d{2}|\d{12}\.\d{1})\.(?:" + _SAFE + "){1,20}$")
_DL_CHARS = r"[\x22\x27\x2D\x2E\x30-\x39\x3B-\x3F\x41-\x5A\x5F\x61-\x7A]"
_DL_CANONICAL = re.compile(r"^https://id\.gs1\.org/(01/\d{14}(/10/" + _DL_CHARS + r"{0,20})?|414/\d{13}(/254/"
                           + _DL_CHARS + r"{0,20})?)$")
_DL_ANY = re.compile(r"^https?://[^?#]*/(01|gtin|8006|itip|8010|cpid|414|gln|417|party|8017|gsrnp|8018|gsrn|255|gcn|"
                     r"00|sscc|253|gdti|401|ginc|402|gsin|8003|grai|8004|giai)/\d{4}")


def check_digit(digits: str) -> int:
    """GS1 mod-10 check digit of a key written without it (GTIN, GLN, SSCC ...)."""
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(digits)))
    return (10 - total % 10) % 10


def _pct(text: str) -> str:
    for ch, code in (("!", "%21"), ("(", "%28"), (")", "%29"), ("*", "%2A"), ("+", "%2B"), (",", "%2C"), (":", "%3A")):
        text = text.replace(ch, code)
    return text


def canonical_id(uri: str) -> str | None:
    """The canonical GS1 Digital Link form of an identifier the hash must normalise, else None.

    Raises ValueError for a GS1 identifier form this module cannot normalise exactly (the
    configuration uses that to refuse it)."""
    if "." not in uri:
        return None
    if uri.startswith("urn:epc:id:sgln:"):
        if not _SGLN.match(uri):
            raise ValueError(f"'{uri}' is not a valid SGLN URN — write it as urn:epc:id:sgln:<company prefix>.<location ref>.<extension>")
        prefix, rest = uri[16:].split(".", 1)
        ref, ext = rest[: 12 - len(prefix)], uri[30:]
        gln = prefix + ref
        base = f"https://id.gs1.org/414/{gln}{check_digit(gln)}"
        return base if ext == "0" else f"{base}/254/{_pct(ext)}"
    if uri.startswith("urn:epc:class:lgtin:"):
        if not _LGTIN.match(uri):
            raise ValueError(f"'{uri}' is not a valid LGTIN URN — write it as urn:epc:class:lgtin:<company prefix>.<item ref>.<lot>")
        prefix, rest = uri[20:].split(".", 1)
        item = rest[: 13 - len(prefix)]
        gtin = item[0] + prefix + item[1:]
        return f"https://id.gs1.org/01/{gtin}{check_digit(gtin)}/10/{_pct(uri[35:])}"
    if uri.startswith("urn:epc:"):
        raise ValueError(f"'{uri}': only sgln and lgtin EPC URNs are supported here — use one of those or a plain URI")
    if _DL_ANY.match(uri):
        if _DL_CANONICAL.match(uri):
            return uri
        raise ValueError(f"'{uri}' is a GS1 Digital Link URI not in canonical form — write it as "
                         "https://id.gs1.org/414/<GLN-13> (or /01/<GTIN-14>/10/<lot>)")
    return None


# --------------------------------------------------------------------------- canonical values
def _numeric(text: str) -> str:
    try:
        number = float(text)
        if int(number) == number:
            return str(int(number))
        return str(number)
    except (ValueError, OverflowError):
        return text


def _canon(text: str) -> str:
    for old, new in (("urn:epcglobal:cbv:bizstep:", "https://ref.gs1.org/cbv/BizStep-"),
                     ("urn:epcglobal:cbv:disp:", "https://ref.gs1.org/cbv/Disp-"),
                     ("urn:epcglobal:cbv:btt:", "https://ref.gs1.org/cbv/BTT-"),
                     ("urn:epcglobal:cbv:sdt:", "https://ref.gs1.org/cbv/SDT-"),
                     ("urn:epcglobal:cbv:er:", "https://ref.gs1.org/cbv/ER-")):
        text = text.replace(old, new)
    text = _numeric(text)
    try:
        converted = canonical_id(text)
    except ValueError:
        converted = None
    return converted or text


def _utc_ms(text: str) -> str:
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    if when.tzinfo is None:
        when = when.astimezone()  # a time without offset is local time, as dateutil reads it
    when = when.astimezone(dt.UTC)
    when = when.replace(microsecond=round(when.microsecond, -3) if when.microsecond < 999500 else 999000)
    return when.isoformat(timespec="milliseconds")[:-6] + "Z"


# --------------------------------------------------------------------------- JSON -> tree
def _vocab_urls(node: Any, parent: str | None, out: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and ":" not in value:
                if key in _VOCAB_PREFIX:
                    out.add(_VOCAB_PREFIX[key] + value)
                elif key in ("type", "exception") and parent == "sensorReport":
                    out.add(_VOC + value)
            _vocab_urls(value, key, out)
    elif isinstance(node, list):
        for item in node:
            _vocab_urls(item, parent, out)


def _replace_bare(node: Any, urls: set[str]) -> Any:
    if isinstance(node, str):
        hits = [u for u in urls if u.endswith("-" + node) or u.endswith("/" + node)]
        return hits[0] if len(hits) == 1 else node
    if isinstance(node, list):
        return [_replace_bare(v, urls) for v in node]
    if isinstance(node, dict):
        return {k: _replace_bare(v, urls) for k, v in node.items()}
    return node


def _ns(text: Any, namespaces: dict[str, str], is_value: bool = False) -> Any:
    if not isinstance(text, str):
        return text
    head, sep, rest = text.partition(":")
    if sep and head in namespaces:
        url = namespaces[head]
        return (url.strip("{}") if is_value else url) + rest
    return text


def _tree(obj: Any, namespaces: dict[str, str]) -> Node:
    node: Node = ("", "", [])
    if isinstance(obj, list):
        for child in obj:
            node[2].append(_tree(child, namespaces))
    elif isinstance(obj, dict):
        if "type" in obj:
            node = (obj["type"], "", [])
        if "#text" in obj:
            node = (node[0], obj["#text"], node[2])
        for key, value in obj.items():
            if key in ("#text", "rdfs:comment", "comment"):
                continue
            child = _tree(value, namespaces)
            name = _ns(key, namespaces)
            if isinstance(value, list):
                for element in child[2]:
                    node[2].append((name, element[1], element[2]))
            else:
                node[2].append((name, child[1], child[2]))
    else:
        return ("", str(_ns(obj, namespaces, True)), [])
    if not any(k in obj for k in _UNORDERED_PARENTS):
        node[2].sort()
    return node


def _xml_shape(node: Node) -> Node:
    children = list(node[2]) if len(node) > 2 else []
    lists: dict[str, list[Node]] = {}
    for element in [e for e in children if not isinstance(e[0], tuple) and e[0].endswith("List")]:
        lists.setdefault(element[0], []).append((element[0][:-4], element[1], element[2]))
        children.remove(element)
    for name, elements in lists.items():
        if name in ("sourceList", "destinationList", "bizTransactionList"):
            children.append((name, "", [(e[2][0], e[2][1]) for e in elements]))
        else:
            children.append((name, "", elements))
    child_epcs: list[Node] = [("epc", e[1], []) for e in children if e[0] == "childEPCs"]
    children = [e for e in children if e[0] != "childEPCs"]
    if child_epcs:
        children.append(("childEPCs", "", child_epcs))
    fixed = [e if e[0] in ("sourceList", "destinationList", "bizTransactionList") else _xml_shape(e) for e in children]
    name = node[0]
    if name in ("inputEPC", "outputEPC"):
        name = "epc"
    elif name in ("inputQuantity", "outputQuantity", "childQuantity") or (name == "quantity" and fixed):
        name = "quantityElement"
    return (name, node[1], fixed)


# --------------------------------------------------------------------------- pre-hash string
def _user_extensions(children: list[Any]) -> list[Any]:
    if len(children) <= 1 or any("eventTime" in c[0] or "action" in c[0] for c in children):
        return []
    found = [c for c in children if isinstance(c, tuple) and "{" in c[0] and "/}" in c[0]]
    for c in found:
        children.remove(c)
    return found


def _generic(children: list[Any]) -> str:
    values = []
    for child in children:
        if isinstance(child, tuple) and len(child) == 2 and isinstance(child[0], tuple):
            values.append(_generic(list(child)))
        else:
            text = child[1].strip()
            if text:
                text = "=" + _canon(text)
            values.append(child[0] + text + _generic(child[2]))
    if len(children) > 1 and not any(c[0] in ("bizTransaction", "source", "destination") for c in children):
        values.sort()
    return "".join(values)


def _child(child: Node, order: Any) -> str:
    text = ""
    below = _ordered(child[2], order) if order else ""
    if child[1]:
        text = child[1].strip()
        name = child[0].lower()
        text = _utc_ms(text) if "time" in name and "offset" not in name else _canon(text)
        if text:
            text = "=" + text
    return child[0] + text + below if (text or below) else ""


def _ordered(children: list[Any], order: list[tuple[str, Any]]) -> str:
    pre = ""
    extensions = _user_extensions(children)
    for name, sub in order:
        values = []
        for child in [c for c in children if c[0] == name]:
            text = _child(child, sub)
            if text:
                values.append(text)
            if not child[2]:
                children.remove(child)
        values.sort()
        if "".join(values):
            if pre:
                values.insert(0, pre)
            pre = "".join(values)
    if extensions:
        pre += _generic(extensions)
    return pre


def prehash(event: dict[str, Any], context: Any) -> str:
    """The canonical pre-hash string of ``event`` (an event object of an EPCIS 2.0 JSON document
    whose ``@context`` is ``context``)."""
    urls: set[str] = set()
    _vocab_urls(event, None, urls)
    event = _replace_bare(copy.deepcopy(event), urls)
    namespaces: dict[str, str] = {}
    for item in context if isinstance(context, list) else []:
        if isinstance(item, str):
            namespaces[item] = "{" + item + "}"
        elif isinstance(item, dict):
            namespaces.update({k: "{" + v + "}" for k, v in item.items()})
    tree = _xml_shape(_tree(event, namespaces))
    event_type: str = tree[0]
    children = tree[2]
    ordered = _ordered(children, _PROP_ORDER)
    rest = [c for c in children if c[0] not in _IGNORED]
    return "eventType=" + event_type + ordered + (_generic(rest) if rest else "")


def event_hash(event: dict[str, Any], context: Any) -> str:
    """``ni:///sha-256;<hex>?ver=CBV2.0`` of ``event`` — its deterministic eventID."""
    return "ni:///sha-256;" + hashlib.sha256(prehash(event, context).encode()).hexdigest() + "?ver=CBV2.0"
