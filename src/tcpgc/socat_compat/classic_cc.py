"""The classic CC: it dials the LL's agent port again and again; a connection that gets
through carries the next client, and the CC connects the server for it at once."""

from __future__ import annotations

import asyncio
import functools
import logging

from tcpgc.addresses import Address
from tcpgc.relay.factory import start_relay
from tcpgc.relay.result import AnyRelay, RelayResult
from tcpgc.socat_compat.classic_config import WARNING, ClassicCCConfig
from tcpgc.task_set import TaskSet
from tcpgc.transport.dial import dial
from tcpgc.transport.failures import transport_error
from tcpgc.transport.link import Link
from tcpgc.transport.link_handlers import Ignoring

cc_log = logging.getLogger("tcpgc.cc")

#: How long the CC waits for the LL to say something on a new connection before it
#: dials again anyway. A client that speaks first confirms far sooner; this bounds the
#: wait for one that listens for a server-first banner (SMTP, FTP), at the cost of one
#: such client per CONFIRM_GRACE while several of them arrive at once.
CONFIRM_GRACE = 0.2


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
            if relay.b is not None:
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
                error = transport_error(exc)
                reason = str(error)
                if reason != last_failure:
                    # Refused is the idle state of the protocol (no client waiting):
                    # say it once, not every interval.
                    refused = error.reason == "refused"
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
            cc_log.warning("cannot reach server %s: %s", server, str(transport_error(exc)))
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
