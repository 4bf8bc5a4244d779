"""One TCP connection as the nodes see it: plain, or TLS over memory BIOs
(`tcpgc.transport.tls_memory`: bytes from the socket go into it, the records it makes
go straight to the transport, and half-close works over TLS 1.3).

A `Link` hands what it reads to its `handler`. Until a real handler is attached, a
buffering one holds the first bytes (and pauses reading beyond a small bound), so a
client that talks first while it waits for an agent loses nothing.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import cast

from tcpgc.safe_text import shared
from tcpgc.transport import socket_handover
from tcpgc.transport.link_handlers import Buffering, Ignoring, LinkHandler
from tcpgc.transport.peer_address import endpoint_of, format_peer
from tcpgc.transport.socket_handover import WRITE_HIGH_WATER
from tcpgc.transport.socket_transport import SocketTransport, reset_on_close
from tcpgc.transport.tls_memory import BIO_SLICE, MemoryTls, ReadStatus


class Link(asyncio.Protocol):
    """A TCP connection with an optional TLS layer and a swappable handler."""

    # Thousands are alive at once (two per relayed client on each node): no __dict__.
    # Futures and peer strings are made only when asked for: most links never are, and
    # they would cost about a kilobyte per relayed client.
    __slots__ = (
        "transport", "handler", "borrower", "_tls_context", "_server_side",
        "_server_hostname", "_on_made", "_tls", "_ready", "_closed", "is_closed",
        "_peername", "shed", "got_eof", "sent_eof", "_reading_paused", "__weakref__",
    )  # fmt: skip

    def __init__(
        self,
        tls: ssl.SSLContext | None = None,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        on_made: Callable[[Link], None] | None = None,
    ) -> None:
        self._tls_context = tls
        self._server_side = server_side
        self._server_hostname = server_hostname
        self._on_made = on_made
        self._tls: MemoryTls | None = None  # from connection_made to connection_lost
        self.transport: asyncio.Transport | None = None
        self.handler: LinkHandler = Buffering(self)
        self._ready: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        #: The connection is gone (what `closed` tells, without making a future).
        self.is_closed = False
        self._peername: object = None
        #: Dropped by admission control; its task should not log it again.
        self.shed = False
        self.got_eof = False
        self.sent_eof = False
        self._reading_paused = False
        #: Whom to tell before the socket closes, while it is lent (`socket_handover.lend`).
        self.borrower: Callable[[], None] | None = None

    @classmethod
    def on_socket(cls, sock: socket.socket, peername: object) -> Link:
        """A plain link over a connected non-blocking socket we dialed ourselves: on a
        `SocketTransport` from the start, so no loop transport is made for it and a
        relay takes the socket without duplicating it. It reads nothing until a handler
        is attached (see `hold_reading`): a splice relay that takes the socket at once
        then costs no reader registered and dropped."""
        link = cls()
        link._peername = peername
        loop = asyncio.get_running_loop()
        link.connection_made(SocketTransport(loop, sock, link, reading_paused=True))
        link.hold_reading()  # the transport reads nothing yet: only the link is told
        return link

    def hold_reading(self) -> None:
        """Read nothing until a handler is attached (`attach` resumes reading, before
        it replays what was held, so a pause its handler then asks for stands)."""
        self.pause_reading()
        if isinstance(self.handler, Buffering):
            self.handler.paused = True

    # ---- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport (uvloop's does not subclass asyncio.Transport, but is one).
        self.transport = cast(asyncio.Transport, transport)
        # No TCP_NODELAY to set: asyncio and uvloop both set it on every TCP transport.
        # Write buffers above asyncio's 64 KiB default: a single socket read can return
        # 256 KiB, and pausing the peer on every chunk costs more than it saves.
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peername = self._peername  # known already when made by `on_socket`
        if peername is None:
            peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            # The links of one agent, or to one server, share one host string.
            peername = (shared(str(peername[0])), peername[1])
        self._peername = peername
        if self._tls_context is not None:
            self._ready = asyncio.get_running_loop().create_future()
            self._tls = MemoryTls(
                self._tls_context,
                server_side=self._server_side,
                server_hostname=self._server_hostname,
            )
            self._handshake()
        on_made, self._on_made = self._on_made, None  # needed once: let it go
        if on_made is not None:
            on_made(self)

    def data_received(self, data: bytes) -> None:
        tls = self._tls
        if tls is None:
            self.handler.on_data(data)
            return
        # The memory BIOs are fed a slice at a time: OpenSSL keeps a BIO's largest
        # buffer for the life of the connection, so one 256 KiB read would otherwise
        # pin 256 KiB per idle connection after any bulk transfer.
        view = memoryview(data)
        plain: list[bytes] = []
        status = ReadStatus.MORE
        for start in range(0, len(view), BIO_SLICE):
            if self.transport is None or self.transport.is_closing():
                return
            tls.feed(view[start : start + BIO_SLICE])
            if self._ready is not None:  # handshake under way (or failed)
                if not self._ready.done():
                    self._handshake()
                if self._ready is not None:
                    continue
            status = tls.decrypt(plain)
            if status is not ReadStatus.MORE:
                break
        # Handed on as one chunk, so the peer gets one write, not one per 16 KiB record.
        if plain:
            self.handler.on_data(plain[0] if len(plain) == 1 else b"".join(plain))
        if status is ReadStatus.FAILED:
            self.reset()
            return
        if status is ReadStatus.ENDED:
            self._got_eof()
        self._flush()  # TLS 1.3 key updates and alerts are written during reads

    def eof_received(self) -> bool:
        if self._ready is not None and not self._ready.done():
            self._fail_handshake(
                ConnectionResetError("peer closed the connection during the TLS handshake")
            )
            return False
        self._got_eof()
        return True  # keep our write side open: half-close

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(
                exc or ConnectionResetError("connection closed before it was ready")
            )
            self._ready.exception()  # mark retrieved: a refused handshake is logged by the caller
        self.is_closed = True
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        handler, self.handler = self.handler, Ignoring()
        handler.on_lost(exc)
        # Drop the TLS state and the transport now rather than at the next cyclic
        # garbage collection: OpenSSL's buffers are tens of KiB per connection, and after
        # a flood of connections they would otherwise linger in the heap.
        self._tls = None
        self.transport = None

    def pause_writing(self) -> None:
        self.handler.on_pause()

    def resume_writing(self) -> None:
        self.handler.on_resume()

    # ---- state, made on demand ---------------------------------------------------------

    @property
    def ready(self) -> asyncio.Future[None]:
        """Done once the link can carry data: at once for plain TCP, after the handshake
        for TLS (with the handshake's error if it failed)."""
        if self._ready is not None:  # TLS handshake under way, or failed
            return self._ready
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ready.set_result(None)
        return ready

    @property
    def closed(self) -> asyncio.Future[None]:
        """Done when the connection is gone; `is_closed` tells the same without a future."""
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
            if self.is_closed:
                self._closed.set_result(None)
        return self._closed

    @property
    def is_closing(self) -> bool:
        """Nothing more written goes out: the link is closed or closing."""
        return self.transport is None or self.transport.is_closing()

    @property
    def is_tls(self) -> bool:
        """The connection carries TLS (until it is lost)."""
        return self._tls is not None

    @property
    def reading_paused(self) -> bool:
        """Reading was paused (`pause_reading`), by flow control or a borrower."""
        return self._reading_paused

    @property
    def peer(self) -> str:
        """'host:port' of the peer, for logs; '?' before the connection is made."""
        return "?" if self._peername is None else format_peer(self._peername)

    @property
    def peer_host(self) -> str:
        return str(self._peername[0]) if isinstance(self._peername, tuple) else ""

    @property
    def peer_endpoint(self) -> tuple[str, int]:
        """(host, port) of the peer, for PROXY protocol headers; ("", 0) if unknown."""
        return endpoint_of(self._peername)

    @property
    def local_endpoint(self) -> tuple[str, int]:
        """(host, port) of our end while the connection is open; ("", 0) otherwise."""
        if self.transport is None:
            return "", 0
        return endpoint_of(self.transport.get_extra_info("sockname"))

    # ---- TLS -------------------------------------------------------------------------

    def _handshake(self) -> None:
        assert self._tls is not None
        try:
            complete = self._tls.handshake()
        except (ssl.SSLError, OSError) as exc:
            self._flush()
            self._fail_handshake(exc)
            return
        self._flush()
        if not complete:
            return
        # Its awaiter holds the future: the link need not (a future per idle link).
        ready, self._ready = self._ready, None
        if ready is not None and not ready.done():
            ready.set_result(None)

    def _fail_handshake(self, exc: BaseException) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(exc)
            self._ready.exception()
        self.abort()

    def _flush(self) -> None:
        """Send the records the TLS layer has made (handshake, alerts, key updates)."""
        if self._tls is None:
            return
        records = self._tls.take_output()  # after most reads: nothing, found cheaply
        transport = self.transport
        if records and transport is not None and not transport.is_closing():
            transport.write(records)

    @property
    def peer_certificate(self) -> bytes | None:
        """DER of the peer's certificate (TLS only)."""
        return self._tls.peer_certificate if self._tls is not None else None

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """The context in use: after SNI selection, the one that was chosen."""
        return self._tls.context if self._tls is not None else None

    # ---- what handlers call ----------------------------------------------------------

    def _got_eof(self) -> None:
        if not self.got_eof:
            self.got_eof = True
            self.handler.on_eof()

    def attach(self, handler: LinkHandler) -> None:
        """Give this link its real handler, replaying what was buffered before."""
        previous = self.handler
        self.handler = handler
        if isinstance(previous, Buffering):
            previous.replay(handler)

    @property
    def buffered(self) -> bytes:
        """The bytes read and held until a handler is attached."""
        handler = self.handler
        return bytes(handler.data) if isinstance(handler, Buffering) else b""

    def consume(self, n: int) -> None:
        """Drop the first `n` held bytes: they were passed on another way."""
        handler = self.handler
        if isinstance(handler, Buffering):
            del handler.data[:n]

    def detach(self, leftover: bytes = b"", eof: bool = False) -> None:
        """Go back to buffering, starting with `leftover` (bytes read past a frame)."""
        buffer = Buffering(self, leftover, eof)
        if self.is_closed:
            buffer.lost = (None,)
        self.handler = buffer

    def write(self, data: bytes | memoryview, prefix: bytes = b"") -> None:
        """Send `prefix` then `data`; over TLS in the same records and one socket write
        (a chunk header does not cost a record and a send of its own)."""
        if self.transport is None or self.transport.is_closing() or self.sent_eof:
            return
        if self._tls is None:
            # With its prefix in one write: one send, one segment.
            self.transport.write(prefix + data if prefix else data)
            return
        try:
            records = self._tls.encrypt(data, prefix)
        except ssl.SSLError:
            self.reset()
            return
        self.transport.write(records)

    def write_eof(self) -> None:
        """Half-close: the peer sees the end of our stream, and we keep reading."""
        if self.transport is None or self.sent_eof or self.transport.is_closing():
            return
        self.sent_eof = True
        if self._tls is not None:
            self._tls.close_notify()  # TLS 1.3 lets us go on reading
            self._flush()
        if self.transport.can_write_eof():
            try:
                self.transport.write_eof()
            except OSError:  # the peer is gone already (ENOTCONN): a reset, not a bug
                self.reset()

    def pause_reading(self) -> None:
        if (
            self.transport is not None
            and not self._reading_paused
            and not self.transport.is_closing()
        ):
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self._reading_paused and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()

    def move_to_socket(self) -> bool:
        """Go on over a `SocketTransport` of our own (see `socket_handover.move_to_socket`)."""
        return socket_handover.move_to_socket(self)

    def _let_go(self) -> None:
        # Before the socket closes: a borrower lets go of it first (its callbacks on a
        # closed descriptor would be stale, and on a reused one, wrong).
        borrower, self.borrower = self.borrower, None
        if borrower is not None:
            borrower()

    # ---- the end ---------------------------------------------------------------------

    def close(self) -> None:
        """Close after what we wrote is sent."""
        if self.borrower is not None:
            self._let_go()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.borrower is not None:
            self._let_go()
        if self.transport is not None:
            self.transport.abort()

    def reset(self) -> None:
        """Close with a TCP RST, so the peer sees a reset as we did."""
        if self.borrower is not None:
            self._let_go()
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            reset_on_close(sock)
        self.transport.abort()
