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
import errno
import hmac
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from tcpgc.config import Address, LLConfig, ServiceListener
from tcpgc.errors import PeerRefused, ProtocolError, Unanswered, UsageError
from tcpgc.identity import (
    Certificate,
    Identity,
    default_state_dir,
    format_fingerprint,
    load_identity,
)
from tcpgc.ll.admission import PendingHandshakes
from tcpgc.ll.agent_port import AgentPort, WaitingClient
from tcpgc.ll.agents import AgentRegistry, AgentSession
from tcpgc.ops.memory_trim import BurstTrimmer, trim_periodically
from tcpgc.ops.metrics import Metrics
from tcpgc.protocol.chunks import chunk_header
from tcpgc.protocol.handshake import data_proof, key_id
from tcpgc.protocol.messages import (
    CONN_ID_SIZE,
    Data,
    Open,
    OpenFailed,
    Retire,
)
from tcpgc.relay.factory import start_chunked_relay
from tcpgc.relay.result import AnyRelay, RelayResult
from tcpgc.safe_text import printable
from tcpgc.task_set import TaskSet
from tcpgc.transport.link import Link

log = logging.getLogger("tcpgc.ll")


#: The most of a client's first bytes sent right behind its OPEN. An agent reads frames
#: in bounded amounts (pausing its reads beyond 32 KiB), and the rest follows at once.
EARLY_BYTES = 16 * 1024


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


class ListenNode(AgentPort):
    """The LL node. Use as ``async with ListenNode(config) as node:``; the bound
    addresses are then in `agent_address` and `service_addresses`."""

    def __init__(self, config: LLConfig) -> None:
        self.config = config
        self.identity: Identity | None = None
        self.agent_address: Address | None = None
        self.services: dict[str, Service] = {}
        self.agents = AgentRegistry()
        # Only a node with an admin endpoint counts: nothing else could read the figures.
        self.metrics = Metrics("ll", enabled=config.admin is not None)
        #: Clients refused by a service's controls, by service and reason.
        self.refused: collections.Counter[tuple[str, str]] = collections.Counter()
        self._agent_server: asyncio.Server | None = None
        self._tasks = TaskSet()
        self._waiting: dict[bytes, WaitingClient] = {}
        self._secrets: dict[bytes, bytes] = {}
        self._tls: ssl.SSLContext | None = None
        self._binding_of_context: dict[int, bytes] = {}
        self._pending = PendingHandshakes(config.max_pending, config.max_pending_per_source)
        self._trimmer = BurstTrimmer(lambda: len(self._pending))
        self._no_clients = asyncio.Event()
        self._no_clients.set()
        #: How the agent address was given, for error messages: the config key or flag.
        self.cc_source = "cc"

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
                f"agents ({self.cc_source})",
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

    async def _open_service(
        self, name: str, listener: ServiceListener, reuse_port: bool = False
    ) -> Service:
        server = await _listen(
            partial(Link, on_made=partial(self._client_connected, name)),
            listener.listen,
            f"service '{name}'",
            reuse_port,
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
        moving = [
            service
            for name, service in self.services.items()
            if name not in config.services or service.config.listen != config.services[name].listen
        ]
        # A listener that closes may share its port with one that opens (a service
        # moved from 0.0.0.0:8002 to 10.0.0.1:8002, or from [::]:2222 to :2222, or a
        # port handed from a removed service to a new one). The new one opens first, so
        # no client is refused in between: with SO_REUSEPORT on both, which the kernel
        # allows for sockets of one user, the two coexist until the old one closes.
        _set_reuse_port(moving, True)
        opened: dict[str, Service] = {}
        try:
            for name, listener in config.services.items():
                current = self.services.get(name)
                if current is None or current.config.listen != listener.listen:
                    opened[name] = await self._open_service(name, listener, reuse_port=True)
        except UsageError:
            # All or nothing: one service that cannot open refuses the whole reload.
            for service in opened.values():
                service.server.close()
            _set_reuse_port(moving, False)
            raise
        replaced = {
            name: service
            for name, service in self.services.items()
            if name not in config.services or name in opened
        }
        for name, service in opened.items():
            self.services[name] = service  # its clients, from either listener, from now
            log.info("service '%s' listening for clients on %s", name, service.address)
        if opened and replaced:
            # Two loop turns: the first polls the old listeners, the second runs their
            # accept callbacks, so clients already queued on them are taken, not reset
            # by the close below. (Clients the kernel spreads onto an old listener of
            # the very same address in the instant before it closes can still be reset.)
            for _ in range(2):
                await asyncio.sleep(0)
        for name, service in replaced.items():
            service.server.close()  # its connections finish on their own
            if service.reaper is not None:
                service.reaper.cancel()
            if name not in opened:
                del self.services[name]
                log.info("service '%s' removed", name)
        # The old listeners are closed: nobody else may join the new ones' ports now.
        _set_reuse_port(opened.values(), False)
        for name, service in self.services.items():
            if name not in opened and service.config != config.services[name]:
                service.config = config.services[name]
                self._start_reaper(service)
                log.info("service '%s' controls updated", name)
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
            # One loop turn first: asyncio runs this task before it reads the client's
            # first bytes, and the bytes read by the time OPEN leaves go with it.
            await asyncio.sleep(0)
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

    async def _pair(self, service: str, link: Link) -> tuple[Link, AgentSession, int] | None:
        """Find an agent that claims this client; try the next agent if one cannot.
        Returns its data connection, the agent, and how many of the client's first bytes
        went to it behind OPEN."""
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        deadline = arrived + self.config.client_wait
        tried: set[AgentSession] = set()
        reason = f"no agent for service '{service}' within {self.config.client_wait:.1f} s"
        unanswered = ""
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
            except Unanswered as exc:
                unanswered = str(exc)
                break
            if ready is not None:
                self.metrics.child(self.metrics.data_wait, service).observe(loop.time() - arrived)
                return ready[0], agent, ready[1]
            if closed.done() or (remaining := deadline - loop.time()) <= 0:
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
                    return data_link, agent, 0
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
        elif unanswered:
            label = "unanswered"
            log.warning(
                "client %s of service '%s' reset: %s after its first bytes went to it; "
                "not offered to another agent, as they may have reached a server",
                link.peer, service, unanswered,
            )  # fmt: skip
            link.reset()  # what the client sees when a connection breaks mid-request
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
    ) -> tuple[Link, int] | None:
        """Offer the client on one of the agent's ready data connections. Returns the
        claimed connection and how many of the client's first bytes it got; None when
        the agent has no live ready connection (the caller then asks over the control
        connection). Raises PeerRefused if the agent answers that it cannot serve the
        client."""
        open_message = Open(conn_id, service, *link.peer_endpoint, *link.local_endpoint)
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
            if isinstance(reply, Data) and reply.conn_id == conn_id:
                proof = data_proof(agent.session_key, conn_id, self._binding_of(channel.link))
                if hmac.compare_digest(reply.proof, proof):
                    channel.detach()
                    return channel.link, len(early)
                log.warning("agent %s: DATA with a bad proof on a ready connection", agent.agent_id)
            channel.link.abort()
            if isinstance(reply, Retire):
                continue  # the agent was closing it and did not read our OPEN
            if isinstance(reply, OpenFailed) and reply.conn_id == conn_id:
                # Said before any byte went to a server: the next agent may have them.
                raise PeerRefused(f"agent could not serve it: {printable(reply.reason)}")
            if early:
                raise Unanswered(f"agent {agent.agent_id} closed the connection")
            # Closed before answering (replaced, or broken): try the next one.
        return None

    def _relay(
        self, service: Service, link: Link, data_link: Link, agent: AgentSession, early: int
    ) -> None:
        m = self.metrics
        counters = (m.child(m.bytes, service.name, "in"), m.child(m.bytes, service.name, "out"))
        link.consume(early)  # the agent has them: they went behind OPEN
        # The data connection carries the client chunked, and is reused after it.
        relay = start_chunked_relay(link, data_link, *counters, on_idle=self._data_connection_idle)
        if early:
            relay.result.bytes_a_to_b += early
            counters[0].inc(early)
        service.relays.add(relay)
        agent.relays.add(relay)
        m.child(m.clients_active, service.name).inc()
        # A partial, not a closure or a future: it lives as long as the connection.
        relay.on_done = partial(self._finished, service, agent, link, relay)

    def _finished(
        self, service: Service, agent: AgentSession, link: Link, relay: AnyRelay, _: RelayResult
    ) -> None:
        self.metrics.child(self.metrics.clients_active, service.name).dec()
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


def _set_reuse_port(services: Iterable[Service], on: bool) -> None:
    for service in services:
        for sock in service.server.sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(on))


async def _listen(
    factory: Callable[[], asyncio.BaseProtocol],
    address: Address,
    what: str,
    reuse_port: bool = False,
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    tries = 1
    port = address.port
    if address.bind_host is None and port == 0:
        # Both families on any free port: the same one for both, or a client would
        # need to know which family it was given.
        tries = 5
    for attempt in range(tries):
        if tries > 1:
            with socket.socket() as probe:
                probe.bind(("", 0))
                port = probe.getsockname()[1]
        try:
            return await loop.create_server(
                factory,
                address.bind_host,
                port,
                reuse_address=True,
                reuse_port=reuse_port or None,
                backlog=1024,
            )
        except socket.gaierror as exc:
            raise UsageError(
                f"cannot listen on {address} for {what}: host {address.host!r} does not "
                f"resolve ({exc.strerror})"
            ) from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and attempt + 1 < tries:
                continue  # taken in between by someone else: pick another
            reason = exc.strerror or exc
            raise UsageError(f"cannot listen on {address} for {what}: {reason}") from None
    raise AssertionError("unreachable")


def _bound(server: asyncio.Server, wanted: Address) -> Address:
    host, port = server.sockets[0].getsockname()[:2]
    return Address(wanted.host, port)
