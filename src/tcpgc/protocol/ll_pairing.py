"""The LL's decisions about data connections, without I/O: which waiting client a DATA
frame claims, which ready connection a POOL frame offers, what an agent's answer on a
ready connection means, and what the first frame on the agent port starts.

A data connection is bound to its client only by a single-use id sent over the
authenticated control connection of the agent it was offered to, and a proof under that
session's key and the certificate the agent saw on *this* connection. Both are checked
before the id is used up, so a forged claim costs the client nothing. A ready connection
proves its session the same way, over a counter that must not repeat (see
`tcpgc.protocol.replay_window`).

The caller passes the time (`now`, any monotonic clock) where it matters.
"""

from __future__ import annotations

import collections
import hmac
from dataclasses import dataclass
from enum import Enum, auto
from typing import Generic, TypeVar

from tcpgc.errors import BadDataConnection, ProtocolError, WrongTransport
from tcpgc.protocol.frame_auth import FrameAuth, frame_auth, offer_context
from tcpgc.protocol.handshake import data_proof, pool_proof
from tcpgc.protocol.messages import (
    MAX_VERSION,
    MIN_VERSION,
    Data,
    Hello,
    Message,
    OpenFailed,
    Pool,
    Resume,
    Retire,
)
from tcpgc.protocol.replay_window import ReplayWindow
from tcpgc.safe_text import printable

#: Ready data connections an LL keeps per agent at most (the agent asks for fewer).
MAX_READY = 64

#: The first byte of a TLS record (a handshake record: the ClientHello).
TLS_RECORD = 0x16

T = TypeVar("T")


def refuse_tls_record(kind: int) -> None:
    """The first-frame check of a plaintext LL's agent port (`FrameDecoder.first_type`):
    a TLS ClientHello there is an agent that speaks TLS, told as such."""
    if kind == TLS_RECORD:
        raise WrongTransport(
            "peer speaks TLS but this LL runs with --insecure-plaintext (both sides must agree)"
        )


# ---- waiting clients -------------------------------------------------------------------


@dataclass(eq=False)
class WaitingClient(Generic[T]):
    """A client whose agent was sent OPEN and has not claimed it yet. `agent` is who it
    was offered to (compared by identity); `client` is the caller's handle on it."""

    conn_id: bytes
    service: str
    agent: object
    session_key: bytes
    deadline: float
    client: T


class PairingTable(Generic[T]):
    """Clients waiting for a data connection, by their single-use id."""

    def __init__(self) -> None:
        self._waiting: dict[bytes, WaitingClient[T]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, conn_id: object) -> bool:
        return conn_id in self._waiting

    def __iter__(self) -> collections.abc.Iterator[WaitingClient[T]]:
        return iter(list(self._waiting.values()))

    def expect(
        self,
        conn_id: bytes,
        *,
        service: str,
        agent: object,
        session_key: bytes,
        deadline: float,
        client: T,
    ) -> WaitingClient[T]:
        """Wait for a data connection claiming `conn_id` until `deadline`."""
        if conn_id in self._waiting:
            raise ValueError("connection id already waiting")
        waiting = WaitingClient(conn_id, service, agent, session_key, deadline, client)
        self._waiting[conn_id] = waiting
        return waiting

    def claim(self, data: Data, binding: bytes, now: float) -> WaitingClient[T]:
        """The client a data connection's DATA frame claims, removed from the table.
        `binding` is the fingerprint of the certificate this LL presented on that
        connection. Raises a ProtocolError (BadDataConnection for an unknown, used,
        expired or badly proven id), leaving a client that was not claimed waiting."""
        if not MIN_VERSION <= data.version <= MAX_VERSION:
            # Told as a bad message, not a version refusal: there is no version to agree.
            raise ProtocolError(f"data connection speaks version {data.version}", reason="version")
        waiting = self._waiting.get(data.conn_id)
        if waiting is None or now >= waiting.deadline:
            raise BadDataConnection("unknown, expired or already used data connection id")
        # Checked before the id is used up: a forged claim must not cost the client.
        expected = data_proof(waiting.session_key, data.conn_id, binding)
        if not hmac.compare_digest(data.proof, expected):
            raise BadDataConnection(
                "data connection with a bad proof (not from the session its client was "
                "offered to, or not over this LL's certificate)",
                reason="certificate",  # the label this failure has always been counted under
            )
        del self._waiting[data.conn_id]
        return waiting

    def refuse(self, conn_id: bytes, agent: object) -> WaitingClient[T] | None:
        """OPEN_FAILED for `conn_id` from `agent`: the client, removed, if it was offered
        to that agent; None otherwise (another agent cannot turn a client away)."""
        waiting = self._waiting.get(conn_id)
        if waiting is None or waiting.agent is not agent:
            return None
        del self._waiting[conn_id]
        return waiting

    def agent_gone(self, agent: object) -> list[WaitingClient[T]]:
        """The clients offered to `agent`, removed: it will not claim them."""
        gone = [w for w in self._waiting.values() if w.agent is agent]
        for waiting in gone:
            del self._waiting[waiting.conn_id]
        return gone

    def forget(self, conn_id: bytes) -> None:
        """The client stopped waiting (served, left, or timed out)."""
        self._waiting.pop(conn_id, None)

    def expire(self, now: float) -> list[WaitingClient[T]]:
        """The clients whose deadline passed, removed."""
        due = [w for w in self._waiting.values() if now >= w.deadline]
        for waiting in due:
            del self._waiting[waiting.conn_id]
        return due

    def next_deadline(self) -> float | None:
        return min((w.deadline for w in self._waiting.values()), default=None)


# ---- ready connections -----------------------------------------------------------------


class ReadyOffers(Generic[T]):
    """One agent session's ready data connections, oldest first, and the POOL counters
    already accepted from it."""

    def __init__(self, agent_id: bytes, session_key: bytes, max_ready: int = MAX_READY) -> None:
        self.agent_id = agent_id
        self.session_key = session_key
        self.max_ready = max_ready
        self.window = ReplayWindow()
        self._ready: collections.deque[T] = collections.deque()

    def __len__(self) -> int:
        return len(self._ready)

    def accept(self, pool: Pool, binding: bytes, *, plaintext: bool) -> FrameAuth | None:
        """Check a POOL frame for this session; raises ProtocolError if it is forged or
        replayed. Returns the frame MACs of the offered connection in plaintext mode."""
        expected = pool_proof(self.session_key, pool.agent_id, pool.counter, binding)
        # The proof first: only proven numbers may move the replay window.
        if pool.agent_id != self.agent_id or not hmac.compare_digest(pool.proof, expected):
            raise ProtocolError("ready connection with a bad or replayed proof")
        if not self.window.accept(pool.counter):
            raise ProtocolError("ready connection with a bad or replayed proof")
        if plaintext:
            return frame_auth(self.session_key, offer_context(pool.counter), agent=False)
        return None

    def park(self, connection: T) -> T | None:
        """Keep an accepted ready connection; returns the oldest one, dropped to make
        room, when MAX_READY are held."""
        evicted = self._ready.popleft() if len(self._ready) >= self.max_ready else None
        self._ready.append(connection)
        return evicted

    def take(self) -> T | None:
        """The oldest ready connection, or None."""
        return self._ready.popleft() if self._ready else None

    def drain(self) -> list[T]:
        """Every ready connection, removed (the session ended)."""
        out = list(self._ready)
        self._ready.clear()
        return out


# ---- answers on a ready connection -----------------------------------------------------


class Answer(Enum):
    """What an agent's first frame after OPEN on a ready connection means."""

    TAKEN = auto()  # DATA with its proof: the stream follows
    REFUSED = auto()  # OPEN_FAILED for this client, before any byte went to a server
    RETIRED = auto()  # the agent was closing it and did not read our OPEN
    BAD_PROOF = auto()  # DATA for this client with a proof that does not hold
    CLOSED = auto()  # closed, or anything else: the connection is lost


@dataclass(frozen=True)
class Verdict:
    answer: Answer
    #: For REFUSED: the refusal worded for a log line.
    reason: str = ""


def classify_answer(
    reply: Message | None, conn_id: bytes, session_key: bytes, binding: bytes
) -> Verdict:
    """What `reply` (None: the agent closed the connection) to OPEN(`conn_id`) means."""
    if isinstance(reply, Data) and reply.conn_id == conn_id:
        if hmac.compare_digest(reply.proof, data_proof(session_key, conn_id, binding)):
            return Verdict(Answer.TAKEN)
        return Verdict(Answer.BAD_PROOF)
    if isinstance(reply, Retire):
        return Verdict(Answer.RETIRED)
    if isinstance(reply, OpenFailed) and reply.conn_id == conn_id:
        return Verdict(Answer.REFUSED, f"agent could not serve it: {printable(reply.reason)}")
    return Verdict(Answer.CLOSED)


# ---- the first frame on the agent port -------------------------------------------------


class Opening(Enum):
    """What a connection to the agent port is, by its first frame."""

    CONTROL = auto()  # HELLO: an agent's handshake
    CLAIM = auto()  # DATA: a data connection claiming a waiting client
    READY = auto()  # POOL: a ready data connection offered for future clients
    RESUME = auto()  # RESUME: a data connection taking over a stream after a break
    CLOSED = auto()  # closed before any frame


def classify_opening(first: Message | None) -> Opening:
    """What the first frame starts; ProtocolError for a frame that starts nothing."""
    if isinstance(first, Hello):
        return Opening.CONTROL
    if isinstance(first, Data):
        return Opening.CLAIM
    if isinstance(first, Pool):
        return Opening.READY
    if isinstance(first, Resume):
        return Opening.RESUME
    if first is None:
        return Opening.CLOSED
    raise ProtocolError(f"unexpected {first.TYPE.name} as first message")


def classify_reoffer(message: Message | None) -> Opening:
    """What the first frame on a used data connection (its client done) starts: POOL
    (offered again) or nothing (closed); ProtocolError for anything else."""
    if message is None:
        return Opening.CLOSED
    if isinstance(message, Pool):
        return Opening.READY
    raise ProtocolError(f"unexpected {message.TYPE.name} on a used data connection")


def accept_pool(
    offers: ReadyOffers[T] | None, pool: Pool, binding: bytes, *, plaintext: bool
) -> FrameAuth | None:
    """Check a POOL frame against the session it names (`offers`, None: no session of
    that agent here); see `ReadyOffers.accept`."""
    if offers is None:
        raise ProtocolError("ready connection for an agent that has no session here")
    return offers.accept(pool, binding, plaintext=plaintext)
