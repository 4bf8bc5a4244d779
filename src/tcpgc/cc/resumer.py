"""The agent's resumable streams: started for each OPEN that carries a window, and
resumed, each on a new data connection, when their data connection breaks.

The agent opens every connection, so it is the one that resumes: once a session to the
stream's LL is up again (the same one, if only the data connection broke), it dials the
LL, sends RESUME with what it has received of the stream and a proof under the stream's
key bound to that session, and on RESUMED sends again what the LL lacks. It tries until
the stream's window passes (the `ResumeTable` then gives the stream up).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
from collections.abc import Callable

from tcpgc.cc.ll_dial import LLDialer
from tcpgc.config import Address, CCConfig
from tcpgc.errors import ProtocolError, TcpgcError
from tcpgc.metrics import Metrics
from tcpgc.protocol.handshake import AgentHandshake, resume_proof, resumed_proof, stream_key
from tcpgc.protocol.messages import MAX_VERSION, Error, ErrorCode, Open, Resume, Resumed
from tcpgc.protocol.resumable import RecordDecoder, Retention
from tcpgc.relay.result import ByteCounter
from tcpgc.relay.resumable import ResumableRelay
from tcpgc.relay.resume_table import ResumeTable
from tcpgc.safe_text import printable
from tcpgc.task_set import TaskSet
from tcpgc.transport.failures import transport_error
from tcpgc.transport.frame_channel import FrameChannel
from tcpgc.transport.link import Link

log = logging.getLogger("tcpgc.cc")

#: Between two tries to resume one stream (doubling up to the cap) while its LL's
#: session is up but the try fails.
RETRY_FIRST = 0.05
RETRY_CAP = 2.0
#: Resumes in flight at once: after a break every stream comes back at the same moment,
#: and an LL sheds more unauthenticated connections from one address than this.
CONCURRENT_RESUMES = 16


class CCResumes:
    """The agent's resumable streams, and the session each LL has now."""

    def __init__(
        self,
        config: CCConfig,
        dialer: LLDialer,
        metrics: Metrics,
        tasks: TaskSet,
        connected: dict[str, asyncio.Event],
    ) -> None:
        self.config = config
        self._dialer = dialer
        self._tasks = tasks
        self._connected = connected
        self.table = ResumeTable(log, metrics, config.resume_memory)
        #: The handshake of the session up now with each LL (by address).
        self.sessions: dict[str, AgentHandshake] = {}
        self._where: dict[ResumableRelay, tuple[Address, str]] = {}
        self._in_flight = asyncio.Semaphore(CONCURRENT_RESUMES)

    def reconfigure(self, config: CCConfig) -> None:
        self.config = config
        self.table.memory_cap = config.resume_memory

    def start(
        self,
        ll: Address,
        request: Open,
        server_link: Link,
        data_link: Link,
        early: bytes,
        session_key: bytes,
        counters: tuple[ByteCounter | None, ByteCounter | None],
        on_idle: Callable[[Link], None],
    ) -> ResumableRelay:
        """Relay `server_link` over `data_link` as a resumable stream. `early`: the
        client's first bytes, which came with the OPEN and went to the server."""
        conn_id = request.conn_id
        relay = ResumableRelay(
            server_link,
            data_link,
            retention=Retention(),
            decoder=RecordDecoder(received=len(early)),
            limit=self.config.resume_buffer,
            window=request.resume_window_ms / 1000,
            stream_id=conn_id,
            key=stream_key(session_key, conn_id),
            label=f"service '{request.service}' connection {conn_id.hex()[:12]}",
            counters=counters,
            on_broken=self._broken,
            on_idle=on_idle,
        )
        self.table.add(relay)
        self._where[relay] = (ll, request.service)
        return relay

    def forget(self, relay: ResumableRelay) -> None:
        self._where.pop(relay, None)
        self.table.forget(relay)

    def _broken(self, relay: ResumableRelay, reason: str) -> None:
        self.table.broken(relay, reason)
        if not relay.ended:
            self._tasks.spawn(self._resume(relay), f"resume {relay.label}")

    async def _resume(self, relay: ResumableRelay) -> None:
        where = self._where.get(relay)
        if where is None:
            return
        ll, service = where
        delay = RETRY_FIRST
        while not relay.ended and relay.b is None:
            await self._connected[str(ll)].wait()
            handshake = self.sessions.get(str(ll))
            if handshake is None:
                await asyncio.sleep(delay)
                continue
            try:
                async with self._in_flight:
                    if relay.ended or relay.b is not None:
                        return
                    if await self._try(ll, service, relay, handshake):
                        return
            except (TcpgcError, OSError, ssl.SSLError, TimeoutError) as exc:
                log.info("%s: resume failed, trying again: %s", relay.label, transport_error(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_CAP)

    async def _try(
        self, ll: Address, service: str, relay: ResumableRelay, handshake: AgentHandshake
    ) -> bool:
        """One resume over a new data connection; True once the stream is settled
        (resumed, or given up), False to try again. A connection given up is reset,
        never closed: a FIN would tell the LL, had it taken the stream over on it, that
        the agent let go of the stream."""
        epoch, received = relay.epoch + 1, relay.inbound.offset
        relay.epoch = epoch  # used, whatever comes of it: a retry takes the next one
        async with asyncio.timeout(self.config.connect_timeout):
            link, binding = await self._dialer.dial(ll, handshake.binding)
            try:
                channel = FrameChannel(link)
                proof = resume_proof(
                    relay.key, handshake.session_key, relay.stream_id, epoch, received, binding
                )
                channel.send(Resume(MAX_VERSION, relay.stream_id, epoch, received, proof))
                answer = await channel.recv()
            except BaseException:
                link.reset()
                raise
        if relay.ended or relay.b is not None:
            link.reset()
            return True
        if isinstance(answer, Resumed):
            expected = resumed_proof(relay.key, relay.stream_id, epoch, answer.received)
            if not hmac.compare_digest(expected, answer.proof):
                link.reset()
                self.table.give_up(relay, "not resumed: the LL's answer has a bad proof", "proof")
                return True
            pause = self.table.pause_of(relay)
            channel.detach()
            try:
                replayed = relay.attach(link, answer.received)
            except ProtocolError as exc:
                link.reset()
                self.table.give_up(relay, f"cannot be resumed: {exc}", "proof")
                return True
            self.table.resumed(relay, service, pause, replayed)
            return True
        link.reset()
        if not isinstance(answer, Error):
            return False  # closed unanswered (shed among many, say): again
        if answer.code == ErrorCode.UNAVAILABLE:
            return False  # the LL does not know our new session yet: again
        if self.sessions.get(str(ll)) is not handshake:
            return False  # proven with a session that was replaced meanwhile: again
        if relay.inbound.ended and relay.out.ended:
            # Both ends had crossed; only the LL's acknowledgement of ours was lost with
            # the connection, and the LL is done with the stream: so are we.
            relay.fail("closed", reset=False)
            return True
        self.table.give_up(relay, f"not resumed: {printable(answer.message)}", "unknown")
        return True

    def ll_lost(self, ll: Address, reason: str) -> int:
        """The session to `ll` died silently: the data connections of its streams most
        likely did too. They wait for a resume from now on. Returns how many."""
        count = 0
        for relay, (address, _) in list(self._where.items()):
            if address == ll and relay.b is not None:
                relay.broken(relay.b, reason)
                count += 1
        return count
