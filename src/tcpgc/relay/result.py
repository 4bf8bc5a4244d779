"""What every relay engine shares: its result, how it tells it is over, how it counts
the bytes it moves, what counts as a reset, and the interface callers hold (`AnyRelay`).

The engines (`copy`, `chunked_copy`, `splice`, `chunked_splice`) import from here and
never from each other's private names; `tcpgc.relay.factory` picks one.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tcpgc.task_set import NO_CONTEXT
from tcpgc.transport.link import Link

__all__ = [
    "RESET_ERRNOS",
    "AnyRelay",
    "ByteCounter",
    "ByteTally",
    "Completion",
    "RelayEnd",
    "RelayResult",
    "is_reset",
]


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


class ByteCounter(Protocol):
    """A metric the relay adds the bytes it moves to (a Prometheus counter child)."""

    def inc(self, amount: float = 1) -> None: ...


class RelayEnd(Protocol):
    """What callers see of a relay's plain side: a client's or server's connection, or
    a UDP flow's end (`tcpgc.relay.datagrams`)."""

    @property
    def peer(self) -> str: ...
    def abort(self) -> None: ...


class AnyRelay(Protocol):
    """What callers hold of a relay, whichever engine runs it."""

    @property
    def a(self) -> RelayEnd: ...
    @property
    def b(self) -> Link | None: ...
    @property
    def result(self) -> RelayResult: ...
    @property
    def done(self) -> asyncio.Future[RelayResult]: ...
    @property
    def on_done(self) -> Callable[[RelayResult], None] | None: ...
    @on_done.setter
    def on_done(self, callback: Callable[[RelayResult], None] | None) -> None: ...
    def close(self) -> None:
        """End both directions now (idle timeout, drain, a lost peer node)."""


class Completion:
    """How a relay tells it is over: `await relay.done`, or `relay.on_done`, called soon
    after with the result (also when set after the end: a relay can end while it is
    built, on a link that was already lost). The callback costs no future: thousands of
    relays are held idle at once. An engine derives from it, sets `result`, calls
    `_init_completion()` in its constructor and `_settle()` once when it is over."""

    __slots__ = ("_done", "_on_done", "is_done")

    result: RelayResult

    def _init_completion(self) -> None:
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


class ByteTally:
    """The byte accounting of one direction of a relay: its share of the result, the
    time of the last activity (for idle timeouts) and its metric.

    Each engine's per-direction object (the copy engines' link handlers, the splice
    engines' directions) derives from it, so counting costs no object of its own:
    thousands of relays are held at once."""

    __slots__ = ("result", "a_to_b", "counter")

    def __init__(self, result: RelayResult, a_to_b: bool, counter: ByteCounter | None) -> None:
        self.result = result
        self.a_to_b = a_to_b
        self.counter = counter

    def add(self, n: int) -> None:
        """Count `n` bytes moved on."""
        result = self.result
        result.last_activity = time.monotonic()
        if self.a_to_b:
            result.bytes_a_to_b += n
        else:
            result.bytes_b_to_a += n
        if self.counter is not None:
            self.counter.inc(n)


def is_reset(exc: BaseException | None) -> bool:
    """Whether a link ended with this error because its peer reset the connection (or
    it broke under a write): the relay then resets the other side too."""
    return isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError)


#: The same, as the errno of a socket call the splice engine makes itself. A kernel
#: timeout (keepalive or retransmissions gave up) counts too: the socket is as dead as
#: after a reset, and the splice engine has no transport to report it otherwise.
RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})
