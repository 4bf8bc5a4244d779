"""The link handlers of a resumable relay (`tcpgc.relay.resumable`): its plain side,
each of its data connections, and their variants under rate limits.

They reach the relay through `Stream`, the part of `ResumableRelay` they use (a
protocol, so that this module does not import the relay's).
"""

from __future__ import annotations

from typing import Protocol

from tcpgc.relay.rate_limit import Throttle
from tcpgc.relay.result import ByteCounter, ByteTally, RelayResult, is_reset
from tcpgc.transport.link import Link

#: Why the plain side is not read (bits: a set would cost 200 bytes per stream):
#: waiting for a data connection, retention full, the data connection's write buffer
#: full, a rate limit owed.
WAITING, FULL, WRITE, RATE = 1, 2, 4, 8


class Stream(Protocol):
    """What the handlers ask of their `ResumableRelay`."""

    @property
    def result(self) -> RelayResult: ...
    @property
    def ended(self) -> bool: ...
    @property
    def b(self) -> Link | None: ...
    @property
    def throttles(self) -> tuple[Throttle, ...]: ...
    def send(self, data: bytes) -> None: ...
    def send_end(self) -> None: ...
    def abort(self, reason: str) -> None: ...
    def plain_blocked(self, blocked: bool) -> None: ...
    def received(self, data: bytes, side: DataSide) -> None: ...
    def fail(self, reason: str, *, reset: bool = True) -> None: ...
    def broken(self, link: Link, reason: str) -> None: ...
    def hold(self, reason: int) -> None: ...
    def release(self, reason: int) -> None: ...


class PlainSide(ByteTally):
    __slots__ = ("relay",)

    def __init__(self, relay: Stream, counter: ByteCounter | None) -> None:
        super().__init__(relay.result, True, counter)
        self.relay = relay

    def on_data(self, data: bytes) -> None:
        self.add(len(data))
        self.relay.send(data)

    def on_eof(self) -> None:
        self.relay.send_end()

    def on_lost(self, exc: BaseException | None) -> None:
        relay = self.relay
        if relay.ended:
            return
        relay.abort("reset" if is_reset(exc) else f"error: {exc}" if exc else "closed early")

    def on_pause(self) -> None:
        self.relay.plain_blocked(True)

    def on_resume(self) -> None:
        self.relay.plain_blocked(False)


class DataSide(ByteTally):
    """Handler of one data connection of the stream: events of a replaced one are stale."""

    __slots__ = ("relay", "link")

    def __init__(self, relay: Stream, link: Link, counter: ByteCounter | None) -> None:
        super().__init__(relay.result, False, counter)
        self.relay = relay
        self.link = link

    def on_data(self, data: bytes) -> None:
        if self.relay.b is self.link:
            self.relay.received(data, self)

    def on_eof(self) -> None:
        # A FIN comes from the peer's own system, never from the network in between:
        # the peer node let go of the stream (its process ended), so it cannot resume.
        relay = self.relay
        if relay.b is self.link:
            relay.fail("data connection closed mid-stream")

    def on_lost(self, exc: BaseException | None) -> None:
        why = "data connection reset" if is_reset(exc) else f"data connection lost: {exc}"
        self.relay.broken(self.link, why if exc else "data connection lost")

    def on_pause(self) -> None:
        if self.relay.b is self.link:
            self.relay.hold(WRITE)

    def on_resume(self) -> None:
        if self.relay.b is self.link:
            self.relay.release(WRITE)


class LimitedPlainSide(PlainSide):
    """Under rate limits: what the plain side sends is taken from `throttles[0]`."""

    __slots__ = ()

    def add(self, n: int) -> None:
        super().add(n)
        self.relay.throttles[0].moved(n)


class LimitedDataSide(DataSide):
    """Under rate limits: what goes to the plain side is taken from `throttles[1]`."""

    __slots__ = ()

    def add(self, n: int) -> None:
        super().add(n)
        self.relay.throttles[1].moved(n)
