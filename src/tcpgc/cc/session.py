"""The asyncio driver of the agent's sessions: one per LL address, reconnected with
backoff. It dials the LL, feeds the control connection's bytes to the session core
(`tcpgc.protocol.agent_session`), writes what the core answers, runs its timer, and
acts on its events: an OPEN goes to `tcpgc.cc.opening.Opener.serve`, the end of the
session ends the connection (and, if the LL went silent, the clients through it).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from functools import partial

from tcpgc.cc.claims import NewDataConnection
from tcpgc.cc.link_feed import LinkFeed
from tcpgc.cc.ll_dial import PLAINTEXT_HINT, LLDialer
from tcpgc.cc.opening import Opener
from tcpgc.cc.ready_pool import ReadyPools
from tcpgc.cc.resumer import CCResumes
from tcpgc.config import Address, CCConfig
from tcpgc.errors import HeartbeatLost, TcpgcError
from tcpgc.identity import JoinToken
from tcpgc.metrics import Metrics
from tcpgc.protocol.agent_session import (
    AgentControlSession,
    Event,
    Joined,
    OpenRequested,
    SessionEnded,
)
from tcpgc.protocol.backoff import Backoff
from tcpgc.protocol.handshake import AgentHandshake
from tcpgc.safe_text import printable
from tcpgc.task_set import TaskSet
from tcpgc.transport.failures import transport_error
from tcpgc.transport.link import Link

log = logging.getLogger("tcpgc.cc")

#: A session that lasted this long resets the reconnect backoff.
STABLE_SESSION = 30.0
#: The longest wait between two dials of an LL while streams wait to be resumed.
WAITING_RETRY = 1.0

#: The control connection of a joined session: its link, its core, its feed, and the
#: events that came with READY.
_Joined = tuple[Link, AgentControlSession, LinkFeed[Event], list[Event]]


class SessionKeeper:
    """Runs the sessions to the LLs. `config`, `token` may be replaced (on reload):
    the next session uses them."""

    def __init__(
        self,
        config: CCConfig,
        token: JoinToken,
        agent_id: bytes,
        *,
        dialer: LLDialer,
        opener: Opener,
        pools: ReadyPools,
        resumes: CCResumes,
        metrics: Metrics,
        tasks: TaskSet,
        connected: dict[str, asyncio.Event],
    ) -> None:
        self.config = config
        self.token = token
        self._agent_id = agent_id
        self._dialer = dialer
        self._opener = opener
        self._pools = pools
        self._resumes = resumes
        #: LLs whose session came up in the current try (a break then retries at once).
        self._joined: set[Address] = set()
        self._metrics = metrics
        self._tasks = tasks
        #: Set while the session to each LL (by address) is up.
        self._connected = connected

    async def keep(self, address: Address) -> None:
        """Keep a session to the LL at `address` until cancelled, reconnecting with
        backoff and full jitter."""
        backoff = Backoff(self.config.reconnect_min, self.config.reconnect_max)
        while True:
            started = time.monotonic()
            self._joined.discard(address)
            try:
                await self._run(address)
            except (TcpgcError, OSError, ssl.SSLError, TimeoutError) as exc:
                error = transport_error(exc, peer_plaintext_hint=PLAINTEXT_HINT)
                log.error("cannot connect to LL %s: %s", address, error)
            finally:
                self._connected[str(address)].clear()
            backoff.low, backoff.high = self.config.reconnect_min, self.config.reconnect_max
            if time.monotonic() - started > STABLE_SESSION:
                backoff.reset()
            wait = backoff.full_jitter(random.random())
            if self._resumes.table.waiting():
                # Streams wait to be resumed, each second costs them: try at least
                # every second until the window passes (then the backoff of today).
                wait = min(wait, WAITING_RETRY)
            if address in self._joined:
                # A session that was up broke: its streams wait to be resumed, so the
                # first try is at once (a network blip is over as often as not).
                wait = 0.0
            log.info("reconnecting to %s in %.1f s", address, wait)
            await asyncio.sleep(wait)

    async def _run(self, address: Address) -> None:
        try:
            link, session, feed, pending = await self._join(address)
        except (TcpgcError, OSError, ssl.SSLError, TimeoutError) as exc:
            reason = transport_error(exc, peer_plaintext_hint=PLAINTEXT_HINT).reason
            self._metrics.child(self._metrics.handshake_failures, reason).inc()
            raise
        handshake = session.handshake
        refused = {subject for subject, _ in handshake.refusals}
        log.info(
            "connected to LL %s as agent %s (services: %s)",
            address,
            handshake.agent_id.hex()[:12],
            ", ".join(s for s in self.config.configured_services if s not in refused) or "none",
        )
        for _, why in handshake.refusals:
            # The LL's own words: what it refused, and what this agent may do instead.
            log.warning("LL %s: %s", address, printable(why))
        missing = [
            s
            for s in self.config.configured_services
            if s not in handshake.ll_services and s not in refused
        ]
        if missing and handshake.ll_services:
            log.warning(
                "LL %s does not have services: %s (it has: %s); no client of theirs "
                "comes through it until it is configured with them",
                address,
                ", ".join(missing),
                ", ".join(s for s in handshake.ll_services if not s.startswith(":")),
            )
        for expose in self.config.exposes:
            if expose.name in handshake.ll_services:
                log.info(
                    "LL %s takes clients on %s %d for %s", address,
                    "UDP port" if expose.udp else "port", expose.port, expose.server,
                )  # fmt: skip
        self._joined.add(address)
        self._resumes.sessions[str(address)] = handshake
        self._connected[str(address)].set()
        self._count_agents()
        pool = None
        if self.config.pool_size > 0:
            pool = self._tasks.spawn(self._pools.keep(address, session), f"pool {address}")
        try:
            await self._serve(address, session, feed, pending)
        except HeartbeatLost:
            self._session_down(address, handshake)
            # A reset, not a FIN, should it get through: to the LL a FIN means this
            # agent let go, and it would give up the streams that wait for us.
            link.reset()
            waiting = self._resumes.ll_lost(address, "LL lost")
            if waiting:
                log.warning("%d connections through LL %s wait to be resumed", waiting, address)
            count = self._opener.close_relays(address, "LL lost")
            if count:
                # The data connections most likely died with the link: end them now
                # rather than when TCP gives up, many minutes later.
                log.warning("closing %d connections through LL %s", count, address)
            raise
        except (TcpgcError, OSError):
            # Ended otherwise (a reset, an error): the data connections may have died
            # with it, silently if idle. The streams go on over new ones (and the LL
            # is sent a reset, not a FIN, which would tell it we let go of them).
            link.reset()
            self._session_down(address, handshake)
            self._resumes.ll_lost(address, f"session to LL {address} ended")
            raise
        finally:
            if pool is not None:
                pool.cancel()
                await asyncio.gather(pool, return_exceptions=True)
            link.abort()
            self._session_down(address, handshake)
            self._count_agents()

    def _session_down(self, address: Address, handshake: AgentHandshake) -> None:
        """Before the streams through `address` try to resume: not with this session."""
        self._connected[str(address)].clear()
        if self._resumes.sessions.get(str(address)) is handshake:
            del self._resumes.sessions[str(address)]

    def _count_agents(self) -> None:
        self._metrics.agents.set(sum(e.is_set() for e in self._connected.values()))

    async def _join(self, address: Address) -> _Joined:
        """Dial the LL, verify it, and authenticate: a session ready to serve."""
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                link, binding = await self._dialer.dial(address)
                try:
                    return await self._authenticate(link, binding)
                except BaseException:
                    link.abort()
                    raise
        except TimeoutError as exc:
            raise transport_error(exc) from exc

    async def _authenticate(self, link: Link, binding: bytes) -> _Joined:
        handshake = AgentHandshake(
            self.token.secret,
            services=self.config.configured_services,
            exposes=tuple((e.host, e.port) for e in self.config.exposes if not e.udp),
            udp_exposes=tuple((e.host, e.port) for e in self.config.exposes if e.udp),
            agent_id=self._agent_id,
            binding=binding,
            tls=self._dialer.tls is not None,
        )
        session = AgentControlSession(handshake)
        loop = asyncio.get_running_loop()
        feed: LinkFeed[Event] = LinkFeed(
            link, lambda data: session.receive_data(data, loop.time()), session.data_to_send
        )
        feed.flush()  # HELLO
        while True:
            events = await feed.events(None)
            for index, event in enumerate(events):
                if isinstance(event, SessionEnded):
                    raise event.error
                if isinstance(event, Joined):
                    return link, session, feed, events[index + 1 :]

    async def _serve(
        self,
        address: Address,
        session: AgentControlSession,
        feed: LinkFeed[Event],
        pending: list[Event],
    ) -> None:
        loop = asyncio.get_running_loop()
        reuse = partial(self._pools.reuse, address)
        while True:
            for event in pending:
                if isinstance(event, OpenRequested):
                    claim = NewDataConnection(
                        address,
                        event.open,
                        session,
                        feed,
                        self._dialer,
                        self.config.connect_timeout,
                    )
                    self._tasks.spawn(
                        self._opener.serve(address, event.open, claim, reuse),
                        f"open {event.open.service}",
                    )
                elif isinstance(event, SessionEnded):
                    raise event.error
            deadline = session.next_deadline()
            pending = await feed.events(deadline)
            if not pending and deadline is not None:
                # A timer may fire a hair early (the loop's clock resolution).
                pending = session.handle_timer(max(loop.time(), deadline))
                feed.flush()
