"""The chunked splice engine: one client over a reusable plain data connection, with
splice(2) (Linux; loaded only where `tcpgc.relay.splice` can be).

The chunked stream (`tcpgc.protocol.chunks`) is what lets a data connection outlive its
client. `ChunkedCopyRelay` speaks it by copying bytes through Python, as TLS requires; this
relay speaks it for plain data connections and still never reads the payload into
Python: each batch spliced from the plain side into a pipe leaves as a 4-byte header
(sent with MSG_MORE) and the pipe's contents; on the way back, headers are read with
exact 4-byte `recv` calls and then exactly the chunk's length is spliced, so nothing
past a chunk, and nothing after the end marker, is ever read here. Once both directions
have ended, the data link gets its socket back, unread bytes and all, and goes to
`on_idle` to serve the next client.

Under rate limits the directions are `LimitedDirection`s as in `SpliceRelay`: a chunk
is then at most a burst.

Failures end both sides with a reset, as in `ChunkedCopyRelay`: a data connection that
closes before its end marker must not look like a complete stream.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import cast

from tcpgc.errors import ProtocolError
from tcpgc.protocol.chunks import END, HEADER_SIZE, ChunkDecoder, chunk_header, parse_chunk_header
from tcpgc.relay.rate_limit import RateLimits
from tcpgc.relay.result import RESET_ERRNOS, ByteCounter
from tcpgc.relay.splice import (
    PIPES,
    SPLICE_FLAGS,
    LimitedDirection,
    SpliceDirection,
    SpliceRelay,
    close_socket,
)
from tcpgc.transport.link import Link
from tcpgc.transport.socket_handover import hand_over, lend, take_back


class _ChunkingDirection(SpliceDirection):
    """plain → data: each batch as a chunk, the plain side's EOF as the end marker."""

    chunked = True
    ending = False  # the end marker is queued

    def _deliver_eof(self) -> None:
        if self.done:
            return
        if not self.ending:
            self.ending = True
            self.header = END
            self._flush()  # comes back here once the marker is out
            return
        self.done = True
        self.relay.direction_done()


class _DechunkingDirection(SpliceDirection):
    """data → plain: chunk headers read exactly, payload spliced, the end marker
    delivered as EOF. `remaining` is what the current chunk still owes."""

    def __init__(
        self,
        relay: ChunkedSpliceRelay,
        src: socket.socket,
        dst: socket.socket,
        prefix: bytes,
        eof: bool,
        counter: ByteCounter | None,
        *,
        remaining: int,
        partial: bytes,
    ) -> None:
        super().__init__(relay, src, dst, prefix, eof, False, counter)
        self.relay: ChunkedSpliceRelay = relay
        self.remaining = remaining
        self.partial = bytearray(partial)  # a header read in part

    def _readable(self) -> None:
        if not self.remaining:
            try:
                got = self.src.recv(HEADER_SIZE - len(self.partial))
            except BlockingIOError:
                return
            except OSError as exc:
                self.relay.failed(exc, reset=True)
                return
            if not got:
                self.relay.stream_broken("data connection closed mid-stream")
                return
            self.partial += got
            try:
                length = parse_chunk_header(self.partial)
            except ProtocolError as exc:
                self.relay.stream_broken(f"error: {exc}")
                return
            if length is None:
                return
            self.partial.clear()
            if length == 0:  # the end marker: stop reading here, the rest is not ours
                self.eof = True
                self._read_off()
                self._flush()
                return
            self.remaining = length
        if self.pipe is None:
            self.pipe = PIPES.take()
        try:
            n = os.splice(
                self.src.fileno(), self.pipe[1], min(self.remaining, self.chunk), flags=SPLICE_FLAGS
            )
        except BlockingIOError:
            self._release_if_empty()
            return
        except OSError as exc:
            self.relay.failed(exc, reset=True)
            return
        if n == 0:
            self.relay.stream_broken("data connection closed mid-stream")
            return
        self.remaining -= n
        self.in_pipe += n
        self._flush()


class _LimitedChunking(LimitedDirection, _ChunkingDirection):
    pass


class _LimitedDechunking(LimitedDirection, _DechunkingDirection):
    pass


class ChunkedSpliceRelay(SpliceRelay):
    """Plain link `a` <-> plain data link `b` carrying the chunked stream. `on_idle(b)`
    gets the data link back once both directions ended."""

    def __init__(
        self,
        a: Link,
        b: Link,
        count_a_to_b: ByteCounter | None,
        count_b_to_a: ByteCounter | None,
        on_idle: Callable[[Link], None] | None,
        limits: RateLimits | None = None,
    ) -> None:
        self._init_relay(a, b)
        self.on_idle = on_idle
        self._limits = limits
        self._counters = (count_a_to_b, count_b_to_a)
        self._directions = ()
        self.leftover = b""

    def start(self) -> bool:
        """Take both sockets and start; False, with both links as they were, if either
        cannot be had (the `ChunkedCopyRelay` can still serve them)."""
        lent = lend(self.b, self._reclaimed)
        if lent is None:
            return False
        try:
            handed = hand_over(self.a)
        except OSError as exc:
            take_back(self.b, lent[1])
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            return False  # no descriptor for the duplicate
        if handed is None:
            take_back(self.b, lent[1])
            return False
        self._sa, prefix_a, eof_a = handed
        self._sb, framed = lent
        count_a_to_b, count_b_to_a = self._counters
        decoder = ChunkDecoder()
        broken = None
        try:
            prefix_b = b"".join(decoder.feed(framed))
        except ProtocolError as exc:
            prefix_b, broken = b"", f"error: {exc}"
        if decoder.ended:
            self.leftover = decoder.leftover  # the peer's next message: kept for later
        limited = self._limits is not None
        out = (_LimitedChunking if limited else _ChunkingDirection)(
            self, self._sa, self._sb, prefix_a, eof_a, True, count_a_to_b
        )
        if prefix_a:  # read before the relay began: within MAX_CHUNK (a link buffers less)
            out.header = chunk_header(len(prefix_a))
        back = (_LimitedDechunking if limited else _DechunkingDirection)(
            self, self._sb, self._sa, prefix_b, decoder.ended, count_b_to_a,
            remaining=decoder.remaining, partial=decoder.partial_header,
        )  # fmt: skip
        self._directions = (out, back)
        if self._limits is not None:
            cast(LimitedDirection, out).limit(self._limits, True)
            cast(LimitedDirection, back).limit(self._limits, False)
        if broken is not None:
            self.stream_broken(broken)
            return True
        for direction in self._directions:
            direction.start()
        return True

    def _reclaimed(self) -> None:
        # The data link is being closed by its owner (its agent is gone, the node
        # stops): let go of both sockets now, while the descriptor is still ours.
        self._finish("data connection closed", reset=True)

    def stream_broken(self, reason: str) -> None:
        self._finish(reason, reset=True)

    def failed(self, exc: OSError, reset: bool) -> None:
        # Any failure resets both sides: the data connection cannot be reused after it.
        reason = "reset" if exc.errno in RESET_ERRNOS else f"error: {exc.strerror or exc}"
        self._finish(reason, reset=True)

    def direction_done(self) -> None:
        if not all(d.done for d in self._directions) or self.finished:
            return
        self.finished = True
        for direction in self._directions:
            direction.stop()
        self._sa.close()
        link = self.b
        take_back(link, self.leftover)
        if self.on_idle is not None and not link.is_closed:
            self.on_idle(link)
        else:
            link.close()
        self._settle()

    def _close_sockets(self, reset: bool) -> None:
        # The data socket belongs to its link: closed through it, which is not reused.
        close_socket(self._sa, reset)
        if reset:
            self.b.reset()
        else:
            self.b.abort()
