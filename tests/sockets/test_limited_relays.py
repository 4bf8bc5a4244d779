"""Rate limits on real loopback sockets, in every relay engine: a limited relay moves
about its rate in each direction (both at once, each with its own bucket), an unlimited
one is not slowed, on each event loop. The peers are raw sockets that frame and unframe
the data connection's stream as the engine speaks it (raw, chunks, resumable records)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest

import tcpgc.relay.splice
from loops import LOOPS, run_on
from tcpgc.protocol.chunks import MAX_CHUNK, ChunkDecoder, chunk_header
from tcpgc.protocol.resumable import RecordDecoder, Retention, chunk_records
from tcpgc.relay.chunked_copy import ChunkedCopyRelay
from tcpgc.relay.copy import CopyRelay
from tcpgc.relay.rate_limit import RateLimits
from tcpgc.relay.resumable import ResumableRelay
from tcpgc.transport.link import Link

RATE = 40_000_000  # bits per second: 5 MB/s, a burst of 250 kB
SIZE = 4_000_000  # bytes each way: 0.75 s at the rate, after the burst
EXPECTED = (SIZE - RATE / 8 * 0.05) / (RATE / 8)


def _copy(a: Link, b: Link, limits: RateLimits | None) -> Any:
    return CopyRelay(a, b, limits=limits)


def _splice(a: Link, b: Link, limits: RateLimits | None) -> Any:
    from tcpgc.relay.splice import SpliceRelay

    return SpliceRelay(a, b, limits=limits)


def _chunked_copy(a: Link, b: Link, limits: RateLimits | None) -> Any:
    return ChunkedCopyRelay(a, b, limits=limits)


def _chunked_splice(a: Link, b: Link, limits: RateLimits | None) -> Any:
    from tcpgc.relay.chunked_splice import ChunkedSpliceRelay

    relay = ChunkedSpliceRelay(a, b, None, None, None, limits)
    assert relay.start()
    return relay


def _resumable(a: Link, b: Link, limits: RateLimits | None) -> Any:
    return ResumableRelay(
        a, b, retention=Retention(), decoder=RecordDecoder(), limit=4 * SIZE, window=0.0,
        stream_id=bytes(16), key=bytes(32), label="test stream",
        on_broken=lambda relay, why: None, limits=limits,
    )  # fmt: skip


#: engine -> (how to start it, how its data connection frames the stream, needs splice)
ENGINES: dict[str, tuple[Callable[[Link, Link, RateLimits | None], Any], str, bool]] = {
    "copy": (_copy, "raw", False),
    "splice": (_splice, "raw", True),
    "chunked-copy": (_chunked_copy, "chunks", False),
    "chunked-splice": (_chunked_splice, "chunks", True),
    "resumable": (_resumable, "records", False),
}


class _Rig:
    """plain peer <-> link `a`, data peer <-> link `b`, through a local server."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.plain_peer = socket.socket()
        self.data_peer = socket.socket()
        self.links: list[Link] = []
        self.server: asyncio.Server | None = None

    async def connect(self) -> tuple[Link, Link]:
        accepted: asyncio.Queue[Link] = asyncio.Queue()
        self.server = await self.loop.create_server(
            lambda: Link(on_made=accepted.put_nowait), "127.0.0.1", 0
        )
        address = self.server.sockets[0].getsockname()
        for peer in (self.plain_peer, self.data_peer):
            peer.setblocking(False)
            await self.loop.sock_connect(peer, address)
            self.links.append(await accepted.get())
        return self.links[0], self.links[1]

    def close(self) -> None:
        for peer in (self.plain_peer, self.data_peer):
            peer.close()
        for link in self.links:
            link.abort()
        if self.server is not None:
            self.server.close()


@contextlib.asynccontextmanager
async def _rig() -> AsyncIterator[_Rig]:
    rig = _Rig()
    try:
        yield rig
    finally:
        rig.close()


def _framed(data: bytes, framing: str) -> bytes:
    if framing == "raw":
        return data
    if framing == "chunks":
        step = MAX_CHUNK // 4
        return b"".join(chunk_header(len(data[i : i + step])) + data[i : i + step]
                        for i in range(0, len(data), step))  # fmt: skip
    return b"".join(bytes(record) for record in chunk_records(data))


async def _receive(loop: asyncio.AbstractEventLoop, sock: socket.socket, framing: str) -> float:
    """Read until SIZE payload bytes came; the time it took."""
    started = time.monotonic()
    decoder: Any = None if framing == "raw" else ChunkDecoder() if framing == "chunks" else (
        RecordDecoder()
    )  # fmt: skip
    got = 0
    while got < SIZE:
        data = await loop.sock_recv(sock, 1 << 18)
        assert data, f"the stream ended after {got} bytes"
        got += len(data) if decoder is None else sum(len(p) for p in decoder.feed(data))
    return time.monotonic() - started


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("limited", [True, False], ids=["limited", "unlimited"])
@pytest.mark.parametrize("engine", list(ENGINES))
def test_each_direction_moves_its_rate(loop_name: str, limited: bool, engine: str) -> None:
    start, framing, needs_splice = ENGINES[engine]
    if needs_splice and not tcpgc.relay.splice.AVAILABLE:
        pytest.skip("splice(2) is Linux-only")
    hits: list[int] = []

    async def main() -> None:
        async with _rig() as rig:
            a, b = await rig.connect()
            limits = None
            if limited:
                limits = replace(RateLimits.of(RATE), on_limited=lambda: hits.append(1))
            relay = start(a, b, limits)
            loop = rig.loop
            up, down = os.urandom(SIZE), os.urandom(SIZE)
            senders = [
                loop.create_task(loop.sock_sendall(rig.plain_peer, up)),
                loop.create_task(loop.sock_sendall(rig.data_peer, _framed(down, framing))),
            ]
            took_up, took_down = await asyncio.gather(
                _receive(loop, rig.data_peer, framing), _receive(loop, rig.plain_peer, "raw")
            )
            await asyncio.gather(*senders)
            relay.close()
            rates = [round(SIZE * 8 / took / 1e6, 1) for took in (took_up, took_down)]
            if limited:
                # Never faster than the rate (less a read beyond the burst), and not
                # much slower either.
                for took in (took_up, took_down):
                    assert 0.8 * EXPECTED <= took <= 2.0 * EXPECTED, (rates, "Mbit/s")
                assert hits, "no pause was counted"
            else:
                for took in (took_up, took_down):
                    assert took < 0.3 * EXPECTED, (rates, "Mbit/s")

    run_on(loop_name, main)
