"""The chunked copy engine: one client over a reusable data connection, through Python.

`ChunkedCopyRelay` is `tcpgc.relay.copy.CopyRelay` for a data connection that outlives
its client: what the plain side (the client on the LL, the server on the CC) sends goes into the
data connection as chunks, its EOF as the end marker (see `tcpgc.protocol.chunks`), and
the chunks that come back go out as plain bytes, the peer's end marker as a half-close.
When both directions have ended, the plain side is closed and the data connection,
untouched, is handed to `on_idle` to serve the next client: that saves a TCP and a TLS
handshake per client, most of what a new TLS client costs the two nodes.

Anything else (a reset on either side, the data connection closing before its end
marker, a malformed chunk, `close()`) ends both sides, and the data connection is not
reused. Back-pressure works as in `CopyRelay`: a side whose write buffer fills
stops the reading of the other; under rate limits, through the same throttle that
pauses a side for the rate (see `tcpgc.relay.copy`).
"""

from __future__ import annotations

from collections.abc import Callable

from tcpgc.errors import ProtocolError
from tcpgc.protocol.chunks import END, MAX_CHUNK, ChunkDecoder, chunk_header
from tcpgc.relay.rate_limit import RateLimits, Throttle
from tcpgc.relay.result import ByteCounter, ByteTally, Completion, RelayResult, is_reset
from tcpgc.transport.link import Link
from tcpgc.transport.link_handlers import Ignoring

#: What may follow a peer's end marker before our own end: only its next frame (a POOL
#: offer of a few dozen bytes) is expected there.
_MAX_LEFTOVER = 4096


class _PlainSide(ByteTally):
    """Handler of the plain link: what it reads goes to the data link as chunks."""

    __slots__ = ("relay",)

    def __init__(self, relay: ChunkedCopyRelay, counter: ByteCounter | None) -> None:
        super().__init__(relay.result, True, counter)
        self.relay = relay

    def on_data(self, data: bytes) -> None:
        relay = self.relay
        self.add(len(data))
        view = memoryview(data)
        for start in range(0, len(view), MAX_CHUNK):
            piece = view[start : start + MAX_CHUNK]
            relay.b.write(piece, prefix=chunk_header(len(piece)))

    def on_eof(self) -> None:
        relay = self.relay
        relay.b.write(END)
        relay.sent_end = True
        relay.check_idle()

    def on_lost(self, exc: BaseException | None) -> None:
        relay = self.relay
        if relay.idle:
            return  # we closed it after both ends: the normal way
        if is_reset(exc):
            relay.fail("reset", reset=True)
        else:
            relay.fail("closed early" if exc is None else f"error: {exc}", reset=True)

    def on_pause(self) -> None:
        self.relay.b.pause_reading()

    def on_resume(self) -> None:
        self.relay.b.resume_reading()


class _DataSide(ByteTally):
    """Handler of the data link: chunks from it go to the plain link as bytes."""

    __slots__ = ("relay", "decoder")

    def __init__(self, relay: ChunkedCopyRelay, counter: ByteCounter | None) -> None:
        super().__init__(relay.result, False, counter)
        self.relay = relay
        self.decoder = ChunkDecoder()

    def on_data(self, data: bytes) -> None:
        relay = self.relay
        if self.decoder.ended:
            # The next message after our client's stream (an agent offering the
            # connection again): kept for whoever takes the connection next.
            relay.leftover += data
            if len(relay.leftover) > _MAX_LEFTOVER:
                relay.fail("error: bytes after the end of the stream", reset=True)
            return
        try:
            pieces = self.decoder.feed(data)
        except ProtocolError as exc:
            relay.fail(f"error: {exc}", reset=True)
            return
        plain = relay.a
        for piece in pieces:
            self.add(len(piece))
            plain.write(piece)
        if self.decoder.ended:
            relay.leftover = self.decoder.leftover
            if len(relay.leftover) > _MAX_LEFTOVER:
                relay.fail("error: bytes after the end of the stream", reset=True)
                return
            plain.write_eof()
            relay.got_end = True
            relay.check_idle()

    def on_eof(self) -> None:
        # Before its end marker, the stream was cut short: say so with a reset rather
        # than pass on an EOF that would look like a complete stream. After it, our own
        # direction can no longer end properly (the peer gave up on the connection).
        self.relay.fail("data connection closed mid-stream", reset=True)

    def on_lost(self, exc: BaseException | None) -> None:
        relay = self.relay
        if relay.idle:
            return
        if is_reset(exc):
            relay.fail("reset", reset=True)
        else:
            relay.fail("data connection lost" if exc is None else f"error: {exc}", reset=True)

    def on_pause(self) -> None:
        self.relay.a.pause_reading()

    def on_resume(self) -> None:
        self.relay.a.resume_reading()


class _LimitedPlainSide(_PlainSide):
    __slots__ = ()

    def add(self, n: int) -> None:
        super().add(n)
        self.relay.throttles[0].moved(n)

    def on_pause(self) -> None:
        self.relay.throttles[1].block()

    def on_resume(self) -> None:
        self.relay.throttles[1].unblock()


class _LimitedDataSide(_DataSide):
    __slots__ = ()

    def add(self, n: int) -> None:
        super().add(n)
        self.relay.throttles[1].moved(n)

    def on_pause(self) -> None:
        self.relay.throttles[0].block()

    def on_resume(self) -> None:
        self.relay.throttles[0].unblock()


class ChunkedCopyRelay(Completion):
    """Relay plain link `a` <-> chunked data link `b`; `await relay.done` for the result.
    `on_idle(b)` gets the data connection back once both directions ended, with whatever
    followed the end marker buffered in it."""

    __slots__ = (
        "a", "b", "result", "on_idle", "sent_end", "got_end", "idle", "ended",
        "leftover", "throttles",
    )  # fmt: skip

    def __init__(
        self,
        a: Link,
        b: Link,
        count_a_to_b: ByteCounter | None = None,
        count_b_to_a: ByteCounter | None = None,
        on_idle: Callable[[Link], None] | None = None,
        limits: RateLimits | None = None,
    ) -> None:
        self.a = a
        self.b = b
        self.result = RelayResult()
        self._init_completion()
        self.on_idle = on_idle
        self.sent_end = False  # a's EOF went into b as the end marker
        self.got_end = False  # b's end marker came, and went to a as EOF
        self.idle = False  # both ended: b is free again
        self.ended = False
        self.leftover = b""
        # Held for the life of the client: on lean transports of our own.
        a.move_to_socket()
        b.move_to_socket()
        #: Under rate limits: the throttles of a to b and of b to a.
        self.throttles: tuple[Throttle, ...] = ()
        if limits is None:
            a.attach(_PlainSide(self, count_a_to_b))
            b.attach(_DataSide(self, count_b_to_a))
            return
        self.throttles = (
            limits.throttle(True, a.pause_reading, a.resume_reading),
            limits.throttle(False, b.pause_reading, b.resume_reading),
        )
        a.attach(_LimitedPlainSide(self, count_a_to_b))
        b.attach(_LimitedDataSide(self, count_b_to_a))

    def check_idle(self) -> None:
        if not (self.sent_end and self.got_end) or self.ended:
            return
        self.idle = self.ended = True
        self._stop_throttles()
        # The plain side is done with the data connection: its late events (a drained
        # write buffer resuming the reader it paused) must not reach the next client's.
        self.a.handler = Ignoring()
        self.a.close()  # after what is queued for it has been sent
        data_link = self.b
        data_link.resume_reading()  # it may have been paused by this client's side
        data_link.detach(self.leftover, eof=data_link.got_eof)
        if self.on_idle is not None and not data_link.got_eof and not data_link.is_closed:
            self.on_idle(data_link)
        else:
            data_link.close()
        self._settle()

    def fail(self, reason: str, *, reset: bool) -> None:
        """End both sides now (resetting them if `reset`); the data connection is
        dropped, not reused."""
        if self.ended:
            return
        self.ended = True
        self._stop_throttles()
        if self.result.ended == "closed":
            self.result.ended = reason
        if reset:
            self.a.reset()
            self.b.reset()
        else:
            self.a.close()
            self.b.abort()
        self._settle()

    def _stop_throttles(self) -> None:
        # The data link may serve another client next: no late resume may reach it.
        for throttle in self.throttles:
            throttle.stop()

    def close(self) -> None:
        """End both directions now (idle timeout, drain, lost LL)."""
        self.fail("closed", reset=False)
