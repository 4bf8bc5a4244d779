"""The agent's (CC's) side of a control session, without I/O.

One `AgentControlSession` is one control connection to an LL, from its first byte:

    bytes from the LL ──▶ receive_data(data, now) ──▶ events (Joined, OpenRequested,
                                                              SessionEnded)
    data_to_send()   ──▶ bytes for the LL (HELLO, AUTH, PONG, PING, OPEN_FAILED)
    next_deadline()  ──▶ when to call handle_timer(now) (next PING, LL silence)

It runs the handshake (`AgentHandshake`), then dispatches the LL's messages, keeps the
heartbeat schedule and the silence deadline, and numbers and proves the session's
offers of ready data connections (`offer`, see `tcpgc.protocol.ready_offer`) and the
DATA frame of every new data connection (`data_frame`). Time is a parameter (`now`,
any monotonic clock in seconds): the caller owns the clock and the sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from typing import TypeAlias

from tcpgc.errors import HeartbeatLost, PeerRefused, ProtocolError, TcpgcError
from tcpgc.protocol.frame_auth import CONTROL, frame_auth
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.handshake import AgentHandshake, State, data_proof
from tcpgc.protocol.messages import (
    MAX_VERSION,
    Data,
    Error,
    Message,
    Open,
    OpenFailed,
    Ping,
    Pong,
    encode,
)
from tcpgc.protocol.ready_offer import ReadyOffer
from tcpgc.safe_text import printable

#: Shortest heartbeat interval honoured, whatever the LL asks: a PING every few
#: milliseconds would cost both sides more than it tells them.
MIN_HEARTBEAT = 0.1

#: Heartbeat intervals the LL may stay silent before the session is given up: one lost
#: or late PONG is no reason to drop every connection the session carries.
SILENCE_INTERVALS = 3


@dataclass(frozen=True)
class Joined:
    """The LL proved the secret, accepted ours and said READY: the session is up."""

    handshake: AgentHandshake


@dataclass(frozen=True)
class OpenRequested:
    """The LL asks for client `open.conn_id` of service `open.service`: claim it with a
    data connection (`data_frame`) or refuse it (`refuse`)."""

    open: Open


@dataclass(frozen=True)
class SessionEnded:
    """The session is over: `error` says why (`PeerRefused` for an ERROR from the LL,
    `HeartbeatLost` for its silence, `ProtocolError` for anything else). Nothing more
    is accepted or sent."""

    error: TcpgcError

    @property
    def heartbeat_lost(self) -> bool:
        return isinstance(self.error, HeartbeatLost)


Event: TypeAlias = Joined | OpenRequested | SessionEnded


class Phase(Enum):
    HANDSHAKE = auto()
    JOINED = auto()
    ENDED = auto()


class AgentControlSession:
    """One control connection to an LL, as a state machine (see the module docstring)."""

    def __init__(self, handshake: AgentHandshake) -> None:
        self.handshake = handshake
        self.phase = Phase.HANDSHAKE
        #: Seconds between PINGs, and the LL's expected pace: known once joined.
        self.heartbeat = 0.0
        self._decoder = FrameDecoder()
        self._out = bytearray(encode(handshake.start()))
        self._ping_token = 0
        self._next_ping = 0.0
        self._silence_deadline = 0.0
        self._offers = 0

    # ---- bytes in, bytes out ---------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes read from the LL (b"": it closed the connection); returns what
        they mean, in order. Ends with `SessionEnded` on any error."""
        if self.phase is Phase.ENDED:
            return []
        self._decoder.receive_data(data)
        events: list[Event] = []
        while True:
            try:
                message = self._decoder.next_message()
            except ProtocolError as exc:
                events.append(self._end(exc))
                return events
            if message is None:
                if not data:
                    events.append(self._end(self._closed()))
                return events
            self._silence_deadline = now + SILENCE_INTERVALS * self.heartbeat
            event = self._handle(message, now)
            if event is not None:
                events.append(event)
                if isinstance(event, SessionEnded):
                    return events

    def data_to_send(self) -> bytes:
        """The bytes to write to the LL, taken: each is returned once."""
        out = bytes(self._out)
        self._out.clear()
        return out

    # ---- timers ----------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When `handle_timer` must next be called; None while nothing is timed (the
        handshake's own deadline is the caller's, with its dial)."""
        if self.phase is not Phase.JOINED:
            return None
        return min(self._next_ping, self._silence_deadline)

    def handle_timer(self, now: float) -> list[Event]:
        """Act on the deadlines that passed by `now`: send the next PING, or give the
        session up if the LL has been silent too long."""
        if self.phase is not Phase.JOINED:
            return []
        if now >= self._silence_deadline:
            silence = SILENCE_INTERVALS * self.heartbeat
            return [self._end(HeartbeatLost(f"no heartbeat from the LL for {silence:.0f} s"))]
        if now >= self._next_ping:
            self._ping_token += 1
            self._send(Ping(self._ping_token))
            self._next_ping = now + self.heartbeat
        return []

    # ---- what the agent sends --------------------------------------------------------

    def refuse(self, conn_id: bytes, reason: str) -> None:
        """Tell the LL that client `conn_id` will not be served (OPEN_FAILED)."""
        if self.phase is Phase.JOINED:
            self._send(OpenFailed(conn_id, reason))

    def data_frame(self, conn_id: bytes) -> bytes:
        """The first frame of a new data connection claiming client `conn_id`: DATA with
        the proof that it comes from this session, over the certificate of its control
        connection (which the data connection was checked to present too). A new
        connection carries no MAC: its proof is its authentication. Also after the
        session ended: a client being claimed then is still claimed."""
        self._expect_authenticated("a data connection")
        session = self.handshake
        proof = data_proof(session.session_key, conn_id, session.binding)
        return encode(Data(MAX_VERSION, conn_id, proof))

    def offer(self, now: float, ttl: float) -> ReadyOffer:
        """The next offer of a ready data connection of this session (see `ReadyOffer`).
        Numbered when made, so numbers leave in the order the caller sends them."""
        self._expect_authenticated("a ready connection")
        self._offers += 1
        return ReadyOffer(self.handshake, self._offers, now=now, ttl=ttl)

    # ---- internals -------------------------------------------------------------------

    def _handle(self, message: Message, now: float) -> Event | None:
        if self.phase is Phase.HANDSHAKE:
            return self._handshake_step(message, now)
        if isinstance(message, Open):
            return OpenRequested(message)
        if isinstance(message, Ping):
            self._send(Pong(message.token))
            return None
        if isinstance(message, Pong):
            return None
        if isinstance(message, Error):
            return self._end(
                PeerRefused(f"the LL closed the session: {printable(message.message)}")
            )
        return self._end(ProtocolError(f"unexpected {message.TYPE.name} from the LL"))

    def _handshake_step(self, message: Message, now: float) -> Event | None:
        handshake = self.handshake
        try:
            reply = handshake.receive(message)
        except (ProtocolError, PeerRefused) as exc:
            return self._end(exc)
        if reply is not None:
            self._send(reply)
        if handshake.state is not State.DONE:
            return None
        if not handshake.tls:  # every later frame carries its MAC, both ways
            self._decoder.auth = frame_auth(handshake.session_key, CONTROL, agent=True)
        self.phase = Phase.JOINED
        self.heartbeat = max(handshake.heartbeat_ms / 1000, MIN_HEARTBEAT)
        self._next_ping = now + self.heartbeat
        self._silence_deadline = now + SILENCE_INTERVALS * self.heartbeat
        return Joined(handshake)

    def _closed(self) -> ProtocolError:
        if self.phase is Phase.HANDSHAKE:
            return ProtocolError("the LL closed the connection during the handshake")
        return ProtocolError("the LL closed the control connection")

    def _send(self, message: Message) -> None:
        self._out += encode(message, self._decoder.auth)

    def _end(self, error: TcpgcError) -> SessionEnded:
        self.phase = Phase.ENDED
        return SessionEnded(error)

    def _expect_authenticated(self, what: str) -> None:
        if self.handshake.state is not State.DONE:
            raise RuntimeError(f"{what} needs an authenticated session ({self.handshake.state})")
