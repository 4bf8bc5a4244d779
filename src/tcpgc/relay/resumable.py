"""The resumable engine: one client over a data connection that may be replaced.

`ResumableRelay` relays a plain link (the client on the LL, the server on the agent)
over the resumable stream of `tcpgc.protocol.resumable`: chunks as in
`ChunkedCopyRelay`, plus acknowledgements, so that what is not acknowledged yet can be
sent again. When the data connection breaks (closed, reset, or given up by its node when
the agent's session died), the relay does not end: it stops reading the plain side,
keeps it open, and waits (`waiting_since`) for its node to `attach` a new data
connection within the stream's window, or to `expire` it. The plain side never sees the
break, only a pause.

It moves bytes through Python, as TLS requires; the retention is the bytes objects the
plain side's reads produced (no copy). Back-pressure as in the other engines, plus one
more: a sender whose retention reaches `limit` stops reading its source until the
receiver acknowledges. Under rate limits the plain side pauses for the rate as for
the others (`RATE`), and the data connection (whichever it is) as for back-pressure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial

from tcpgc.errors import ProtocolError
from tcpgc.protocol.chunks import END, MAX_CHUNK, chunk_header
from tcpgc.protocol.resumable import (
    RESET_RECORD,
    RecordDecoder,
    Retention,
    ack_record,
    chunk_records,
)
from tcpgc.relay.rate_limit import RateLimits, Throttle
from tcpgc.relay.result import ByteCounter, Completion, RelayResult
from tcpgc.relay.resumable_sides import (
    FULL,
    RATE,
    WAITING,
    WRITE,
    DataSide,
    LimitedDataSide,
    LimitedPlainSide,
    PlainSide,
)
from tcpgc.task_set import NO_CONTEXT
from tcpgc.transport.link import Link
from tcpgc.transport.link_handlers import Ignoring

#: Acknowledge at once after this many bytes delivered; fewer are acknowledged after
#: ACK_DELAY (or with the next bytes the other way), so an idle stream retains nothing.
ACK_EVERY = 128 * 1024
ACK_DELAY = 0.2
#: How long a data connection whose stream was reset is kept reading, at most, while
#: the peer takes in the RESET record and resets it.
DRAIN_AFTER_RESET = 5.0
#: What may follow the stream's end before the connection's next frame is read.
_MAX_LEFTOVER = 4096


class ResumableRelay(Completion):
    """Relay plain link `a` <-> data link `b` (None while waiting for a new one).

    `retention` and `decoder` start where the stream starts (the client's first bytes
    may have gone with OPEN already). `on_broken(relay, reason)` is told when the data
    connection is lost and the relay starts waiting; `on_idle(b)` gets the data
    connection back once both directions ended."""

    __slots__ = (
        "a", "b", "result", "out", "inbound", "limit", "window", "stream_id", "key",
        "epoch", "label", "waiting_since", "ended", "on_broken", "on_idle", "_holds",
        "_a_blocked", "_acked_sent", "_ack_timer", "_eof_sent", "_counter_in", "throttles",
    )  # fmt: skip

    def __init__(
        self,
        a: Link,
        b: Link,
        *,
        retention: Retention,
        decoder: RecordDecoder,
        limit: int,
        window: float,
        stream_id: bytes,
        key: bytes,
        label: str,
        counters: tuple[ByteCounter | None, ByteCounter | None] = (None, None),
        on_broken: Callable[[ResumableRelay, str], None],
        on_idle: Callable[[Link], None] | None = None,
        limits: RateLimits | None = None,
    ) -> None:
        self.a = a
        self.b: Link | None = None
        self.result = RelayResult()
        self._init_completion()
        self.out = retention
        self.inbound = decoder
        self.limit = limit
        self.window = window
        self.stream_id = stream_id
        self.key = key  # the stream's key (`handshake.stream_key`): proves its resumes
        self.epoch = 0  # the highest resume number used (the LL accepts only higher ones)
        self.label = label  # how logs name the stream
        self.waiting_since: float | None = None
        self.ended = False
        self.on_broken = on_broken
        self.on_idle = on_idle
        self._holds = 0
        self._a_blocked = False
        self._acked_sent = decoder.offset  # what we told the peer we have
        self._ack_timer: asyncio.TimerHandle | None = None
        self._eof_sent = False
        self._counter_in = counters[1]
        #: Under rate limits: the throttles of the plain side and of the data connection.
        self.throttles: tuple[Throttle, ...] = ()
        if limits is not None:
            self.throttles = (
                limits.throttle(True, partial(self.hold, RATE), partial(self.release, RATE)),
                limits.throttle(False, self._pause_data, self._resume_data),
            )
        a.move_to_socket()
        b.move_to_socket()
        self.b = b  # before the plain side's held bytes are replayed into `send`
        a.attach((LimitedPlainSide if self.throttles else PlainSide)(self, counters[0]))
        self._connect(b)
        if decoder.offset:
            self._ack_now()  # the first bytes came with OPEN
        if retention.kept >= limit:
            self.hold(FULL)

    # ---- bytes -------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Bytes from the plain side: kept, and sent if a data connection is there."""
        out = self.out
        out.keep(data)
        if self.b is not None:
            self._write(data)
        if out.kept >= self.limit:
            self.hold(FULL)

    def _write(self, data: bytes | memoryview) -> None:
        link = self.b
        assert link is not None
        if len(data) <= MAX_CHUNK:  # a read is at most 256 KiB: one chunk, one write
            link.write(data, prefix=self._pending_ack() + chunk_header(len(data)))
            return
        records = chunk_records(data)
        prefix = self._pending_ack()
        for i in range(0, len(records), 2):
            link.write(records[i + 1], prefix=prefix + bytes(records[i]))
            prefix = b""

    def send_end(self) -> None:
        self.out.end()
        self.inbound.done_at = self.out.end_offset
        if self.b is not None:
            self.b.write(END, prefix=self._pending_ack())

    def received(self, data: bytes, side: DataSide) -> None:
        inbound = self.inbound
        try:
            pieces = inbound.feed(data)
            for piece in pieces:
                side.add(len(piece))
                self.a.write(piece)
            if inbound.acked > self.out.acked:
                self.out.ack(inbound.acked)
                if self.out.kept < self.limit:
                    self.release(FULL)
        except ProtocolError as exc:
            self.fail(f"error: {exc}")
            return
        if inbound.aborted:
            self.fail("reset")
            return
        if inbound.ended and not self._eof_sent:
            self._eof_sent = True
            self.a.write_eof()
        behind = inbound.offset - self._acked_sent
        if inbound.ended and behind or behind >= ACK_EVERY:
            self._ack_now()
        elif behind and self._ack_timer is None:
            loop = asyncio.get_running_loop()
            self._ack_timer = loop.call_later(ACK_DELAY, self._ack_due, context=NO_CONTEXT)
        if inbound.finished:
            self._idle()

    def _pending_ack(self) -> bytes:
        offset = self.inbound.offset
        if offset == self._acked_sent:
            return b""
        self._acked_sent = offset
        return ack_record(offset)

    def _ack_now(self) -> None:
        if self.b is not None:
            ack = self._pending_ack()
            if ack:
                self.b.write(ack)

    def _ack_due(self) -> None:
        self._ack_timer = None
        if not self.ended:
            self._ack_now()

    # ---- pauses ------------------------------------------------------------------

    def hold(self, reason: int) -> None:
        if not self._holds:
            self.a.pause_reading()
        self._holds |= reason

    def release(self, reason: int) -> None:
        if self._holds & reason:
            self._holds &= ~reason
            if not self._holds and not self.ended:
                self.a.resume_reading()

    def plain_blocked(self, blocked: bool) -> None:
        """The plain side's write buffer filled (or drained): stop (or go on) reading
        the data connection."""
        self._a_blocked = blocked
        if self.b is None:
            return
        if blocked:
            self.b.pause_reading()
        elif not (self.throttles and self.throttles[1].waiting):
            self.b.resume_reading()

    def _pause_data(self) -> None:
        if self.b is not None:
            self.b.pause_reading()

    def _resume_data(self) -> None:
        if self.b is not None and not self._a_blocked:
            self.b.resume_reading()

    # ---- the data connection -------------------------------------------------------

    def _connect(self, link: Link) -> None:
        self.b = link
        link.move_to_socket()
        if self._a_blocked or (self.throttles and self.throttles[1].waiting):
            link.pause_reading()
        kind = LimitedDataSide if self.throttles else DataSide
        link.attach(kind(self, link, self._counter_in))

    def broken(self, link: Link, reason: str) -> None:
        """`link`, this stream's data connection, is gone: wait for another one."""
        if self.ended or link is not self.b:
            return
        self.b = None
        link.handler = Ignoring()
        link.reset()  # a reset, not a FIN: the peer, if it hears it, waits for a resume
        self._cancel_ack_timer()
        if self.window <= 0:
            self.fail(reason)
            return
        self.inbound.reset_partial()
        self.waiting_since = time.monotonic()
        self.hold(WAITING)
        self.release(WRITE)
        self.on_broken(self, reason)

    def attach(self, link: Link, peer_received: int) -> int:
        """Go on over `link` from `peer_received`, what the peer has of our direction:
        send again what it lacks. Returns the bytes sent again. Raises ProtocolError
        (nothing changed) if that offset is not one we can go on from."""
        old = self.b
        kept, end_again = self.out.replay(peer_received)
        if old is not None:  # the peer knows better: the old connection is dead
            self.b = None
            old.handler = Ignoring()
            old.reset()
        self.inbound.reset_partial()
        self.waiting_since = None
        self._connect(link)
        replayed = 0
        for data in kept:
            self._write(data)
            replayed += len(data)
        if end_again:
            link.write(END)
        self._ack_now()
        self.release(WAITING)
        if self.out.kept < self.limit:
            self.release(FULL)
        return replayed

    # ---- the end -----------------------------------------------------------------

    def _idle(self) -> None:
        self.ended = True
        self._cancel_ack_timer()
        for throttle in self.throttles:  # the data link may serve someone else next
            throttle.stop()
        leftover = self.inbound.leftover
        self.a.handler = Ignoring()
        self.a.close()
        link = self.b
        self.b = None
        if link is None:
            self._settle()
            return
        if len(leftover) > _MAX_LEFTOVER:
            link.reset()
        else:
            link.resume_reading()
            link.detach(leftover, eof=link.got_eof)
            if self.on_idle is not None and not link.got_eof and not link.is_closed:
                self.on_idle(link)
            else:
                link.close()
        self._settle()

    def abort(self, reason: str) -> None:
        """The plain side was reset or broke: tell the peer, whose side is reset too,
        and end. The data connection is not reused."""
        if self.ended:
            return
        link = self.b
        if link is not None:
            # The record, then a FIN; and we go on reading (and dropping) what the peer
            # still sends: closing now, with its bytes unread, would send a reset, and
            # a reset can overtake the record and make the peer wait for a resume.
            self.b = None
            link.write(RESET_RECORD)
            link.write_eof()
            link.handler = Ignoring()
            link.resume_reading()
            asyncio.get_running_loop().call_later(DRAIN_AFTER_RESET, link.abort)
        self.fail(reason)

    def fail(self, reason: str, *, reset: bool = True) -> None:
        """End both sides now, with a reset unless `reset` is False; the data
        connection, if any, is not reused."""
        if self.ended:
            return
        self.ended = True
        self._cancel_ack_timer()
        for throttle in self.throttles:  # the data link may serve someone else next
            throttle.stop()
        if self.result.ended == "closed":
            self.result.ended = reason
        link, self.b = self.b, None
        if reset:
            self.a.reset()
            if link is not None:
                link.reset()
        else:
            self.a.close()
            if link is not None:
                link.abort()
        self._settle()

    def expire(self, reason: str) -> None:
        """Give up waiting (window passed, memory cap, node stopping)."""
        self.fail(reason)

    def close(self) -> None:
        """End both directions now (idle timeout, drain)."""
        self.fail("closed", reset=False)

    def _cancel_ack_timer(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
