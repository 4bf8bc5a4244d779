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
import hmac
import itertools
import logging
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from tcpgc.agents import AgentRegistry, AgentSession
from tcpgc.channel import FrameChannel
from tcpgc.config import Address, LLConfig, ServiceListener
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
from tcpgc.memory import BurstTrimmer, trim_periodically
from tcpgc.metrics import Metrics, failure_reason
from tcpgc.protocol.handshake import LLHandshake, error_code, key_id, pool_proof
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
    Pool,
)
from tcpgc.splice import AnyRelay, start_relay
from tcpgc.tasks import TaskGroup

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


@dataclass(eq=False)
class Service:
    """One service's listener and its clients."""

    name: str
    config: ServiceListener
    server: asyncio.Server
    address: Address
    relays: set[AnyRelay] = field(default_factory=set)
    clients: int = 0  # waiting or relayed
    reaper: asyncio.Task[Any] | None = None


class ListenNode:
    """The LL node. Use as ``async with ListenNode(config) as node:``; the bound
    addresses are then in `agent_address` and `service_addresses`."""

    def __init__(self, config: LLConfig) -> None:
        self.config = config
        self.identity: Identity | None = None
        self.agent_address: Address | None = None
        self.services: dict[str, Service] = {}
        self.agents = AgentRegistry()
        self.metrics = Metrics("ll")
        #: Clients refused by a service's controls, by service and reason.
        self.refused: collections.Counter[tuple[str, str]] = collections.Counter()
        self._agent_server: asyncio.Server | None = None
        self._tasks = TaskGroup()
        self._waiting: dict[bytes, WaitingClient] = {}
        self._secrets: dict[bytes, bytes] = {}
        self._tls: ssl.SSLContext | None = None
        self._binding_of_context: dict[int, bytes] = {}
        self._pending = PendingHandshakes(config.max_pending, config.max_pending_per_source)
        self._trimmer = BurstTrimmer(lambda: len(self._pending))
        self._no_clients = asyncio.Event()
        self._no_clients.set()

    @property
    def service_addresses(self) -> dict[str, Address]:
        return {name: service.address for name, service in self.services.items()}

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self.config.cc is None:
            raise UsageError("no agent address: give --cc HOST:PORT or 'cc' in the config file")
        if not self.config.services:
            raise UsageError(
                "no service: give --clients HOST:PORT or [services.NAME] in the config file"
            )
        self._load_identity(self.config)
        try:
            self._agent_server = await _listen(
                lambda: Link(self._tls, server_side=True, on_made=self._agent_connected),
                self.config.cc,
                "--cc",
            )
            self.agent_address = _bound(self._agent_server, self.config.cc)
            for name, listener in self.config.services.items():
                self.services[name] = await self._open_service(name, listener)
        except BaseException:
            await self.close()
            raise
        self._tasks.spawn(trim_periodically(), "memory trim")
        assert self.identity is not None
        security = (
            "PLAINTEXT (--insecure-plaintext)"
            if self._tls is None
            else f"TLS 1.3, certificate {format_fingerprint(self.identity.fingerprint)}"
        )
        log.info("listening for agents on %s (%s)", self.agent_address, security)
        for name, service in self.services.items():
            log.info("service '%s' listening for clients on %s", name, service.address)

    def _load_identity(self, config: LLConfig) -> None:
        identity = load_identity(config.state_dir or default_state_dir(), create=True)
        if config.tls_cert is not None and config.tls_key is not None:
            identity = identity.with_certificate(Certificate.load(config.tls_cert, config.tls_key))
        tls: ssl.SSLContext | None = None
        bindings: dict[int, bytes] = {}
        if not config.insecure_plaintext:
            tls, bindings = identity.server_context(config.tls_client_ca)
        # Only now that everything loaded: a reload that fails changes nothing.
        self.identity = identity
        self._secrets = {key_id(secret): secret for secret in identity.secrets}
        self._tls, self._binding_of_context = tls, bindings

    async def _open_service(self, name: str, listener: ServiceListener) -> Service:
        server = await _listen(
            partial(Link, on_made=partial(self._client_connected, name)),
            listener.listen,
            f"service '{name}'",
        )
        service = Service(name, listener, server, _bound(server, listener.listen))
        self._start_reaper(service)
        return service

    def _start_reaper(self, service: Service) -> None:
        if service.reaper is not None:
            service.reaper.cancel()
            service.reaper = None
        if service.config.idle_timeout > 0:
            service.reaper = self._tasks.spawn(self._reap_idle(service), f"idle {service.name}")

    async def reload(self, config: LLConfig) -> None:
        """Apply a new config: services added, removed or changed; connections of the
        others untouched. Raises UsageError, changing nothing, if it cannot be applied."""
        if (
            config.cc != self.config.cc
            or config.insecure_plaintext != self.config.insecure_plaintext
        ):
            raise UsageError(
                "'cc' and 'insecure_plaintext' cannot change on reload: restart instead"
            )
        self._load_identity(config)
        opened: dict[str, Service] = {}
        try:
            for name, listener in config.services.items():
                current = self.services.get(name)
                if current is None or current.config.listen != listener.listen:
                    opened[name] = await self._open_service(name, listener)
        except UsageError:
            for service in opened.values():
                service.server.close()
            raise
        for name, service in list(self.services.items()):
            if name not in config.services or name in opened:
                service.server.close()  # its connections finish on their own
                if service.reaper is not None:
                    service.reaper.cancel()
                del self.services[name]
                if name not in opened:
                    log.info("service '%s' removed", name)
            elif service.config != config.services[name]:
                service.config = config.services[name]
                self._start_reaper(service)
                log.info("service '%s' controls updated", name)
        for name, service in opened.items():
            self.services[name] = service
            log.info("service '%s' listening for clients on %s", name, service.address)
        self._pending.max_total = config.max_pending
        self._pending.max_per_source = config.max_pending_per_source
        self.config = config
        log.info("config reloaded: services %s", ", ".join(self.services))

    async def drain(self, deadline: float) -> None:
        """Stop taking clients, let those in flight finish for up to `deadline` seconds,
        then close everything. Agents stay connected meanwhile so waiting clients are
        still served."""
        for service in self.services.values():
            service.server.close()
        active = sum(service.clients for service in self.services.values())
        if active:
            log.info("draining: waiting up to %.0f s for %d connections", deadline, active)
            try:
                await asyncio.wait_for(self._no_clients.wait(), deadline)
            except TimeoutError:
                left = sum(service.clients for service in self.services.values())
                log.warning("drain deadline reached: closing %d connections", left)
        await self.close()

    async def close(self) -> None:
        self._trimmer.cancel()
        if self._agent_server is not None:
            self._agent_server.close()
        for service in self.services.values():
            service.server.close()
            for relay in list(service.relays):
                relay.close()
        for session in self.agents:
            session.close()
        for waiting in self._waiting.values():
            waiting.link.abort()
        await self._tasks.close()

    async def __aenter__(self) -> ListenNode:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for the status page: services, agents, connections."""
        now = time.monotonic()
        return {
            "role": "ll",
            "agent_address": str(self.agent_address),
            "tls": self._tls is not None,
            "services": [
                {
                    "name": name,
                    "listen": str(service.address),
                    "clients": service.clients,
                    "agents": sum(1 for a in self.agents if name in a.services),
                }
                for name, service in self.services.items()
            ],
            "agents": [
                {
                    "id": agent.agent_id,
                    "peer": agent.peer,
                    "services": list(agent.services),
                    "connected_for": round(time.time() - agent.since, 1),
                    "connections": len(agent.relays),
                }
                for agent in self.agents
            ],
            "connections": [
                {
                    "service": service.name,
                    "client": relay.a.peer,
                    "bytes_in": relay.result.bytes_a_to_b,
                    "bytes_out": relay.result.bytes_b_to_a,
                    "seconds": round(now - relay.result.started, 1),
                }
                for service in self.services.values()
                for relay in service.relays
            ],
        }

    # ---- clients -----------------------------------------------------------------------

    def _client_connected(self, name: str, link: Link) -> None:
        service = self.services.get(name)
        if service is None:  # removed by a reload while this connection was accepted
            link.abort()
            return
        refusal = service.config.admits(link.peer_host)
        if refusal is None and 0 < service.config.max_clients <= service.clients:
            refusal = f"service at its limit of {service.config.max_clients} clients"
        if refusal is not None:
            self.refused[name, refusal] += 1
            self.metrics.child(self.metrics.clients_refused, name, refusal.split(" ")[0]).inc()
            log.info("refused client %s of service '%s': %s", link.peer, name, refusal)
            link.abort()
            return
        service.clients += 1
        self.metrics.child(self.metrics.clients_accepted, name).inc()
        self._no_clients.clear()
        self._tasks.spawn(self._serve_client(service, link), f"client {link.peer} of {name}")

    async def _serve_client(self, service: Service, link: Link) -> None:
        paired = None
        try:
            paired = await self._pair(service.name, link)
        finally:
            if paired is None:
                self._client_gone(service)
        if paired is not None:
            # From here on callbacks, not this task, see the client through: a task and
            # its frames per idle connection would cost kilobytes each.
            self._relay(service, link, *paired)

    def _client_gone(self, service: Service) -> None:
        service.clients -= 1
        if not any(s.clients for s in self.services.values()):
            self._no_clients.set()

    async def _pair(self, service: str, link: Link) -> tuple[Link, AgentSession] | None:
        """Find an agent that claims this client; try the next agent if one cannot."""
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        deadline = arrived + self.config.client_wait
        tried: set[AgentSession] = set()
        reason = f"no agent for service '{service}' within {self.config.client_wait:.1f} s"
        closed: asyncio.Future[Any] = link.closed
        while not closed.done() and (remaining := deadline - loop.time()) > 0:
            agent = self.agents.pick(service, tried)
            if agent is None and tried:
                break  # every agent there is refused it: say so now rather than later
            if agent is None:
                joined = asyncio.ensure_future(self.agents.joined())
                await asyncio.wait(
                    [joined, closed], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                joined.cancel()
                continue
            conn_id = secrets.token_bytes(CONN_ID_SIZE)
            try:
                ready = await self._offer_ready(agent, conn_id, service, link, remaining)
            except PeerRefused as exc:
                tried.add(agent)
                reason = str(exc)
                continue
            if ready is not None:
                self.metrics.child(self.metrics.data_wait, service).observe(loop.time() - arrived)
                return ready, agent
            if closed.done():
                break
            if not agent.alive:  # lost while we offered: try another
                tried.add(agent)
                reason = f"agent {agent.agent_id} disconnected"
                continue
            claimed: asyncio.Future[Any] = loop.create_future()
            self._waiting[conn_id] = WaitingClient(link, service, agent, claimed)
            self._pending.expect(agent.peer_host)
            agent.channel.send(Open(conn_id, service, *link.peer_endpoint, *link.local_endpoint))
            agent.pending.add(conn_id)
            try:
                await asyncio.wait(
                    [claimed, closed], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                if claimed.done():
                    data_link = claimed.result()
                    self.metrics.child(self.metrics.data_wait, service).observe(
                        loop.time() - arrived
                    )
                    return data_link, agent
                if not closed.done():
                    reason = f"agent {agent.agent_id} did not take it in time"
            except PeerRefused as exc:
                tried.add(agent)
                reason = str(exc)
            finally:
                self._waiting.pop(conn_id, None)
                self._pending.settle(agent.peer_host)
                agent.pending.discard(conn_id)
                claimed.cancel()
        if closed.done():
            label = "left"
            log.info("client %s of service '%s' left before it was served", link.peer, service)
        elif reason.startswith("no agent"):
            label = "no_agent"
            log.warning("%s: closing client %s", reason, link.peer)
        else:
            label = "agent_refused"
            log.warning("client %s of service '%s' closed: %s", link.peer, service, reason)
        self.metrics.child(self.metrics.clients_refused, service, label).inc()
        link.abort()
        return None

    async def _offer_ready(
        self, agent: AgentSession, conn_id: bytes, service: str, link: Link, within: float
    ) -> Link | None:
        """Offer the client on one of the agent's ready data connections. Returns the
        claimed connection; None when the agent has no live ready connection (the
        caller then asks over the control connection). Raises PeerRefused if the agent
        answers that it cannot serve the client."""
        open_message = Open(conn_id, service, *link.peer_endpoint, *link.local_endpoint)
        closed: asyncio.Future[Any] = link.closed
        while (channel := agent.take_ready()) is not None:
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
                return None  # the client left, or the agent is too slow
            try:
                reply = answer.result()
            except ProtocolError as exc:
                log.warning("agent %s: bad answer on a ready connection: %s", agent.agent_id, exc)
                channel.link.abort()
                continue
            if isinstance(reply, Data) and reply.conn_id == conn_id:
                channel.detach()
                return channel.link
            channel.link.abort()
            if isinstance(reply, OpenFailed) and reply.conn_id == conn_id:
                raise PeerRefused(f"agent could not serve it: {reply.reason}")
            # Closed before answering (replaced, or broken): try the next one.
        return None

    def _relay(self, service: Service, link: Link, data_link: Link, agent: AgentSession) -> None:
        m = self.metrics
        relay = start_relay(
            link,
            data_link,
            m.child(m.bytes, service.name, "in"),
            m.child(m.bytes, service.name, "out"),
        )
        service.relays.add(relay)
        agent.relays.add(relay)
        active = m.child(m.clients_active, service.name)
        active.inc()

        def finished(_: object) -> None:
            active.dec()
            service.relays.discard(relay)
            agent.relays.discard(relay)
            self._client_gone(service)
            result = relay.result
            log.info(
                "client %s of service '%s' done after %.3f s: %d bytes in, %d bytes out, %s",
                link.peer,
                service.name,
                result.duration,
                result.bytes_a_to_b,
                result.bytes_b_to_a,
                result.ended,
            )

        relay.done.add_done_callback(finished)

    async def _reap_idle(self, service: Service) -> None:
        """Close connections of `service` that moved no byte for its idle timeout."""
        limit = service.config.idle_timeout
        while True:
            await asyncio.sleep(min(limit / 4, 5.0))
            now = time.monotonic()
            for relay in list(service.relays):
                if now - relay.result.last_activity > limit:
                    relay.result.ended = f"idle for {limit:.0f} s"
                    relay.close()

    # ---- agent port --------------------------------------------------------------------

    def _agent_connected(self, link: Link) -> None:
        for victim in self._pending.admit(link, link.peer_host):
            assert isinstance(victim, Link)
            self._handshake_failed(
                victim,
                "shed, too many unauthenticated connections "
                f"({self.config.max_pending} pending at most, "
                f"{self.config.max_pending_per_source} per source)",
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
            if channel is not None and not link.closed.done():
                channel.send(Error(error_code(exc), _public_reason(exc)))
                link.close()
            else:
                link.abort()
        except (ssl.SSLError, OSError) as exc:
            if not link.shed:
                self._handshake_failed(link, _transport_reason(exc, self._tls is None))
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
        waiting = self._waiting.pop(data.conn_id, None)
        if waiting is None or waiting.claimed.done():
            raise ProtocolError("unknown, expired or already used data connection id")
        channel.detach()
        waiting.claimed.set_result(channel.link)  # relayed by the client's task from here on

    def _park(self, pool: Pool, channel: FrameChannel) -> None:
        """Keep a ready data connection of an authenticated agent for a future client."""
        session = self.agents.find(pool.agent_id)
        if session is None:
            raise ProtocolError("ready connection for an agent that has no session here")
        expected = pool_proof(session.session_key, pool.agent_id, pool.counter)
        if pool.counter <= session.ready_counter or not hmac.compare_digest(pool.proof, expected):
            raise ProtocolError("ready connection with a bad or replayed proof")
        session.ready_counter = pool.counter
        if len(session.ready) >= MAX_READY:
            session.ready.popleft().link.close()
        session.ready.append(channel)

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
        agent_id = handshake.agent_id.hex()[:12]
        return AgentSession(
            agent_id,
            link.peer,
            link.peer_host,
            handshake.services,
            channel,
            raw_id=handshake.agent_id,
            session_key=handshake.session_key,
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
                "agent %s offers services this LL does not have: %s",
                session.agent_id,
                ", ".join(unknown),
            )
        # Registered for every service it offers, not only today's: a service added to
        # this LL by a reload is served by the agents already connected.
        stale = self.agents.add(session, session.services)
        self.metrics.agents.set(len(self.agents))
        if stale is not None:
            log.info("agent %s: new session replaces the one from %s", session.agent_id, stale.peer)
            stale.close()
        heartbeat = self._tasks.spawn(self._heartbeat(session.channel), f"heartbeat {link.peer}")
        try:
            dead = await self._session_loop(session)
        finally:
            heartbeat.cancel()
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
                log.warning(
                    "agent %s at %s silent for %.0f s: dropping it",
                    session.agent_id,
                    session.peer,
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
                        PeerRefused(f"agent could not serve it: {message.reason}")
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


async def _listen(
    factory: Callable[[], asyncio.BaseProtocol], address: Address, what: str
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(
            factory, address.bind_host, address.port, reuse_address=True, backlog=1024
        )
    except OSError as exc:
        raise UsageError(f"cannot listen on {address} for {what}: {exc.strerror or exc}") from None


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
