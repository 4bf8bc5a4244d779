"""Ready data connections: opened by an agent before any client (POOL), kept for the
next client of one of its services, and offered again by the agent once their client
is done. Whether a POOL frame is accepted is `tcpgc.protocol.ll_pairing`'s decision."""

from __future__ import annotations

import asyncio
import logging
import ssl

from tcpgc.config import LLConfig
from tcpgc.errors import ProtocolError
from tcpgc.ll.agents import AgentRegistry
from tcpgc.ll.credentials import Credentials
from tcpgc.protocol.ll_pairing import Opening, accept_pool, classify_reoffer
from tcpgc.protocol.messages import Pool
from tcpgc.task_set import TaskSet
from tcpgc.transport.frame_channel import FrameChannel
from tcpgc.transport.link import Link

log = logging.getLogger("tcpgc.ll")


class ReadyConnections:
    """Parks proven ready connections with their agent's session."""

    def __init__(
        self, config: LLConfig, agents: AgentRegistry, credentials: Credentials, tasks: TaskSet
    ) -> None:
        self.config = config
        self._agents = agents
        self._credentials = credentials
        self._tasks = tasks

    def park(self, pool: Pool, channel: FrameChannel) -> None:
        """Keep a ready data connection of an authenticated agent for a future client;
        ProtocolError if it does not prove that agent's session."""
        session = self._agents.find(pool.agent_id)
        # A closed session (revoked, ending) takes no more: it would never offer it.
        offers = session.offers if session is not None and session.alive else None
        binding = self._credentials.binding_of(channel.link)
        auth = accept_pool(offers, pool, binding, plaintext=self._credentials.plaintext)
        assert offers is not None
        if auth is not None:
            channel.auth = auth
        evicted = offers.park(channel)
        if evicted is not None:
            evicted.link.close()

    def data_connection_idle(self, link: Link) -> None:
        """A reusable data connection whose client is done: the agent offers it again
        (a new POOL frame) or closes it."""
        self._tasks.spawn(self._await_offer(link), f"used data connection {link.peer}")

    async def _await_offer(self, link: Link) -> None:
        channel = FrameChannel(link)
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                message = await channel.recv()
            if classify_reoffer(message) is Opening.CLOSED:
                link.close()  # the agent has enough ready connections
            else:
                assert isinstance(message, Pool)
                self.park(message, channel)
        except (TimeoutError, ProtocolError, ssl.SSLError, OSError) as exc:
            reason = str(exc) or "no offer in time"
            log.warning("used data connection from %s dropped: %s", link.peer, reason)
            link.abort()
