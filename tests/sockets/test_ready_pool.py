"""The CC's ready pool as an object, in process: real links over 127.0.0.1 to a fake LL
that reads the offers, a session core joined in memory, and stand-ins for the node's
dial and serve. What the LL sees (POOL numbers in order, RETIRE after the time to live,
OPEN_FAILED with its MAC) and what the pool does (refill, reuse, close on stop)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest

from session_tools import join
from tcpgc.cc.opening import Claim, OnIdle
from tcpgc.cc.ready_pool import ReadyPools
from tcpgc.config import Address, CCConfig
from tcpgc.errors import TimedOut
from tcpgc.metrics import Metrics
from tcpgc.protocol.frame_auth import FrameAuth, frame_auth, offer_context
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.messages import Message, Open, OpenFailed, Pool, Retire, encode
from tcpgc.task_set import TaskSet
from tcpgc.transport.link import Link

LL = Address("127.0.0.1", 1)  # only a key: the fake dial ignores it
OPEN = Open(b"\x07" * 16, "web")
WAIT = 10.0  # bound on every wait: a hang fails, it does not stall


@dataclass
class Offered:
    """One ready connection as the fake LL accepted it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    decoder: FrameDecoder
    pool: Pool

    async def next_message(self) -> Message | None:
        """The next frame on it; None at its end."""
        while True:
            message = self.decoder.next_message()
            if message is not None:
                return message
            data = await asyncio.wait_for(self.reader.read(65536), WAIT)
            if not data:
                return None
            self.decoder.receive_data(data)


class Harness:
    def __init__(self, config: CCConfig) -> None:
        self.session, self.ll, _ = join(tls=False)
        self.accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        self.accepted = asyncio.Queue()
        self.served: asyncio.Queue[tuple[Address, Open, Claim, OnIdle]] = asyncio.Queue()
        self.dials = 0
        self.failures = 0  # dials to fail before the first that succeeds
        self.tasks = TaskSet()
        self.pools = ReadyPools(
            config, Metrics("cc", enabled=False), self.tasks, self.dial, self.serve
        )
        self.port = 0

    async def dial(self, address: Address, binding: bytes) -> tuple[Link, bytes]:
        self.dials += 1
        if self.failures:
            self.failures -= 1
            raise TimedOut("timed out")
        loop = asyncio.get_running_loop()
        _, link = await loop.create_connection(lambda: Link(None), "127.0.0.1", self.port)
        return link, binding

    async def serve(self, ll: Address, request: Open, claim: Claim, on_idle: OnIdle) -> None:
        await self.served.put((ll, request, claim, on_idle))

    async def next_offer(self) -> Offered:
        reader, writer = await asyncio.wait_for(self.accepted.get(), WAIT)
        offered = Offered(reader, writer, FrameDecoder(), Pool(b"", 0, b""))
        pool = await offered.next_message()
        assert isinstance(pool, Pool)
        offered.pool = pool
        offered.decoder.auth = self.offer_auth(pool.counter)  # every later frame: MAC'd
        return offered

    def offer_auth(self, counter: int) -> FrameAuth:
        return frame_auth(self.ll.handshake.session_key, offer_context(counter), agent=False)


@contextlib.asynccontextmanager
async def running(pool_size: int, pool_ttl: float = 60.0) -> AsyncIterator[Harness]:
    config = CCConfig(
        ll=[LL], services={"web": LL}, reconnect_min=0.05, pool_size=pool_size, pool_ttl=pool_ttl
    )
    harness = Harness(config)

    writers: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await harness.accepted.put((reader, writer))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    harness.port = server.sockets[0].getsockname()[1]
    keeper = asyncio.ensure_future(harness.pools.keep(LL, harness.session))
    try:
        yield harness
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        await harness.tasks.close()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 4 * WAIT))


def test_the_pool_fills_with_offers_numbered_in_order() -> None:
    async def scenario() -> None:
        async with running(pool_size=3) as h:
            offers = [await h.next_offer() for _ in range(3)]
            assert [o.pool.counter for o in offers] == [1, 2, 3]
            assert h.pools.count() == 3
            assert h.accepted.empty() and h.dials == 3
        # Stopping closes every ready connection.
        for offer in offers:
            assert await offer.next_message() is None

    run(scenario)


def test_open_on_a_ready_connection_is_served_and_replaced() -> None:
    async def scenario() -> None:
        async with running(pool_size=1) as h:
            offer = await h.next_offer()
            offer.writer.write(encode(OPEN, h.offer_auth(offer.pool.counter)))
            ll, request, claim, _ = await asyncio.wait_for(h.served.get(), WAIT)
            assert (ll, request) == (LL, OPEN)
            claim.refuse("the agent is at its connection limit")
            assert await offer.next_message() == OpenFailed(
                OPEN.conn_id, "the agent is at its connection limit"
            )
            assert await offer.next_message() is None  # one client per ready connection
            replacement = await h.next_offer()  # dialed once the client was answered
            assert replacement.pool.counter == 2

    run(scenario)


def test_an_idle_ready_connection_is_retired_and_replaced() -> None:
    async def scenario() -> None:
        async with running(pool_size=1, pool_ttl=0.3) as h:
            offer = await h.next_offer()
            assert await offer.next_message() == Retire()
            assert await offer.next_message() is None
            assert (await h.next_offer()).pool.counter == 2

    run(scenario)


def test_anything_but_open_closes_a_ready_connection() -> None:
    async def scenario() -> None:
        async with running(pool_size=1) as h:
            offer = await h.next_offer()
            offer.writer.write(encode(OPEN))  # no MAC: not from the LL
            assert await offer.next_message() is None
            assert h.served.empty()
            assert (await h.next_offer()).pool.counter == 2

    run(scenario)


def test_a_failed_dial_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with running(pool_size=1) as h:
            h.failures = 2
            assert (await h.next_offer()).pool.counter == 1  # failures are not numbered
            assert h.dials == 3

    run(scenario)
    assert caplog.text.count("cannot open a ready connection to 127.0.0.1:1: timed out") == 2


def test_a_connection_given_back_is_offered_again_unless_the_pool_is_full() -> None:
    async def scenario() -> None:
        async with running(pool_size=1) as h:
            await h.next_offer()
            loop = asyncio.get_running_loop()
            _, link = await loop.create_connection(lambda: Link(None), "127.0.0.1", h.port)
            h.pools.reuse(LL, link)
            again = await h.next_offer()
            assert again.pool.counter == 2
            assert h.pools.count() == 2
            # Another LL's pool does not exist: its connection is closed, not offered.
            _, stray = await loop.create_connection(lambda: Link(None), "127.0.0.1", h.port)
            h.pools.reuse(Address("127.0.0.1", 2), stray)
            reader, _ = await asyncio.wait_for(h.accepted.get(), WAIT)
            assert await asyncio.wait_for(reader.read(), WAIT) == b""

    run(scenario)
