"""The chunked stream spliced: `start_chunked_relay` on plain links, real loopback
sockets, each event loop we run on. The peers are raw sockets, so the bytes on the
data connection are checked exactly: headers, end markers, and what follows them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

import tcpgc.relay.chunked_splice
import tcpgc.relay.splice
from loops import LOOPS, loop_turns, run_on
from tcpgc.protocol.chunks import END, MAX_CHUNK, ChunkDecoder, chunk_header
from tcpgc.relay.chunked_copy import ChunkedCopyRelay
from tcpgc.relay.chunked_splice import ChunkedSpliceRelay
from tcpgc.relay.factory import start_chunked_relay
from tcpgc.transport.link import Link

pytestmark = pytest.mark.skipif(not tcpgc.relay.splice.AVAILABLE, reason="splice(2) is Linux-only")


class _Rig:
    """Two connections through a local server: plain peer <-> link `a` (the client
    or server leg) and data peer <-> link `b` (the data connection)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.plain_peer = socket.socket()
        self.data_peer = socket.socket()
        self.a: Link | None = None
        self.b: Link | None = None
        self.idle: list[Link] = []
        self.server: asyncio.Server | None = None

    async def connect(self) -> None:
        accepted: asyncio.Queue[Link] = asyncio.Queue()
        self.server = await self.loop.create_server(
            lambda: Link(on_made=accepted.put_nowait), "127.0.0.1", 0
        )
        address = self.server.sockets[0].getsockname()
        for peer in (self.plain_peer, self.data_peer):
            peer.setblocking(False)
            await self.loop.sock_connect(peer, address)
        self.a = await accepted.get()
        self.b = await accepted.get()

    def relay(self) -> Any:
        assert self.a is not None and self.b is not None
        return start_chunked_relay(self.a, self.b, on_idle=self.idle.append)

    async def recv_all(self, sock: socket.socket) -> bytes:
        """Everything until EOF (a reset raises)."""
        got = bytearray()
        while chunk := await asyncio.wait_for(self.loop.sock_recv(sock, 1 << 16), 10):
            got += chunk
        return bytes(got)

    async def recv_stream(self) -> tuple[bytes, bytes]:
        """The payload of one chunked stream from the data peer, up to its end marker,
        and whatever came after the marker."""
        decoder = ChunkDecoder()
        payload = bytearray()
        while not decoder.ended:
            data = await asyncio.wait_for(self.loop.sock_recv(self.data_peer, 1 << 16), 10)
            assert data, "the data connection closed before the end marker"
            for piece in decoder.feed(data):
                payload += piece
        return bytes(payload), decoder.leftover

    def close(self) -> None:
        for peer in (self.plain_peer, self.data_peer):
            peer.close()
        for link in (self.a, self.b):
            if link is not None:
                link.abort()
        if self.server is not None:
            self.server.close()


@contextlib.asynccontextmanager
async def _rig() -> AsyncIterator[_Rig]:
    rig = _Rig()
    try:
        await rig.connect()
        yield rig
    finally:
        rig.close()


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_both_directions_spliced_then_the_connection_is_handed_back(
    loop_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_splice = os.splice

    def counting_splice(*args: Any, **kwargs: Any) -> int:
        n = real_splice(*args, **kwargs)
        calls.append(n)
        return n

    monkeypatch.setattr(tcpgc.relay.chunked_splice.os, "splice", counting_splice)

    async def main() -> None:
        async with _rig() as rig:
            relay = rig.relay()
            assert isinstance(relay, ChunkedSpliceRelay)
            upload = os.urandom(3 * MAX_CHUNK // 2)
            await rig.loop.sock_sendall(rig.plain_peer, upload)
            rig.plain_peer.shutdown(socket.SHUT_WR)
            payload, after = await rig.recv_stream()
            assert payload == upload and after == b""

            download = os.urandom(200_000)
            stream = b"".join(
                chunk_header(len(download[i : i + 70_000])) + download[i : i + 70_000]
                for i in range(0, len(download), 70_000)
            )
            # The agent's next message follows its end marker at once: not ours to read.
            await rig.loop.sock_sendall(rig.data_peer, stream + END + b"NEXT")
            assert await rig.recv_all(rig.plain_peer) == download
            await relay.done
            assert relay.result.ended == "closed"
            assert (relay.result.bytes_a_to_b, relay.result.bytes_b_to_a) == (
                len(upload),
                len(download),
            )
            assert rig.idle == [rig.b]
            await loop_turns()
            buffered = rig.b.handler  # reading again, into the link's buffer
            assert bytes(getattr(buffered, "data", b"")) == b"NEXT"
            # Payload went through pipes: splice moved it, in and out, both ways.
            assert sum(calls) >= 2 * (len(upload) + len(download))

    run_on(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_bytes_read_before_the_relay_are_framed_and_unframed(loop_name: str) -> None:
    async def main() -> None:
        async with _rig() as rig:
            # Both links read before the relay starts: the client's first request, and
            # a chunk and half a header from the data connection.
            rig.plain_peer.send(b"early")
            framed = chunk_header(3) + b"abc" + chunk_header(10)[:2]
            rig.data_peer.send(framed)
            assert rig.a is not None and rig.b is not None
            while rig.a.buffered != b"early" or rig.b.buffered != framed:
                await loop_turns(1)  # until both links have read them
            relay = rig.relay()
            assert isinstance(relay, ChunkedSpliceRelay)
            rig.data_peer.send(chunk_header(10)[2:] + b"0123456789" + END)
            got = bytearray()
            while len(got) < 13:
                got += await asyncio.wait_for(rig.loop.sock_recv(rig.plain_peer, 100), 10)
            assert bytes(got) == b"abc0123456789"
            assert await rig.recv_all(rig.plain_peer) == b""  # the end marker, as EOF
            # Ours is framed: the early bytes as one chunk, then the end marker.
            rig.plain_peer.shutdown(socket.SHUT_WR)
            raw = bytearray()
            while not raw.endswith(END):
                raw += await asyncio.wait_for(rig.loop.sock_recv(rig.data_peer, 100), 10)
            assert bytes(raw) == chunk_header(5) + b"early" + END
            await relay.done
            assert rig.idle == [rig.b]

    run_on(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (chunk_header(10) + b"12345", "data connection closed mid-stream"),
        (chunk_header(10)[:3], "data connection closed mid-stream"),
        ((MAX_CHUNK + 1).to_bytes(4, "big"), "error: chunk of"),
    ],
    ids=["closed-mid-chunk", "closed-mid-header", "oversized-chunk"],
)
def test_broken_stream_resets_the_plain_side(loop_name: str, stream: bytes, reason: str) -> None:
    async def main() -> None:
        async with _rig() as rig:
            relay = rig.relay()
            assert isinstance(relay, ChunkedSpliceRelay)
            rig.data_peer.send(stream)
            if reason.endswith("mid-stream"):
                rig.data_peer.shutdown(socket.SHUT_WR)
            with pytest.raises(ConnectionResetError):
                await rig.recv_all(rig.plain_peer)
            await relay.done
            assert relay.result.ended.startswith(reason)
            assert rig.idle == []

    run_on(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_plain_reset_resets_the_data_connection(loop_name: str) -> None:
    async def main() -> None:
        async with _rig() as rig:
            relay = rig.relay()
            rig.plain_peer.send(b"partial request")
            payload = await asyncio.wait_for(rig.loop.sock_recv(rig.data_peer, 100), 10)
            assert payload == chunk_header(15) + b"partial request"
            _reset(rig.plain_peer)
            with pytest.raises(ConnectionResetError):
                await rig.recv_all(rig.data_peer)
            await relay.done
            assert relay.result.ended == "reset" and rig.idle == []

    run_on(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("ended", ["peer-closed", "being-closed"])
def test_data_link_that_ended_is_not_lent(loop_name: str, ended: str) -> None:
    """A data link whose peer already closed, or that is being closed (its agent was
    lost in the same loop turn that its answer came), is not taken for splicing: the
    buffered relay takes the client, sees the stream cut short, and resets it."""

    async def main() -> None:
        async with _rig() as rig:
            assert rig.b is not None
            if ended == "peer-closed":
                rig.data_peer.shutdown(socket.SHUT_WR)
                while not rig.b.got_eof:
                    await loop_turns(1)
            else:
                assert rig.b.move_to_socket()
                rig.b.abort()
            relay = rig.relay()
            assert isinstance(relay, ChunkedCopyRelay)
            with pytest.raises(ConnectionResetError):
                await rig.recv_all(rig.plain_peer)
            assert rig.idle == []

    run_on(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_data_link_with_unsent_bytes_is_not_lent(loop_name: str) -> None:
    """Bytes the data link still has to send (its peer reads slowly) must leave before
    any chunk: such a link is relayed through Python, in order."""

    async def main() -> None:
        async with _rig() as rig:
            assert rig.b is not None and rig.b.move_to_socket()
            queued = os.urandom(8 << 20)  # more than the socket buffers take at once
            rig.b.write(queued)
            assert rig.b.transport is not None and rig.b.transport.get_write_buffer_size()
            relay = rig.relay()
            assert isinstance(relay, ChunkedCopyRelay)
            rig.plain_peer.send(b"after")
            expected = queued + chunk_header(5) + b"after"
            got = bytearray()
            while len(got) < len(expected):
                got += await asyncio.wait_for(rig.loop.sock_recv(rig.data_peer, 1 << 20), 10)
            assert bytes(got) == expected

    run_on(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_data_link_closed_by_its_owner_ends_the_relay_first(loop_name: str) -> None:
    """The node closes a lent data link (its agent is gone): the relay lets go of the
    socket before it closes, resets the client, and leaves no callback on the
    descriptor for whichever socket gets its number next."""

    async def main() -> None:
        async with _rig() as rig:
            relay = rig.relay()
            assert isinstance(relay, ChunkedSpliceRelay) and rig.b is not None
            fd = rig.b.transport.get_extra_info("socket").fileno()  # type: ignore[union-attr]
            rig.b.abort()
            with pytest.raises(ConnectionResetError):
                await rig.recv_all(rig.plain_peer)
            await relay.done
            assert relay.result.ended == "data connection closed" and rig.idle == []
            # Sockets until one gets that descriptor number: it must report readable.
            held = []
            try:
                while True:
                    left, right = socket.socketpair()
                    held += [left, right]
                    if fd in (left.fileno(), right.fileno()) or left.fileno() > fd:
                        break
                if fd in (left.fileno(), right.fileno()):
                    reader, writer = (left, right) if left.fileno() == fd else (right, left)
                    readable = asyncio.Event()
                    rig.loop.add_reader(fd, readable.set)
                    writer.send(b"x")
                    await asyncio.wait_for(readable.wait(), 5)
                    rig.loop.remove_reader(fd)
            finally:
                for sock in held:
                    sock.close()

    run_on(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_no_splice_set_relays_through_python(
    loop_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TCPGC_NO_SPLICE=1 picks the copy engine for links splice could take, and the
    stream on the data connection is the same chunked stream."""
    monkeypatch.setenv("TCPGC_NO_SPLICE", "1")

    async def main() -> None:
        async with _rig() as rig:
            relay = rig.relay()
            assert isinstance(relay, ChunkedCopyRelay)
            await rig.loop.sock_sendall(rig.plain_peer, b"hello")
            rig.plain_peer.shutdown(socket.SHUT_WR)
            assert await rig.recv_stream() == (b"hello", b"")

    run_on(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_tls_data_link_builds_no_splice_relay(
    loop_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TLS data link cannot lend its socket: the factory goes to the copy engine
    without building a splice relay first."""
    built: list[object] = []
    monkeypatch.setattr(ChunkedSpliceRelay, "start", lambda self: built.append(self) or False)

    async def main() -> None:
        async with _rig() as rig:
            with socket.socket() as listener:
                listener.bind(("127.0.0.1", 0))
                listener.listen()
                context = ssl.create_default_context()
                _, tls_link = await rig.loop.create_connection(
                    lambda: Link(context, server_hostname="localhost"), *listener.getsockname()
                )
                try:
                    assert rig.a is not None and tls_link.is_tls
                    relay = start_chunked_relay(rig.a, tls_link)
                    assert isinstance(relay, ChunkedCopyRelay) and built == []
                finally:
                    tls_link.abort()

    run_on(loop_name, main)
