"""The classic LL: clients queue (first in, first out) and the agent port is open only
while one waits, so that a socat CC is refused until it has a client to carry."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from tcpgc.addresses import Address
from tcpgc.config import DEFAULT_SERVICE
from tcpgc.errors import UsageError
from tcpgc.relay.factory import start_relay
from tcpgc.relay.result import AnyRelay
from tcpgc.socat_compat.classic_config import WARNING, ClassicLLConfig
from tcpgc.task_set import TaskSet
from tcpgc.transport.link import Link
from tcpgc.transport.listeners import bound, listen

ll_log = logging.getLogger("tcpgc.ll")

#: Queued connection requests on the client port: a burst of clients larger than the
#: usual 100 would otherwise wait a SYN retransmit (1 s or more) for a slot.
CLIENT_BACKLOG = 1024

#: After EMFILE and friends, how long the LL leaves the agent port alone.
ACCEPT_ERROR_PAUSE = 0.5

#: While clients wait but the agent port cannot be bound, how often to try again.
REBIND_INTERVAL = 1.0


class ClassicListenNode:
    """Use as ``async with ClassicListenNode(config) as node:``; the bound addresses
    are then in `client_address` and `agent_address`."""

    def __init__(self, config: ClassicLLConfig) -> None:
        self.config = config
        self.client_address: Address | None = None
        self.agent_address: Address | None = None
        #: Clients paired with a CC connection so far.
        self.served = 0
        self._loop = asyncio.get_running_loop()
        self._client_server: asyncio.Server | None = None
        self._agent_family = socket.AF_INET
        self._agent_sockaddr: Any = None
        self._agent_dualstack = False
        self._agent_sock: socket.socket | None = None
        self._retry: asyncio.TimerHandle | None = None
        # Insertion-ordered: the first key is the client that has waited longest.
        self._waiting: dict[Link, asyncio.TimerHandle] = {}
        self._relays: set[AnyRelay] = set()
        self._tasks = TaskSet()

    async def start(self) -> None:
        ll_log.warning(WARNING)
        self._resolve_agent_port()
        self._client_server = await listen(
            lambda: Link(on_made=self._client_connected), self.config.clients, "clients"
        )
        self.client_address = bound(self._client_server, self.config.clients)
        ll_log.info(
            "listening for agents on %s while clients wait (classic: socat protocol)",
            self.agent_address,
        )
        ll_log.info(
            "service '%s' listening for clients on %s", DEFAULT_SERVICE, self.client_address
        )

    def _resolve_agent_port(self) -> None:
        """Bind the agent port once and let it go: a taken port fails at start, not at
        the first client, and port 0 becomes the fixed port a CC can be told about."""
        wanted = self.config.cc
        try:
            host = wanted.bind_host
            if host is None:  # every interface, IPv4 and IPv6, as asyncio does for clients
                self._agent_dualstack = socket.has_dualstack_ipv6()
                family = socket.AF_INET6 if self._agent_dualstack else socket.AF_INET
                sockaddr: Any = ("::" if self._agent_dualstack else "0.0.0.0", wanted.port)
            else:
                infos = socket.getaddrinfo(
                    host, wanted.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
                family, _, _, _, sockaddr = infos[0]
            self._agent_family = family
            self._agent_sockaddr = sockaddr
            with self._bind_agent_port() as probe:
                port = probe.getsockname()[1]
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {wanted} for agents: {exc.strerror or exc}"
            ) from None
        self._agent_sockaddr = (sockaddr[0], port, *sockaddr[2:])
        self.agent_address = Address(wanted.host, port)

    def _bind_agent_port(self) -> socket.socket:
        # SO_REUSEADDR (set by create_server), like the seed's `reuseaddr`: connections
        # of the previous listening period in TIME_WAIT must not block the next one.
        return socket.create_server(
            self._agent_sockaddr,
            family=self._agent_family,
            backlog=CLIENT_BACKLOG,
            dualstack_ipv6=self._agent_dualstack,
        )

    async def close(self) -> None:
        if self._client_server is not None:
            self._client_server.close()
        self._close_agent_port()
        for link, timer in list(self._waiting.items()):
            timer.cancel()
            link.abort()
        self._waiting.clear()
        for relay in list(self._relays):
            relay.a.abort()
            if relay.b is not None:
                relay.b.abort()
        await self._tasks.close()

    async def __aenter__(self) -> ClassicListenNode:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ---- clients ---------------------------------------------------------------------

    def _client_connected(self, link: Link) -> None:
        # Until paired, the link buffers what the client sends (bounded), so an HTTP
        # request written at once is replayed to the CC, not lost.
        timer = self._loop.call_later(self.config.client_wait, self._expire, link)
        self._waiting[link] = timer
        link.closed.add_done_callback(lambda _: self._left(link))
        ll_log.debug("client %s waits for a CC connection", link.peer)
        self._open_agent_port()

    def _expire(self, link: Link) -> None:
        if self._waiting.pop(link, None) is None:
            return
        ll_log.warning(
            "no CC connection within %.1f s: closing client %s", self.config.client_wait, link.peer
        )
        link.abort()
        self._maybe_close_agent_port()

    def _left(self, link: Link) -> None:
        timer = self._waiting.pop(link, None)
        if timer is None:
            return
        timer.cancel()
        ll_log.info("client %s left before a CC connection came", link.peer)
        self._maybe_close_agent_port()

    # ---- agent port ------------------------------------------------------------------

    def _open_agent_port(self) -> None:
        if self._agent_sock is not None or self._retry is not None:
            return
        try:
            sock = self._bind_agent_port()
        except OSError as exc:
            ll_log.error(
                "cannot listen for agents on %s: %s; trying again in %.0f s",
                self.agent_address,
                exc.strerror or exc,
                REBIND_INTERVAL,
            )
            self._retry = self._loop.call_later(REBIND_INTERVAL, self._retry_open)
            return
        sock.setblocking(False)
        self._agent_sock = sock
        self._loop.add_reader(sock.fileno(), self._accept_agents)
        ll_log.debug("agent port %s open", self.agent_address)

    def _retry_open(self) -> None:
        self._retry = None
        if self._waiting:
            self._open_agent_port()

    def _maybe_close_agent_port(self) -> None:
        if not self._waiting:
            self._close_agent_port()

    def _close_agent_port(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._agent_sock is None:
            return
        # Synchronous, in the same callback that emptied the queue: nothing more is
        # accepted, and connections still in the backlog are reset by the kernel, so a
        # socat CC never gets a connection nobody waits for.
        self._loop.remove_reader(self._agent_sock.fileno())
        self._agent_sock.close()
        self._agent_sock = None
        ll_log.debug("agent port %s closed: no client waits", self.agent_address)

    def _accept_agents(self) -> None:
        # Accept only as many as there are waiting clients: one connection, one client.
        while self._waiting and self._agent_sock is not None:
            try:
                conn, _ = self._agent_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE, ENFILE, ENOBUFS...: the port stays readable, so step back
                # instead of spinning, and keep serving (trio's accept loop does this).
                ll_log.error("cannot accept on the agent port: %s", exc.strerror or exc)
                sock = self._agent_sock
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(ACCEPT_ERROR_PAUSE, self._resume_accepting, sock)
                return
            client = next(iter(self._waiting))
            self._waiting.pop(client).cancel()
            self._tasks.spawn(self._relay(client, conn), f"classic client {client.peer}")
        self._maybe_close_agent_port()

    def _resume_accepting(self, sock: socket.socket) -> None:
        if sock is self._agent_sock:
            self._loop.add_reader(sock.fileno(), self._accept_agents)

    async def _relay(self, client: Link, conn: socket.socket) -> None:
        try:
            _, agent = await self._loop.connect_accepted_socket(Link, conn)
        except OSError as exc:
            conn.close()
            ll_log.warning("CC connection for client %s failed: %s", client.peer, exc)
            client.abort()
            return
        self.served += 1
        ll_log.debug("client %s paired with CC connection %s", client.peer, agent.peer)
        relay = start_relay(client, agent)
        self._relays.add(relay)
        try:
            result = await relay.done
        finally:
            self._relays.discard(relay)
        ll_log.info(
            "client %s of service '%s' done after %.3f s: %d bytes in, %d bytes out, %s",
            client.peer,
            DEFAULT_SERVICE,
            result.duration,
            result.bytes_a_to_b,
            result.bytes_b_to_a,
            result.ended,
        )
