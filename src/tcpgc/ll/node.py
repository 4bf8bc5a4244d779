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
import logging
import socket
from functools import partial
from typing import Any

from tcpgc.config import Address, LLConfig, ServiceListener
from tcpgc.errors import UsageError
from tcpgc.identity import Identity, format_fingerprint
from tcpgc.ll.admission import PendingHandshakes
from tcpgc.ll.agent_port import AgentPort
from tcpgc.ll.agents import AgentRegistry
from tcpgc.ll.clients import Clients, Service
from tcpgc.ll.credentials import Credentials
from tcpgc.ll.exposes import ExposedPorts
from tcpgc.ll.pairing import ClientPairing
from tcpgc.ll.ready import ReadyConnections
from tcpgc.ll.resumes import LLResumes
from tcpgc.ll.status import ll_status
from tcpgc.ll.udp_flows import UdpFlows
from tcpgc.ll.watch_agents import watch_agents
from tcpgc.memory_trim import trim_periodically
from tcpgc.metrics import Metrics
from tcpgc.task_set import TaskSet
from tcpgc.transport.datagram_sockets import DatagramServer
from tcpgc.transport.link import Link
from tcpgc.transport.listeners import bound, listen, set_reuse_port

log = logging.getLogger("tcpgc.ll")


class ListenNode:
    """The LL node. Use as ``async with ListenNode(config) as node:``; the bound
    addresses are then in `agent_address` and `service_addresses`.

    It holds its parts: the agent port (handshakes and control sessions), the pairing
    of clients with data connections, the ready data connections, and the clients."""

    def __init__(self, config: LLConfig) -> None:
        self.config = config
        self.credentials = Credentials()
        self.agent_address: Address | None = None
        self.services: dict[str, Service] = {}
        self.agents = AgentRegistry()
        # Only a node with an admin endpoint counts: nothing else could read the figures.
        self.metrics = Metrics("ll", enabled=config.admin is not None)
        self._agent_server: asyncio.Server | None = None
        self._tasks = TaskSet()
        self._pending = PendingHandshakes(config.max_pending, config.max_pending_per_source)
        self.pairing = ClientPairing(
            config, self.agents, self.credentials, self._pending, self.metrics
        )
        self.ready = ReadyConnections(config, self.agents, self.credentials, self._tasks)
        self.resumes = LLResumes(config, self.agents, self.credentials, self.metrics)
        self.clients = Clients(
            self.services,
            pairing=self.pairing,
            ready=self.ready,
            resumes=self.resumes,
            metrics=self.metrics,
            tasks=self._tasks,
        )
        self.exposes = ExposedPorts(config, self.services, self.clients, self.metrics)
        self.exposes.open_udp = self._udp_service
        self.agent_port = AgentPort(
            config,
            agents=self.agents,
            credentials=self.credentials,
            pairing=self.pairing,
            ready=self.ready,
            resumes=self.resumes,
            exposes=self.exposes,
            pending=self._pending,
            metrics=self.metrics,
            tasks=self._tasks,
        )
        #: How the agent address was given, for error messages: the config key or flag.
        self.cc_source = "cc"

    @property
    def identity(self) -> Identity | None:
        return self.credentials.identity

    @property
    def refused(self) -> collections.Counter[tuple[str, str]]:
        """Clients refused by a service's controls, by service and reason."""
        return self.clients.refused

    @property
    def service_addresses(self) -> dict[str, Address]:
        return {name: service.address for name, service in self.services.items()}

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self.config.require_complete()
        assert self.config.cc is not None
        self.credentials.load(self.config)
        if not self.config.services and not self.credentials.may_expose:
            # Agents may be given ports once it runs: it waits for them, and says so.
            log.warning(
                "no services (--clients, [services.NAME]) and no agent that may expose "
                "ports yet: this LL serves nothing until one is added ('tcpgc agent add "
                "NAME --ports LOW-HIGH', same state dir)"
            )
        try:
            self._agent_server = await listen(
                # The context as of each accept: a reload may have replaced it.
                lambda: Link(
                    self.credentials.tls, server_side=True, on_made=self.agent_port.connected
                ),
                self.config.cc,
                f"agents ({self.cc_source})",
            )
            self.agent_address = bound(self._agent_server, self.config.cc)
            for name, listener in self.config.services.items():
                self.services[name] = await self._open_service(name, listener)
        except BaseException:
            await self.close()
            raise
        self._tasks.spawn(trim_periodically(), "memory trim")
        self._tasks.spawn(
            watch_agents(self.credentials, self.agents, self.agent_port.revoke), "agents"
        )
        assert self.identity is not None
        security = (
            "PLAINTEXT (--insecure-plaintext)"
            if self.credentials.plaintext
            else f"TLS 1.3, certificate {format_fingerprint(self.identity.fingerprint)}"
        )
        log.info("listening for agents on %s (%s)", self.agent_address, security)
        for name, service in self.services.items():
            log.info("service '%s' listening for clients on %s%s", name, service.address,
                     " (UDP)" if service.config.udp else "")  # fmt: skip

    async def _open_service(
        self, name: str, listener: ServiceListener, reuse_port: bool = False
    ) -> Service:
        if listener.udp:
            return self._udp_service(name, listener, None, reuse_port)
        server = await listen(
            partial(Link, on_made=partial(self.clients.connected, name)),
            listener.listen,
            f"service '{name}'",
            reuse_port,
        )
        service = Service(name, listener, server, bound(server, listener.listen))
        self.clients.start_reaper(service)
        return service

    def _udp_service(
        self,
        name: str,
        listener: ServiceListener,
        server: DatagramServer | None,
        reuse_port: bool = False,
    ) -> Service:
        """A UDP service, on `server` if its socket is bound already (an exposed port)."""
        flows = UdpFlows(
            name, listener, pairing=self.pairing, ready=self.ready, metrics=self.metrics,
            tasks=self._tasks, reuse_port=reuse_port, server=server,
        )  # fmt: skip
        address = bound(flows, listener.listen)
        if not address.host:  # as `ss` shows it: '[::]' is both families
            family = flows.sockets[0].family
            address = Address("::" if family == socket.AF_INET6 else "0.0.0.0", address.port)
        service = Service(name, listener, flows, address)
        flows.service = service
        return service

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
        gone = self.credentials.load(config)
        if gone:  # revoked since the last look: the reload must not swallow that
            self.agent_port.revoke(gone)
        # Ports agents expose are theirs, not the config's: a reload leaves them be.
        configured = {name: s for name, s in self.services.items() if not s.exposed_by}
        moving = [
            service
            for name, service in configured.items()
            if name not in config.services or _moves(service.config, config.services[name])
        ]
        # A listener that closes may share its port with one that opens (a service
        # moved from 0.0.0.0:8002 to 10.0.0.1:8002, or from [::]:2222 to :2222, or a
        # port handed from a removed service to a new one). The new one opens first, so
        # no client is refused in between: with SO_REUSEPORT on both, which the kernel
        # allows for sockets of one user, the two coexist until the old one closes.
        set_reuse_port((service.server for service in moving), True)
        opened: dict[str, Service] = {}
        try:
            for name, listener in config.services.items():
                current = self.services.get(name)
                if current is None or _moves(current.config, listener):
                    opened[name] = await self._open_service(name, listener, reuse_port=True)
        except UsageError:
            # All or nothing: one service that cannot open refuses the whole reload.
            for service in opened.values():
                service.server.close()
            set_reuse_port((service.server for service in moving), False)
            raise
        replaced = {
            name: service
            for name, service in configured.items()
            if name not in config.services or name in opened
        }
        for name, service in opened.items():
            old = replaced.get(name)
            if old is not None:  # moved: its clients so far and from now share one limit
                old.reconfigure(config.services[name])
                service.limits = old.limits or service.limits
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
        set_reuse_port((service.server for service in opened.values()), False)
        for name, service in configured.items():
            if (
                name in config.services
                and name not in opened
                and service.config != config.services[name]
            ):
                service.reconfigure(config.services[name])
                self.clients.start_reaper(service)
                log.info("service '%s' controls updated", name)
        self._pending.max_total = config.max_pending
        self._pending.max_per_source = config.max_pending_per_source
        self.config = self.pairing.config = self.ready.config = self.agent_port.config = config
        self.exposes.config = config
        self.resumes.reconfigure(config)
        log.info("config reloaded: services %s", ", ".join(self.services))

    async def drain(self, deadline: float) -> None:
        """Stop taking clients, let those in flight finish for up to `deadline` seconds,
        then close everything. Agents stay connected meanwhile so waiting clients are
        still served."""
        for service in self.services.values():
            service.server.close()
        active = self.clients.count()
        if active:
            log.info("draining: waiting up to %.0f s for %d connections", deadline, active)
            try:
                await asyncio.wait_for(self.clients.none_left.wait(), deadline)
            except TimeoutError:
                left = self.clients.count()
                log.warning("drain deadline reached: closing %d connections", left)
        await self.close()

    async def close(self) -> None:
        self.resumes.give_up_all()  # with a reset: those streams cannot go on
        self.exposes.close_all()
        self.agent_port.trimmer.cancel()
        if self._agent_server is not None:
            self._agent_server.close()
        for service in self.services.values():
            service.server.close()
            for relay in list(service.relays):
                relay.close()
        for session in self.agents:
            session.close()
        self.pairing.close()
        await self._tasks.close()

    async def __aenter__(self) -> ListenNode:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for the status page: services, agents, connections."""
        tls = not self.credentials.plaintext
        return ll_status(self.agent_address, tls, self.services, self.agents)


def _moves(current: ServiceListener, new: ServiceListener) -> bool:
    """Whether a reload gives the service a new listener."""
    return current.listen != new.listen or current.protocol != new.protocol
