"""The one sink contract: what every sink (MQTT, InfluxDB, the trace feed's MQTT, EPCIS and JSON
Lines sinks) promises the delivery engine (gateway/sinks/engine.py), after Telegraf's output
contract.

Lifecycle (who calls what): the core builds a sink through the registry (gateway/sinks/__init__.py;
no I/O in the constructor), enters it (``async with``: it opens its connection or session and
keeps it, reconnecting by itself), and one engine loop calls :meth:`Sink.send` with one batch at a
time — never two concurrently. Everything runs on the event loop.

:meth:`Sink.send` takes a batch (readings sinks: :data:`Message`; trace sinks: :data:`Event`) and
either

* returns a :class:`Result` naming, by index into the batch, what the far end *accepted* and what
  it *refused as data* (each with the far end's reason: sending it again cannot succeed, it becomes
  a dead letter) — :data:`ACCEPTED` style results (``Result.whole(n)``) for the usual case; indices
  in neither list were not delivered and go again, in order, after :meth:`Sink.wait_connected`
  (``Result.unavailable`` then says why), or
* raises :class:`SinkUnavailable`: nothing of the batch counts as delivered (not connected, a
  link dropped before the last acknowledgement, a server that answers "later"); the same items go
  again, in order, once :meth:`Sink.wait_connected` returns. Duplicates are fine; loss is not.

A sink never acknowledges anything itself: the engine moves the stream's position.

**End-to-end receipts** are a capability a sink declares: :attr:`Sink.receipts` is a
:class:`Receipting` (an MQTT 5 sink with ``delivery: end_to_end``) or None. The engine then sends
through :meth:`Receipting.send_tagged` and moves only the *sent* position; receipts arrive at the
handler given to :meth:`Receipting.on_receipt` (gateway/sinks/receipts.py holds the rules).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

__all__ = ["Event", "EventSink", "Message", "Paced", "Receipting", "Result", "Sink", "SinkUnavailable", "Where"]

Message = tuple[str, bytes]
"""A readings sink's item: (topic, payload); topic ``""`` for sinks without topics (HTTP)."""
Event = tuple[int, str]
"""A trace sink's item: (seq, sealed line) — one signed EPCIS document."""

W_contra = TypeVar("W_contra", contravariant=True)


class SinkUnavailable(Exception):
    """The sink cannot take the batch now: nothing of it counts as delivered; the engine waits in
    :meth:`Sink.wait_connected` and sends the same items again, in order."""

    logged = False
    """True when the sink has logged the cause itself (callers need not log it again)."""


@dataclass(frozen=True, slots=True)
class Result:
    """What the far end did with a batch (Telegraf's partial write, as a value): the indices it
    ``accepted`` and those it ``refused`` as data with its reason. An index in neither was not
    delivered (``unavailable`` says why) and is sent again."""

    accepted: Sequence[int]
    refused: Sequence[tuple[int, str]] = ()
    unavailable: str | None = None

    @staticmethod
    def whole(n: int) -> Result:
        """Every one of the ``n`` items accepted."""
        return Result(range(n))

    def reasons(self) -> dict[int, str]:
        return dict(self.refused)


@dataclass(frozen=True)
class Where:
    """What a sink's factory may need besides its configuration."""

    gateway_id: str
    site: str
    state: Path = field(default_factory=Path)
    """Relative paths of file sinks resolve here (the service's state directory)."""
    outbox: Path | None = None
    """The outbox file (the JSON Lines sink names its moved-aside copies in a warning)."""


class Receipting(Protocol):
    """The end-to-end receipt capability of a sink (``Sink.receipts``)."""

    @property
    def receipt_topic(self) -> str: ...

    @property
    def receipt_timeout(self) -> float: ...

    @property
    def receipt_window(self) -> int: ...

    @property
    def receipt_key(self) -> bytes | None:
        """``receipt_secret``: receipts count only with its MAC (None: no secret)."""
        ...

    def on_receipt(self, handler: Callable[[bytes], None]) -> None:
        """Call ``handler(payload)`` on the event loop with every receipt (it must not block)."""
        ...

    async def send_tagged(self, batch: Sequence[Message], tags: Sequence[bytes]) -> Result:
        """:meth:`Sink.send` with one batch id per message (MQTT 5 correlation data, the receipt
        topic as response topic)."""
        ...


class Sink(Protocol[W_contra]):
    """See the module docstring. ``connected``, ``last_error`` and ``refused`` are what health shows."""

    @property
    def connected(self) -> bool: ...

    @property
    def last_error(self) -> str | None: ...

    @property
    def refused(self) -> int:
        """Batches the far end refused (MQTT 5 reason codes); 0 for sinks that cannot be refused."""
        ...

    @property
    def receipts(self) -> Receipting | None: ...

    async def wait_connected(self) -> None:
        """Return once a batch is worth sending (connected; any backoff or Retry-After over)."""
        ...

    async def send(self, batch: Sequence[W_contra]) -> Result: ...


class EventSink(Sink[Event], Protocol):
    """A trace sink: also takes the feed's signed heads and may carry binding commands."""

    @property
    def takes_heads(self) -> bool: ...

    async def send_head(self, head: str) -> None:
        """Deliver a signed chain head; raises :class:`SinkUnavailable` (tried again later)."""
        ...

    def subscribe(self, handler: Callable[[str, bytes], None]) -> None:
        """Binding commands, when the sink carries them (MQTT: the command topic); call before entering."""
        ...

    async def reply(self, payload: bytes) -> None:
        """A command's answer; raises :class:`SinkUnavailable`."""
        ...


class Paced:
    """For a sink with no connection to keep (HTTP, a file): it counts as connected once the retry
    time it set after a failure (``_retry_at``, event-loop time) has passed."""

    _retry_at: float = 0.0

    @property
    def connected(self) -> bool:
        """False while waiting out a backoff or a Retry-After."""
        return asyncio.get_running_loop().time() >= self._retry_at

    async def wait_connected(self) -> None:
        delay = self._retry_at - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
