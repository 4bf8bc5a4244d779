"""How a `tcpgc.transport.link.Link` gives its socket to a relay that drives it itself (the splice
relays), lends it for one client's time, or moves onto tcpgc's own lean transport.
A mixin of `Link`, which owns the state declared here."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable

from tcpgc.transport.link_handlers import Buffering, Ignoring, LinkHandler, Retired
from tcpgc.transport.socket_transport import SocketTransport

#: Per-connection write buffer above which the feeding side stops reading. It bounds
#: the memory a slow reader can cost us (per direction).
WRITE_HIGH_WATER = 512 * 1024


class SocketHandOver(asyncio.Protocol):
    """The socket hand-over half of `Link`. The attributes it sets have their slots
    here; the rest are `Link`'s."""

    __slots__ = ("transport", "handler", "_borrower")

    transport: asyncio.Transport | None
    handler: LinkHandler
    _borrower: Callable[[], None] | None  # see `lend`
    _ssl: ssl.SSLObject | None
    got_eof: bool
    _reading_paused: bool

    # Provided by `Link`.
    def pause_reading(self) -> None:
        raise NotImplementedError

    def resume_reading(self) -> None:
        raise NotImplementedError

    def detach(self, leftover: bytes = b"", eof: bool = False) -> None:
        raise NotImplementedError

    def connection_lost(self, exc: BaseException | None) -> None:
        raise NotImplementedError

    def can_hand_over(self) -> bool:
        """Whether `hand_over` would succeed: plain TCP, open, nothing left to write,
        still buffering (no handler attached)."""
        return (
            self._ssl is None
            and self.transport is not None
            and not self.transport.is_closing()
            and self.transport.get_write_buffer_size() == 0
            and isinstance(self.handler, Buffering)
            and self.handler.lost is None
        )

    def hand_over(self) -> tuple[socket.socket, bytes, bool] | None:
        """Give the socket to a caller that will drive it itself (the splice relay):
        returns it (a non-blocking duplicate, if a loop transport had it), the bytes
        read so far, and whether the peer already ended its stream. The link is over;
        the connection is not touched."""
        if not self.can_hand_over():
            return None
        assert self.transport is not None and isinstance(self.handler, Buffering)
        buffered = self.handler
        if isinstance(self.transport, SocketTransport):
            # Our own transport lets go of the socket itself: no duplicate needed.
            sock = self.transport.release()
            self.handler = Ignoring()
            self.connection_lost(None)  # over for the link; the socket lives on
            return sock, bytes(buffered.data), buffered.eof
        raw = self.transport.get_extra_info("socket")
        # Family, type and protocol given: otherwise the socket asks the kernel for each.
        sock = socket.socket(raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno()))
        sock.setblocking(False)
        self.handler = Ignoring()
        self.transport.abort()
        return sock, bytes(buffered.data), buffered.eof

    def can_lend(self) -> bool:
        """Whether `lend` would succeed, but for running out of descriptors: plain TCP,
        open, nothing left to write, still buffering, the peer's stream not ended."""
        handler = self.handler
        transport = self.transport
        return not (
            self._ssl is not None
            or transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size()
            or not isinstance(handler, Buffering)
            or handler.eof
            or handler.lost is not None
            or self.got_eof
        )

    def lend(self, on_reclaim: Callable[[], None]) -> tuple[socket.socket, bytes] | None:
        """Lend the socket, for a while, to a caller that drives it itself (the chunked
        splice relay) while this link keeps the connection: returns the socket and the
        bytes read so far. Until `take_back`, the link neither reads nor writes, and a
        `close`, `abort` or `reset` of the link first calls `on_reclaim`, in which the
        borrower must let go of the socket (its readiness callbacks). None, and nothing
        changes, if the link is TLS, is closing, has bytes left to send, has seen the
        peer's EOF or its end, or cannot move onto a socket of its own."""
        handler = self.handler
        transport = self.transport
        if (
            self._ssl is not None
            or transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size()
            or not isinstance(handler, Buffering)
            or handler.eof
            or handler.lost is not None
            or not self.move_to_socket()
        ):
            return None
        assert self.transport is not None
        self.pause_reading()
        self.handler = Ignoring()  # its end, if the borrower ends it, concerns nobody here
        self._borrower = on_reclaim
        return self.transport.get_extra_info("socket"), bytes(handler.data)

    def take_back(self, leftover: bytes = b"") -> None:
        """End a `lend`: buffer again, starting with `leftover`, and read again."""
        self._borrower = None
        self.detach(leftover)
        self.resume_reading()

    def _let_go(self) -> None:
        """Before the socket closes: a borrower lets go of it first (its callbacks on a
        closed descriptor would be stale, and on a reused one, wrong)."""
        borrower, self._borrower = self._borrower, None
        if borrower is not None:
            borrower()

    def move_to_socket(self) -> bool:
        """Go on over a `SocketTransport` of our own instead of the loop's transport
        (0.5 to 1 KB less per connection: relays call this for the links they hold).
        Only between writes: False, and nothing changes, if the transport still has
        bytes to send, is closing, or has seen the peer's EOF, or if the move fails
        (no descriptor left for the duplicate)."""
        old = self.transport
        if isinstance(old, SocketTransport):
            return True
        if old is None or old.is_closing() or old.get_write_buffer_size() or self.got_eof:
            return False
        raw = old.get_extra_info("socket")
        if raw is None:
            return False
        try:
            sock = socket.socket(raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno()))
        except OSError:
            return False
        try:
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            new = SocketTransport(loop, sock, self, reading_paused=self._reading_paused)
        except (OSError, RuntimeError, NotImplementedError):
            sock.close()
            return False
        new.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        # Only now is the old one let go: nothing runs between the two registrations.
        old.set_protocol(Retired())  # its last callback (connection_lost) goes nowhere
        old.abort()  # closes its descriptor; ours keeps the connection
        self.transport = new
        return True
