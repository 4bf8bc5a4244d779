"""The LL's resumable streams: started for each client of a service with a window, kept
waiting when their agent's leg breaks, and taken over by the agent's RESUME.

The LL never starts a resume: the agent, which opens every connection, comes back with
a new data connection per stream whose first frame is RESUME. The LL checks it against
the stream's key (derived from the session the stream began in) and the agent's
current session, answers RESUMED with what it has received, and the relay goes on.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable

from tcpgc.config import LLConfig
from tcpgc.errors import ProtocolError, ResumeRefused
from tcpgc.ll.agents import AgentRegistry, AgentSession
from tcpgc.ll.credentials import Credentials
from tcpgc.metrics import Metrics
from tcpgc.protocol.handshake import resume_proof, resumed_proof, stream_key
from tcpgc.protocol.messages import MAX_VERSION, Resume, Resumed
from tcpgc.protocol.resumable import RecordDecoder, Retention
from tcpgc.relay.rate_limit import RateLimits
from tcpgc.relay.result import ByteCounter
from tcpgc.relay.resumable import ResumableRelay
from tcpgc.relay.resume_table import ResumeTable
from tcpgc.transport.frame_channel import FrameChannel
from tcpgc.transport.link import Link

log = logging.getLogger("tcpgc.ll")


class LLResumes:
    """The resumable streams of the LL and the agent session each belongs to now."""

    def __init__(
        self, config: LLConfig, agents: AgentRegistry, credentials: Credentials, metrics: Metrics
    ) -> None:
        self.config = config
        self._agents = agents
        self._credentials = credentials
        self.table = ResumeTable(log, metrics, config.resume_memory)
        #: Each stream's service, and the agent session carrying it now (its `raw_id`
        #: names the agent whose later sessions may resume it).
        self._owners: dict[ResumableRelay, tuple[str, AgentSession]] = {}

    def reconfigure(self, config: LLConfig) -> None:
        self.config = config
        self.table.memory_cap = config.resume_memory

    def start(
        self,
        service: str,
        link: Link,
        data_link: Link,
        agent: AgentSession,
        stream_id: bytes,
        early: bytes,
        counters: tuple[ByteCounter | None, ByteCounter | None],
        on_idle: Callable[[Link], None],
        limits: RateLimits | None = None,
    ) -> ResumableRelay:
        """Relay client `link` over `data_link` as a resumable stream. `early`: the
        client's first bytes, which went to the agent behind OPEN (kept until acked).
        `limits`: the rate limits the stream answers to, if any."""
        relay = ResumableRelay(
            link,
            data_link,
            retention=Retention(sent=len(early), kept=early),
            decoder=RecordDecoder(),
            limit=self.config.resume_buffer,
            window=self.config.window_of(service),
            stream_id=stream_id,
            key=stream_key(agent.session_key, stream_id),
            label=f"client {link.peer} of service '{service}'",
            counters=counters,
            on_broken=self.table.broken,
            on_idle=on_idle,
            limits=limits,
        )
        self.table.add(relay)
        self._owners[relay] = (service, agent)
        return relay

    def forget(self, relay: ResumableRelay) -> None:
        """`relay` is over."""
        owner = self._owners.pop(relay, None)
        if owner is not None:
            owner[1].relays.discard(relay)
        self.table.forget(relay)

    def agent_lost(self, session: AgentSession) -> int:
        """`session` died silently: its streams' data connections likely did too, and
        TCP could take minutes to say so. They wait for the agent from now on. Returns
        how many streams now wait."""
        count = 0
        for relay in list(session.relays):
            if isinstance(relay, ResumableRelay) and relay.b is not None:
                relay.broken(relay.b, f"agent {session.agent_id} lost")
                count += 1
        return count

    def agent_let_go(self, session: AgentSession) -> None:
        """`session`'s agent closed its control connection: give up its streams that
        wait (those still running end when their own data connections close)."""
        for relay in list(session.relays):
            if isinstance(relay, ResumableRelay) and relay.waiting_since is not None:
                why = f"not resumed: agent {session.agent_id} closed its session"
                self.table.give_up(relay, why, "closed")

    def give_up_agents(self, key_ids: set[bytes], why: str) -> int:
        """The credentials `key_ids` were revoked: their streams that wait (whichever of
        their sessions began them) will not be resumed. Returns how many there were."""
        count = 0
        for relay, (_, session) in list(self._owners.items()):
            if session.key_id in key_ids and relay.waiting_since is not None:
                self.table.give_up(relay, f"not resumed: {why}", "revoked")
                count += 1
        return count

    def resume(self, message: Resume, channel: FrameChannel) -> None:
        """A data connection whose first frame is RESUME: check it, answer RESUMED and
        hand the connection to its stream; raise ResumeRefused (logged and counted by
        the caller) otherwise. A refused RESUME changes nothing for the stream."""
        relay = self.table.find(message.stream_id)
        if relay is None or relay.ended:
            self._refuse("unknown", "unknown or finished stream")
        assert relay is not None
        service, owner = self._owners[relay]
        session = self._agents.find(owner.raw_id)
        binding = self._credentials.binding_of(channel.link)
        if session is None or not session.alive:
            self._refuse("session", "the stream's agent has no session (yet)")
        assert session is not None
        if session.key_id != owner.key_id:  # a stream stays with the credential it began with
            self._refuse("session", "the stream's agent holds another credential now")
        expected = resume_proof(
            relay.key, session.session_key, message.stream_id, message.epoch, message.received,
            binding,
        )  # fmt: skip
        if message.version != MAX_VERSION or not hmac.compare_digest(expected, message.proof):
            self._refuse("proof", "bad proof")
        if message.epoch <= relay.epoch:
            # Used already: a recorded RESUME played again. (An agent whose RESUMED was
            # lost tries again with a higher number.)
            self._refuse("proof", f"resume number {message.epoch} already used")
        pause = self.table.pause_of(relay)
        received = relay.inbound.offset
        proof = resumed_proof(relay.key, message.stream_id, message.epoch, received)
        relay.epoch = message.epoch
        channel.send(Resumed(received, proof))
        channel.detach()
        try:
            replayed = relay.attach(channel.link, message.received)
        except ProtocolError as exc:  # an offset we cannot go on from: the stream is lost
            self.table.give_up(relay, f"cannot be resumed: {exc}", "proof")
            raise ResumeRefused(f"cannot resume: {exc}") from None
        owner.relays.discard(relay)
        session.relays.add(relay)
        self._owners[relay] = (service, session)
        self.table.resumed(relay, service, pause, replayed)

    def _refuse(self, reason: str, why: str) -> None:
        self.table.refused(reason)
        raise ResumeRefused(why, reason=reason)

    def give_up_all(self) -> None:
        """The node stops: no stream will be resumed."""
        self.table.give_up_all("not resumed: the LL is stopping")
