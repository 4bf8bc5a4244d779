"""The two ways the agent claims the client of an OPEN (`tcpgc.cc.opening.Claim`):
with a new data connection, for an OPEN that came on the control connection, or with
the ready connection the OPEN came on. Each refuses on the connection the OPEN came on.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from tcpgc.cc.link_feed import LinkFeed
from tcpgc.cc.ll_dial import PLAINTEXT_HINT, LLDialer
from tcpgc.config import Address
from tcpgc.errors import ProtocolError, TcpgcError
from tcpgc.protocol.agent_session import AgentControlSession, Event
from tcpgc.protocol.chunks import HEADER_SIZE, parse_chunk_header
from tcpgc.protocol.messages import Open
from tcpgc.protocol.ready_offer import ReadyOffer
from tcpgc.transport.failures import transport_error
from tcpgc.transport.link import Link

log = logging.getLogger("tcpgc.cc")


class NewDataConnection:
    """The `Claim` of an OPEN that came on the control connection: refused there, or
    claimed with a new data connection."""

    def __init__(
        self,
        ll: Address,
        request: Open,
        session: AgentControlSession,
        feed: LinkFeed[Event],
        dialer: LLDialer,
        timeout: float,
    ) -> None:
        self._ll = ll
        self._conn_id = request.conn_id
        self._session = session
        self._feed = feed
        self._dialer = dialer
        self._timeout = timeout

    @property
    def session_key(self) -> bytes:
        return self._session.handshake.session_key

    def refuse(self, reason: str) -> None:
        self._session.refuse(self._conn_id, reason)
        self._feed.flush()

    async def connect(self) -> tuple[Link, bytes, bytes] | None:
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    link, _ = await self._dialer.dial(self._ll, self._session.handshake.binding)
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                raise transport_error(exc, peer_plaintext_hint=PLAINTEXT_HINT) from exc
        except TcpgcError as exc:
            log.warning("cannot open a data connection to LL %s: %s", self._ll, exc)
            return None
        # A new connection: no frames before it.
        return link, self._session.data_frame(self._conn_id), b""


class ReadyConnection:
    """The `Claim` of an OPEN that came on a ready connection: the answer and then the
    stream go on that connection itself."""

    def __init__(self, ll: Address, link: Link, offer: ReadyOffer, request: Open) -> None:
        self._ll = ll
        self._link = link
        self._offer = offer
        self._conn_id = request.conn_id

    @property
    def session_key(self) -> bytes:
        return self._offer.session_key

    def refuse(self, reason: str) -> None:
        self._offer.refuse(self._conn_id, reason)
        self._link.write(self._offer.data_to_send())
        self._link.close()  # a ready connection serves one client at most

    async def connect(self) -> tuple[Link, bytes, bytes] | None:
        link = self._link
        if link.is_closed or link.got_eof:
            # The LL gave up on this client meanwhile (and may have given it to another
            # agent): its first bytes, which came with the OPEN, must not reach a server.
            log.info("LL %s closed the connection of a client being opened: dropped", self._ll)
            link.abort()
            return None
        return link, self._offer.claim(self._conn_id), take_first_chunk(link)


def take_first_chunk(link: Link) -> bytes:
    """The client's first bytes, if they came whole behind OPEN (as the LL's first
    chunk), taken off the link's buffer; else b"" and the relay will read them."""
    held = link.buffered
    try:
        length = parse_chunk_header(held)
    except ProtocolError:
        return b""  # not a chunk: the relay reads it, and says what is wrong
    if not length or len(held) < HEADER_SIZE + length:
        return b""
    link.consume(HEADER_SIZE + length)
    return held[HEADER_SIZE : HEADER_SIZE + length]
