"""Classic mode: the seed's raw socat protocol, so a site can replace one socat node at a
time. There is no control connection, no authentication and no TLS; a connection on
the LL's agent port *is* the next client's stream.

The protocol has one signal, and it is the agent port itself: the seed's LL
(``socat tcp-l:C,reuseaddr,fork tcp-l:A,reuseaddr``) listens on A only while a client
waits, so the seed's CC (``socat tcp:LL:A,forever,interval=2,fork tcp:SERVER:P``) is
refused until there is a client, and every connection it gets through is one it should
carry. Both nodes here keep that contract, and do better where socat fails:

- The classic LL queues clients (first in, first out) and keeps the agent port open
  while any waits, instead of dropping every client that arrives while another waits.
  It closes the port the moment the queue empties: a socat CC that got through with
  nobody waiting would fork, dial the server and hold an idle connection there.
- The classic CC dials again at once after a connection gets through (the next client
  is likely waiting), waits `interval` after a refusal, and caps the connections on
  which the LL has said nothing, so an LL that accepts without a client (the race at
  the end of a burst, a misconfigured port, an attacker) cannot make it pile up idle
  connections to the server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tcpgc.config import DEFAULT_SERVICE, Address, CCConfig, LLConfig
from tcpgc.errors import UsageError
from tcpgc.relay.factory import start_relay
from tcpgc.relay.result import AnyRelay, RelayResult
from tcpgc.task_set import TaskSet
from tcpgc.transport.dial import dial
from tcpgc.transport.link import Link
from tcpgc.transport.link_handlers import Ignoring

ll_log = logging.getLogger("tcpgc.ll")
cc_log = logging.getLogger("tcpgc.cc")

WARNING = (
    "classic mode speaks the seed's socat protocol: NO authentication and NO encryption; "
    "anyone who reaches the agent port gets the next client's bytes. Use it only while "
    "migrating from socat."
)

#: The CC's wait after a refused or failed attempt. The seed polls every 2 s; half of
#: that halves a client's worst-case wait for the cost of one SYN a second while idle.
DEFAULT_INTERVAL = 1.0

#: Queued connection requests on the client port: a burst of clients larger than the
#: usual 100 would otherwise wait a SYN retransmit (1 s or more) for a slot.
CLIENT_BACKLOG = 1024

#: Connections on which the LL has sent nothing yet that the CC holds at most. A real
#: client usually speaks at once, or as soon as a server-first banner reaches it; an
#: LL that accepts and stays silent is exactly what must not grow without bound.
MAX_SILENT = 32

#: How long the CC waits for the LL to say something on a new connection before it
#: dials again anyway. A client that speaks first confirms far sooner; this bounds the
#: wait for one that listens for a server-first banner (SMTP, FTP), at the cost of one
#: such client per CONFIRM_GRACE while several of them arrive at once.
CONFIRM_GRACE = 0.2

#: After EMFILE and friends, how long the LL leaves the agent port alone.
ACCEPT_ERROR_PAUSE = 0.5

#: While clients wait but the agent port cannot be bound, how often to try again.
REBIND_INTERVAL = 1.0


@dataclass
class ClassicLLConfig:
    """The classic LL: one client port, one agent port, no identity."""

    #: Where clients connect.
    clients: Address
    #: Where a socat or classic CC connects; listened on only while clients wait.
    cc: Address
    #: How long a client may wait for a CC connection before it is closed.
    client_wait: float = 10.0

    @classmethod
    def from_config(cls, config: LLConfig) -> ClassicLLConfig:
        if config.cc is None or len(config.services) != 1:
            raise UsageError(
                "classic mode carries one service: give --clients HOST:PORT and --cc HOST:PORT"
            )
        (service,) = config.services.values()
        return cls(service.listen, config.cc, config.client_wait)


@dataclass
class ClassicCCConfig:
    """The classic CC: the LL agent ports to poll and the one server behind them."""

    ll: list[Address]
    server: Address
    #: Seconds to wait after the LL refused (no client waiting) or an attempt failed.
    interval: float = DEFAULT_INTERVAL
    #: Deadline to connect to the LL or to the server.
    connect_timeout: float = 10.0
    #: See MAX_SILENT.
    max_silent: int = MAX_SILENT

    @classmethod
    def from_config(cls, config: CCConfig, interval: float | None = None) -> ClassicCCConfig:
        if not config.ll or list(config.services) != [DEFAULT_SERVICE]:
            raise UsageError(
                "classic mode carries one service: give --ll HOST:PORT and --server HOST:PORT"
            )
        if interval is not None and not interval > 0:
            raise UsageError("--interval must be a positive number of seconds")
        return cls(
            list(config.ll),
            config.services[DEFAULT_SERVICE],
            DEFAULT_INTERVAL if interval is None else interval,
            config.connect_timeout,
        )


# ---- the LL ----------------------------------------------------------------------------


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
        try:
            self._client_server = await self._loop.create_server(
                lambda: Link(on_made=self._client_connected),
                self.config.clients.bind_host,
                self.config.clients.port,
                reuse_address=True,
                backlog=CLIENT_BACKLOG,
            )
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {self.config.clients} for clients: {exc.strerror or exc}"
            ) from None
        port = self._client_server.sockets[0].getsockname()[1]
        self.client_address = Address(self.config.clients.host, port)
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


# ---- the CC ----------------------------------------------------------------------------


class _LLLink(Link):
    """A connection to the LL that tells when the LL first sends a byte: in the raw
    protocol, the only sign that a client is behind it."""

    def __init__(self) -> None:
        super().__init__()
        loop = asyncio.get_running_loop()
        self.spoke: asyncio.Future[None] = loop.create_future()
        #: The LL connection ended (`closed` resolves when the splice relay takes the
        #: socket over; this one only when the connection is really gone).
        self.gone: asyncio.Future[None] = loop.create_future()

    def heard(self) -> None:
        if not self.spoke.done():
            self.spoke.set_result(None)

    def ended(self, _: object = None) -> None:
        if not self.gone.done():
            self.gone.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.heard()
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        handed_over = isinstance(self.handler, Ignoring)
        super().connection_lost(exc)
        if not handed_over:
            self.ended()


class ClassicConnectNode:
    """Use as ``async with ClassicConnectNode(config) as node:``; it polls each LL
    until closed."""

    def __init__(self, config: ClassicCCConfig) -> None:
        self.config = config
        #: Connections carried to the server so far.
        self.served = 0
        self._tasks = TaskSet()
        self._relays: set[AnyRelay] = set()
        #: Open LL connections on which the LL has not sent a byte yet.
        self._silent: set[_LLLink] = set()
        self._quieter = asyncio.Event()

    async def start(self) -> None:
        cc_log.warning(WARNING)
        for ll in self.config.ll:
            self._tasks.spawn(self._poll(ll), f"classic poll {ll}")
            cc_log.info(
                "polling LL %s every %.1f s while it refuses; server %s (classic: socat protocol)",
                ll,
                self.config.interval,
                self.config.server,
            )

    async def close(self) -> None:
        for relay in list(self._relays):
            relay.a.abort()
            relay.b.abort()
        await self._tasks.close()

    async def __aenter__(self) -> ClassicConnectNode:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def silent(self) -> int:
        """Open connections on which the LL has sent nothing yet."""
        return len(self._silent)

    def _heard(self, link: _LLLink, _: object = None) -> None:
        self._silent.discard(link)
        self._quieter.set()

    async def _poll(self, ll: Address) -> None:
        loop = asyncio.get_running_loop()
        last_failure: str | None = None
        while True:
            while len(self._silent) >= self.config.max_silent:
                self._quieter.clear()
                await self._quieter.wait()
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    _, link = await loop.create_connection(_LLLink, ll.connect_host, ll.port)
            except (OSError, TimeoutError) as exc:
                reason = _describe(exc)
                if reason != last_failure:
                    # Refused is the idle state of the protocol (no client waiting):
                    # say it once, not every interval.
                    refused = isinstance(exc, ConnectionRefusedError)
                    cc_log.log(
                        logging.INFO if refused else logging.WARNING,
                        "LL %s: %s; trying every %.1f s",
                        ll,
                        "refused, no client waiting" if refused else reason,
                        self.config.interval,
                    )
                    last_failure = reason
                await asyncio.sleep(self.config.interval)
                continue
            last_failure = None
            self._silent.add(link)
            heard = functools.partial(self._heard, link)
            link.spoke.add_done_callback(heard)
            link.gone.add_done_callback(heard)
            self._tasks.spawn(self._carry(link), f"classic connection {link.peer}")
            # One unconfirmed connection at a time. Dialing again at once, before the LL
            # has paired this one, lands in its backlog just before it closes the port,
            # and each such connection costs an idle server connection. So wait until
            # the LL speaks (a client is behind it: dial again at once, the next may be
            # waiting), closes it (nobody was: back to polling), or CONFIRM_GRACE passes
            # (a client silent until a server-first banner reaches it).
            await asyncio.wait(
                [link.spoke, link.gone],
                timeout=CONFIRM_GRACE,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if link.gone.done() and not link.spoke.done():
                await asyncio.sleep(self.config.interval)

    async def _carry(self, link: _LLLink) -> None:
        """Connect the server at once, as socat does: a server that speaks first (SMTP,
        FTP) must reach the client before the client has said anything."""
        server = self.config.server
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                server_link = await dial(server.connect_host, server.port)
        except (OSError, TimeoutError) as exc:
            cc_log.warning("cannot reach server %s: %s", server, _describe(exc))
            link.reset()  # the client behind the LL sees a reset, as with socat
            return
        except BaseException:  # cancelled: shutting down
            link.abort()
            raise
        self.served += 1
        # The LL's first byte tells that a client is behind the connection: the relay
        # reports it (with splice, the bytes never pass through `_LLLink`).
        relay = start_relay(server_link, link, on_first_b_to_a=link.heard)
        relay.done.add_done_callback(link.ended)
        self._relays.add(relay)
        try:
            result: RelayResult = await relay.done
        finally:
            self._relays.discard(relay)
        cc_log.info(
            "connection from LL %s done after %.3f s: %d bytes to server, %d bytes from it, %s",
            link.peer,
            result.duration,
            result.bytes_b_to_a,
            result.bytes_a_to_b,
            result.ended,
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        # Its errno is a resolver code (EAI_*), which os.strerror calls 'unknown error'.
        return f"the host name does not resolve ({exc.strerror})"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


# ---- running from the command line -----------------------------------------------------


def run_classic(config: LLConfig | CCConfig, interval: float | None = None) -> int:
    """Run a classic node built from the parsed flags until SIGINT or SIGTERM."""
    if isinstance(config, LLConfig):
        ll_config = ClassicLLConfig.from_config(config)
        asyncio.run(_run_until_signal(lambda: ClassicListenNode(ll_config)))
    else:
        cc_config = ClassicCCConfig.from_config(config, interval)
        asyncio.run(_run_until_signal(lambda: ClassicConnectNode(cc_config)))
    return 0


async def _run_until_signal(make: Callable[[], ClassicListenNode | ClassicConnectNode]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        # Built here: the nodes take the running loop.
        async with make():
            await stop.wait()
            logging.getLogger("tcpgc").info("stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
