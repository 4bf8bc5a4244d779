"""The LL's agent port: TLS, then either an agent's handshake (a control session), a
data connection claiming a waiting client, or a ready data connection to keep.

Every connection here is unauthenticated until its first exchange is done: admission
control sheds the excess (from the busiest network first), a deadline bounds each, and
any failure is one log line and one count, and closes that connection only.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import ssl
import time
from dataclasses import dataclass

from tcpgc.config import LLConfig
from tcpgc.errors import PeerRefused, ProtocolError
from tcpgc.identity import Identity
from tcpgc.ll.admission import PendingHandshakes
from tcpgc.ll.agents import AgentRegistry, AgentSession
from tcpgc.ops.memory_trim import BurstTrimmer
from tcpgc.ops.metrics import Metrics, failure_reason
from tcpgc.protocol.frame_auth import CONTROL, frame_auth, offer_context
from tcpgc.protocol.handshake import LLHandshake, data_proof, error_code, pool_proof
from tcpgc.protocol.messages import (
    MAX_VERSION,
    MIN_VERSION,
    Data,
    Error,
    ErrorCode,
    Hello,
    OpenFailed,
    Ping,
    Pong,
    Pool,
)
from tcpgc.safe_text import printable
from tcpgc.task_set import TaskSet
from tcpgc.transport.frame_channel import FrameChannel
from tcpgc.transport.link import Link

log = logging.getLogger("tcpgc.ll")

#: Ready data connections an LL keeps per agent at most (the agent asks for fewer).
MAX_READY = 64

#: First bytes of a TLS ClientHello, to tell a TLS agent talking to a plaintext LL.
_TLS_RECORD = 0x16


@dataclass(eq=False)
class WaitingClient:
    """A client whose agent was sent OPEN and has not claimed it yet."""

    link: Link
    service: str
    agent: AgentSession
    claimed: asyncio.Future[Link]


class AgentPort:
    """The agent-port half of the LL node (`tcpgc.ll.node.ListenNode`), which owns the state
    declared here."""

    config: LLConfig
    identity: Identity | None
    agents: AgentRegistry
    metrics: Metrics
    _tasks: TaskSet
    _waiting: dict[bytes, WaitingClient]
    _secrets: dict[bytes, bytes]
    _tls: ssl.SSLContext | None
    _binding_of_context: dict[int, bytes]
    _pending: PendingHandshakes
    _trimmer: BurstTrimmer

    def _agent_connected(self, link: Link) -> None:
        for victim in self._pending.admit(link, link.peer_host, time.monotonic()):
            assert isinstance(victim, Link)
            self._handshake_failed(
                victim,
                "shed, too many unauthenticated connections "
                f"({self.config.max_pending} pending at most, "
                f"{self.config.max_pending_per_source} per network)",
            )
            victim.shed = True
            victim.abort()
        self._tasks.spawn(self._serve_agent_link(link), f"agent link {link.peer}")

    async def _serve_agent_link(self, link: Link) -> None:
        try:
            session = await self._authenticate(link)
        finally:
            self._pending.release(link)
        if session is not None and self._admit(session):
            await self._run_session(session)

    def _admit(self, session: AgentSession) -> bool:
        """Cap the sessions one credential holds: a leaked token must not let its holder
        open thousands (each with its ready connections). A returning agent replaces its
        own session, so it is not counted against itself."""
        cap = self.config.max_sessions_per_token
        held = self.agents.sessions_with_key(session.key_id, besides=session.raw_id)
        if not cap or held < cap:
            return True
        link = session.channel.link
        self._handshake_failed(
            link,
            f"agent {session.agent_id} refused: {held} sessions already hold its join token "
            f"(max_sessions_per_token = {cap})",
        )
        session.channel.send(
            Error(ErrorCode.UNAVAILABLE, f"too many sessions with this join token ({cap} at most)")
        )
        link.close()
        return False

    async def _authenticate(self, link: Link) -> AgentSession | None:
        """Take a new connection on the agent port through TLS and its first exchange.
        Returns the session of an authenticated agent; a data connection is handed to
        its client and None returned. Any failure is logged once and closes only it."""
        channel: FrameChannel | None = None
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                await link.ready
                channel = FrameChannel(link)
                first = await channel.recv()
                if isinstance(first, Data):
                    self._claim(first, channel)
                    return None
                if isinstance(first, Pool):
                    self._park(first, channel)
                    return None
                if isinstance(first, Hello):
                    return await self._handshake(first, channel)
                if first is None:
                    if not link.shed:
                        self._handshake_failed(
                            link,
                            "closed before its first message "
                            "(an agent refusing our certificate, or a port scan)",
                        )
                    link.abort()
                    return None
                raise ProtocolError(f"unexpected {first.TYPE.name} as first message")
        except TimeoutError:
            self._handshake_failed(
                link, f"no complete handshake within {self.config.handshake_timeout:.1f} s"
            )
            link.abort()
        except ProtocolError as exc:
            reason = str(exc)
            if self._tls is None and _looks_like_tls(exc):
                reason = _transport_reason(exc, True)
            self._handshake_failed(link, reason)
            if channel is not None and not link.is_closed:
                channel.send(Error(error_code(exc), _public_reason(exc)))
                link.close()
            else:
                link.abort()
        except (ssl.SSLError, OSError) as exc:
            if not link.shed:
                self._handshake_failed(link, _transport_reason(exc, self._tls is None))
            link.abort()
        except Exception as exc:  # a bug must cost this connection, never leak it
            log.exception("handshake from %s ended by an internal error", link.peer)
            self._handshake_failed(link, f"internal error: {type(exc).__name__}")
            link.abort()
        return None

    def _handshake_failed(self, link: Link, reason: str) -> None:
        """One log line and one count per bad connection on the agent port."""
        log.warning("handshake failed from %s: %s", link.peer, reason)
        self._trimmer.failed()
        self.metrics.child(self.metrics.handshake_failures, failure_reason(reason)).inc()

    def _claim(self, data: Data, channel: FrameChannel) -> None:
        if not MIN_VERSION <= data.version <= MAX_VERSION:
            raise ProtocolError(f"data connection speaks version {data.version}")
        waiting = self._waiting.get(data.conn_id)
        if waiting is None or waiting.claimed.done():
            raise ProtocolError("unknown, expired or already used data connection id")
        # Checked before the id is used up: a forged claim must not cost the client.
        binding = self._binding_of(channel.link)
        expected = data_proof(waiting.agent.session_key, data.conn_id, binding)
        if not hmac.compare_digest(data.proof, expected):
            raise ProtocolError(
                "data connection with a bad proof (not from the session its client was "
                "offered to, or not over this LL's certificate)"
            )
        del self._waiting[data.conn_id]
        channel.detach()
        waiting.claimed.set_result(channel.link)  # relayed by the client's task from here on

    def _park(self, pool: Pool, channel: FrameChannel) -> None:
        """Keep a ready data connection of an authenticated agent for a future client."""
        session = self.agents.find(pool.agent_id)
        if session is None:
            raise ProtocolError("ready connection for an agent that has no session here")
        binding = self._binding_of(channel.link)
        expected = pool_proof(session.session_key, pool.agent_id, pool.counter, binding)
        # The proof first: only proven numbers may move the replay window.
        if not hmac.compare_digest(pool.proof, expected) or not session.offers.accept(pool.counter):
            raise ProtocolError("ready connection with a bad or replayed proof")
        if self._tls is None:
            channel.auth = frame_auth(session.session_key, offer_context(pool.counter), agent=False)
        if len(session.ready) >= MAX_READY:
            session.ready.popleft().link.close()
        session.ready.append(channel)

    def _data_connection_idle(self, link: Link) -> None:
        """A reusable data connection whose client is done: the agent offers it again
        (a new POOL frame) or closes it."""
        self._tasks.spawn(self._await_offer(link), f"used data connection {link.peer}")

    async def _await_offer(self, link: Link) -> None:
        channel = FrameChannel(link)
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                message = await channel.recv()
            if message is None:
                link.close()  # the agent has enough ready connections
            elif isinstance(message, Pool):
                self._park(message, channel)
            else:
                raise ProtocolError(f"unexpected {message.TYPE.name} on a used data connection")
        except (TimeoutError, ProtocolError, ssl.SSLError, OSError) as exc:
            reason = str(exc) or "no offer in time"
            log.warning("used data connection from %s dropped: %s", link.peer, reason)
            link.abort()

    def _binding_of(self, link: Link) -> bytes:
        """The fingerprint of the certificate this LL presented on `link`: what every
        proof on it is bound to. In plaintext mode, the identity the token names."""
        binding = self._binding_of_context.get(id(link.tls_context))
        if binding is None:
            assert self.identity is not None
            binding = self.identity.fingerprint
        return binding

    async def _handshake(self, hello: Hello, channel: FrameChannel) -> AgentSession:
        link = channel.link
        handshake = LLHandshake(
            self._secrets,
            heartbeat_ms=int(self.config.heartbeat * 1000),
            binding=self._binding_of(link),
            tls=self._tls is not None,
            services=tuple(self.config.services),
        )
        channel.send(handshake.receive(hello))
        auth = await channel.recv()
        if auth is None:
            raise ProtocolError("connection closed during the handshake")
        channel.send(handshake.receive(auth))
        if self._tls is None:  # every later frame carries its MAC
            channel.auth = frame_auth(handshake.session_key, CONTROL, agent=False)
        agent_id = handshake.agent_id.hex()[:12]
        return AgentSession(
            agent_id,
            link.peer,
            link.peer_host,
            handshake.services,
            channel,
            raw_id=handshake.agent_id,
            session_key=handshake.session_key,
            key_id=handshake.key_id,
        )

    async def _run_session(self, session: AgentSession) -> None:
        link = session.channel.link
        served = [s for s in session.services if s in self.config.services]
        unknown = [s for s in session.services if s not in self.config.services]
        log.info(
            "agent %s connected from %s (services: %s)",
            session.agent_id,
            link.peer,
            ", ".join(served),
        )
        if unknown:
            log.warning(
                "agent %s offers services this LL does not have: %s (this LL has: %s)",
                session.agent_id,
                ", ".join(unknown),
                ", ".join(self.config.services),
            )
        # Registered for every service it offers, not only today's: a service added to
        # this LL by a reload is served by the agents already connected.
        stale = self.agents.add(session, session.services)
        self.metrics.agents.set(len(self.agents))
        if stale is not None:
            log.info("agent %s: new session replaces the one from %s", session.agent_id, stale.peer)
            stale.close()
        heartbeat = self._tasks.spawn(self._heartbeat(session.channel), f"heartbeat {link.peer}")
        # Its address's ready and data connections are now kept apart from any flood.
        self._pending.authenticated(session.peer_host, time.monotonic())
        try:
            dead = await self._session_loop(session)
        finally:
            heartbeat.cancel()
            self._pending.session_ended(session.peer_host, time.monotonic())
            self.agents.remove(session)
            self.metrics.agents.set(len(self.agents))
            session.close()  # with its ready connections, and those offered to clients
            # Clients this agent was asked to take will not be claimed: try others.
            for conn_id in list(session.pending):
                waiting = self._waiting.get(conn_id)
                if waiting is not None and not waiting.claimed.done():
                    waiting.claimed.set_exception(
                        PeerRefused(f"agent {session.agent_id} disconnected")
                    )
        if dead and session.relays:
            # The link died silently: its data connections likely did too, and TCP
            # alone could take many minutes to notice. End them now.
            log.warning(
                "closing %d connections carried by agent %s", len(session.relays), session.agent_id
            )
            for relay in list(session.relays):
                relay.result.ended = "agent lost"
                relay.close()

    async def _session_loop(self, session: AgentSession) -> bool:
        """Serve one agent's control messages; True if it ended by heartbeat timeout."""
        channel = session.channel
        while True:
            try:
                message = await channel.recv(within=3 * self.config.heartbeat)
            except TimeoutError:
                # Write-blocked: we stopped reading it because it reads nothing we send (a
                # PING flood that never reads its PONGs, or a peer that stalled).
                what = "reads nothing we send" if channel.write_blocked else "silent"
                log.warning(
                    "agent %s at %s %s for %.0f s: dropping it",
                    session.agent_id,
                    session.peer,
                    what,
                    3 * self.config.heartbeat,
                )
                return True
            except ProtocolError as exc:
                log.warning(
                    "agent %s at %s sent a bad message: %s", session.agent_id, session.peer, exc
                )
                return False
            if message is None:
                log.info("agent %s at %s disconnected", session.agent_id, session.peer)
                return False
            if isinstance(message, Ping):
                channel.send(Pong(message.token))
            elif isinstance(message, Pong):
                pass
            elif isinstance(message, OpenFailed):
                waiting = self._waiting.get(message.conn_id)
                if waiting is not None and waiting.agent is session and not waiting.claimed.done():
                    waiting.claimed.set_exception(
                        PeerRefused(f"agent could not serve it: {printable(message.reason)}")
                    )
            else:
                log.warning(
                    "agent %s sent unexpected %s: closing its session",
                    session.agent_id,
                    message.TYPE.name,
                )
                channel.send(Error(ErrorCode.BAD_MESSAGE, f"unexpected {message.TYPE.name}"))
                return False

    async def _heartbeat(self, channel: FrameChannel) -> None:
        for token in itertools.count():
            await asyncio.sleep(self.config.heartbeat)
            channel.send(Ping(token))


def _looks_like_tls(exc: Exception) -> bool:
    return f"unknown message type {_TLS_RECORD}" in str(exc)


def _transport_reason(exc: BaseException, plaintext: bool) -> str:
    if plaintext:
        if isinstance(exc, ProtocolError) and _looks_like_tls(exc):
            return (
                "peer speaks TLS but this LL runs with --insecure-plaintext (both sides must agree)"
            )
        return str(exc)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ssl.SSLError) and "WRONG_VERSION_NUMBER" in text.upper():
        return "peer does not speak TLS (an agent with --insecure-plaintext, or not a tcpgc agent)"
    return f"TLS failed: {text}"


def _public_reason(exc: ProtocolError) -> str:
    """What an unauthenticated peer is told: enough to fix a setup, nothing more."""
    code = error_code(exc)
    if code == ErrorCode.AUTHENTICATION:
        return "authentication failed: the agent's join token is not accepted by this LL"
    return str(exc)
