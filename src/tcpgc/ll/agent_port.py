"""The LL's agent port: TLS, then either an agent's handshake (a control session), a
data connection claiming a waiting client, or a ready data connection to keep.

Every connection here is unauthenticated until its first exchange is done: admission
control sheds the excess (from the busiest network first), a deadline bounds each, and
any failure is one log line and one count (by the typed error's `reason`), and closes
that connection only.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from functools import partial

from tcpgc.config import LLConfig
from tcpgc.errors import (
    ConnectionClosed,
    ProtocolError,
    ResumeRefused,
    Shed,
    TcpgcError,
    TimedOut,
    TooManySessions,
)
from tcpgc.identity.agents import AgentCredential
from tcpgc.ll.admission import PendingHandshakes
from tcpgc.ll.agents import AgentRegistry, AgentSession
from tcpgc.ll.control import ControlDriver
from tcpgc.ll.credentials import Credentials
from tcpgc.ll.exposes import Claim, ExposedPorts
from tcpgc.ll.pairing import ClientPairing
from tcpgc.ll.ready import ReadyConnections
from tcpgc.ll.resumes import LLResumes
from tcpgc.ll.watch_agents import revoke_sessions
from tcpgc.memory_trim import BurstTrimmer
from tcpgc.metrics import Metrics
from tcpgc.protocol.frame_auth import CONTROL, frame_auth
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.handshake import Grant, LLHandshake, Request, error_code
from tcpgc.protocol.ll_pairing import Opening, classify_opening, refuse_tls_record
from tcpgc.protocol.ll_session import Event, LLControlSession, OpenRefused, SessionEnded
from tcpgc.protocol.messages import Data, Error, ErrorCode, Hello, Pool, Resume
from tcpgc.relay.resumable import ResumableRelay
from tcpgc.task_set import TaskSet
from tcpgc.transport.failures import handshake_tls_error
from tcpgc.transport.frame_channel import FrameChannel
from tcpgc.transport.link import Link

log = logging.getLogger("tcpgc.ll")


class AgentPort:
    """Takes every connection to the agent port through its first exchange, and runs
    the control sessions of the agents that authenticate."""

    def __init__(
        self,
        config: LLConfig,
        *,
        agents: AgentRegistry,
        credentials: Credentials,
        pairing: ClientPairing,
        ready: ReadyConnections,
        resumes: LLResumes,
        exposes: ExposedPorts,
        pending: PendingHandshakes,
        metrics: Metrics,
        tasks: TaskSet,
    ) -> None:
        self.config = config
        self._agents = agents
        self._credentials = credentials
        self._pairing = pairing
        self._ready = ready
        self._resumes = resumes
        self._exposes = exposes
        #: What each authenticated session was granted, until it runs.
        self._claims: dict[AgentSession, Claim] = {}
        self._pending = pending
        self._metrics = metrics
        self._tasks = tasks
        self.trimmer = BurstTrimmer(lambda: len(self._pending))

    def connected(self, link: Link) -> None:
        """A new connection on the agent port (the `on_made` of its Link)."""
        for victim in self._pending.admit(link, link.peer_host, time.monotonic()):
            assert isinstance(victim, Link)
            self._failed(
                victim,
                Shed(
                    "shed, too many unauthenticated connections "
                    f"({self.config.max_pending} pending at most, "
                    f"{self.config.max_pending_per_source} per network)"
                ),
            )
            victim.shed = True
            victim.abort()
        self._tasks.spawn(self._serve(link), f"agent link {link.peer}")

    async def _serve(self, link: Link) -> None:
        try:
            session = await self._authenticate(link)
        finally:
            self._pending.release(link)
        if session is None:
            return
        claim = self._claims.pop(session)
        if session.key_id not in self._credentials.secrets:
            # Revoked (or retired) while it was answered: refused from now on.
            self._exposes.cancel(claim)
            session.channel.send(Error(ErrorCode.AUTHENTICATION, "authentication failed"))
            session.channel.link.close()
            log.warning("agent %s refused: its credential was just revoked", session.name)
        elif self._admit(session):
            await self._run_session(session, claim)
        else:
            self._exposes.cancel(claim)

    def _admit(self, session: AgentSession) -> bool:
        """Cap the sessions one credential holds: a leaked token must not let its holder
        open thousands (each with its ready connections). A returning agent replaces its
        own session, so it is not counted against itself."""
        cap = self.config.max_sessions_per_token
        other = self._agents.find(session.raw_id)
        if other is not None and other.alive and other.key_id != session.key_id:
            # An agent id names a session to replace only for the same credential.
            self._failed(
                session.channel.link,
                TooManySessions(
                    f"agent {session.agent_id} refused: its id is in use by another credential"
                ),
            )
            session.channel.send(
                Error(ErrorCode.UNAVAILABLE, "agent id in use by another credential: retry later")
            )
            session.channel.link.close()
            return False
        held = self._agents.sessions_with_key(session.key_id, besides=session.raw_id)
        if not cap or held < cap:
            return True
        link = session.channel.link
        self._failed(
            link,
            TooManySessions(
                f"agent {session.agent_id} refused: {held} sessions already hold its join "
                f"token (max_sessions_per_token = {cap})"
            ),
        )
        session.channel.send(
            Error(ErrorCode.UNAVAILABLE, f"too many sessions with this join token ({cap} at most)")
        )
        link.close()
        return False

    async def _authenticate(self, link: Link) -> AgentSession | None:
        """Take a new connection on the agent port through TLS and its first exchange.
        Returns the session of an authenticated agent; a data connection is handed to
        its client and None returned. Any failure is logged once and closes only it."""
        channel: FrameChannel | None = None
        plaintext = self._credentials.plaintext
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                await link.ready
                # A plaintext LL tells a TLS ClientHello by its first byte.
                decoder = FrameDecoder(first_type=refuse_tls_record) if plaintext else None
                channel = FrameChannel(link, decoder)
                first = await channel.recv()
                opening = classify_opening(first)
                if opening is Opening.CLAIM:
                    assert isinstance(first, Data)
                    self._pairing.claim(first, channel)
                elif opening is Opening.READY:
                    assert isinstance(first, Pool)
                    self._ready.park(first, channel)
                elif opening is Opening.RESUME:
                    assert isinstance(first, Resume)
                    self._resume(first, channel)
                elif opening is Opening.CONTROL:
                    assert isinstance(first, Hello)
                    return await self._handshake(first, channel)
                else:
                    if not link.shed:
                        self._failed(
                            link,
                            ConnectionClosed(
                                "closed before its first message "
                                "(an agent refusing our certificate, or a port scan)",
                                reason="certificate",  # the usual cause
                            ),
                        )
                    link.abort()
                return None
        except TimeoutError:
            self._failed(
                link,
                TimedOut(f"no complete handshake within {self.config.handshake_timeout:.1f} s"),
            )
            link.abort()
        except ProtocolError as exc:
            self._failed(link, exc)
            if channel is not None and not link.is_closed:
                channel.send(Error(error_code(exc), _public_reason(exc)))
                link.close()
            else:
                link.abort()
        except (ssl.SSLError, OSError) as exc:
            if not link.shed:
                self._failed(link, handshake_tls_error(exc, we_speak_tls=not plaintext))
            link.abort()
        except Exception as exc:  # a bug must cost this connection, never leak it
            log.exception("handshake from %s ended by an internal error", link.peer)
            internal = TcpgcError(f"internal error: {type(exc).__name__}", reason="protocol")
            self._failed(link, internal)
            link.abort()
        return None

    def _resume(self, message: Resume, channel: FrameChannel) -> None:
        try:
            self._resumes.resume(message, channel)
        except ResumeRefused as exc:
            # Refused for want of the agent's new session: it tries again, as expected
            # right after a break. Anything else is worth a warning.
            (log.info if exc.reason == "session" else log.warning)(
                "resume refused from %s: %s", channel.link.peer, exc
            )
            self.trimmer.failed()
            code = {"unknown": ErrorCode.UNKNOWN_STREAM, "proof": ErrorCode.AUTHENTICATION}
            answer = code.get(exc.reason, ErrorCode.UNAVAILABLE)
            channel.send(Error(answer, f"resume refused: {exc}"))
            channel.link.close()

    def _failed(self, link: Link, exc: TcpgcError) -> None:
        """One log line and one count per bad connection on the agent port."""
        log.warning("handshake failed from %s: %s", link.peer, exc)
        self.trimmer.failed()
        self._metrics.child(self._metrics.handshake_failures, exc.reason).inc()

    async def _handshake(self, hello: Hello, channel: FrameChannel) -> AgentSession:
        link = channel.link
        credentials = self._credentials
        claims: list[Claim] = []
        gone = credentials.refresh_for(hello.key_id)  # an agent added this very second?
        if gone:
            self.revoke(gone)
        # Looked up once, with the secret the handshake checks: a revocation meanwhile
        # must not turn the agent into a holder of the shared token.
        credential = credentials.agents.get(hello.key_id)

        def grant(_: bytes, request: Request) -> Grant:
            # The credential the agent proved decides what it gets, not what it asks.
            found, claim = self._exposes.grant(credential, handshake.agent_id, request)
            claims.append(claim)
            return found

        handshake = LLHandshake(
            credentials.secrets,
            heartbeat_ms=int(self.config.heartbeat * 1000),
            binding=credentials.binding_of(link),
            tls=not credentials.plaintext,
            services=tuple(self.config.services),
            grant=grant,
        )
        channel.send(handshake.receive(hello))
        auth = await channel.recv()
        if auth is None:
            raise ProtocolError("connection closed during the handshake", reason="closed")
        ready = handshake.receive(auth)
        claim = claims[0]
        try:
            channel.send(ready)
        except BaseException:
            self._exposes.cancel(claim)
            raise
        if credentials.plaintext:  # every later frame carries its MAC
            channel.auth = frame_auth(handshake.session_key, CONTROL, agent=False)
        session = AgentSession(
            handshake.agent_id.hex()[:12],
            link.peer,
            link.peer_host,
            claim.services,
            channel,
            raw_id=handshake.agent_id,
            session_key=handshake.session_key,
            key_id=handshake.key_id,
            credential=credential,
            rate=credentials.rate_of(credential),
            refused=tuple(why for _, why in ready.refusals),  # type: ignore[union-attr]
        )
        self._claims[session] = claim
        return session

    async def _run_session(self, session: AgentSession, claim: Claim) -> None:
        link = session.channel.link
        served = [s for s in session.services if s in self.config.services or s[:1] == ":"]
        unknown = [s for s in session.services if s not in served]
        who = f"agent '{session.name}'" if session.credential else f"agent {session.agent_id}"
        log.info("%s connected from %s (services: %s)", who, link.peer, ", ".join(served))
        if unknown:
            log.warning(
                "%s offers services this LL does not have: %s (this LL has: %s)",
                who,
                ", ".join(unknown),
                ", ".join(self.config.services),
            )
        for why in session.refused:
            log.warning("%s from %s: %s", who, link.peer, why)
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[SessionEnded] = loop.create_future()
        core = LLControlSession(
            # Its credential's name, if it has one, in the lines that say how it ended.
            agent_id=f"'{session.name}' ({session.agent_id})"
            if session.credential
            else session.agent_id,
            peer=session.peer,
            heartbeat=self.config.heartbeat,
            now=loop.time(),
            auth=session.channel.auth,
        )
        session.channel.detach()  # what was read past AUTH goes to the session
        driver = ControlDriver(link, core, partial(self._session_event, session, ended))
        session.control = driver
        # Registered for every service it offers, not only today's: a service added to
        # this LL by a reload is served by the agents already connected.
        stale = self._agents.add(session, session.services)
        m = self._metrics
        m.agents.set(len(self._agents))
        m.child(m.agent_sessions, session.metric_label).inc()
        if session.refused:
            m.child(m.agent_refusals, session.metric_label).inc(len(session.refused))
        if stale is not None:
            log.info("agent %s: new session replaces the one from %s", session.agent_id, stale.peer)
            stale.close()
        # Its address's ready and data connections are now kept apart from any flood.
        self._pending.authenticated(session.peer_host, time.monotonic())
        try:
            # Registered first: a revocation while its ports open finds the session.
            await self._exposes.start(session, claim)
            end = await ended
        finally:
            found = self._agents.find(session.raw_id)
            replaced = found is not None and found is not session
            driver.stop()
            self._pending.session_ended(session.peer_host, time.monotonic())
            self._agents.remove(session)
            m.agents.set(len(self._agents))
            m.child(m.agent_sessions, session.metric_label).dec()
            session.close()  # with its ready connections, and those offered to clients
            self._pairing.agent_gone(session)
            self._exposes.release(session, at_once=session.revoked)
        if not (end.by_heartbeat or driver.broken or replaced):
            # The agent closed its control connection itself (it stopped, or its
            # process ended): the streams waiting for it will not be resumed.
            self._resumes.agent_let_go(session)
        if end.by_heartbeat and session.relays:
            # The link died silently: its data connections likely did too, and TCP
            # alone could take many minutes to notice. Resumable streams wait for the
            # agent to come back; the others end now.
            waiting = self._resumes.agent_lost(session)
            closing = [r for r in session.relays if not isinstance(r, ResumableRelay)]
            if waiting:
                log.warning(
                    "%d connections carried by agent %s wait for it to resume them",
                    waiting,
                    session.agent_id,
                )
            if closing:
                log.warning(
                    "closing %d connections carried by agent %s", len(closing), session.agent_id
                )
            for relay in closing:
                relay.result.ended = "agent lost"
                relay.close()

    def revoke(self, gone: list[AgentCredential]) -> None:
        """These credentials were revoked: see `revoke_sessions`."""
        revoke_sessions(self._agents, self._resumes, self._exposes, gone)

    def _session_event(
        self, session: AgentSession, ended: asyncio.Future[SessionEnded], event: Event
    ) -> None:
        if isinstance(event, OpenRefused):
            self._pairing.refused(event.conn_id, session, event.reason)
        elif not ended.done():
            (log.warning if event.warning else log.info)(event.reason)
            ended.set_result(event)


def _public_reason(exc: ProtocolError) -> str:
    """What an unauthenticated peer is told: enough to fix a setup, nothing more."""
    code = error_code(exc)
    if code == ErrorCode.AUTHENTICATION:
        return "authentication failed: the agent's join token is not accepted by this LL"
    return str(exc)
