"""One offer of a ready data connection, the agent's side, without I/O.

A ready data connection is opened (or given back after its client) before any client
needs it, and offered to the LL with POOL: the session's agent id and the offer's
number, proven with the session key over the certificate of the session's control
connection. The LL then sends OPEN on it when a client comes; the agent answers DATA
(then the stream) or OPEN_FAILED. Idle for `ttl` seconds, the agent renews it: RETIRE
first, so that an OPEN crossing it is known to the LL as never acted on.

In plaintext every frame after POOL carries its MAC, keyed for this offer alone.
Offers are made by `AgentControlSession.offer`, which numbers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from typing import TypeAlias

from tcpgc.errors import ProtocolError
from tcpgc.protocol.frame_auth import frame_auth, offer_context
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.handshake import AgentHandshake, data_proof, pool_proof
from tcpgc.protocol.messages import MAX_VERSION, Data, Open, OpenFailed, Pool, Retire, encode


@dataclass(frozen=True)
class ClientOffered:
    """The LL sent OPEN on this connection: claim the client (`claim`) or refuse it
    (`refuse`). Bytes after the OPEN (the client's first chunk) are in `leftover`."""

    open: Open


@dataclass(frozen=True)
class OfferDropped:
    """The LL closed the connection, or sent something else than OPEN on it (`why`):
    close it."""

    why: str


@dataclass(frozen=True)
class OfferRetired:
    """Idle past its time to live: RETIRE is queued; send it, then close."""


OfferEvent: TypeAlias = ClientOffered | OfferDropped | OfferRetired


class OfferState(Enum):
    WAITING = auto()  # for OPEN, until the deadline
    CLAIMING = auto()  # OPEN received: DATA or OPEN_FAILED to send
    DONE = auto()  # dropped or retired: nothing more


class ReadyOffer:
    """One offer: POOL out first, then OPEN awaited until `next_deadline()`."""

    def __init__(self, handshake: AgentHandshake, counter: int, *, now: float, ttl: float) -> None:
        self.counter = counter
        self._handshake = handshake
        agent_id, key = handshake.agent_id, handshake.session_key
        proof = pool_proof(key, agent_id, counter, handshake.binding)
        self._out = bytearray(encode(Pool(agent_id, counter, proof)))
        self._decoder = FrameDecoder()
        if not handshake.tls:  # the frames of this offer after POOL carry MACs
            self._decoder.auth = frame_auth(key, offer_context(counter), agent=True)
        self._deadline = now + ttl
        self.state = OfferState.WAITING

    @property
    def session_key(self) -> bytes:
        """The key of the session this offer belongs to."""
        return self._handshake.session_key

    def receive_data(self, data: bytes) -> list[OfferEvent]:
        """Feed bytes read on the connection (b"": the LL closed it). At most one event:
        after OPEN the rest is the client's stream, kept undecoded for `leftover`."""
        if self.state is OfferState.CLAIMING:
            if data:  # its end is the link's to tell
                self._decoder.receive_data(data)
            return []
        if self.state is not OfferState.WAITING:
            return []
        self._decoder.receive_data(data)
        try:
            message = self._decoder.next_message()
        except ProtocolError as exc:
            return [self._drop(str(exc))]
        if isinstance(message, Open):
            self.state = OfferState.CLAIMING
            return [ClientOffered(message)]
        if message is not None:
            return [self._drop(f"unexpected {message.TYPE.name} on a ready connection")]
        if not data:
            return [self._drop("the LL closed it")]
        return []

    def data_to_send(self) -> bytes:
        """The bytes to write, taken: each is returned once."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_deadline(self) -> float | None:
        """When the offer expires, while it waits for OPEN."""
        return self._deadline if self.state is OfferState.WAITING else None

    def handle_timer(self, now: float) -> list[OfferEvent]:
        """Past the deadline: queue RETIRE (see the module docstring)."""
        if self.state is not OfferState.WAITING or now < self._deadline:
            return []
        self._out += encode(Retire(), self._decoder.auth)
        self.state = OfferState.DONE
        return [OfferRetired()]

    def leftover(self) -> bytes:
        """Bytes read after the OPEN: the start of the client's chunked stream."""
        return self._decoder.leftover()

    def claim(self, conn_id: bytes) -> bytes:
        """The reply to this connection's OPEN that takes the client: DATA (with its
        MAC in plaintext). Returned, not queued: the caller decides when it goes."""
        self._expect_claiming()
        session = self._handshake
        proof = data_proof(session.session_key, conn_id, session.binding)
        self.state = OfferState.DONE
        return encode(Data(MAX_VERSION, conn_id, proof), self._decoder.auth)

    def refuse(self, conn_id: bytes, reason: str) -> None:
        """Queue OPEN_FAILED for the client offered; the connection then closes (a ready
        connection serves one client at most)."""
        self._expect_claiming()
        self._out += encode(OpenFailed(conn_id, reason), self._decoder.auth)
        self.state = OfferState.DONE

    def _drop(self, why: str) -> OfferDropped:
        self.state = OfferState.DONE
        return OfferDropped(why)

    def _expect_claiming(self) -> None:
        if self.state is not OfferState.CLAIMING:
            raise RuntimeError(f"no OPEN to answer on this offer (state {self.state.name})")
