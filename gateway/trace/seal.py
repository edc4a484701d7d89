"""Sealing and verifying the feed: event ids, the hash chain, Ed25519 signatures and signed heads.

The exact procedure a verifier follows is in ``docs/trace-verification.md``; this is the code.
A sealed line is one EPCIS 2.0 document holding one event, in RFC 8785 canonical JSON
(:mod:`gateway.trace.jcs`) on one line. The event carries ``sluice:seq`` (1, 2, 3 ... with no
gap), ``sluice:prev`` (the eventID of the event before it; absent on seq 1), ``sluice:chain`` (the
chain's id, the same on every event of a chain: an outbox moved aside as unusable takes its chain
with it and the fresh one starts a new chain at seq 1; absent on chains begun before chain ids),
``sluice:gateway`` and ``sluice:eventSignature`` = ``{"key": <key id>, "value": <hex>}``: an Ed25519 signature over
``b"sluice-event-1\\n"`` + the GS1 event hash id (ASCII) of the event *without* that field and
without ``eventID`` (its content, chain link included). Its ``eventID`` is the GS1 event hash of
everything else in it, signature included, so GS1's reference generator computes the same id and
the id commits to the chain. The event signature is what survives an EPCIS repository (which
keeps events, not our documents): :func:`verify_events` checks a query answer with it.
The document carries ``sluice:signature`` (same form), over ``b"sluice-trace-1\\n"`` + the JCS
bytes of the document without that member. The key id is ``"ed25519:"`` + the first 16 hex
digits of SHA-256 over the raw 32-byte public key.
Any change to a line — a byte, a removed line, two lines swapped — breaks the canonical form,
the signature, the eventID or the sequence, and :func:`verify_lines` names the first one.

What the chain cannot show on its own is events cut off its *end*: a shorter feed is a valid
feed. A **signed head** (:meth:`Sealer.signed_head`, :func:`read_head`) closes that gap for whoever
holds one: ``{"type": "sluice:ChainHead", "gateway", "chain", "seq", "eventID", "time", "signature"}``,
the signature over ``b"sluice-head-1\\n"`` + the JCS bytes of the head without ``signature``. It
states that by ``time`` the chain ``chain`` had reached event ``seq`` with that eventID; a feed of
that chain verified with it (``heads=``) must contain that event, unchanged; a head of another
chain is named as such (it is not evidence about this feed).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.trace.engine import CONTEXT, iso
from gateway.trace.hashing import event_hash
from gateway.trace.jcs import canonical

__all__ = ["Head", "Problem", "Sealer", "Validate", "canonical", "event_signature_problem", "key_id", "load_or_create_key",
           "load_public_key", "read_head", "verify_events", "verify_lines"]

# A schema check: an EPCIS document in, its schema errors out (none: it matches).
Validate = Callable[[dict[str, Any]], list[str]]

DOMAIN = b"sluice-trace-1\n"
EVENT_DOMAIN = b"sluice-event-1\n"
HEAD_DOMAIN = b"sluice-head-1\n"
EVENT_SIGNATURE = "sluice:eventSignature"
CHAIN = "sluice:chain"
HEAD_TYPE = "sluice:ChainHead"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The gateway's signing key; created (mode 0600, never overwritten) when absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        return key
    loaded = serialization.load_pem_private_key(data, password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key — move it away; a new key is made on start")
    return loaded


def public_pem(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A PEM public key (``sluice trace pubkey`` output) or the private key file itself."""
    data = path.read_bytes()
    if b"PRIVATE" in data:
        private = serialization.load_pem_private_key(data, password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return private.public_key()
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


class Sealer:
    """Turns unsealed events into signed lines, continuing the chain ``chain`` at (seq, head)."""

    def __init__(self, key: Ed25519PrivateKey, gateway_id: str, seq: int = 0, head: str | None = None,
                 chain: str | None = None) -> None:
        self._key = key
        self._kid = key_id(key.public_key())
        self.gateway_id = gateway_id
        self.seq, self.head = seq, head
        self.chain = chain

    def seal(self, event: dict[str, Any]) -> str:
        event = dict(event)
        event["sluice:gateway"] = self.gateway_id
        event["sluice:seq"] = self.seq + 1
        if self.chain is not None:
            event[CHAIN] = self.chain
        if self.head is not None:
            event["sluice:prev"] = self.head
        event.pop("eventID", None)
        event.pop(EVENT_SIGNATURE, None)
        content_id = event_hash(event, CONTEXT)
        event[EVENT_SIGNATURE] = {"key": self._kid, "value": self._key.sign(EVENT_DOMAIN + content_id.encode()).hex()}
        event_id = event_hash(event, CONTEXT)
        event = {"eventID": event_id, **event}
        doc = {"@context": CONTEXT, "type": "EPCISDocument", "schemaVersion": "2.0",
               "creationDate": event["eventTime"], "epcisBody": {"eventList": [event]}}
        signature = self._key.sign(DOMAIN + canonical(doc).encode())
        doc["sluice:signature"] = {"key": self._kid, "value": signature.hex()}
        self.seq, self.head = self.seq + 1, event_id
        return canonical(doc)

    def signed_head(self, seq: int, event_id: str | None, time_ns: int) -> str:
        """A signed head (one JCS line): the chain had reached ``seq`` (eventID ``event_id``;
        None for seq 0) by ``time_ns``. Any seq of the chain may be stated, not only the last."""
        head: dict[str, Any] = {"type": HEAD_TYPE, "gateway": self.gateway_id, "seq": seq, "eventID": event_id,
                                "time": iso(time_ns)}
        if self.chain is not None:
            head["chain"] = self.chain
        head["signature"] = {"key": self._kid, "value": self._key.sign(HEAD_DOMAIN + canonical(head).encode()).hex()}
        return canonical(head)


@dataclass(frozen=True)
class Head:
    """A verified signed head (see the module docstring)."""

    gateway: str
    seq: int
    event_id: str | None
    time: str
    chain: str | None = None  # None: a chain begun before chain ids

    def __str__(self) -> str:
        return f"seq {self.seq} (signed {self.time}{f', chain {self.chain}' if self.chain else ''})"


def read_head(text: str, public: Ed25519PublicKey) -> Head:
    """Parse and check a signed head; raises ValueError saying what is wrong with it."""
    try:
        head = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"a signed head is one JSON object (`sluice trace head`): {exc}") from None
    if not isinstance(head, dict) or head.get("type") != HEAD_TYPE:
        raise ValueError(f"not a signed head: expected a JSON object with \"type\": \"{HEAD_TYPE}\"")
    signature = head.pop("signature", None)
    seq, event_id, gateway, when = head.get("seq"), head.get("eventID"), head.get("gateway"), head.get("time")
    chain = head.get("chain")
    if (type(seq) is not int or seq < 0 or not isinstance(gateway, str) or not isinstance(when, str)
            or not (event_id is None if seq == 0 else isinstance(event_id, str)) or not isinstance(chain, str | None)):
        raise ValueError("a signed head needs seq (an integer >= 0), eventID (null only for seq 0), gateway and time "
                         "(and chain, when present, a string)")
    if not _valid_signature(public, signature, HEAD_DOMAIN + canonical(head).encode()):
        raise ValueError(f"the head's signature does not verify with key {key_id(public)}: altered, or another gateway's")
    return Head(gateway, seq, event_id, when, chain)


def _chain_name(chain: str | None) -> str:
    return f"chain {chain}" if chain is not None else "a chain without an id (begun before chain ids)"


def another_chain(first: str | None, this: str | None, seq: int | None) -> str:
    """What a verifier says when event ``seq`` of chain ``this`` follows events of chain ``first``."""
    if seq != 1:  # a chain begins at seq 1: this is not a new chain starting but events of two chains mixed
        return (f"this event belongs to {_chain_name(this)}, the events before it to {_chain_name(first)}, and it is "
                "not the first event of its chain: events of two chains were mixed — verify each chain's events on "
                "their own")
    return (f"this event belongs to {_chain_name(this)}, the events before it to {_chain_name(first)}: a new chain "
            "started here (a gateway whose outbox was moved aside as unusable starts a new one at seq 1; the old "
            "chain's remaining events are in that moved-aside file, `sluice outbox salvage FILE --events OUT` "
            "exports them) — verify each chain's events on their own; a feed never mixes two chains")


def _other_heads(heads: Sequence[Head], chain: str | None) -> str | None:
    """Why the heads cannot be checked against a feed of ``chain`` (None: they are all of that chain)."""
    other = next((h for h in heads if h.chain != chain), None)
    if other is None:
        return None
    return (f"the signed head {other} is of {_chain_name(other.chain)}, the feed is {_chain_name(chain)}: "
            "a head says nothing about another chain — give the head of this chain (a jsonl sink moves the old "
            "chain's feed aside as <feed>.chain-<id> with its .head)")


def _head_problem(heads: Sequence[Head], seq: int, event_id: Any) -> str | None:
    for head in heads:
        if head.seq == seq and head.event_id != event_id:
            return (f"it is not the event the signed head {head} names (eventID {head.event_id}): "
                    "the feed was rewritten from here on")
    return None


def _short_of(heads: Sequence[Head], last: int) -> str | None:
    """Why a chain ending at ``last`` falls short of a head (None: it reaches every head)."""
    beyond = max((h for h in heads if h.seq > last), key=lambda h: h.seq, default=None)
    if beyond is None:
        return None
    return (f"the feed ends at seq {last}, but the signed head {beyond} says the chain had reached seq {beyond.seq}: "
            f"{beyond.seq - last} event(s) were cut off the end (or were not delivered here)")


def _valid_signature(public: Ed25519PublicKey, signature: Any, message: bytes) -> bool:
    """``signature`` is ``{"key": key_id(public), "value": <hex of a valid signature>}``."""
    if not isinstance(signature, dict) or signature.get("key") != key_id(public) or not isinstance(signature.get("value"), str):
        return False
    try:
        raw = bytes.fromhex(signature["value"])
        public.verify(raw, message)
    except (InvalidSignature, ValueError):
        return False
    value: str = signature["value"]  # checked a str above
    return raw.hex() == value


def event_signature_problem(event: dict[str, Any], public: Ed25519PublicKey) -> str | None:
    """Why ``event``'s own signature does not verify with ``public`` (None: it does)."""
    if EVENT_SIGNATURE not in event:
        return f"no {EVENT_SIGNATURE} — not sealed by this gateway"
    content = {k: v for k, v in event.items() if k not in ("eventID", EVENT_SIGNATURE)}
    if not _valid_signature(public, event[EVENT_SIGNATURE], EVENT_DOMAIN + event_hash(content, CONTEXT).encode()):
        return f"{EVENT_SIGNATURE} does not match (key {key_id(public)}): the event was altered or not signed by this gateway"
    return None


@dataclass(frozen=True)
class Problem:
    position: int  # 1-based line number in the file
    seq: int | None
    message: str

    def __str__(self) -> str:
        seq = f", seq {self.seq}" if self.seq is not None else ""
        return f"event #{self.position} (line {self.position}{seq}): {self.message}"


def verify_lines(lines: Iterable[str], public: Ed25519PublicKey, validate: Validate | None = None,
                 heads: Sequence[Head] = ()) -> tuple[int, Problem | None]:
    """Check every line; returns (events that verified, the first problem or None).

    ``validate``, if given, is called with each document and returns a list of schema errors.
    ``heads`` (verified with :func:`read_head`): the feed must contain each head's event,
    unchanged — so events cut off the end before the newest head are found. A feed is one chain:
    every event names the first one's ``sluice:chain``; an event of another chain is reported as a
    new chain starting, and a head of another chain as such."""
    kid = key_id(public)
    expected_seq, head = 1, None
    chain: str | None = None
    count = 0
    for position, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        try:
            doc = json.loads(line)
        except ValueError as exc:
            return count, Problem(position, None, f"not JSON ({exc}) — the line was altered or cut")
        events = doc.get("epcisBody", {}).get("eventList") if isinstance(doc, dict) else None
        event = events[0] if isinstance(events, list) and len(events) == 1 and isinstance(events[0], dict) else None
        seq = event.get("sluice:seq") if event else None
        seq = seq if isinstance(seq, int) else None
        if canonical(doc) != line:
            return count, Problem(position, seq, "not in canonical form: the line was edited after it was signed")
        sig = doc.pop("sluice:signature", None)
        if not isinstance(sig, dict) or sig.get("key") != kid or not isinstance(sig.get("value"), str):
            return count, Problem(position, seq, f"no signature by key {kid}")
        if not _valid_signature(public, sig, DOMAIN + canonical(doc).encode()):
            return count, Problem(position, seq, "signature does not match: the event was altered")
        if event is None or seq is None:
            return count, Problem(position, seq, "not a one-event Sluice document")
        wrong = event_signature_problem(event, public)
        if wrong is not None:
            return count, Problem(position, seq, wrong)
        if validate is not None:
            errors = validate({**doc})
            if errors:
                return count, Problem(position, seq, "does not match the EPCIS 2.0 schema: " + errors[0])
        if event_hash({k: v for k, v in event.items() if k != "eventID"}, doc.get("@context")) != event.get("eventID"):
            return count, Problem(position, seq, "eventID is not the hash of the event")
        if position == 1:
            chain = event.get(CHAIN)
            wrong = _other_heads(heads, chain)
            if wrong is not None:
                return count, Problem(position, seq, wrong)
        elif event.get(CHAIN) != chain:
            return count, Problem(position, seq, another_chain(chain, event.get(CHAIN), seq))
        if seq != expected_seq:
            what = (f"{seq - expected_seq} event(s) before it are missing, or events were reordered" if seq > expected_seq
                    else "it repeats or precedes an earlier event: events were reordered or duplicated")
            return count, Problem(position, seq, f"expected seq {expected_seq}: {what}")
        if event.get("sluice:prev") != head:
            return count, Problem(position, seq, "sluice:prev is not the eventID of the event before it: the chain is broken")
        wrong = _head_problem(heads, seq, event["eventID"])
        if wrong is not None:
            return count, Problem(position, seq, wrong)
        expected_seq, head = seq + 1, event["eventID"]
        count += 1
    short = _short_of(heads, expected_seq - 1)
    return count, (Problem(count + 1, None, short) if short else None)


REPOSITORY_FIELDS = frozenset({"recordTime", "@context"})
"""Fields an EPCIS repository adds to an event it returns; not part of what Sluice sealed."""


def verify_events(events: list[Any], public: Ed25519PublicKey | None, validate: Validate | None = None,
                  partial: bool = False, heads: Sequence[Head] = ()) -> tuple[int, Problem | None]:
    """Check events returned by an EPCIS query (an EPCISQueryDocument's eventList).

    A repository keeps events, not the documents, and returns them in no promised order: the
    events are put in ``sluice:seq`` order, and each is checked for its eventID (the hash of its
    content), its own signature (``sluice:eventSignature``, when ``public`` is given: without the
    key anyone could recompute ids and links), the sequence (1, 2, 3 ... with no gap or repeat)
    and the chain (``sluice:prev``); each is re-wrapped as the one-event document it was sent in
    for the schema check. ``Problem.position`` is the seq's place in that order. ``partial``: the
    answer of a filtered query (one lot's events): gaps in the sequence are allowed, and the
    chain is checked between consecutive seqs only — each event still stands on its signature.
    ``heads``: as for :func:`verify_lines` (with ``partial``, a head's event may be absent: only its
    seq is compared with the answer's last). A repository may hold several chains of the gateway
    (a new one starts when an outbox is moved aside as unusable): the events are grouped by
    ``sluice:chain`` and each chain is checked on its own, with the heads of that chain; the count
    is over all of them, and a problem names its chain when there are several."""
    chains: dict[str | None, list[tuple[int, dict[str, Any]]]] = {}
    for index, event in enumerate(events, 1):
        seq = event.get("sluice:seq") if isinstance(event, dict) else None
        if not isinstance(seq, int):
            return 0, Problem(index, None, f"event {index} of the answer has no sluice:seq — not a Sluice event")
        chains.setdefault(event.get(CHAIN), []).append((seq, {k: v for k, v in event.items() if k not in REPOSITORY_FIELDS}))
    if not chains:
        return _verify_chain([], public, validate, partial, heads)
    if len(chains) == 1:
        wrong = _other_heads(heads, next(iter(chains)))
        if wrong is not None:
            return 0, Problem(1, None, wrong)
    total = 0
    for chain, items in chains.items():
        count, problem = _verify_chain(sorted(items, key=lambda item: item[0]), public, validate, partial,
                                       [h for h in heads if h.chain == chain])
        total += count
        if problem is not None:
            if len(chains) > 1:
                problem = Problem(problem.position, problem.seq, f"{_chain_name(chain)}: {problem.message}")
            return total, problem
    unmatched = next((h for h in heads if h.chain not in chains), None)
    if unmatched is not None:
        return total, Problem(total + 1, None, f"the signed head {unmatched} is of {_chain_name(unmatched.chain)}, of "
                              "which the answer holds no event")
    return total, None


def _verify_chain(items: list[tuple[int, dict[str, Any]]], public: Ed25519PublicKey | None, validate: Validate | None,
                  partial: bool, heads: Sequence[Head]) -> tuple[int, Problem | None]:
    """:func:`verify_events` for the events of one chain, in seq order."""
    expected_seq, head, count = 1, None, 0
    for position, (seq, event) in enumerate(items, 1):
        if partial and seq > expected_seq:
            expected_seq, head = seq, event.get("sluice:prev")  # a gap: the link is not checkable
        if seq != expected_seq:
            what = (f"{seq - expected_seq} event(s) before it are missing" if seq > expected_seq
                    else "it repeats an earlier seq")
            return count, Problem(position, seq, f"expected seq {expected_seq}: {what}")
        if event_hash({k: v for k, v in event.items() if k != "eventID"}, CONTEXT) != event.get("eventID"):
            return count, Problem(position, seq, "eventID is not the hash of the event: the event was altered")
        wrong = event_signature_problem(event, public) if public is not None else None
        if wrong is not None:
            return count, Problem(position, seq, wrong)
        if event.get("sluice:prev") != head:
            return count, Problem(position, seq, "sluice:prev is not the eventID of the event before it: the chain is broken")
        if validate is not None:
            doc = {"@context": CONTEXT, "type": "EPCISDocument", "schemaVersion": "2.0",
                   "creationDate": event.get("eventTime"), "epcisBody": {"eventList": [event]}}
            errors = validate(doc)
            if errors:
                return count, Problem(position, seq, "does not match the EPCIS 2.0 schema: " + errors[0])
        wrong = _head_problem(heads, seq, event["eventID"])
        if wrong is not None:
            return count, Problem(position, seq, wrong)
        expected_seq, head = seq + 1, event["eventID"]
        count += 1
    short = _short_of(heads, expected_seq - 1)
    return count, (Problem(count + 1, None, short) if short else None)
