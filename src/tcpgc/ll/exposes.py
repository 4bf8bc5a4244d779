"""Ports agents expose (`tcpgc cc --expose`): what each agent's credential grants of what
it asks, the listeners the LL opens for them, and how long those stay.

An exposed port is a service named ':PORT' (':PORT/udp' for a UDP one, a UDP service
of its own) that exists while an agent holds it. Agents
exposing the same port (on the same address) share it as the agents of one configured
service do. When the last holder's session ends, the port stays open for the resume
window, so a client's stream (and new clients, who wait for an agent as usual) see an
agent's network blip as a pause; then it closes. A revoked agent's ports close at once.

The listening socket is bound while the handshake is answered, so READY can say which
ports were refused, with why, and the LL never listens on a port it refused.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tcpgc.config import Address, LLConfig, ServiceListener, ll_listeners, ll_udp_listeners
from tcpgc.errors import UsageError
from tcpgc.identity.agents import AgentCredential
from tcpgc.ll.agents import AgentSession
from tcpgc.ll.clients import Clients, Service
from tcpgc.metrics import Metrics
from tcpgc.protocol.handshake import Grant, Request
from tcpgc.protocol.messages import expose_name
from tcpgc.transport.datagram_sockets import DatagramServer, bind_datagram
from tcpgc.transport.link import Link

log = logging.getLogger("tcpgc.ll")

#: The flow caps of a UDP port an agent exposes (a configured UDP service sets its own):
#: an agent may expose 32 ports, and each flow holds a data connection.
EXPOSED_MAX_FLOWS = 500
EXPOSED_MAX_FLOWS_PER_SOURCE = 100

_SHARED_TOKEN_NO_EXPOSE = (
    "the LL's shared join token may expose no port; give this agent its own credential "
    "('tcpgc agent add NAME --ports LOW-HIGH' on the LL)"
)


@dataclass(eq=False)
class _Port:
    """One exposed port: its service, once listening, and the sessions that hold it."""

    host: str
    port: int
    sock: socket.socket | DatagramServer | None
    udp: bool = False
    service: Service | None = None
    holders: set[AgentSession] = field(default_factory=set)
    #: Who asked first, for the log lines and the status page.
    owner: str = ""
    closing: asyncio.TimerHandle | None = None
    #: The key id of its last holder while it waits for one to come back: revoking
    #: that credential closes it at once.
    left_by: bytes = b""


@dataclass
class Claim:
    """What one handshake was granted: the names it may serve and the ports it holds
    (bound, not yet served). `cancel` undoes it if the session does not start."""

    services: tuple[str, ...] = ()
    ports: list[_Port] = field(default_factory=list)
    fresh: list[_Port] = field(default_factory=list)


class ExposedPorts:
    """The exposed ports of an LL, kept in `services` (the node's, by name) beside the
    configured ones."""

    def __init__(
        self, config: LLConfig, services: dict[str, Service], clients: Clients, metrics: Metrics
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._services = services
        self._clients = clients
        self._ports: dict[tuple[int, bool], _Port] = {}  # by (port, udp)
        #: Makes the service of a UDP port, on its bound socket (set by the node).
        self.open_udp: Callable[[str, ServiceListener, DatagramServer], Service] | None = None

    def grant(
        self, credential: AgentCredential | None, agent_id: bytes, request: Request
    ) -> tuple[Grant, Claim]:
        """Decide what an agent holding `credential` (None: the LL's shared token) gets
        of `request`, binding the ports it is granted. Returns READY's grant, and the
        claim to `start` (or `cancel`) once the session runs (or does not)."""
        offered, exposes, udp_exposes = request
        claim = Claim()
        refusals: list[tuple[str, str]] = []
        # A ':PORT' name is only ever granted through an expose: offered as a service
        # it would join the port's agents (and take its clients) unchecked.
        for name in offered:
            if name.startswith(":"):
                text = f"service '{name}' refused: declare an exposed port with --expose"
                refusals.append((name, text))
        offered = tuple(name for name in offered if not name.startswith(":"))
        configured = tuple(self.config.services)
        if credential is None:
            ll_services, registered = configured, offered
        else:
            scope = credential.scope
            ll_services = tuple(s for s in configured if scope.may_serve(s))
            registered = tuple(s for s in offered if scope.may_serve(s))
            for name in offered:
                if not scope.may_serve(name):
                    text = f"service '{name}' refused: agent '{credential.name}' may serve "
                    refusals.append((name, text + scope.describe_services()))
        granted: list[str] = []
        held = self._held_by(credential, agent_id) if credential is not None else set()
        asked = [(h, p, False) for h, p in exposes] + [(h, p, True) for h, p in udp_exposes]
        for host, port, udp in asked:
            name = expose_name(port, udp)
            why = self._refusal(credential, host, (port, udp), held, granted)
            if why is None:
                why = self._take(host, (port, udp), claim, credential)
            if why is None:
                granted.append(name)
                held.add((port, udp))
            else:
                what = f"UDP port {port}" if udp else f"port {port}"
                refusals.append((name, f"expose of {what} refused: {why}"))
        claim.services = registered + tuple(granted)
        return (ll_services + tuple(granted), tuple(refusals)), claim

    def _held_by(self, credential: AgentCredential, agent_id: bytes) -> set[tuple[int, bool]]:
        """Ports held by other sessions of the same credential, or waiting for one of
        them to come back (a returning agent's old session is about to be replaced:
        its ports are not counted twice)."""
        return {
            key
            for key, port in self._ports.items()
            if (not port.holders and port.left_by == credential.key_id)
            or any(h.key_id == credential.key_id and h.raw_id != agent_id for h in port.holders)
        }

    def _refusal(
        self,
        credential: AgentCredential | None,
        host: str,
        key: tuple[int, bool],
        held: set[tuple[int, bool]],
        granted: list[str],
    ) -> str | None:
        if credential is None:
            return _SHARED_TOKEN_NO_EXPOSE
        port, udp = key
        scope = credential.scope
        if not scope.may_expose(port):
            return f"agent '{credential.name}' may expose {scope.describe_ports()}"
        if expose_name(port, udp) in granted:
            return "declared twice"
        if key not in held and len(held) >= scope.max_ports:
            return f"agent '{credential.name}' may expose at most {scope.max_ports} at once"
        listeners = ll_udp_listeners(self.config) if udp else ll_listeners(self.config)
        for key_name, address in listeners:
            if address.port == port:
                what = key_name.split(".")[1] if key_name.startswith("services.") else None
                return (
                    f"port {port} is service '{what}' of this LL"
                    if what
                    else f"port {port} is this LL's {key_name} port"
                )
        current = self._ports.get(key)
        if current is not None and current.host != host:
            where = current.host or "all addresses"
            return f"port {port} is exposed on {where} by agent '{current.owner}'"
        return None

    def _take(
        self, host: str, key: tuple[int, bool], claim: Claim, credential: AgentCredential | None
    ) -> str | None:
        current = self._ports.get(key)
        if current is not None:  # shared with the agents already holding it
            claim.ports.append(current)
            return None
        port, udp = key
        sock: socket.socket | DatagramServer
        try:
            if udp:
                sock = bind_datagram(Address(host, port), f"UDP port {port}")
            else:
                sock = _bind(host, port)
        except UsageError as exc:
            return str(exc)
        except OSError as exc:
            where = Address(host, port) if host else f"port {port}"
            return f"cannot listen on {where} ({exc.strerror or exc})"
        entry = _Port(host, port, sock, udp, owner=credential.name if credential else "")
        self._ports[key] = entry
        claim.ports.append(entry)
        claim.fresh.append(entry)
        return None

    async def start(self, session: AgentSession, claim: Claim) -> None:
        """The session runs: serve its fresh ports, and hold all it was granted."""
        for entry in claim.ports:
            entry.holders.add(session)
            _name_holders(entry)
            if entry.closing is not None:
                entry.closing.cancel()
                entry.closing = None
        for entry in claim.fresh:
            await self._serve(entry)

    def cancel(self, claim: Claim) -> None:
        """The session did not start: give back the ports no one else holds."""
        for entry in claim.fresh:
            if not entry.holders and entry.sock is not None:
                entry.sock.close()
                self._ports.pop((entry.port, entry.udp), None)

    async def _serve(self, entry: _Port) -> None:
        sock, entry.sock = entry.sock, None
        if sock is None or self._ports.get((entry.port, entry.udp)) is not entry:
            return
        name = expose_name(entry.port, entry.udp)
        if isinstance(sock, DatagramServer):
            self._serve_udp(entry, name, sock)
            return
        loop = asyncio.get_running_loop()
        factory: Callable[[], Link] = lambda: Link(  # noqa: E731
            on_made=lambda link: self._clients.connected(name, link)
        )
        server = await loop.create_server(factory, sock=sock, backlog=1024)
        listener = ServiceListener(Address(entry.host, entry.port))
        # '[::]' for all addresses of both families, as `ss` shows a dual-stack socket.
        anywhere = "::" if sock.family == socket.AF_INET6 else "0.0.0.0"
        address = Address(entry.host or anywhere, sock.getsockname()[1])
        entry.service = Service(name, listener, server, address, exposed_by=entry.owner)
        self._services[name] = entry.service
        self._metrics.exposed_ports.inc()
        log.info(
            "port %d exposed by agent '%s': listening for clients on %s",
            entry.port,
            entry.owner,
            address,
        )

    def _serve_udp(self, entry: _Port, name: str, sock: DatagramServer) -> None:
        if self.open_udp is None:
            sock.close()
            return
        listener = ServiceListener(
            Address(entry.host, entry.port), protocol="udp", max_flows=EXPOSED_MAX_FLOWS,
            max_flows_per_source=EXPOSED_MAX_FLOWS_PER_SOURCE,
        )  # fmt: skip
        entry.service = self.open_udp(name, listener, sock)
        entry.service.exposed_by = entry.owner
        self._services[name] = entry.service
        self._metrics.exposed_ports.inc()
        log.info(
            "UDP port %d exposed by agent '%s': taking datagrams on %s",
            entry.port, entry.owner, entry.service.address,
        )  # fmt: skip

    def release(self, session: AgentSession, *, at_once: bool = False) -> None:
        """`session` ended: its ports close once no one holds them, after the resume
        window (or `at_once`: the agent was revoked)."""
        for entry in list(self._ports.values()):
            if session not in entry.holders:
                continue
            entry.holders.discard(session)
            if entry.holders:
                _name_holders(entry)
                continue
            entry.left_by = session.key_id
            window = 0.0 if at_once else self.config.window_of(expose_name(entry.port))
            if window <= 0:
                self._close(entry, "its agent left" if not at_once else "its agent was revoked")
            elif entry.closing is None:
                entry.closing = asyncio.get_running_loop().call_later(
                    window, self._close, entry, f"no agent came back within {window:.0f} s"
                )

    def _close(self, entry: _Port, why: str) -> None:
        if entry.holders or self._ports.get((entry.port, entry.udp)) is not entry:
            return
        del self._ports[entry.port, entry.udp]
        if entry.closing is not None:
            entry.closing.cancel()
            entry.closing = None
        if entry.sock is not None:
            entry.sock.close()
        service = entry.service
        if service is not None:
            service.server.close()
            if service.reaper is not None:
                service.reaper.cancel()
            if self._services.get(service.name) is service:
                del self._services[service.name]
            self._metrics.exposed_ports.dec()
        what = "UDP port" if entry.udp else "port"
        log.info("%s %d no longer exposed: %s", what, entry.port, why)

    def revoked(self, key_ids: set[bytes]) -> None:
        """Credentials were revoked: the ports their agents left, waiting for them to
        come back, close now (those they hold close as their sessions end)."""
        for entry in list(self._ports.values()):
            if not entry.holders and entry.left_by in key_ids:
                self._close(entry, "its agent was revoked")

    def close_all(self) -> None:
        for entry in list(self._ports.values()):
            entry.holders.clear()
            self._close(entry, "the LL is stopping")

    def holders(self, port: int, udp: bool = False) -> Iterable[AgentSession]:
        entry = self._ports.get((port, udp))
        return () if entry is None else tuple(entry.holders)


def _name_holders(entry: _Port) -> None:
    """Who exposes the port now, for refusals, logs and the status page."""
    names = sorted({holder.name for holder in entry.holders})
    if names:
        entry.owner = ", ".join(names)
        if entry.service is not None:
            entry.service.exposed_by = entry.owner


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on `host` (all addresses, both families, if empty)."""
    if not host:
        if socket.has_dualstack_ipv6():
            return socket.create_server(
                ("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=1024
            )
        return socket.create_server(("", port), backlog=1024)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=1024)
    except socket.gaierror as exc:
        raise OSError(errno.EADDRNOTAVAIL, f"{host} is not an address here") from exc
