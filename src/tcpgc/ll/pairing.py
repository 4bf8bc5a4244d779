"""Pairing a client with a data connection from an agent that serves its service: on one
of the agent's ready connections (OPEN, the client's first bytes right behind it), or by
OPEN on its control connection and a data connection claiming the client with DATA.

The decisions (which claim is good, what an answer means, who may refuse a client) are
`tcpgc.protocol.ll_pairing`'s; this module waits for them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from tcpgc.config import LLConfig
from tcpgc.errors import BadDataConnection, PeerRefused, ProtocolError, Unanswered
from tcpgc.ll.admission import PendingHandshakes
from tcpgc.ll.agents import AgentRegistry, AgentSession
from tcpgc.ll.credentials import Credentials
from tcpgc.metrics import Metrics
from tcpgc.protocol.chunks import chunk_header
from tcpgc.protocol.ll_pairing import Answer, PairingTable, classify_answer
from tcpgc.protocol.messages import CONN_ID_SIZE, Data, Open
from tcpgc.transport.frame_channel import FrameChannel
from tcpgc.transport.link import Link

log = logging.getLogger("tcpgc.ll")

#: The most of a client's first bytes sent right behind its OPEN. An agent reads frames
#: in bounded amounts (pausing its reads beyond 32 KiB), and the rest follows at once.
EARLY_BYTES = 16 * 1024


#: A client's data connection, its agent, the first bytes sent behind OPEN, the id.
Paired = tuple[Link, AgentSession, int, bytes]


class Waiter(Protocol):
    """What waits for a data connection: a client's `Link`, or a UDP flow
    (`tcpgc.ll.udp_flows.Flow`)."""

    @property
    def closed(self) -> asyncio.Future[None]: ...
    @property
    def buffered(self) -> bytes: ...
    @property
    def peer(self) -> str: ...
    @property
    def peer_endpoint(self) -> tuple[str, int]: ...
    @property
    def local_endpoint(self) -> tuple[str, int]: ...
    def abort(self) -> None: ...
    def reset(self) -> None: ...


@dataclass(frozen=True)
class _Claim:
    """A waiting client: its link, and the future its data connection is handed in."""

    link: Waiter
    future: asyncio.Future[Link]


class ClientPairing:
    """Finds each client its data connection; holds the clients waiting for one."""

    def __init__(
        self,
        config: LLConfig,
        agents: AgentRegistry,
        credentials: Credentials,
        pending: PendingHandshakes,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self._agents = agents
        self._credentials = credentials
        self._pending = pending
        self._metrics = metrics
        self._table: PairingTable[_Claim] = PairingTable()

    # ---- what the agent port hands over ------------------------------------------------

    def claim(self, data: Data, channel: FrameChannel) -> None:
        """A data connection's DATA frame: give it to the client it names, or raise
        ProtocolError (the client keeps waiting if the claim was not its agent's)."""
        binding = self._credentials.binding_of(channel.link)
        waiting = self._table.claim(data, binding, asyncio.get_running_loop().time())
        if waiting.client.future.done():  # its client stopped waiting this very turn
            raise BadDataConnection("unknown, expired or already used data connection id")
        channel.detach()
        waiting.client.future.set_result(channel.link)  # relayed by the client's task from here on

    def refused(self, conn_id: bytes, agent: AgentSession, reason: str) -> None:
        """OPEN_FAILED from `agent`: its client, if it was offered to that agent, goes
        to the next agent."""
        waiting = self._table.refuse(conn_id, agent)
        if waiting is not None and not waiting.client.future.done():
            waiting.client.future.set_exception(PeerRefused(reason))

    def agent_gone(self, agent: AgentSession) -> None:
        """Clients `agent` was asked to take will not be claimed: try others."""
        for waiting in self._table.agent_gone(agent):
            if not waiting.client.future.done():
                refusal = PeerRefused(f"agent {agent.agent_id} disconnected")
                waiting.client.future.set_exception(refusal)

    def close(self) -> None:
        """Abort every client waiting for a data connection (the node closes)."""
        for waiting in self._table:
            waiting.client.link.abort()

    # ---- one client ----------------------------------------------------------------------

    async def pair(self, service: str, link: Waiter, quiet: bool = False) -> Paired | None:
        """Find an agent that claims this client; try the next agent if one cannot.
        Returns its data connection, the agent, how many of the client's first bytes
        went to it behind OPEN, and the stream's id; None (the client closed, and
        counted) if none did."""
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        deadline = arrived + self.config.client_wait
        tried: set[AgentSession] = set()
        reason = ""  # why the last agent tried did not take it
        unanswered = ""
        closed: asyncio.Future[Any] = link.closed
        while not closed.done() and (remaining := deadline - loop.time()) > 0:
            agent = self._agents.pick(service, tried)
            if agent is None and tried:
                break  # every agent there is refused it: say so now rather than later
            if agent is None:
                joined = asyncio.ensure_future(self._agents.joined())
                await asyncio.wait(
                    [joined, closed], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                joined.cancel()
                continue
            conn_id = secrets.token_bytes(CONN_ID_SIZE)
            window_ms = int(self.config.window_of(service) * 1000)
            open_message = Open(
                conn_id, service, *link.peer_endpoint, *link.local_endpoint, window_ms,
                self.config.is_udp(service),
            )  # fmt: skip
            try:
                ready = await self._offer_ready(agent, open_message, link, remaining)
            except PeerRefused as exc:
                tried.add(agent)
                reason = str(exc)
                continue
            except Unanswered as exc:
                unanswered = str(exc)
                break
            if ready is not None:
                self._observe_wait(service, loop.time() - arrived)
                return ready[0], agent, ready[1], conn_id
            if closed.done() or (remaining := deadline - loop.time()) <= 0:
                break
            if not agent.alive or agent.control is None:  # lost while we offered
                tried.add(agent)
                reason = f"agent {agent.agent_id} disconnected"
                continue
            claimed: asyncio.Future[Link] = loop.create_future()
            self._table.expect(
                conn_id,
                service=service,
                agent=agent,
                session_key=agent.session_key,
                deadline=deadline,
                client=_Claim(link, claimed),
            )
            self._pending.expect(agent.peer_host)
            agent.control.offer(open_message)
            try:
                await asyncio.wait(
                    [claimed, closed], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                if claimed.done():
                    data_link = claimed.result()
                    self._observe_wait(service, loop.time() - arrived)
                    return data_link, agent, 0, conn_id
                if not closed.done():
                    reason = f"agent {agent.agent_id} did not take it in time"
            except PeerRefused as exc:
                tried.add(agent)
                reason = str(exc)
            finally:
                self._table.forget(conn_id)
                self._pending.settle(agent.peer_host)
                claimed.cancel()
        self._give_up(service, link, reason, unanswered, quiet)
        return None

    def _observe_wait(self, service: str, seconds: float) -> None:
        self._metrics.child(self._metrics.data_wait, service).observe(seconds)

    def _give_up(
        self, service: str, link: Waiter, refusal: str, unanswered: str, quiet: bool
    ) -> None:
        """Close a client no agent took: it left, its first bytes went unanswered, an
        agent refused it (`refusal`), or no agent came. `quiet`: logged at debug level
        (the caller sums them up: a UDP flow's address can be spoofed at will)."""
        info = logging.DEBUG if quiet else logging.INFO
        warning = logging.DEBUG if quiet else logging.WARNING
        if link.closed.done():
            label = "left"
            log.log(info, "client %s of service '%s' left before it was served", link.peer, service)
        elif unanswered:
            label = "unanswered"
            log.log(warning,
                "client %s of service '%s' reset: %s after its first bytes went to it; "
                "not offered to another agent, as they may have reached a server",
                link.peer, service, unanswered,
            )  # fmt: skip
            link.reset()  # what the client sees when a connection breaks mid-request
        elif not refusal:
            label = "no_agent"
            wait = self.config.client_wait
            log.log(
                warning,
                "no agent for service '%s' within %.1f s: closing client %s",
                service,
                wait,
                link.peer,
            )
        else:
            label = "agent_refused"
            log.log(warning, "client %s of service '%s' closed: %s", link.peer, service, refusal)
        self._metrics.child(self._metrics.clients_refused, service, label).inc()
        link.abort()

    async def _offer_ready(
        self, agent: AgentSession, open_message: Open, link: Waiter, within: float
    ) -> tuple[Link, int] | None:
        """Offer the client on one of the agent's ready data connections. Returns the
        claimed connection and how many of the client's first bytes it got; None when
        the agent has no live ready connection (the caller then asks over the control
        connection). Raises PeerRefused if the agent answers that it cannot serve the
        client, Unanswered if its first bytes went to an agent that did not answer."""
        closed: asyncio.Future[Any] = link.closed
        while (channel := agent.take_ready()) is not None:
            # What the client has sent so far rides right behind OPEN, in the same
            # segment, as the stream's first chunk: the agent hands it to the server as
            # soon as it is connected, instead of a turn later. The client's buffer keeps
            # it until the agent answers DATA, so a refusal can still go to another agent.
            early = link.buffered[:EARLY_BYTES]
            if early:
                prefix = channel.encode(open_message) + chunk_header(len(early))
                channel.link.write(early, prefix=prefix)
            else:
                channel.send(open_message)
            answer = asyncio.ensure_future(channel.recv())
            agent.offered.add(channel)  # aborted if the agent is lost meanwhile
            try:
                await asyncio.wait(
                    [answer, closed], timeout=within, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                agent.offered.discard(channel)
            if not answer.done():
                answer.cancel()
                channel.link.abort()
                if early and not closed.done():
                    raise Unanswered(f"agent {agent.agent_id} did not answer in time")
                return None  # the client left, or the agent is too slow
            try:
                reply = answer.result()
            except ProtocolError as exc:
                log.warning("agent %s: bad answer on a ready connection: %s", agent.agent_id, exc)
                channel.link.abort()
                if early:
                    raise Unanswered(f"agent {agent.agent_id} answered badly") from None
                continue
            binding = self._credentials.binding_of(channel.link)
            verdict = classify_answer(reply, open_message.conn_id, agent.session_key, binding)
            if verdict.answer is Answer.TAKEN:
                channel.detach()
                return channel.link, len(early)
            if verdict.answer is Answer.BAD_PROOF:
                log.warning("agent %s: DATA with a bad proof on a ready connection", agent.agent_id)
            channel.link.abort()
            if verdict.answer is Answer.RETIRED:
                continue  # the agent was closing it and did not read our OPEN
            if verdict.answer is Answer.REFUSED:
                # Said before any byte went to a server: the next agent may have them.
                raise PeerRefused(verdict.reason)
            if early:
                raise Unanswered(f"agent {agent.agent_id} closed the connection")
            # Closed before answering (replaced, or broken): try the next one.
        return None
