"""The CC's ready data connections: authenticated data connections kept open to each
LL, so a new client costs no connection set-up on the LL-CC leg, and given back to the
LL after their client (the chunked stream marks its end), which saves the next client a
TCP and a TLS handshake.

The numbering, proofs, MACs and time to live of each offer are the session core's
(`tcpgc.protocol.ready_offer`); this module dials, waits and hands OPENs on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any

from tcpgc.cc.claims import ReadyConnection
from tcpgc.cc.link_feed import LinkFeed
from tcpgc.cc.opening import Claim, OnIdle
from tcpgc.config import Address, CCConfig
from tcpgc.errors import TcpgcError
from tcpgc.metrics import Metrics
from tcpgc.protocol.agent_session import AgentControlSession
from tcpgc.protocol.backoff import Backoff
from tcpgc.protocol.messages import Open
from tcpgc.protocol.ready_offer import ClientOffered, OfferEvent, ReadyOffer
from tcpgc.task_set import TaskSet
from tcpgc.transport.failures import transport_error
from tcpgc.transport.link import Link

log = logging.getLogger("tcpgc.cc")

#: Ready data connections kept per LL at most, counting those given back by their
#: clients (the LL keeps as many per agent).
MAX_READY = 64

#: Dials a data connection to an LL for the session whose control connection's
#: certificate has fingerprint `binding` (`tcpgc.cc.ll_dial.LLDialer.dial`).
DialLL = Callable[[Address, bytes], Awaitable[tuple[Link, bytes]]]

#: Serves one OPEN (`tcpgc.cc.opening.Opener.serve`).
Serve = Callable[[Address, Open, Claim, OnIdle], Coroutine[Any, Any, None]]


class ReadyPool:
    """The ready data connections of one session to one LL."""

    def __init__(self, session: AgentControlSession) -> None:
        self.session = session
        self.ready: set[asyncio.Task[Any]] = set()
        self.refill = asyncio.Event()
        self.open = True


class ReadyPools:
    """Keeps `pool_size` ready connections per LL session, and takes back data
    connections whose client is done. `config` may be replaced (on reload)."""

    def __init__(
        self, config: CCConfig, metrics: Metrics, tasks: TaskSet, dial: DialLL, serve: Serve
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._tasks = tasks
        self._dial = dial
        self._serve = serve
        self._pools: dict[Address, ReadyPool] = {}

    async def keep(self, address: Address, session: AgentControlSession) -> None:
        """Keep `pool_size` authenticated data connections open to the LL of `session`
        until cancelled (when the session ends). Connections whose client is done come
        back to the pool (see `reuse`)."""
        pool = self._pools[address] = ReadyPool(session)
        ready, refill = pool.ready, pool.refill
        backoff = Backoff(self.config.reconnect_min, self.config.reconnect_max)
        try:
            while True:
                while len(ready) < self.config.pool_size:
                    opening = asyncio.ensure_future(self._open_ready(address, pool))
                    try:
                        await asyncio.shield(opening)
                    except asyncio.CancelledError:
                        # Stopping must not cut a connection between its TLS handshake
                        # and its first frame (the LL would log it as an attack): let it
                        # finish, with the control connection still up, then close it.
                        await asyncio.gather(opening, return_exceptions=True)
                        _close_opened(opening)
                        raise
                    except TcpgcError as exc:
                        log.warning("cannot open a ready connection to %s: %s", address, exc)
                        # As configured now: a reload may have changed them.
                        backoff.low = self.config.reconnect_min
                        backoff.high = self.config.reconnect_max
                        await asyncio.sleep(backoff.delay)
                        backoff.failed()
                        continue
                    backoff.reset()
                    self._add_ready(address, pool, *opening.result())
                self._count_ready()
                await refill.wait()
                refill.clear()
        finally:
            pool.open = False
            for task in ready:
                task.cancel()
            if self._pools.get(address) is pool:
                del self._pools[address]
            self._count_ready()

    def reuse(self, address: Address, link: Link) -> None:
        """A data connection whose client is done: offer it to the LL again, which saves
        the next client a TCP and a TLS handshake, or close it if the pool is full."""
        pool = self._pools.get(address)
        if pool is None or not pool.open or len(pool.ready) >= MAX_READY:
            link.close()
            return
        self._add_ready(address, pool, link, self._offer(pool, link))
        self._metrics.reused.inc()
        self._count_ready()

    def count(self) -> int:
        """Ready connections waiting, over every LL."""
        return sum(len(p.ready) for p in self._pools.values())

    def _count_ready(self) -> None:
        self._metrics.pool_size.set(self.count())

    async def _open_ready(self, address: Address, pool: ReadyPool) -> tuple[Link, ReadyOffer]:
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                link, _ = await self._dial(address, pool.session.handshake.binding)
        except TimeoutError as exc:
            raise transport_error(exc) from exc
        return link, self._offer(pool, link)

    def _offer(self, pool: ReadyPool, link: Link) -> ReadyOffer:
        """Offer `link` to the LL as ready: POOL is written now, so the numbers leave in
        the order they were given whichever connection carries them. The proof covers
        the certificate of the session's control connection, which `link` was checked
        to present too (`LLDialer.dial`)."""
        offer = pool.session.offer(asyncio.get_running_loop().time(), self.config.pool_ttl)
        link.write(offer.data_to_send())
        return offer

    def _add_ready(self, address: Address, pool: ReadyPool, link: Link, offer: ReadyOffer) -> None:
        task = self._tasks.spawn(self._wait_ready(address, pool, link, offer), "ready connection")
        pool.ready.add(task)
        task.add_done_callback(pool.ready.discard)
        task.add_done_callback(lambda _: pool.refill.set())

    async def _wait_ready(
        self, address: Address, pool: ReadyPool, link: Link, offer: ReadyOffer
    ) -> None:
        """One ready connection: wait for its OPEN, serve it; renewed after pool_ttl
        idle seconds (RETIRE, then closed) so no middlebox forgets it silently."""
        feed: LinkFeed[OfferEvent] = LinkFeed(link, offer.receive_data, offer.data_to_send)
        try:
            deadline = offer.next_deadline()
            events = await feed.events(deadline)
            if not events and deadline is not None:
                # A loop timer may fire a hair before its time: the deadline has passed.
                events = offer.handle_timer(max(asyncio.get_running_loop().time(), deadline))
                feed.flush()
        except asyncio.CancelledError:
            link.close()  # the session ended
            raise
        event = events[0] if events else None
        if not isinstance(event, ClientOffered):
            link.close()  # retired, dropped by the LL, or something else than OPEN
            return
        link.detach(offer.leftover(), feed.eof)
        claim = ReadyConnection(address, link, offer, event.open)
        # Its own task: ending the session must not cut the client it now carries.
        opening = self._tasks.spawn(
            self._serve(address, event.open, claim, partial(self.reuse, address)), "open"
        )
        # The replacement is dialed once this client is answered: dialed now, its
        # connect and the LL's accept would sit on the client's critical path.
        await asyncio.wait([opening])


def _close_opened(opening: asyncio.Future[tuple[Link, ReadyOffer]]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result()[0].close()
