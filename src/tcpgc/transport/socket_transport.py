"""A lean transport for connections a relay carries: the socket, driven by the event
loop's readiness callbacks.

The loops' own TCP transports cost 1.3 KB (uvloop) and 1.6 KB (asyncio) per connection,
for features a relayed connection no longer needs once it is set up. A relayed TLS
client has four of them across the two nodes, so with thousands held open they decide
how many fit in memory. This one keeps a socket, a few flags, and a write buffer only
while the peer is not keeping up (about 0.8 KB with the loop's reader included).

It does what `tcpgc.transport.link.Link` asks of a transport, with asyncio's semantics: reads of up
to 256 KiB handed to `data_received`; `eof_received` returning true keeps the write side
open (half-close); writes go out at once, and what the kernel does not take is buffered,
with `pause_writing`/`resume_writing` around the buffer limits; `close` sends what is
buffered first, `abort` does not; `connection_lost` comes soon after, with the error
that ended the connection, if any.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any, Protocol, cast

log = logging.getLogger("tcpgc")

#: Largest read, as the loops' own transports do.
READ_SIZE = 256 * 1024


def reset_on_close(sock: socket.socket) -> None:
    """Make closing `sock` send a TCP RST (SO_LINGER 0), so its peer sees a reset."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class StreamProtocol(Protocol):
    """What the transport calls: the stream callbacks of `asyncio.Protocol`."""

    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool | None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


class SocketTransport(asyncio.Transport):
    __slots__ = (
        "_loop", "_sock", "_fd", "_protocol", "_buffer", "_high", "_low", "_closing",
        "_closed", "_eof_pending", "_eof_received", "_paused", "_reading", "_writing",
        "_protocol_paused",
    )  # fmt: skip

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: StreamProtocol,
        *,
        reading_paused: bool = False,
    ) -> None:
        # No BaseTransport.__init__: its extra-info dict is not needed.
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol: StreamProtocol = protocol
        self._buffer: bytearray | None = None  # only while the kernel is not keeping up
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._closing = False  # close() or abort() called, or the connection failed
        self._closed = False  # connection_lost is on its way
        self._eof_pending = False  # write_eof() called: shut down once the buffer is out
        self._eof_received = False
        self._paused = reading_paused  # by the protocol
        self._reading = False  # a reader is registered
        self._writing = False  # a writer is registered
        self._protocol_paused = False  # pause_writing() was called
        self._read_on()

    # ---- reading ---------------------------------------------------------------------

    def _read_on(self) -> None:
        if not (self._reading or self._paused or self._closing or self._eof_received):
            self._reading = True
            self._loop.add_reader(self._fd, self._readable)

    def _read_off(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _readable(self) -> None:
        try:
            data = self._sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._force_close(exc)
            return
        try:
            if data:
                self._protocol.data_received(data)
                return
            self._eof_received = True
            self._read_off()
            keep_open = self._protocol.eof_received()
        except Exception as exc:  # a bug in the protocol ends its connection, no other
            log.error("error in a connection's protocol: %r", exc, exc_info=exc)
            self._force_close(exc)
            return
        if not keep_open:
            self.close()

    def pause_reading(self) -> None:
        self._paused = True
        self._read_off()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._read_on()

    def is_reading(self) -> bool:
        return self._reading

    # ---- writing ---------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._eof_pending or not data:
            return
        if self._buffer is None:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._force_close(exc)
                return
            if sent == len(data):
                return
            self._buffer = bytearray(memoryview(data)[sent:])
            self._write_on()
        else:
            self._buffer += data
        if not self._protocol_paused and len(self._buffer) > self._high:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def _write_on(self) -> None:
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._writable)

    def _write_off(self) -> None:
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _writable(self) -> None:
        assert self._buffer is not None
        try:
            sent = self._sock.send(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._force_close(exc)
            return
        del self._buffer[:sent]
        if self._protocol_paused and len(self._buffer) <= self._low:
            self._protocol_paused = False
            self._protocol.resume_writing()
        if self._buffer:
            return
        self._buffer = None
        self._write_off()
        if self._closing:
            self._force_close(None)
        elif self._eof_pending:
            self._shut_down()

    def write_eof(self) -> None:
        if self._closing or self._eof_pending:
            return
        self._eof_pending = True
        if self._buffer is None:
            self._shut_down()

    def _shut_down(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone: the reader will tell

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return len(self._buffer) if self._buffer is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    # ---- the end ---------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; end the connection once what is buffered has been sent."""
        if self._closing:
            return
        self._closing = True
        self._read_off()
        if self._buffer is None:
            self._force_close(None)

    def abort(self) -> None:
        self._force_close(None)

    def release(self) -> socket.socket:
        """Stop driving the socket and give it away, still open, to whoever drives it
        next (the splice relay). Nothing is buffered to send (the caller checks); the
        protocol hears nothing more from this transport."""
        self._read_off()
        self._write_off()
        self._closed = self._closing = True
        self._buffer = None
        return self._sock

    def _force_close(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        self._read_off()
        self._write_off()
        self._buffer = None
        self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._sock.close()

    # ---- the rest of the transport interface -----------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        try:
            if name == "peername":
                return self._sock.getpeername()
            if name == "sockname":
                return self._sock.getsockname()
        except OSError:
            pass
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return cast(asyncio.BaseProtocol, self._protocol)
