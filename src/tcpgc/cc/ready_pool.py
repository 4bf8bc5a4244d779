"""The CC's ready data connections: authenticated data connections kept open to each
LL, so a new client costs no connection set-up on the LL-CC leg, and given back to the
LL after their client (the chunked stream marks its end), which saves the next client a
TCP and a TLS handshake. A mixin of `tcpgc.cc.node.ConnectNode`, which owns the state
declared here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from typing import Any

from tcpgc.config import Address, CCConfig
from tcpgc.errors import ProtocolError, TcpgcError
from tcpgc.ops.metrics import Metrics
from tcpgc.protocol.frame_auth import frame_auth, offer_context
from tcpgc.protocol.handshake import AgentHandshake, pool_proof
from tcpgc.protocol.messages import Open, Pool, Retire
from tcpgc.task_set import TaskSet
from tcpgc.transport.frame_channel import FrameChannel
from tcpgc.transport.link import Link

log = logging.getLogger("tcpgc.cc")

#: Ready data connections kept per LL at most, counting those given back by their
#: clients (the LL keeps as many per agent).
MAX_READY = 64


class ReadyPool:
    """The ready data connections of one session to one LL, and their numbering."""

    def __init__(self, handshake: AgentHandshake) -> None:
        self.handshake = handshake
        self.counter = 0
        self.ready: set[asyncio.Task[Any]] = set()
        self.refill = asyncio.Event()
        self.open = True

    def offer(self, link: Link) -> FrameChannel:
        """Offer `link` to the LL as ready (a POOL frame). Numbered when sent, so the
        numbers leave in order whichever connection carries them. The proof covers the
        certificate of the session's control connection, which `link` was checked to
        present too (`ConnectNode._dial_ll`)."""
        self.counter += 1
        session = self.handshake
        agent_id, key = session.agent_id, session.session_key
        channel = FrameChannel(link)
        proof = pool_proof(key, agent_id, self.counter, session.binding)
        channel.send(Pool(agent_id, self.counter, proof))
        if not session.tls:  # the frames of this offer carry MACs
            channel.auth = frame_auth(key, offer_context(self.counter), agent=True)
        return channel


class ReadyPools:
    """The ready-connection half of the CC node."""

    config: CCConfig
    metrics: Metrics
    _tasks: TaskSet
    _pools: dict[Address, ReadyPool]

    # Provided by the node.
    async def _dial_ll(
        self, address: Address, session: AgentHandshake | None = None
    ) -> tuple[Link, bytes]:
        raise NotImplementedError

    async def _open(
        self,
        ll: Address,
        channel: FrameChannel,
        session: AgentHandshake,
        request: Open,
        ready: bool = False,
    ) -> None:
        raise NotImplementedError

    async def _keep_ready(self, address: Address, handshake: AgentHandshake) -> None:
        """Keep `pool_size` authenticated data connections open to the LL, so a new
        client costs no connection set-up on the LL-CC leg. Connections whose client is
        done come back to the pool (see `_reuse`)."""
        pool = self._pools[address] = ReadyPool(handshake)
        ready, refill = pool.ready, pool.refill
        delay = self.config.reconnect_min
        try:
            while True:
                while len(ready) < self.config.pool_size:
                    opening = asyncio.ensure_future(self._open_ready(address, pool))
                    try:
                        channel = await asyncio.shield(opening)
                    except asyncio.CancelledError:
                        # Stopping must not cut a connection between its TLS handshake
                        # and its first frame (the LL would log it as an attack): let it
                        # finish, with the control connection still up, then close it.
                        await asyncio.gather(opening, return_exceptions=True)
                        _close_opened(opening)
                        raise
                    except (TcpgcError, OSError, ssl.SSLError, TimeoutError) as exc:
                        reason = describe(exc)
                        log.warning("cannot open a ready connection to %s: %s", address, reason)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, self.config.reconnect_max)
                        continue
                    delay = self.config.reconnect_min
                    self._add_ready(address, pool, channel)
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

    def _count_ready(self) -> None:
        self.metrics.pool_size.set(sum(len(p.ready) for p in self._pools.values()))

    def _add_ready(self, address: Address, pool: ReadyPool, channel: FrameChannel) -> None:
        task = self._tasks.spawn(self._wait_ready(address, pool, channel), "ready connection")
        pool.ready.add(task)
        task.add_done_callback(pool.ready.discard)
        task.add_done_callback(lambda _: pool.refill.set())

    async def _open_ready(self, address: Address, pool: ReadyPool) -> FrameChannel:
        async with asyncio.timeout(self.config.connect_timeout):
            link, _ = await self._dial_ll(address, pool.handshake)
        return pool.offer(link)

    def _reuse(self, address: Address, link: Link) -> None:
        """A data connection whose client is done: offer it to the LL again, which saves
        the next client a TCP and a TLS handshake, or close it if the pool is full."""
        pool = self._pools.get(address)
        if pool is None or not pool.open or len(pool.ready) >= MAX_READY:
            link.close()
            return
        self._add_ready(address, pool, pool.offer(link))
        self.metrics.reused.inc()
        self._count_ready()

    async def _wait_ready(self, address: Address, pool: ReadyPool, channel: FrameChannel) -> None:
        """One ready connection: wait for its OPEN, serve it; replaced after pool_ttl
        idle seconds so no middlebox forgets it silently."""
        try:
            message = await channel.recv(within=self.config.pool_ttl)
        except asyncio.CancelledError:
            channel.link.close()  # the session ended
            raise
        except TimeoutError:
            # Time to renew it. Said first, so that an OPEN crossing our close is known
            # to the LL as never acted on, and can go elsewhere with its first bytes.
            channel.send(Retire())
            channel.link.close()
            return
        except ProtocolError:
            channel.link.close()  # the LL dropped it
            return
        if isinstance(message, Open):
            # Its own task: ending the session must not cut the client it now carries.
            opening = self._tasks.spawn(
                self._open(address, channel, pool.handshake, message, ready=True), "open"
            )
            # The replacement is dialed once this client is answered: dialed now, its
            # connect and the LL's accept would sit on the client's critical path.
            await asyncio.wait([opening])
        else:
            channel.link.close()


def _close_opened(opening: asyncio.Future[FrameChannel]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().link.close()


def describe(exc: BaseException) -> str:
    """A failure to reach the LL or a server, in a few words for a log line."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        # Its errno is a resolver code (EAI_*), which os.strerror calls 'unknown error'.
        return f"the host name does not resolve ({exc.strerror})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc}); is the LL running with --insecure-plaintext?"
    if isinstance(exc, ConnectionResetError) and "TLS" in str(exc):
        return f"{exc}; is the LL running with --insecure-plaintext?"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__
