"""The LL's side of one agent's control session, without I/O.

After the handshake (`tcpgc.protocol.handshake.LLHandshake`) the control connection
carries, from the LL, OPEN for each client offered to the agent and a PING every
heartbeat; from the agent, PONG, its own PINGs (answered with PONG) and OPEN_FAILED for a
client it cannot serve. Anything else ends the session with an ERROR.

`LLControlSession` is that exchange as a state machine in the style of h11's
`Connection` and aioquic's `QuicConnection`: the caller feeds it bytes and the time
(`receive_data`), takes the bytes to send (`data_to_send`) and the events
(`next_event`), and wakes it at the deadline it asks for (`next_deadline`,
`handle_timer`). The heartbeat is PING every `heartbeat` seconds; an agent from which
no message came for three heartbeats is dropped (its link died silently, or it reads
nothing we send and so stopped being read itself).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TypeAlias

from tcpgc.errors import ProtocolError
from tcpgc.protocol.frame_auth import FrameAuth
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.messages import Error, ErrorCode, Message, Open, OpenFailed, Ping, Pong, encode
from tcpgc.safe_text import printable

#: Heartbeats without any message from the agent before its session is dropped: one
#: lost PONG is not a dead link, three in a row are.
MISSED_HEARTBEATS = 3


@dataclass(frozen=True)
class OpenRefused:
    """The agent answered OPEN_FAILED for client `conn_id`: `reason` is worded for a
    log line (the agent's own words made printable)."""

    conn_id: bytes
    reason: str


@dataclass(frozen=True)
class SessionEnded:
    """The session is over; nothing more is read or sent. `reason` is the log line,
    `warning` its level (a clean disconnect is not one), `by_heartbeat` true when the
    agent went silent: its data connections are then likely dead too."""

    reason: str
    warning: bool = True
    by_heartbeat: bool = False


Event: TypeAlias = OpenRefused | SessionEnded


class LLControlSession:
    """One authenticated agent's control connection, LL side.

    `agent_id` and `peer` only word the log lines of `SessionEnded`. `auth` is the
    connection's frame MACs (plaintext mode), already used by the handshake's frames:
    its counters carry on. `received` are bytes read past the handshake's last frame."""

    def __init__(
        self,
        *,
        agent_id: str,
        peer: str,
        heartbeat: float,
        now: float,
        auth: FrameAuth | None = None,
        received: bytes = b"",
    ) -> None:
        self.agent_id = agent_id
        self.peer = peer
        self.heartbeat = heartbeat
        self._decoder = FrameDecoder()
        self._decoder.auth = auth
        self._auth = auth
        self._outgoing = bytearray()
        self._events: collections.deque[Event] = collections.deque()
        self._silence_deadline = now + MISSED_HEARTBEATS * heartbeat
        self._next_ping = now + heartbeat
        self._ping_token = 0
        #: The peer does not read what we send (the caller stopped reading it too): the
        #: silence deadline then says so rather than "silent".
        self.write_blocked = False
        #: Set once the session is over: the event that ended it.
        self.ended: SessionEnded | None = None
        if received:
            self.receive_data(received, now)

    # ---- input -------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes read from the agent at time `now`; b"" when its stream ended."""
        if self.ended is not None:
            return
        self._decoder.receive_data(data)
        try:
            while self.ended is None and (message := self._decoder.next_message()) is not None:
                self._silence_deadline = now + MISSED_HEARTBEATS * self.heartbeat
                self._handle(message)
            # The loop's last next_message() at the end of the stream raised if it
            # ended mid-frame.
            if self.ended is None and not data:
                self._end(f"agent {self.agent_id} at {self.peer} disconnected", warning=False)
        except ProtocolError as exc:
            self._end(f"agent {self.agent_id} at {self.peer} sent a bad message: {exc}")

    def _handle(self, message: Message) -> None:
        if isinstance(message, Ping):
            self._send(Pong(message.token))
        elif isinstance(message, Pong):
            pass  # receiving it was the point: the silence deadline moved
        elif isinstance(message, OpenFailed):
            reason = f"agent could not serve it: {printable(message.reason)}"
            self._events.append(OpenRefused(message.conn_id, reason))
        else:
            name = message.TYPE.name
            self._send(Error(ErrorCode.BAD_MESSAGE, f"unexpected {name}"))
            self._end(f"agent {self.agent_id} sent unexpected {name}: closing its session")

    def handle_timer(self, now: float) -> None:
        """Act on the deadlines due at `now`: drop a silent agent, send PING."""
        if self.ended is not None:
            return
        if now >= self._silence_deadline:
            what = "reads nothing we send" if self.write_blocked else "silent"
            silence = MISSED_HEARTBEATS * self.heartbeat
            self._end(
                f"agent {self.agent_id} at {self.peer} {what} for {silence:.0f} s: dropping it",
                by_heartbeat=True,
            )
            return
        if now >= self._next_ping:
            self._send(Ping(self._ping_token))
            self._ping_token += 1
            self._next_ping = now + self.heartbeat

    # ---- requests ----------------------------------------------------------------------

    def offer(self, open_message: Open) -> None:
        """Ask the agent to claim a client: OPEN goes out with the next `data_to_send`."""
        if self.ended is None:
            self._send(open_message)

    def close(self, reason: str) -> None:
        """End the session from our side (replaced, or the node closes)."""
        if self.ended is None:
            self._end(reason, warning=False)

    # ---- output ------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """The bytes to write to the agent now (possibly none)."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def next_event(self) -> Event | None:
        """The next event, or None until more bytes or time."""
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float | None:
        """When `handle_timer` must be called next; None once the session ended."""
        if self.ended is not None:
            return None
        return min(self._silence_deadline, self._next_ping)

    def _send(self, message: Message) -> None:
        self._outgoing += encode(message, self._auth)

    def _end(self, reason: str, *, warning: bool = True, by_heartbeat: bool = False) -> None:
        self.ended = SessionEnded(reason, warning, by_heartbeat)
        self._events.append(self.ended)
