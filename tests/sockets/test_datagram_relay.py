"""The datagram engine on real sockets, on each event loop: a flow's UDP end (the
agent's socket connected to a server) relayed over a data connection whose far end is
a raw TCP socket speaking the wire format by hand. Datagrams cross whole both ways; a
full data connection drops datagrams (counted) instead of queueing them; an idle flow
sends its end marker and hands the connection back once the peer's comes; a malformed
chunk ends that flow only; the peer's end marker ends the flow at once."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from loops import LOOPS, loop_turns, run_on
from tcpgc.cc.udp_flow import ServerFlowEnd, open_server_socket, start_flow
from tcpgc.config import Address
from tcpgc.protocol.chunks import END
from tcpgc.protocol.datagrams import DatagramDecoder, encode_datagram
from tcpgc.relay.datagrams import DatagramRelay, FlowCounters
from tcpgc.relay.rate_limit import RateLimits
from tcpgc.transport.link import Link


class _Rig:
    """server (a UDP socket) <- flow end -> relay -> link `b` <-> `peer` (raw TCP)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind(("127.0.0.1", 0))
        self.server.setblocking(False)
        self.peer = socket.socket()
        self.peer.setblocking(False)
        self.drops: Counter[str] = Counter()
        self.idle: list[Link] = []
        self.handed_back = asyncio.Event()  # set when the relay hands `b` back (on_idle)
        self.decoder = DatagramDecoder()
        self.link: Link | None = None
        self.end: ServerFlowEnd | None = None
        self._listener: asyncio.Server | None = None

    async def start(
        self, idle_timeout: float = 30.0, first: bytes = b"", held: bytes = b""
    ) -> DatagramRelay:
        """The relay, once the data connection holds `held` (sent by the peer before
        the relay exists, as an LL may send a flow's end right behind its OPEN)."""
        accepted: asyncio.Queue[Link] = asyncio.Queue()
        self._listener = await self.loop.create_server(
            lambda: Link(on_made=accepted.put_nowait), "127.0.0.1", 0
        )
        await self.loop.sock_connect(self.peer, self._listener.sockets[0].getsockname())
        self.link = await accepted.get()
        if held:
            await self.loop.sock_sendall(self.peer, held)
            for _ in range(1000):  # at most 5 s
                if len(self.link.buffered) >= len(held):
                    break
                await asyncio.sleep(0.005)
        self.end = await open_server_socket(Address("127.0.0.1", self.server.getsockname()[1]))
        counters = FlowCounters(drop=lambda reason: self.drops.update([reason]))
        return start_flow(self.end, self.link, first, counters, idle_timeout, self._on_idle)

    def _on_idle(self, link: Link) -> None:
        self.idle.append(link)
        self.handed_back.set()

    async def from_server(self) -> bytes:
        """The next datagram the server got (uvloop has no sock_recvfrom; sock_recv
        reads a datagram whole too)."""
        async with asyncio.timeout(5):
            return await self.loop.sock_recv(self.server, 70000)

    async def from_relay(self, count: int) -> list[bytes]:
        """The next `count` datagrams the relay put into the data connection."""
        got: list[bytes] = []
        async with asyncio.timeout(5):
            while len(got) < count and not self.decoder.ended:
                got += self.decoder.feed(await self.loop.sock_recv(self.peer, 1 << 20))
        return got

    def close(self) -> None:
        self.server.close()
        self.peer.close()
        if self.link is not None:
            self.link.abort()
        if self._listener is not None:
            self._listener.close()


@asynccontextmanager
async def rig() -> AsyncIterator[_Rig]:
    r = _Rig()
    try:
        yield r
    finally:
        r.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_datagrams_cross_whole_both_ways_first_one_first(loop: str) -> None:
    async def main() -> None:
        async with rig() as r:
            relay = await r.start(first=b"first")
            sizes = [1, 1400, 8000, 65507]
            later = [bytes([n % 251]) * n for n in sizes]
            await r.loop.sock_sendall(r.peer, b"".join(encode_datagram(d) for d in later))
            seen = [await r.from_server() for _ in range(len(later) + 1)]
            assert seen == [b"first", *later]
            # Replies go back as whole chunks, in order.
            replies = [b"r" * n for n in sizes]
            client_port = relay.a.sock.getsockname()  # type: ignore[attr-defined]
            for reply in replies:
                r.server.sendto(reply, client_port)
            assert await r.from_relay(len(replies)) == replies
            assert (relay.datagrams_down, relay.datagrams_up) == (5, 4)
            assert not r.drops

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_idle_flow_ends_with_its_marker_and_the_connection_is_handed_back(
    loop: str,
) -> None:
    async def main() -> None:
        async with rig() as r:
            relay = await r.start(idle_timeout=0.2)
            result = await asyncio.wait_for(relay.done, 5)
            assert result.ended == "idle for 0.2 s"
            assert await r.from_relay(1) == [] and r.decoder.ended  # our end marker
            assert relay.a.sock.fileno() == -1  # type: ignore[attr-defined]
            assert r.idle == []  # not before the peer's end marker
            await r.loop.sock_sendall(r.peer, END + b"next frame")
            await asyncio.wait_for(r.handed_back.wait(), 5)
            assert r.idle == [r.link]
            assert r.link is not None and r.link.buffered == b"next frame"

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_the_peers_end_marker_ends_the_flow_and_answers_with_ours(loop: str) -> None:
    async def main() -> None:
        async with rig() as r:
            relay = await r.start()
            await r.loop.sock_sendall(r.peer, encode_datagram(b"last") + END)
            result = await asyncio.wait_for(relay.done, 5)
            assert result.ended == "ended by the LL"
            assert await r.from_server() == b"last"
            assert await r.from_relay(1) == [] and r.decoder.ended
            assert r.idle == [r.link]

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_malformed_chunk_ends_the_flow_and_drops_the_connection(loop: str) -> None:
    async def main() -> None:
        async with rig() as r:
            relay = await r.start()
            await r.loop.sock_sendall(r.peer, (70000).to_bytes(4, "big") + b"x" * 10)
            result = await asyncio.wait_for(relay.done, 5)
            assert result.ended.startswith("error: datagram of 70000 bytes")
            assert r.idle == []
            assert r.link is not None and r.link.is_closing

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_full_data_connection_drops_datagrams_and_counts_them(loop: str) -> None:
    async def main() -> None:
        async with rig() as r:
            relay = await r.start()
            # The peer reads nothing: the connection's buffers fill, then the relay's
            # writes pause, and from then on datagrams are dropped, not queued.
            client_port = relay.a.sock.getsockname()  # type: ignore[attr-defined]
            payload = b"d" * 60000
            for _ in range(400):
                try:
                    r.server.sendto(payload, client_port)
                except BlockingIOError:
                    await asyncio.sleep(0.001)
                if r.drops["queue_full"]:
                    break
                await asyncio.sleep(0)
            assert r.drops["queue_full"] > 0
            assert relay.congested
            assert not relay.ended

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    ("held", "ended"),
    [
        (encode_datagram(b"one") + END, "ended by the LL"),
        ((70000).to_bytes(4, "big"), "error: datagram of 70000 bytes (at most 65527)"),
    ],
)
def test_a_flow_whose_end_or_fault_came_before_its_relay_ends_cleanly(
    loop: str, held: bytes, ended: str
) -> None:
    """What the data connection held when the relay was built is handled in the
    constructor: the flow ends there and then, its socket is closed and no reader is
    left on its descriptor (which the next socket may reuse)."""

    async def main() -> None:
        async with rig() as r:
            relay = await r.start(first=b"first", held=held)
            assert relay.ended and relay.result.ended == ended
            assert (await asyncio.wait_for(relay.done, 5)).ended == ended
            assert r.end is not None and r.end.sock.fileno() == -1
            assert r.end.relay is None  # never read: the socket was closed first
            await loop_turns()  # a stray reader on a closed descriptor would fire
            assert await r.from_server() == b"first"

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_rate_limit_drops_datagrams_over_it_and_counts_them(loop: str) -> None:
    async def main() -> None:
        async with rig() as r:
            relay = await r.start()
            relay.limits = RateLimits.of(200_000)  # 25 kB/s, a burst of 16 KiB
            client_port = relay.a.sock.getsockname()  # type: ignore[attr-defined]
            for _ in range(100):
                r.server.sendto(b"x" * 1000, client_port)
            # The burst (16 KiB: 16 datagrams) goes; the rest of a 100 sent at once is
            # over the rate and dropped, not delayed.
            assert await r.from_relay(16) == [b"x" * 1000] * 16
            await loop_turns()  # the reader has read all 100 (they were sent before)
            assert 16 <= relay.datagrams_up <= 18
            assert r.drops["rate_limited"] == 100 - relay.datagrams_up

    run_on(loop, main)
