"""One TCP connection as the nodes see it: plain, or TLS through `ssl.SSLObject`.

asyncio's own TLS transport cannot half-close (no `write_eof`) and keeps large buffers
per connection, so TLS is done here over memory BIOs: bytes from the socket go into
the SSLObject, records it produces go straight to the socket transport. TLS 1.3 lets
one side send close_notify and keep reading, which is how half-close crosses the tunnel.

A `Link` hands what it reads to its `handler`. Until a real handler is attached, a
buffering one holds the first bytes (and pauses reading beyond a small bound), so a
client that talks first while it waits for an agent loses nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Protocol, cast

from tcpgc.socket_transport import SocketTransport
from tcpgc.texts import shared

#: What the buffering handler holds before it stops reading: a client's first request
#: while it waits for an agent, or bytes that followed a frame. Bounded so a waiting
#: client cannot make us buffer without limit.
PREATTACH_LIMIT = 64 * 1024

#: Per-connection write buffer above which the feeding side stops reading. It bounds
#: the memory a slow reader can cost us (per direction).
WRITE_HIGH_WATER = 512 * 1024

#: Largest piece fed to a TLS memory BIO at once, which bounds what each BIO keeps
#: allocated for the rest of the connection (OpenSSL never shrinks it).
BIO_SLICE = 32 * 1024

_MORE, _ENDED, _FAILED = object(), object(), object()

#: How much decrypted data one SSLObject.read call returns at most.
TLS_READ_SIZE = 64 * 1024


class LinkHandler(Protocol):
    def on_data(self, data: bytes) -> None: ...
    def on_eof(self) -> None: ...
    def on_lost(self, exc: BaseException | None) -> None: ...
    def on_pause(self) -> None: ...
    def on_resume(self) -> None: ...


class _Buffer:
    """Holds events until a real handler is attached."""

    def __init__(self, link: Link, data: bytes = b"", eof: bool = False) -> None:
        self.link = link
        self.data = bytearray(data)
        self.eof = eof
        self.lost: tuple[BaseException | None] | None = None
        self.paused = False

    def on_data(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= PREATTACH_LIMIT and not self.paused:
            self.paused = True
            self.link.pause_reading()

    def on_eof(self) -> None:
        self.eof = True

    def on_lost(self, exc: BaseException | None) -> None:
        self.lost = (exc,)

    def on_pause(self) -> None:
        pass

    def on_resume(self) -> None:
        pass


_NO_BIO = ssl.MemoryBIO()


class Ignoring:
    """Handler that ignores everything: of a link whose socket now belongs to someone
    else, or whose relay is over while the link still drains."""

    def on_data(self, data: bytes) -> None:
        pass

    def on_eof(self) -> None:
        pass

    def on_lost(self, exc: BaseException | None) -> None:
        pass

    def on_pause(self) -> None:
        pass

    def on_resume(self) -> None:
        pass


class _Retired(asyncio.Protocol):
    """Protocol of a transport a link has moved off: hears its end, does nothing."""


class Link(asyncio.Protocol):
    """A TCP connection with an optional TLS layer and a swappable handler."""

    # Thousands are alive at once (two per relayed client on each node): no __dict__.
    # Futures and peer strings are made only when asked for: most links never are, and
    # they would cost about a kilobyte per relayed client.
    __slots__ = (
        "_tls_context", "_server_side", "_server_hostname", "_on_made", "_ssl",
        "_incoming", "_outgoing", "transport", "handler", "_ready", "_closed", "is_closed",
        "_peername", "shed", "got_eof", "sent_eof", "_reading_paused", "_borrower",
        "__weakref__",
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
        self._ssl: ssl.SSLObject | None = None
        # Only TLS links need their own memory BIOs; plain ones share a never-used pair.
        self._incoming = self._outgoing = _NO_BIO
        self.transport: asyncio.Transport | None = None
        self.handler: LinkHandler = _Buffer(self)
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
        self._borrower: Callable[[], None] | None = None  # see `lend`

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
        link._reading_paused = True
        link._hold()
        return link

    def hold_reading(self) -> None:
        """Read nothing until a handler is attached (`attach` resumes reading, before
        it replays what was held, so a pause its handler then asks for stands)."""
        self.pause_reading()
        self._hold()

    def _hold(self) -> None:
        if isinstance(self.handler, _Buffer):
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
            self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._ssl = self._tls_context.wrap_bio(
                self._incoming,
                self._outgoing,
                server_side=self._server_side,
                server_hostname=self._server_hostname,
            )
            self._handshake()
        on_made, self._on_made = self._on_made, None  # needed once: let it go
        if on_made is not None:
            on_made(self)

    def data_received(self, data: bytes) -> None:
        if self._ssl is None:
            self.handler.on_data(data)
            return
        # The memory BIOs are fed a slice at a time: OpenSSL keeps a BIO's largest
        # buffer for the life of the connection, so one 256 KiB read would otherwise
        # pin 256 KiB per idle connection after any bulk transfer.
        view = memoryview(data)
        plain: list[bytes] = []
        status = _MORE
        for start in range(0, len(view), BIO_SLICE):
            if self.transport is None or self.transport.is_closing():
                return
            self._incoming.write(view[start : start + BIO_SLICE])
            if self._ready is not None:  # handshake under way (or failed)
                if not self._ready.done():
                    self._handshake()
                if self._ready is not None:
                    continue
            status = self._decrypt(plain)
            if status is not _MORE:
                break
        # Handed on as one chunk, so the peer gets one write, not one per 16 KiB record.
        if plain:
            self.handler.on_data(plain[0] if len(plain) == 1 else b"".join(plain))
        if status is _FAILED:
            self.reset()
            return
        if status is _ENDED:
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
        self._ssl = None
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
    def peer(self) -> str:
        """'host:port' of the peer, for logs; '?' before the connection is made."""
        return "?" if self._peername is None else format_peer(self._peername)

    @property
    def peer_host(self) -> str:
        return str(self._peername[0]) if isinstance(self._peername, tuple) else ""

    @property
    def peer_endpoint(self) -> tuple[str, int]:
        """(host, port) of the peer, for PROXY protocol headers; ("", 0) if unknown."""
        return _endpoint(self._peername)

    @property
    def local_endpoint(self) -> tuple[str, int]:
        """(host, port) of our end while the connection is open; ("", 0) otherwise."""
        if self.transport is None:
            return "", 0
        return _endpoint(self.transport.get_extra_info("sockname"))

    # ---- TLS -------------------------------------------------------------------------

    def _handshake(self) -> None:
        assert self._ssl is not None
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()
            self._fail_handshake(exc)
            return
        self._flush()
        # Its awaiter holds the future: the link need not (a future per idle link).
        ready, self._ready = self._ready, None
        if ready is not None and not ready.done():
            ready.set_result(None)

    def _fail_handshake(self, exc: BaseException) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(exc)
            self._ready.exception()
        self.abort()

    def _decrypt(self, plain: list[bytes]) -> object:
        """Append every whole record's plaintext to `plain`; _MORE if more may come."""
        assert self._ssl is not None
        while True:
            try:
                chunk = self._ssl.read(TLS_READ_SIZE)
            except ssl.SSLWantReadError:
                return _MORE
            except ssl.SSLZeroReturnError:
                return _ENDED
            except ssl.SSLError:
                return _FAILED
            if not chunk:
                return _ENDED
            plain.append(chunk)

    def _flush(self) -> None:
        if (
            self._outgoing.pending
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self.transport.write(self._outgoing.read())

    @property
    def peer_certificate(self) -> bytes | None:
        """DER of the peer's certificate (TLS only)."""
        return self._ssl.getpeercert(binary_form=True) if self._ssl is not None else None

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """The context in use: after SNI selection, the one that was chosen."""
        return self._ssl.context if self._ssl is not None else None

    # ---- what handlers call ----------------------------------------------------------

    def _got_eof(self) -> None:
        if not self.got_eof:
            self.got_eof = True
            self.handler.on_eof()

    def attach(self, handler: LinkHandler) -> None:
        """Give this link its real handler, replaying what was buffered before."""
        previous = self.handler
        self.handler = handler
        if isinstance(previous, _Buffer):
            if previous.paused:
                # Resumed before the replay: if the replay fills the new handler's
                # peer, flow control pauses us again, and that pause must stand.
                self.resume_reading()
            if previous.data:
                handler.on_data(bytes(previous.data))
            if previous.eof:
                handler.on_eof()
            if previous.lost is not None:
                handler.on_lost(previous.lost[0])

    @property
    def buffered(self) -> bytes:
        """The bytes read and held until a handler is attached."""
        handler = self.handler
        return bytes(handler.data) if isinstance(handler, _Buffer) else b""

    def consume(self, n: int) -> None:
        """Drop the first `n` held bytes: they were passed on another way."""
        handler = self.handler
        if isinstance(handler, _Buffer):
            del handler.data[:n]

    def detach(self, leftover: bytes = b"", eof: bool = False) -> None:
        """Go back to buffering, starting with `leftover` (bytes read past a frame)."""
        buffer = _Buffer(self, leftover, eof)
        if self.is_closed:
            buffer.lost = (None,)
        self.handler = buffer

    def can_hand_over(self) -> bool:
        """Whether `hand_over` would succeed: plain TCP, open, nothing left to write,
        still buffering (no handler attached)."""
        return (
            self._ssl is None
            and self.transport is not None
            and not self.transport.is_closing()
            and self.transport.get_write_buffer_size() == 0
            and isinstance(self.handler, _Buffer)
            and self.handler.lost is None
        )

    def hand_over(self) -> tuple[socket.socket, bytes, bool] | None:
        """Give the socket to a caller that will drive it itself (the splice relay):
        returns it (a non-blocking duplicate, if a loop transport had it), the bytes
        read so far, and whether the peer already ended its stream. The link is over;
        the connection is not touched."""
        if not self.can_hand_over():
            return None
        assert self.transport is not None and isinstance(self.handler, _Buffer)
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
            or not isinstance(handler, _Buffer)
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
        old.set_protocol(_Retired())  # its last callback (connection_lost) goes nowhere
        old.abort()  # closes its descriptor; ours keeps the connection
        self.transport = new
        return True

    def write(self, data: bytes | memoryview, prefix: bytes = b"") -> None:
        """Send `prefix` then `data`; over TLS in the same records and one socket write
        (a chunk header does not cost a record and a send of its own)."""
        if self.transport is None or self.transport.is_closing() or self.sent_eof:
            return
        if self._ssl is None:
            # With its prefix in one write: one send, one segment.
            self.transport.write(prefix + data if prefix else data)
            return
        view = memoryview(data)
        records: list[bytes] = []
        try:
            first = 0
            if prefix:
                first = BIO_SLICE - len(prefix)
                self._ssl.write(prefix + view[:first])
                records.append(self._outgoing.read())
            for start in range(first, len(view), BIO_SLICE):  # see data_received
                self._ssl.write(view[start : start + BIO_SLICE])
                records.append(self._outgoing.read())
        except ssl.SSLError:
            self.reset()
            return
        self.transport.write(records[0] if len(records) == 1 else b"".join(records))

    def write_eof(self) -> None:
        """Half-close: the peer sees the end of our stream, and we keep reading."""
        if self.transport is None or self.sent_eof or self.transport.is_closing():
            return
        self.sent_eof = True
        if self._ssl is not None:
            try:
                self._ssl.unwrap()  # sends close_notify; TLS 1.3 lets us go on reading
            except (ssl.SSLWantReadError, ssl.SSLError):
                pass
            self._flush()
        if self.transport.can_write_eof():
            self.transport.write_eof()

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

    def close(self) -> None:
        """Close after what we wrote is sent."""
        if self._borrower is not None:
            self._let_go()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self._borrower is not None:
            self._let_go()
        if self.transport is not None:
            self.transport.abort()

    def reset(self) -> None:
        """Close with a TCP RST, so the peer sees a reset as we did."""
        if self._borrower is not None:
            self._let_go()
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.transport.abort()


def format_peer(address: object) -> str:
    """'1.2.3.4:5' or '[::1]:5' for a socket address tuple."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def _endpoint(address: object) -> tuple[str, int]:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0]).split("%", 1)[0]  # no IPv6 zone: it means nothing remotely
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]  # an IPv4 client of a dual-stack listener
        return host, int(address[1])
    return "", 0
