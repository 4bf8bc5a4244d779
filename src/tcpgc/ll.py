"""The Listen-Listen node: takes clients and agents, and pairs each client with a data
connection from an agent that serves its service.

    client ──▶ service port ─┐
                             ├─ OPEN(id) on the agent's control connection
    agent ──▶ agent port ────┘   ◀── data connection carrying DATA(id), then the stream

Nothing an unauthenticated peer sends can reach a client: a data connection is bound to
a waiting client only by an id that was sent over an authenticated control connection,
is used once, and expires with the client's wait.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from tcpgc.channel import FrameChannel
from tcpgc.config import Address, LLConfig
from tcpgc.errors import PeerRefused, ProtocolError, UsageError
from tcpgc.guard import PendingHandshakes
from tcpgc.identity import (
    Certificate,
    Identity,
    default_state_dir,
    format_fingerprint,
    load_identity,
)
from tcpgc.link import Link
from tcpgc.protocol.handshake import LLHandshake, error_code, key_id
from tcpgc.protocol.messages import (
    CONN_ID_SIZE,
    MAX_VERSION,
    MIN_VERSION,
    Data,
    Error,
    ErrorCode,
    Hello,
    Open,
    OpenFailed,
    Ping,
    Pong,
)
from tcpgc.relay import Relay
from tcpgc.tasks import TaskGroup

log = logging.getLogger("tcpgc.ll")

#: First bytes of a TLS ClientHello, to tell a TLS agent talking to a plaintext LL.
_TLS_RECORD = 0x16


class NoAgent(Exception):
    pass


@dataclass(eq=False)
class AgentSession:
    """One authenticated control connection."""

    agent_id: str
    peer: str
    services: tuple[str, ...]
    channel: FrameChannel
    pending: set[bytes] = field(default_factory=set)

    def send_open(self, conn_id: bytes, service: str) -> None:
        self.pending.add(conn_id)
        self.channel.send(Open(conn_id, service))


@dataclass(eq=False)
class WaitingClient:
    link: Link
    service: str
    agent: AgentSession
    claimed: asyncio.Future[Link]


class ListenNode:
    """The LL node. Use as ``async with ListenNode(config) as node:``; the bound
    addresses are then in `agent_address` and `service_addresses`."""

    def __init__(self, config: LLConfig) -> None:
        self.config = config
        self.identity: Identity | None = None
        self.agent_address: Address | None = None
        self.service_addresses: dict[str, Address] = {}
        self._servers: list[asyncio.Server] = []
        self._tasks = TaskGroup()
        self._agents: dict[str, list[AgentSession]] = {}
        self._round_robin: dict[str, itertools.count[int]] = {}
        self._agent_joined = asyncio.Event()
        self._waiting: dict[bytes, WaitingClient] = {}
        self._secrets: dict[bytes, bytes] = {}
        self._tls: ssl.SSLContext | None = None
        self._binding_of_context: dict[int, bytes] = {}
        self._pending = PendingHandshakes(config.max_pending, config.max_pending_per_source)
        self._active: dict[str, set[Relay]] = {name: set() for name in config.services}
        self._clients: collections.Counter[str] = collections.Counter()  # waiting or relayed
        #: Clients refused by the service's controls, by service and reason.
        self.refused: collections.Counter[tuple[str, str]] = collections.Counter()

    async def start(self) -> None:
        if self.config.cc is None:
            raise UsageError("no agent address: give --cc HOST:PORT or 'cc' in the config file")
        if not self.config.services:
            raise UsageError(
                "no service: give --clients HOST:PORT or [services.NAME] in the config file"
            )
        state_dir = self.config.state_dir or default_state_dir()
        self.identity = load_identity(state_dir, create=True)
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            own = Certificate.load(self.config.tls_cert, self.config.tls_key)
            self.identity = self.identity.with_certificate(own)
        self._secrets = {key_id(secret): secret for secret in self.identity.secrets}
        if not self.config.insecure_plaintext:
            self._tls, self._binding_of_context = self.identity.server_context(
                self.config.tls_client_ca
            )
        try:
            server = await self._listen(
                lambda: Link(self._tls, server_side=True, on_made=self._agent_connected),
                self.config.cc,
                "--cc",
            )
            self.agent_address = _bound(server, self.config.cc)
            for name, service in self.config.services.items():
                server = await self._listen(
                    partial(Link, on_made=partial(self._client_connected, name)),
                    service.listen,
                    f"service '{name}'",
                )
                self.service_addresses[name] = _bound(server, service.listen)
                if service.idle_timeout > 0:
                    self._tasks.spawn(self._reap_idle(name, service.idle_timeout), f"idle {name}")
        except BaseException:
            await self.close()
            raise
        security = (
            "PLAINTEXT (--insecure-plaintext)"
            if self._tls is None
            else f"TLS 1.3, certificate {format_fingerprint(self.identity.fingerprint)}"
        )
        log.info("listening for agents on %s (%s)", self.agent_address, security)
        for name, address in self.service_addresses.items():
            log.info("service '%s' listening for clients on %s", name, address)

    async def _listen(
        self, factory: Callable[[], asyncio.BaseProtocol], address: Address, what: str
    ) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                factory, address.host, address.port, reuse_address=True
            )
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {address} for {what}: {exc.strerror or exc}"
            ) from None
        self._servers.append(server)
        return server

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for sessions in self._agents.values():
            for session in sessions:
                session.channel.link.abort()
        for waiting in self._waiting.values():
            waiting.link.abort()
        await self._tasks.close()

    async def __aenter__(self) -> ListenNode:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def agents(self) -> list[AgentSession]:
        return list({id(s): s for sessions in self._agents.values() for s in sessions}.values())

    # ---- clients -----------------------------------------------------------------------

    def _client_connected(self, service: str, link: Link) -> None:
        listener = self.config.services[service]
        refusal = listener.admits(link.peer_host)
        if refusal is None and 0 < listener.max_clients <= self._clients[service]:
            refusal = f"service at its limit of {listener.max_clients} clients"
        if refusal is not None:
            self.refused[service, refusal] += 1
            log.info("refused client %s of service '%s': %s", link.peer, service, refusal)
            link.abort()
            return
        self._clients[service] += 1
        self._tasks.spawn(self._serve_client(service, link), f"client {link.peer} of {service}")

    async def _reap_idle(self, service: str, limit: float) -> None:
        """Close connections of `service` that moved no byte for `limit` seconds."""
        while True:
            await asyncio.sleep(min(limit / 4, 5.0))
            now = time.monotonic()
            for relay in list(self._active[service]):
                if now - relay.result.last_activity > limit:
                    relay.result.ended = f"idle for {limit:.0f} s"
                    relay.close()

    def _pick_agent(self, service: str) -> AgentSession | None:
        sessions = self._agents.get(service)
        if not sessions:
            return None
        return sessions[next(self._round_robin[service]) % len(sessions)]

    async def _wait_for_agent(self, service: str, link: Link) -> AgentSession:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.client_wait
        while (agent := self._pick_agent(service)) is None:
            remaining = deadline - loop.time()
            if remaining <= 0 or link.closed.done():
                raise NoAgent
            joined: asyncio.Future[Any] = asyncio.ensure_future(self._agent_joined.wait())
            closed: asyncio.Future[Any] = link.closed
            await asyncio.wait(
                [joined, closed], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            joined.cancel()
        return agent

    async def _serve_client(self, service: str, link: Link) -> None:
        try:
            await self._pair_client(service, link)
        finally:
            self._clients[service] -= 1

    async def _pair_client(self, service: str, link: Link) -> None:
        try:
            agent = await self._wait_for_agent(service, link)
        except NoAgent:
            if not link.closed.done():
                log.warning(
                    "no agent for service '%s' within %.1f s: closing client %s",
                    service,
                    self.config.client_wait,
                    link.peer,
                )
            link.abort()
            return
        conn_id = secrets.token_bytes(CONN_ID_SIZE)
        waiting = WaitingClient(link, service, agent, asyncio.get_running_loop().create_future())
        self._waiting[conn_id] = waiting
        agent.send_open(conn_id, service)
        try:
            async with asyncio.timeout(self.config.client_wait):
                claimed: asyncio.Future[Any] = waiting.claimed
                closed: asyncio.Future[Any] = link.closed
                done, _ = await asyncio.wait([claimed, closed], return_when=asyncio.FIRST_COMPLETED)
            if waiting.claimed not in done:
                log.info("client %s of service '%s' left before it was served", link.peer, service)
                return
            data_link = waiting.claimed.result()
        except TimeoutError:
            log.warning(
                "agent %s did not take client %s of service '%s' in time: closing it",
                agent.agent_id,
                link.peer,
                service,
            )
            link.abort()
            return
        except PeerRefused as exc:
            log.warning("client %s of service '%s' closed: %s", link.peer, service, exc)
            link.abort()
            return
        finally:
            self._waiting.pop(conn_id, None)
            agent.pending.discard(conn_id)
        relay = Relay(link, data_link)
        self._active[service].add(relay)
        try:
            result = await relay.done
        finally:
            self._active[service].discard(relay)
        log.info(
            "client %s of service '%s' done after %.3f s: %d bytes in, %d bytes out, %s",
            link.peer,
            service,
            result.duration,
            result.bytes_a_to_b,
            result.bytes_b_to_a,
            result.ended,
        )

    # ---- agent port --------------------------------------------------------------------

    def _agent_connected(self, link: Link) -> None:
        for victim in self._pending.admit(link, link.peer_host):
            assert isinstance(victim, Link)
            log.warning(
                "handshake failed from %s: shed, too many unauthenticated connections "
                "(%d pending at most, %d per source)",
                victim.peer,
                self.config.max_pending,
                self.config.max_pending_per_source,
            )
            victim.shed = True
            victim.abort()
        self._tasks.spawn(self._serve_agent_link(link), f"agent link {link.peer}")

    async def _serve_agent_link(self, link: Link) -> None:
        try:
            session = await self._authenticate(link)
        finally:
            self._pending.release(link)
        if session is not None:
            await self._run_session(session)

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
                if isinstance(first, Hello):
                    return await self._handshake(first, channel)
                if first is None:
                    if not link.shed:
                        log.warning(
                            "handshake failed from %s: closed before its first message "
                            "(an agent refusing our certificate, or a port scan)",
                            link.peer,
                        )
                    link.abort()
                    return None
                raise ProtocolError(f"unexpected {first.TYPE.name} as first message")
        except TimeoutError:
            log.warning(
                "handshake failed from %s: no complete handshake within %.1f s",
                link.peer,
                self.config.handshake_timeout,
            )
            link.abort()
        except ProtocolError as exc:
            reason = str(exc)
            if self._tls is None and _looks_like_tls(exc):
                reason = _transport_reason(exc, True)
            log.warning("handshake failed from %s: %s", link.peer, reason)
            if channel is not None and not link.closed.done():
                channel.send(Error(error_code(exc), _public_reason(exc)))
                link.close()
            else:
                link.abort()
        except (ssl.SSLError, OSError) as exc:
            if not link.shed:
                reason = _transport_reason(exc, self._tls is None)
                log.warning("handshake failed from %s: %s", link.peer, reason)
            link.abort()
        return None

    def _claim(self, data: Data, channel: FrameChannel) -> None:
        if not MIN_VERSION <= data.version <= MAX_VERSION:
            raise ProtocolError(f"data connection speaks version {data.version}")
        waiting = self._waiting.pop(data.conn_id, None)
        if waiting is None or waiting.claimed.done():
            raise ProtocolError("unknown, expired or already used data connection id")
        channel.detach()
        waiting.claimed.set_result(channel.link)  # relayed by the client's task from here on

    async def _handshake(self, hello: Hello, channel: FrameChannel) -> AgentSession:
        link = channel.link
        binding = self._binding_of_context.get(id(link.tls_context))
        if binding is None:  # plaintext: bind to the identity the token names
            assert self.identity is not None
            binding = self.identity.fingerprint
        handshake = LLHandshake(
            self._secrets, heartbeat_ms=int(self.config.heartbeat * 1000), binding=binding
        )
        channel.send(handshake.receive(hello))
        auth = await channel.recv()
        if auth is None:
            raise ProtocolError("connection closed during the handshake")
        channel.send(handshake.receive(auth))
        return AgentSession(handshake.agent_id.hex()[:12], link.peer, handshake.services, channel)

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
                "agent %s offers services this LL does not have: %s",
                session.agent_id,
                ", ".join(unknown),
            )
        self._register(session, served)
        heartbeat = self._tasks.spawn(self._heartbeat(session.channel), f"heartbeat {link.peer}")
        try:
            await self._session_loop(session)
        finally:
            heartbeat.cancel()
            self._unregister(session, served)
            link.abort()

    async def _session_loop(self, session: AgentSession) -> None:
        channel = session.channel
        while True:
            try:
                message = await channel.recv(within=3 * self.config.heartbeat)
            except TimeoutError:
                log.warning(
                    "agent %s at %s silent for %.0f s: dropping it",
                    session.agent_id,
                    session.peer,
                    3 * self.config.heartbeat,
                )
                return
            except ProtocolError as exc:
                log.warning(
                    "agent %s at %s sent a bad message: %s", session.agent_id, session.peer, exc
                )
                return
            if message is None:
                log.info("agent %s at %s disconnected", session.agent_id, session.peer)
                return
            if isinstance(message, Ping):
                channel.send(Pong(message.token))
            elif isinstance(message, Pong):
                pass
            elif isinstance(message, OpenFailed):
                waiting = self._waiting.get(message.conn_id)
                if waiting is not None and waiting.agent is session and not waiting.claimed.done():
                    waiting.claimed.set_exception(
                        PeerRefused(f"agent could not serve it: {message.reason}")
                    )
            else:
                log.warning(
                    "agent %s sent unexpected %s: closing its session",
                    session.agent_id,
                    message.TYPE.name,
                )
                channel.send(Error(ErrorCode.BAD_MESSAGE, f"unexpected {message.TYPE.name}"))
                return

    async def _heartbeat(self, channel: FrameChannel) -> None:
        for token in itertools.count():
            await asyncio.sleep(self.config.heartbeat)
            channel.send(Ping(token))

    def _register(self, session: AgentSession, services: list[str]) -> None:
        for service in services:
            self._agents.setdefault(service, []).append(session)
            self._round_robin.setdefault(service, itertools.count())
        self._agent_joined.set()
        self._agent_joined = asyncio.Event()

    def _unregister(self, session: AgentSession, services: list[str]) -> None:
        for service in services:
            if session in self._agents.get(service, []):
                self._agents[service].remove(session)
        # Clients this agent was asked to take will not be claimed: fail them now.
        for conn_id in list(session.pending):
            waiting = self._waiting.get(conn_id)
            if waiting is not None and not waiting.claimed.done():
                waiting.claimed.set_exception(PeerRefused(f"agent {session.agent_id} disconnected"))


def _bound(server: asyncio.Server, wanted: Address) -> Address:
    host, port = server.sockets[0].getsockname()[:2]
    return Address(wanted.host, port)


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
