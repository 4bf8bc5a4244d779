"""How a link's socket changes hands: given for good to a relay that drives it itself
(the splice relay: `hand_over`), lent for one client's time (the chunked splice relay:
`lend`, `take_back`), or moved onto tcpgc's own lean transport (`move_to_socket`).
Functions of the link they act on, which they reach through `HandOverHost`
(`tcpgc.transport.link.Link` is one).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Protocol

from tcpgc.transport.link_handlers import Buffering, Ignoring, LinkHandler, Retired
from tcpgc.transport.socket_transport import SocketTransport, StreamProtocol

#: Per-connection write buffer above which the feeding side stops reading. It bounds
#: the memory a slow reader can cost us (per direction).
WRITE_HIGH_WATER = 512 * 1024

#: A socket handed over: the socket, the bytes read before, whether the peer had ended.
HandedSocket = tuple[socket.socket, bytes, bool]


class HandOverHost(StreamProtocol, Protocol):
    """What the hand-over needs of a link: its transport and handler, which it
    replaces, and its reading state."""

    transport: asyncio.Transport | None
    handler: LinkHandler
    got_eof: bool
    #: Called by the link before it closes a socket that is lent (see `lend`).
    borrower: Callable[[], None] | None

    @property
    def is_tls(self) -> bool: ...
    @property
    def reading_paused(self) -> bool: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def detach(self, leftover: bytes = b"", eof: bool = False) -> None: ...


def can_hand_over(link: HandOverHost) -> bool:
    """Whether `hand_over` would succeed: plain TCP, open, nothing left to write,
    still buffering (no handler attached)."""
    transport = link.transport
    handler = link.handler
    return (
        not link.is_tls
        and transport is not None
        and not transport.is_closing()
        and transport.get_write_buffer_size() == 0
        and isinstance(handler, Buffering)
        and handler.lost is None
    )


def hand_over(link: HandOverHost) -> HandedSocket | None:
    """Give the link's socket to a caller that will drive it itself (the splice relay):
    returns it (a non-blocking duplicate, if a loop transport had it), the bytes read
    so far, and whether the peer already ended its stream. The link is over; the
    connection is not touched. Raises OSError if no descriptor is left for the
    duplicate."""
    if not can_hand_over(link):
        return None
    transport = link.transport
    buffered = link.handler
    assert transport is not None and isinstance(buffered, Buffering)
    if isinstance(transport, SocketTransport):
        # Our own transport lets go of the socket itself: no duplicate needed.
        sock = transport.release()
        link.handler = Ignoring()
        link.connection_lost(None)  # over for the link; the socket lives on
        return sock, bytes(buffered.data), buffered.eof
    sock = _duplicate(transport.get_extra_info("socket"))
    link.handler = Ignoring()
    transport.abort()
    return sock, bytes(buffered.data), buffered.eof


def can_lend(link: HandOverHost) -> bool:
    """Whether `lend` may succeed: plain TCP, open, nothing left to write, still
    buffering, the peer's stream not ended. It still fails if the link cannot move
    onto a socket of its own (see `move_to_socket`)."""
    handler = link.handler
    return can_hand_over(link) and isinstance(handler, Buffering) and not handler.eof


def lend(link: HandOverHost, on_reclaim: Callable[[], None]) -> tuple[socket.socket, bytes] | None:
    """Lend the link's socket, for a while, to a caller that drives it itself (the
    chunked splice relay) while the link keeps the connection: returns the socket (on a
    `SocketTransport` of the link's own) and the bytes read so far. Until `take_back`,
    the link neither reads nor writes, and a `close`, `abort` or `reset` of the link
    first calls `on_reclaim`, in which the borrower must let go of the socket (its
    readiness callbacks). None, and nothing changes, if the link is TLS, is closing,
    has bytes left to send, has seen the peer's EOF or its end, or cannot move onto a
    socket of its own."""
    handler = link.handler
    if not can_lend(link) or not move_to_socket(link):
        return None
    assert link.transport is not None and isinstance(handler, Buffering)
    link.pause_reading()
    link.handler = Ignoring()  # its end, if the borrower ends it, concerns nobody here
    link.borrower = on_reclaim
    return link.transport.get_extra_info("socket"), bytes(handler.data)


def take_back(link: HandOverHost, leftover: bytes = b"") -> None:
    """End a `lend`: the link buffers again, starting with `leftover`, and reads again."""
    link.borrower = None
    link.detach(leftover)
    link.resume_reading()


def move_to_socket(link: HandOverHost) -> bool:
    """Go on over a `SocketTransport` of our own instead of the loop's transport
    (0.5 to 1 KB less per connection: relays call this for the links they hold).
    Only between writes: False, and nothing changes, if the transport still has
    bytes to send, is closing, or has seen the peer's EOF, or if the move fails
    (no descriptor left for the duplicate)."""
    old = link.transport
    if isinstance(old, SocketTransport):
        return True
    if old is None or old.is_closing() or old.get_write_buffer_size() or link.got_eof:
        return False
    raw = old.get_extra_info("socket")
    if raw is None:
        return False
    try:
        sock = _duplicate(raw)
    except OSError:
        return False
    try:
        loop = asyncio.get_running_loop()
        new = SocketTransport(loop, sock, link, reading_paused=link.reading_paused)
    except (OSError, RuntimeError, NotImplementedError):
        sock.close()
        return False
    new.set_write_buffer_limits(high=WRITE_HIGH_WATER)
    # Only now is the old one let go: nothing runs between the two registrations.
    old.set_protocol(Retired())  # its last callback (connection_lost) goes nowhere
    old.abort()  # closes its descriptor; ours keeps the connection
    link.transport = new
    return True


def _duplicate(raw: socket.socket) -> socket.socket:
    """A non-blocking duplicate of a loop transport's socket, to outlive the transport."""
    # Family, type and protocol given: otherwise the socket asks the kernel for each.
    sock = socket.socket(raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno()))
    try:
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
