"""`SocketTransport` on real loopback TCP connections, on each event loop we run on.

The far end of each connection is a plain blocking socket driven from a thread, so what
it sees is what the kernel delivered: exact bytes, FIN, RST.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct

import pytest

from loops import LOOPS, loop_turns, run_on
from support import recv_until_eof
from tcpgc.transport.socket_transport import SocketTransport

TIMEOUT = 20


class Recorder(asyncio.Protocol):
    def __init__(self, keep_open: bool = True) -> None:
        self.data = bytearray()
        self.got_data = asyncio.Event()
        self.eof = asyncio.Event()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.keep_open = keep_open
        self.pauses = 0
        self.resumes = 0

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.got_data.set()

    def eof_received(self) -> bool:
        self.eof.set()
        return self.keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.pauses += 1

    def resume_writing(self) -> None:
        self.resumes += 1


def _connected_pair() -> tuple[socket.socket, socket.socket]:
    """(ours, theirs): ours non-blocking for the transport, theirs blocking."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname(), timeout=TIMEOUT)
        ours, _ = server.accept()
    ours.setblocking(False)
    theirs.settimeout(TIMEOUT)
    return ours, theirs


def _wait_readable(sock: socket.socket) -> None:
    """Until bytes the far end sent wait in `sock`'s receive buffer (not read)."""
    readable, _, _ = select.select([sock], [], [], TIMEOUT)
    assert readable, "the far end's bytes never arrived"


@pytest.mark.parametrize("loop_name", LOOPS)
def test_bulk_write_pauses_the_writer_and_arrives_whole(loop_name: str) -> None:
    async def main() -> None:
        ours, theirs = _connected_pair()
        protocol = Recorder()
        transport = SocketTransport(asyncio.get_running_loop(), ours, protocol)
        transport.set_write_buffer_limits(high=64 * 1024)
        payload = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than the kernel buffers
        transport.write(payload)
        assert transport.get_write_buffer_size() > 0 and protocol.pauses == 1
        transport.write_eof()  # only once the buffer is out
        received = await asyncio.to_thread(recv_until_eof, theirs)
        assert received == payload
        assert protocol.resumes == 1 and transport.get_write_buffer_size() == 0
        theirs.close()
        transport.close()
        assert await protocol.lost is None

    run_on(loop_name, main, TIMEOUT)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_half_close_both_ways(loop_name: str) -> None:
    async def main() -> None:
        ours, theirs = _connected_pair()
        protocol = Recorder(keep_open=True)
        transport = SocketTransport(asyncio.get_running_loop(), ours, protocol)
        theirs.sendall(b"request")
        theirs.shutdown(socket.SHUT_WR)
        await protocol.eof.wait()
        assert bytes(protocol.data) == b"request" and not transport.is_closing()
        transport.write(b"answer after their end")  # our direction still flows
        transport.write_eof()
        assert await asyncio.to_thread(recv_until_eof, theirs) == b"answer after their end"
        theirs.close()
        transport.close()
        assert await protocol.lost is None

    run_on(loop_name, main, TIMEOUT)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_eof_closes_unless_the_protocol_keeps_it_open(loop_name: str) -> None:
    async def main() -> None:
        ours, theirs = _connected_pair()
        protocol = Recorder(keep_open=False)
        SocketTransport(asyncio.get_running_loop(), ours, protocol)
        theirs.shutdown(socket.SHUT_WR)
        assert await protocol.lost is None
        assert await asyncio.to_thread(theirs.recv, 1) == b""  # we closed too
        theirs.close()

    run_on(loop_name, main, TIMEOUT)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_close_sends_what_is_buffered_first_and_abort_does_not(loop_name: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        payload = b"z" * (8 << 20)
        ours, theirs = _connected_pair()
        closing = Recorder()
        transport = SocketTransport(loop, ours, closing)
        transport.write(payload)
        transport.close()
        assert transport.is_closing() and not closing.lost.done()
        assert await asyncio.to_thread(recv_until_eof, theirs) == payload
        assert await closing.lost is None
        theirs.close()

        ours, theirs = _connected_pair()
        aborting = Recorder()
        transport = SocketTransport(loop, ours, aborting)
        transport.write(payload)
        transport.abort()
        assert await aborting.lost is None
        assert len(await asyncio.to_thread(recv_until_eof, theirs)) < len(payload)
        theirs.close()

    run_on(loop_name, main, TIMEOUT)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_peer_reset_is_reported_as_such(loop_name: str) -> None:
    async def main() -> None:
        ours, theirs = _connected_pair()
        protocol = Recorder()
        SocketTransport(asyncio.get_running_loop(), ours, protocol)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        theirs.close()
        assert isinstance(await protocol.lost, ConnectionResetError)

    run_on(loop_name, main, TIMEOUT)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_paused_reading_delivers_nothing_until_resumed(loop_name: str) -> None:
    async def main() -> None:
        ours, theirs = _connected_pair()
        protocol = Recorder()
        transport = SocketTransport(asyncio.get_running_loop(), ours, protocol, reading_paused=True)
        theirs.sendall(b"held back")
        _wait_readable(ours)
        await loop_turns()  # a read, were one registered, would have happened
        assert not protocol.data and not transport.is_reading()
        transport.resume_reading()
        await protocol.got_data.wait()
        assert bytes(protocol.data) == b"held back"
        transport.pause_reading()
        theirs.sendall(b" and more")
        _wait_readable(ours)
        await loop_turns()
        assert bytes(protocol.data) == b"held back"
        transport.resume_reading()
        while bytes(protocol.data) != b"held back and more":
            protocol.got_data.clear()
            await protocol.got_data.wait()
        theirs.close()
        transport.close()
        await protocol.lost

    run_on(loop_name, main, TIMEOUT)


def test_writes_after_the_end_are_dropped() -> None:
    async def main() -> None:
        ours, theirs = _connected_pair()
        protocol = Recorder()
        transport = SocketTransport(asyncio.get_running_loop(), ours, protocol)
        transport.write_eof()
        transport.write(b"too late")
        assert await asyncio.to_thread(recv_until_eof, theirs) == b""
        transport.abort()
        transport.write(b"later still")
        assert await protocol.lost is None
        theirs.close()

    run_on("asyncio", main, TIMEOUT)
