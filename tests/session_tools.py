"""The LL's end of an agent's control connection, without sockets, for the tests of
the agent's session core and of the ready pool: the real LL handshake and codec."""

from __future__ import annotations

from tcpgc.protocol.agent_session import AgentControlSession
from tcpgc.protocol.frame_auth import CONTROL, FrameAuth, frame_auth
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.handshake import AgentHandshake, LLHandshake, key_id
from tcpgc.protocol.messages import Message, Open, encode

SECRET = b"s" * 32
CERT = b"\x42" * 32
AGENT_ID = b"\x01" * 16
CONN_ID = b"\x07" * 16
HEARTBEAT_MS = 1000
OPEN = Open(CONN_ID, "web", "192.0.2.1", 4000, "198.51.100.2", 443)
T0 = 1000.0  # the fake clock starts anywhere: only differences matter


class FakeLL:
    """The LL's end of one control connection: the real LL handshake and codec."""

    def __init__(self, *, tls: bool, heartbeat_ms: int = HEARTBEAT_MS, secret: bytes = SECRET):
        # Keyed by the agent's key id whatever `secret` is: an impostor answers it.
        self.handshake = LLHandshake(
            {key_id(SECRET): secret}, heartbeat_ms=heartbeat_ms, binding=CERT, tls=tls
        )
        self.auth: FrameAuth | None = None
        self.tls = tls
        self.decoder = FrameDecoder()

    def answer(self, data: bytes) -> bytes:
        """Read the agent's handshake bytes; the LL's answers, as bytes."""
        out = b""
        for message in self.read(data):
            out += encode(self.handshake.receive(message))
        if self.handshake.session_key and not self.tls and self.decoder.auth is None:
            self.decoder.auth = frame_auth(self.handshake.session_key, CONTROL, agent=False)
            self.auth = frame_auth(self.handshake.session_key, CONTROL, agent=False)
        return out

    def read(self, data: bytes) -> list[Message]:
        self.decoder.receive_data(data)
        messages = []
        while (message := self.decoder.next_message()) is not None:
            messages.append(message)
        return messages

    def frame(self, message: Message) -> bytes:
        """A frame the LL sends on the joined control connection (MAC'd in plaintext)."""
        return encode(message, None if self.tls else self.auth)


def join(
    *, tls: bool = False, heartbeat_ms: int = HEARTBEAT_MS, one_byte: bool = False
) -> tuple[AgentControlSession, FakeLL, list[object]]:
    """A session joined at T0, the fake LL at the other end, and the join's events."""
    session = AgentControlSession(
        AgentHandshake(SECRET, services=("web",), agent_id=AGENT_ID, binding=CERT, tls=tls)
    )
    ll = FakeLL(tls=tls, heartbeat_ms=heartbeat_ms)
    events: list[object] = []
    for _ in range(2):  # HELLO → CHALLENGE, AUTH → READY
        reply = ll.answer(session.data_to_send())
        chunks = [reply[i : i + 1] for i in range(len(reply))] if one_byte else [reply]
        for chunk in chunks:
            events += session.receive_data(chunk, T0)
    return session, ll, events
