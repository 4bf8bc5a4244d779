"""Sans-I/O tests of the agent's side of a control session and of its ready-connection
offers: a fake LL (the real LL handshake and codec) writes bytes, the session answers
with events and bytes, and time is a number the test moves. No sockets, no sleeps."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from session_tools import (
    AGENT_ID,
    CERT,
    CONN_ID,
    OPEN,
    SECRET,
    T0,
    FakeLL,
    join,
)
from tcpgc.errors import AuthenticationError, HeartbeatLost, PeerRefused, ProtocolError
from tcpgc.protocol import agent_session, backoff, ready_offer
from tcpgc.protocol.agent_session import (
    AgentControlSession,
    Joined,
    OpenRequested,
    Phase,
    SessionEnded,
)
from tcpgc.protocol.backoff import Backoff, full_jitter
from tcpgc.protocol.frame_auth import FrameAuth, frame_auth, offer_context
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.handshake import AgentHandshake, data_proof, pool_proof
from tcpgc.protocol.messages import (
    Data,
    Error,
    ErrorCode,
    Message,
    OpenFailed,
    Ping,
    Pong,
    Pool,
    Ready,
    Retire,
    encode,
)
from tcpgc.protocol.ready_offer import (
    ClientOffered,
    OfferDropped,
    OfferRetired,
    OfferState,
    ReadyOffer,
)
from tcpgc.protocol.replay_window import ReplayWindow


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
@pytest.mark.parametrize("one_byte", [False, True], ids=["whole", "byte-by-byte"])
def test_handshake_joins(tls: bool, one_byte: bool) -> None:
    session, ll, events = join(tls=tls, one_byte=one_byte)
    assert events == [Joined(session.handshake)]
    assert session.phase is Phase.JOINED
    assert session.heartbeat == 1.0
    assert session.handshake.session_key == ll.handshake.session_key
    assert session.data_to_send() == b""  # nothing more to say after AUTH


def test_heartbeat_below_the_floor_is_raised_to_it() -> None:
    session, _, _ = join(heartbeat_ms=5)
    assert session.heartbeat == 0.1
    assert session.next_deadline() == pytest.approx(T0 + 0.1)


def test_error_during_the_handshake_is_a_refusal() -> None:
    session = AgentControlSession(AgentHandshake(SECRET, services=("web",), binding=CERT))
    session.data_to_send()
    [event] = session.receive_data(encode(Error(ErrorCode.UNAVAILABLE, "full\x1b[2J")), T0)
    assert isinstance(event, SessionEnded) and isinstance(event.error, PeerRefused)
    assert str(event.error) == "the LL refused us: full\\x1b[2J"
    assert session.receive_data(encode(Ready(1000)), T0) == []  # ended: deaf


def test_a_fake_ll_is_refused_before_anything_is_sent() -> None:
    session = AgentControlSession(AgentHandshake(SECRET, services=("web",), binding=CERT))
    impostor = FakeLL(tls=True, secret=b"x" * 32)
    [event] = session.receive_data(impostor.answer(session.data_to_send()), T0)
    assert isinstance(event, SessionEnded) and isinstance(event.error, AuthenticationError)
    assert session.data_to_send() == b""  # no AUTH: the fake LL learns nothing


@pytest.mark.parametrize(
    ("joined", "data", "expected"),
    [
        (False, b"", "the LL closed the connection during the handshake"),
        (True, b"", "the LL closed the control connection"),
        (True, b"\x08\x00", "connection closed in the middle of a frame (2 bytes)"),
    ],
)
def test_the_ll_closing_ends_the_session(joined: bool, data: bytes, expected: str) -> None:
    if joined:
        session, _, _ = join(tls=True)
    else:
        session = AgentControlSession(AgentHandshake(SECRET, services=("web",)))
    events = session.receive_data(data, T0) + session.receive_data(b"", T0)
    assert len(events) == 1 and isinstance(events[0], SessionEnded)
    assert type(events[0].error) is ProtocolError and str(events[0].error) == expected
    assert session.next_deadline() is None


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_open_ping_pong_and_refusal(tls: bool) -> None:
    session, ll, _ = join(tls=tls)
    stream = ll.frame(OPEN) + ll.frame(Ping(7)) + ll.frame(Pong(1))
    assert session.receive_data(stream, T0 + 0.5) == [OpenRequested(OPEN)]
    session.refuse(CONN_ID, "the agent is at its connection limit")
    assert ll.read(session.data_to_send()) == [
        Pong(7),
        OpenFailed(CONN_ID, "the agent is at its connection limit"),
    ]


def test_error_from_the_ll_ends_the_session() -> None:
    session, ll, _ = join()
    [event] = session.receive_data(ll.frame(Error(ErrorCode.UNAVAILABLE, "replaced")), T0)
    assert isinstance(event, SessionEnded) and isinstance(event.error, PeerRefused)
    assert str(event.error) == "the LL closed the session: replaced"
    assert not event.heartbeat_lost
    session.refuse(CONN_ID, "late")  # ended: nothing more is sent
    assert session.data_to_send() == b""
    # A client being claimed when the session ended is still claimed.
    assert session.data_frame(CONN_ID).startswith(bytes([Data.TYPE]))


@pytest.mark.parametrize("message", [Ready(1000), Retire(), OpenFailed(CONN_ID, "x")])
def test_unexpected_messages_end_the_session(message: Message) -> None:
    session, ll, _ = join()
    events = session.receive_data(ll.frame(message) + ll.frame(OPEN), T0)
    assert len(events) == 1 and isinstance(events[0], SessionEnded)
    assert str(events[0].error) == f"unexpected {message.TYPE.name} from the LL"


def test_plaintext_frames_without_their_mac_end_the_session() -> None:
    session, ll, _ = join(tls=False)
    [event] = session.receive_data(encode(OPEN), T0)  # an injected, unsealed OPEN
    assert isinstance(event, SessionEnded) and isinstance(event.error, ProtocolError)
    assert "MAC" in str(event.error)


def test_a_replayed_plaintext_frame_ends_the_session() -> None:
    session, ll, _ = join(tls=False)
    frame = ll.frame(OPEN)
    assert session.receive_data(frame, T0) == [OpenRequested(OPEN)]
    [event] = session.receive_data(frame, T0)
    assert isinstance(event, SessionEnded) and "MAC" in str(event.error)


def test_pings_follow_the_heartbeat() -> None:
    session, ll, _ = join(tls=False)
    assert session.next_deadline() == T0 + 1.0
    assert session.handle_timer(T0 + 0.99) == [] and session.data_to_send() == b""
    assert session.handle_timer(T0 + 1.0) == []
    assert ll.read(session.data_to_send()) == [Ping(1)]
    assert session.next_deadline() == T0 + 2.0
    session.receive_data(ll.frame(Pong(1)), T0 + 1.5)  # any frame: the LL is alive
    session.handle_timer(T0 + 2.25)  # late: the next one is a heartbeat after this one
    assert ll.read(session.data_to_send()) == [Ping(2)]
    assert session.next_deadline() == T0 + 3.25


def test_silence_for_three_heartbeats_loses_the_session() -> None:
    session, ll, _ = join(tls=True)
    session.receive_data(ll.frame(Pong(0)), T0 + 2.0)  # resets the silence deadline
    now = T0
    while (deadline := session.next_deadline()) is not None and deadline < T0 + 5.0:
        now = deadline
        assert session.handle_timer(now) == []
    assert now == pytest.approx(T0 + 4.0)  # the PINGs went out meanwhile
    assert session.next_deadline() == T0 + 5.0
    [event] = session.handle_timer(T0 + 5.0)
    assert isinstance(event, SessionEnded) and isinstance(event.error, HeartbeatLost)
    assert event.heartbeat_lost and event.error.reason == "heartbeat"
    assert str(event.error) == "no heartbeat from the LL for 3 s"
    assert session.next_deadline() is None and session.handle_timer(T0 + 9) == []


def test_no_timer_before_the_session_is_joined() -> None:
    session = AgentControlSession(AgentHandshake(SECRET, services=("web",)))
    assert session.next_deadline() is None
    assert session.handle_timer(T0 + 100) == []
    with pytest.raises(RuntimeError, match="authenticated session"):
        session.offer(T0, 10)
    with pytest.raises(RuntimeError, match="authenticated session"):
        session.data_frame(CONN_ID)


def test_data_frame_proves_the_session_without_a_mac() -> None:
    session, ll, _ = join(tls=False)
    decoder = FrameDecoder()  # a new connection: its first frame is not MAC'd
    decoder.receive_data(session.data_frame(CONN_ID))
    data = decoder.next_message()
    assert isinstance(data, Data) and data.conn_id == CONN_ID
    assert data.proof == data_proof(ll.handshake.session_key, CONN_ID, CERT)


def offers(tls: bool, count: int) -> tuple[AgentControlSession, FakeLL, list[ReadyOffer]]:
    session, ll, _ = join(tls=tls)
    return session, ll, [session.offer(T0, ttl=30.0) for _ in range(count)]


def read_pool(offer: ReadyOffer) -> Pool:
    decoder = FrameDecoder()
    decoder.receive_data(offer.data_to_send())
    pool = decoder.next_message()
    assert isinstance(pool, Pool)
    return pool


def test_offers_are_numbered_in_order_and_proven() -> None:
    session, ll, made = offers(tls=True, count=3)
    window = ReplayWindow()
    for number, offer in enumerate(made, start=1):
        pool = read_pool(offer)
        assert (pool.agent_id, pool.counter) == (AGENT_ID, number)
        assert pool.proof == pool_proof(ll.handshake.session_key, AGENT_ID, number, CERT)
        assert window.accept(pool.counter)
    assert not window.accept(2)  # a replayed offer is refused by the LL's window


def ll_auth(ll: FakeLL, counter: int) -> FrameAuth:
    return frame_auth(ll.handshake.session_key, offer_context(counter), agent=False)


def test_open_on_an_offer_is_claimed_with_its_first_bytes() -> None:
    _, ll, [offer] = offers(tls=False, count=1)
    read_pool(offer)
    auth = ll_auth(ll, 1)
    first_chunk = b"\x00\x05hello"
    wire = encode(OPEN, auth) + first_chunk
    assert offer.receive_data(wire[:5]) == []
    assert offer.receive_data(wire[5:]) == [ClientOffered(OPEN)]
    assert offer.next_deadline() is None  # no RETIRE once a client is on it
    assert offer.leftover() == first_chunk
    decoder = FrameDecoder()
    decoder.auth = auth
    decoder.receive_data(offer.claim(CONN_ID))
    data = decoder.next_message()
    assert isinstance(data, Data)
    assert data.proof == data_proof(ll.handshake.session_key, CONN_ID, CERT)
    assert offer.state is OfferState.DONE
    with pytest.raises(RuntimeError):
        offer.refuse(CONN_ID, "twice")


def test_refusal_on_an_offer_is_sent_with_its_mac() -> None:
    _, ll, [offer] = offers(tls=False, count=1)
    read_pool(offer)
    auth = ll_auth(ll, 1)
    offer.receive_data(encode(OPEN, auth))
    offer.refuse(CONN_ID, "service 'web' is not served by this agent")
    decoder = FrameDecoder()
    decoder.auth = auth
    decoder.receive_data(offer.data_to_send())
    assert decoder.next_message() == OpenFailed(
        CONN_ID, "service 'web' is not served by this agent"
    )


def test_each_offer_has_its_own_macs() -> None:
    _, ll, [first, second] = offers(tls=False, count=2)
    [event] = second.receive_data(encode(OPEN, ll_auth(ll, 1)))  # sealed for offer 1
    assert isinstance(event, OfferDropped) and "MAC" in event.why
    assert first.receive_data(encode(OPEN, ll_auth(ll, 1))) == [ClientOffered(OPEN)]


def test_tls_offers_carry_no_macs() -> None:
    _, _, [offer] = offers(tls=True, count=1)
    assert offer.receive_data(encode(OPEN)) == [ClientOffered(OPEN)]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "the LL closed it"),
        (encode(Ping(1)), "unexpected PING on a ready connection"),
        (b"\x06\x00", "connection closed in the middle of a frame (2 bytes)"),
    ],
)
def test_anything_but_open_drops_the_offer(data: bytes, why: str) -> None:
    _, _, [offer] = offers(tls=True, count=1)
    events = offer.receive_data(data) + (offer.receive_data(b"") if data else [])
    assert events == [OfferDropped(why)]
    assert offer.next_deadline() is None
    assert offer.receive_data(encode(OPEN)) == []  # dropped: deaf


def test_an_idle_offer_is_retired_after_its_ttl() -> None:
    _, ll, [offer] = offers(tls=False, count=1)
    read_pool(offer)
    assert offer.next_deadline() == T0 + 30.0
    assert offer.handle_timer(T0 + 29.9) == []
    assert offer.data_to_send() == b""
    assert offer.handle_timer(T0 + 30.0) == [OfferRetired()]
    decoder = FrameDecoder()
    decoder.auth = ll_auth(ll, 1)
    decoder.receive_data(offer.data_to_send())
    assert decoder.next_message() == Retire()
    assert offer.next_deadline() is None
    assert offer.receive_data(encode(OPEN, ll_auth(ll, 1))) == []  # crossed RETIRE: ignored


def test_backoff_with_full_jitter() -> None:
    backoff = Backoff(1.0, 8.0)
    assert [backoff.full_jitter(0.999) for _ in range(5)] == pytest.approx(
        [1.0, 1.999, 3.997, 7.993, 7.993]
    )
    assert backoff.full_jitter(0.0) == 1.0  # the draw's low end is the floor
    backoff.reset()
    assert backoff.delay == 1.0
    backoff.failed()
    assert backoff.delay == 2.0
    assert full_jitter(1.0, 3.0, 0.5) == 2.0


def test_bytes_after_open_are_kept_for_the_stream() -> None:
    _, _, [offer] = offers(tls=True, count=1)
    assert offer.receive_data(encode(OPEN) + b"\x00\x02") == [ClientOffered(OPEN)]
    assert offer.receive_data(b"hi") == [] and offer.receive_data(b"") == []
    assert offer.leftover() == b"\x00\x02hi"


class Playbook:
    """A session's life as a script: bytes from the LL (`>>`) or a timer at a time, and
    what must come out: events, and the messages the LL reads."""

    def __init__(self) -> None:
        self.session, self.ll, _ = join(tls=False)

    def receive(self, now: float, *messages: Message) -> Playbook:
        wire = b"".join(self.ll.frame(m) for m in messages)
        self._events = self.session.receive_data(wire, now)
        return self

    def timer(self, now: float) -> Playbook:
        assert self.session.next_deadline() == pytest.approx(now), "no deadline at that time"
        self._events = self.session.handle_timer(now)
        return self

    def expect(self, *events: object, sent: tuple[Message, ...] = ()) -> Playbook:
        assert self._events == list(events)
        assert self.ll.read(self.session.data_to_send()) == list(sent)
        return self


def test_playbook_of_a_session_lost_to_silence() -> None:
    book = Playbook()
    book.receive(T0 + 0.2, OPEN).expect(OpenRequested(OPEN))
    book.session.refuse(CONN_ID, "cannot reach its server: connection refused")
    book.receive(T0 + 0.3, Ping(1)).expect(
        sent=(OpenFailed(CONN_ID, "cannot reach its server: connection refused"), Pong(1))
    )
    book.timer(T0 + 1.0).expect(sent=(Ping(1),))
    book.receive(T0 + 1.1, Pong(1)).expect()
    book.timer(T0 + 2.0).expect(sent=(Ping(2),))
    book.timer(T0 + 3.0).expect(sent=(Ping(3),))
    book.timer(T0 + 4.0).expect(sent=(Ping(4),))  # the LL silent since T0 + 1.1
    lost = book.timer(T0 + 4.1)._events
    assert len(lost) == 1 and isinstance(lost[0], SessionEnded) and lost[0].heartbeat_lost
    assert book.session.data_to_send() == b""


def test_the_session_core_imports_no_io() -> None:
    """Checked in a fresh interpreter: what the core imports, transitively."""
    code = (
        "import sys; before = set(sys.modules)\n"
        "import tcpgc.protocol.agent_session, tcpgc.protocol.backoff\n"
        "new = set(sys.modules) - before\n"
        "print(sorted(m for m in new if m.split('.')[0] in "
        "{'asyncio', 'socket', 'ssl', 'time', 'selectors'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"
    # The interpreter loads `time` itself: that one is checked in the sources.
    for module in (agent_session, ready_offer, backoff):
        tree = ast.parse(Path(module.__file__ or "").read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & {"asyncio", "socket", "ssl", "time", "random"}, module.__name__
