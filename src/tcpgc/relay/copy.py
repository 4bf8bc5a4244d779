"""Moving bytes between two links until both directions are done.

The relay is two mirrored halves. Each half forwards what one side reads to the other:
data as data, EOF as a half-close (the other direction keeps flowing), a reset as a
reset. When a side's outgoing buffer passes its high-water mark, the side feeding it
stops reading until it drains, so a slow reader slows its writer instead of growing
our memory. Both links close once each direction has seen its EOF.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tcpgc.task_set import NO_CONTEXT
from tcpgc.transport.link import Link


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


@dataclass(slots=True)
class RelayResult:
    """What a finished relay did, for the one log line per connection."""

    bytes_a_to_b: int = 0
    bytes_b_to_a: int = 0
    started: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    ended: str = "closed"

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started


class Finishing:
    """How a relay tells it is over: `await relay.done`, or `relay.on_done`, called soon
    after with the result (also when set after the end: a relay can end while it is
    built, on a link that was already lost). The callback costs no future: thousands of
    relays are held idle at once."""

    __slots__ = ("_done", "_on_done", "is_done")

    result: RelayResult

    def _init_finishing(self) -> None:
        self._done: asyncio.Future[RelayResult] | None = None
        self._on_done: Callable[[RelayResult], None] | None = None
        self.is_done = False

    @property
    def done(self) -> asyncio.Future[RelayResult]:
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
            if self.is_done:
                self._done.set_result(self.result)
        return self._done

    @property
    def on_done(self) -> Callable[[RelayResult], None] | None:
        return self._on_done

    @on_done.setter
    def on_done(self, callback: Callable[[RelayResult], None] | None) -> None:
        self._on_done = callback
        if self.is_done:
            self._call_on_done()

    def _settle(self) -> None:
        if self.is_done:
            return
        self.is_done = True
        if self._done is not None:
            self._done.set_result(self.result)
        self._call_on_done()

    def _call_on_done(self) -> None:
        callback, self._on_done = self._on_done, None  # once
        if callback is not None:
            asyncio.get_running_loop().call_soon(callback, self.result, context=NO_CONTEXT)


class _Half:
    """Handler of `src`: forwards to `dst`."""

    __slots__ = ("relay", "src", "dst", "a_to_b", "counter")

    def __init__(
        self, relay: Relay, src: Link, dst: Link, a_to_b: bool, counter: _Counter | None
    ) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.a_to_b = a_to_b
        self.counter = counter

    def on_data(self, data: bytes) -> None:
        result = self.relay.result
        result.last_activity = time.monotonic()
        if self.a_to_b:
            result.bytes_a_to_b += len(data)
        else:
            result.bytes_b_to_a += len(data)
        if self.counter is not None:
            self.counter.inc(len(data))
        self.dst.write(data)

    def on_eof(self) -> None:
        self.dst.write_eof()
        if self.dst.got_eof:
            # Both directions ended: close both once what is queued has been sent.
            self.src.close()
            self.dst.close()

    def on_lost(self, exc: BaseException | None) -> None:
        result = self.relay.result
        first = result.ended == "closed"  # the first explanation is the one to keep
        if isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
            if first:
                result.ended = "reset"
            self.dst.reset()
        else:
            if first and not (self.src.got_eof and self.dst.got_eof):
                result.ended = "closed early" if exc is None else f"error: {exc}"
            self.dst.close()
        self.relay.side_lost()

    def on_pause(self) -> None:
        # src cannot take more: stop reading what is written into it.
        self.dst.pause_reading()

    def on_resume(self) -> None:
        self.dst.resume_reading()


class Relay(Finishing):
    """Relay `a` <-> `b`; `await relay.done` (or set `on_done`) for the result."""

    def __init__(
        self,
        a: Link,
        b: Link,
        count_a_to_b: _Counter | None = None,
        count_b_to_a: _Counter | None = None,
    ) -> None:
        self.a = a
        self.b = b
        self.result = RelayResult()
        self._lost = 0
        self._init_finishing()
        a.attach(_Half(self, a, b, True, count_a_to_b))
        b.attach(_Half(self, b, a, False, count_b_to_a))

    def side_lost(self) -> None:
        self._lost += 1
        if self._lost == 2:
            self._settle()

    def close(self) -> None:
        """End both directions now (e.g. idle timeout)."""
        self.a.close()
        self.b.close()
