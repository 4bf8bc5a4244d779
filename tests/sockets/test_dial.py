"""Connections the CC makes to its servers (`tcpgc.transport.dial`), and how a relay takes their
socket, over real loopback sockets on each event loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import AsyncIterator

import pytest

from loops import LOOPS, loop_turns, run_on
from tcpgc.cc.claims import take_first_chunk as _take_first_chunk
from tcpgc.protocol.chunks import END, chunk_header
from tcpgc.relay.splice import SpliceRelay
from tcpgc.transport.dial import dial, numeric_family
from tcpgc.transport.link import Link
from tcpgc.transport.link_handlers import Ignoring
from tcpgc.transport.socket_handover import hand_over
from tcpgc.transport.socket_transport import SocketTransport


@contextlib.asynccontextmanager
async def _listener(host: str = "127.0.0.1") -> AsyncIterator[tuple[socket.socket, int]]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.bind((host, 0))
        server.listen(8)
        server.setblocking(False)
        yield server, server.getsockname()[1]


class _Collect(Ignoring):
    """A link handler that keeps the bytes it is given (and ignores the rest)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.more = asyncio.Event()

    def on_data(self, data: bytes) -> None:
        self.data += data
        self.more.set()

    async def wait_for(self, n: int) -> bytes:
        while len(self.data) < n:
            self.more.clear()
            await asyncio.wait_for(self.more.wait(), 5)
        return bytes(self.data)


async def _reads_only_once_attached(link: Link, server_side: socket.socket) -> None:
    """What the server sends is not read before a handler (its relay) is attached,
    and reaches that handler once it is."""
    await asyncio.get_running_loop().sock_sendall(server_side, b"world")
    await loop_turns()
    assert link.buffered == b""
    got = _Collect()
    link.attach(got)
    assert await got.wait_for(5) == b"world"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_numeric_family_tells_literals_from_names() -> None:
    assert numeric_family("127.0.0.1") == socket.AF_INET
    assert numeric_family("::1") == socket.AF_INET6
    assert numeric_family("localhost") is None
    assert numeric_family("db.internal") is None


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize(
    ("host", "named"), [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("0:0::1", "::1")]
)
def test_an_address_is_dialed_on_a_socket_of_our_own(loop_name: str, host: str, named: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with _listener(host) as (server, port):
            link = await dial(host, port)
            accepted, _ = await loop.sock_accept(server)
            with accepted:
                assert isinstance(link.transport, SocketTransport)
                assert link.peer_endpoint == (named, port)  # as the kernel writes it
                sock = link.transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                link.write(b"hello")
                assert await loop.sock_recv(accepted, 5) == b"hello"
                await _reads_only_once_attached(link, accepted)
            link.abort()

    run_on(loop_name, main, 10)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_refused_dial_raises_and_leaves_no_descriptor(loop_name: str) -> None:
    async def main() -> None:
        async with _listener() as (_, port):
            pass  # closed: nothing listens on the port now
        before = _open_fds()
        with pytest.raises(ConnectionRefusedError):
            await dial("127.0.0.1", port)
        assert _open_fds() == before

    run_on(loop_name, main, 10)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_name_is_dialed_through_the_loop(loop_name: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with _listener() as (server, port):
            link = await dial("localhost", port)
            accepted, _ = await loop.sock_accept(server)
            with accepted:
                assert not isinstance(link.transport, SocketTransport)
                link.write(b"ping")
                assert await loop.sock_recv(accepted, 4) == b"ping"
                await _reads_only_once_attached(link, accepted)
            link.abort()

    run_on(loop_name, main, 10)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_relay_takes_a_dialed_socket_as_it_is(loop_name: str) -> None:
    """No duplicate descriptor: the socket itself changes hands, the link is over, and
    the connection carries on, with what was read before the hand-over."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with _listener() as (server, port):
            link = await dial("127.0.0.1", port)
            accepted, _ = await loop.sock_accept(server)
            with accepted:
                link.resume_reading()
                await loop.sock_sendall(accepted, b"early")
                await loop_turns()  # loopback: the bytes are there, and read now
                assert link.transport is not None
                fd = link.transport.get_extra_info("socket").fileno()
                before = _open_fds()
                handed = hand_over(link)
                assert handed is not None
                sock, read, eof = handed
                with sock:
                    assert sock.fileno() == fd
                    assert _open_fds() == before
                    assert (read, eof) == (b"early", False)
                    assert link.is_closed and link.closed.done()
                    await loop.sock_sendall(accepted, b"later")
                    assert await loop.sock_recv(sock, 5) == b"later"
                    await loop.sock_sendall(sock, b"back")
                    assert await loop.sock_recv(accepted, 4) == b"back"

    run_on(loop_name, main, 10)


def _held(data: bytes) -> Link:
    link = Link()  # not connected: its buffer alone is what is tested
    link.handler.on_data(data)
    return link


def test_the_first_chunk_behind_open_is_taken_whole() -> None:
    link = _held(chunk_header(5) + b"hello" + chunk_header(3) + b"abc")
    assert _take_first_chunk(link) == b"hello"
    assert link.buffered == chunk_header(3) + b"abc"  # the rest stays for the relay


@pytest.mark.parametrize(
    "held",
    [
        b"",
        chunk_header(5)[:3],
        chunk_header(5) + b"hel",  # not all there yet
        END + chunk_header(2) + b"hi",  # the client ended before sending anything
        (1 << 24).to_bytes(4, "big") + b"x",  # longer than any chunk may be
    ],
    ids=["nothing", "part-of-header", "part-of-chunk", "end-marker", "too-long"],
)
def test_anything_but_a_whole_first_chunk_is_left_to_the_relay(held: bytes) -> None:
    link = _held(held)
    assert _take_first_chunk(link) == b""
    assert link.buffered == held


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_relay_that_cannot_take_both_sockets_closes_the_one_it_took(
    loop_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dialed side's socket is the relay's once taken; if the other side's cannot
    be had (no descriptor for its duplicate), it is closed, not left to the collector."""

    def no_descriptor_left(fd: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with _listener() as (server, port):
            dialed = await dial("127.0.0.1", port)
            dialed_peer, _ = await loop.sock_accept(server)
            _, other = await loop.create_connection(Link, "127.0.0.1", port)
            other_peer, _ = await loop.sock_accept(server)
            with dialed_peer, other_peer:
                with monkeypatch.context() as patched:
                    patched.setattr(os, "dup", no_descriptor_left)
                    with pytest.raises(OSError):
                        SpliceRelay(dialed, other)
                assert await asyncio.wait_for(loop.sock_recv(dialed_peer, 1), 5) == b""
                other.abort()

    run_on(loop_name, main, 10)
