"""`Link` state made on demand, on real loopback sockets, on each event loop we run on.

A link makes its futures and peer strings only when asked (most never are): what it
reports must not depend on when it is asked, before or after the connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import AsyncIterator

import pytest

from loops import LOOPS, run_on
from tcpgc.protocol.messages import MAX_PAYLOAD, Ping, encode
from tcpgc.transport.frame_channel import FrameChannel
from tcpgc.transport.link import Link
from tcpgc.transport.socket_transport import SocketTransport


class _LostEvent(asyncio.Event):
    """A link handler that only tells when the connection is gone."""

    def on_data(self, data: bytes) -> None:
        pass

    def on_eof(self) -> None:
        pass

    def on_lost(self, exc: BaseException | None) -> None:
        self.set()

    def on_pause(self) -> None:
        pass

    def on_resume(self) -> None:
        pass


@contextlib.asynccontextmanager
async def _pair() -> AsyncIterator[tuple[Link, Link, asyncio.Server]]:
    """A plain client link and the server-side link it reached, with their server; all
    three closed on the way out."""
    accepted: asyncio.Future[Link] = asyncio.get_running_loop().create_future()
    server = await asyncio.get_running_loop().create_server(
        lambda: Link(on_made=accepted.set_result), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    _, client = await asyncio.get_running_loop().create_connection(Link, "127.0.0.1", port)
    try:
        yield client, await accepted, server
    finally:
        client.abort()
        if accepted.done():
            accepted.result().abort()
        server.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_plain_link_is_ready_and_knows_both_ends(loop_name: str) -> None:
    async def main() -> None:
        async with _pair() as (client, accepted, server):
            assert client.ready.done() and client.ready.result() is None
            host, port = server.sockets[0].getsockname()[:2]
            assert client.peer == f"{host}:{port}"
            assert client.peer_host == host
            assert client.peer_endpoint == (host, port)
            assert accepted.local_endpoint == (host, port)
            assert accepted.peer_endpoint == client.local_endpoint
            assert not client.is_closed and not client.closed.done()

    run_on(loop_name, main, 10)


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("asked_before", [True, False], ids=["asked-before", "asked-after"])
def test_closed_tells_the_same_whenever_it_is_asked(loop_name: str, asked_before: bool) -> None:
    async def main() -> None:
        async with _pair() as (client, accepted, _):
            peer = accepted.peer
            early = accepted.closed if asked_before else None
            lost = _LostEvent()
            accepted.attach(lost)
            client.reset()  # a plain end would leave the other side half-open, as relays want
            await lost.wait()
            assert accepted.is_closed
            assert accepted.closed.done()
            assert early is None or early is accepted.closed
            # Still known once the connection is gone: logs name the peer after the end.
            assert accepted.peer == peer != "?"
            assert accepted.local_endpoint == ("", 0)

    run_on(loop_name, main, 10)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_links_have_nagle_off(loop_name: str) -> None:
    """The loop's transports set TCP_NODELAY (a small request must not wait 40 ms);
    `Link` relies on that instead of setting it again."""

    async def main() -> None:
        async with _pair() as (client, accepted, _):
            for link in (client, accepted):
                assert link.transport is not None
                sock = link.transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

    run_on(loop_name, main, 10)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_link_that_cannot_move_stays_on_its_transport(
    loop_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors for the duplicate, `move_to_socket` changes nothing and the
    link carries on where it was."""

    def no_descriptor_left(fd: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    async def main() -> None:
        async with _pair() as (client, accepted, _):
            before = accepted.transport
            with monkeypatch.context() as patched:
                patched.setattr(os, "dup", no_descriptor_left)
                assert not accepted.move_to_socket()
            assert accepted.transport is before and not before.is_closing()
            assert accepted.move_to_socket()  # with a descriptor to spare it moves
            assert isinstance(accepted.transport, SocketTransport)
            got = _Collect()
            accepted.attach(got)
            client.write(b"still connected")
            await got.wait()
            assert bytes(got.data) == b"still connected"

    run_on(loop_name, main, 10)


class _Collect(_LostEvent):
    """Collects bytes; set once some arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def on_data(self, data: bytes) -> None:
        self.data += data
        self.set()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_channel_pause_ends_with_the_channel(loop_name: str) -> None:
    """A frame channel pauses its link while more than two frames' worth waits unread.
    The stream that follows the last frame (a client's bytes behind DATA) must flow
    to whoever takes the link next, not stay paused."""

    async def main() -> None:
        async with _pair() as (client, accepted, _):
            channel = FrameChannel(accepted)
            stream = os.urandom(4 * MAX_PAYLOAD)
            client.write(encode(Ping(7)))
            assert await channel.recv(within=5) == Ping(7)
            client.write(stream)  # unread by the channel: over its limit, it pauses
            deadline = asyncio.get_running_loop().time() + 5
            while not accepted._reading_paused:  # the rest arrives, past the limit
                assert asyncio.get_running_loop().time() < deadline, "never paused"
                await asyncio.sleep(0.01)
            channel.detach()
            collected = _Collect()
            accepted.attach(collected)
            client.write(b"more")
            while len(collected.data) < len(stream) + 4:
                assert asyncio.get_running_loop().time() < deadline, "the link stayed paused"
                await asyncio.sleep(0.01)
            assert bytes(collected.data) == stream + b"more"

    run_on(loop_name, main, 10)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_channel_stops_reading_while_its_peer_does_not_read(loop_name: str) -> None:
    """Every PING read makes a PONG written: a frame channel whose peer reads nothing
    stops reading (handling the frames it holds does not undo that), and reads again
    once the peer catches up."""

    async def main() -> None:
        async with _pair() as (client, accepted, _):
            channel = FrameChannel(accepted)
            client.write(encode(Ping(1)) + encode(Ping(2)))
            assert await channel.recv(within=5) == Ping(1)  # Ping(2) waits in the channel
            client.hold_reading()  # the peer reads nothing from here on
            for _ in range(64):
                accepted.write(bytes(1 << 20))
                if channel.write_blocked:
                    break
            assert channel.write_blocked and accepted._reading_paused
            assert await channel.recv(within=5) == Ping(2)
            assert accepted._reading_paused, "handling a frame resumed a blocked reader"
            client.write(encode(Ping(3)))
            collected = _Collect()
            client.attach(collected)  # the peer reads again: so do we
            assert await channel.recv(within=5) == Ping(3)
            assert not channel.write_blocked

    run_on(loop_name, main, 10)


class _FailingEofTransport:
    """Stands for a transport whose socket lost its peer: shutdown() says ENOTCONN."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)

    def write_eof(self) -> None:
        raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_half_close_to_a_peer_already_gone_is_a_reset_not_an_error(loop_name: str) -> None:
    """write_eof on a socket whose peer vanished raises ENOTCONN in asyncio's transport:
    the link resets, and nothing reaches the relay that asked for the half-close."""

    async def main() -> None:
        async with _pair() as (client, _, _):
            real = client.transport
            assert real is not None
            client.transport = _FailingEofTransport(real)  # type: ignore[assignment]
            client.write_eof()  # raised OSError out of the relay before
            assert client.sent_eof and real.is_closing()

    run_on(loop_name, main)
