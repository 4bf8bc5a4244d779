"""The LL's session core without I/O (`tcpgc.protocol.ll_session`, `ll_pairing`), driven
with bytes and a fake clock, playbook-style: what the agent sends in, what the LL sends
out and which events it raises, and what happens when a deadline passes."""

from __future__ import annotations

import os

import pytest

from tcpgc.errors import BadDataConnection, ProtocolError, WrongTransport
from tcpgc.protocol.frame_auth import CONTROL, FrameAuth, frame_auth, offer_context
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.handshake import data_proof, error_code, pool_proof
from tcpgc.protocol.ll_pairing import (
    MAX_READY,
    Answer,
    Opening,
    PairingTable,
    ReadyOffers,
    accept_pool,
    classify_answer,
    classify_opening,
    classify_reoffer,
    refuse_tls_record,
)
from tcpgc.protocol.ll_session import (
    MISSED_HEARTBEATS,
    LLControlSession,
    OpenRefused,
    SessionEnded,
)
from tcpgc.protocol.messages import (
    MAX_VERSION,
    Auth,
    Challenge,
    Data,
    Error,
    ErrorCode,
    Hello,
    Message,
    Open,
    OpenFailed,
    Ping,
    Pong,
    Pool,
    Ready,
    Retire,
    encode,
)

HEARTBEAT = 10.0
KEY = bytes(range(32))
BINDING = b"\x11" * 32
AGENT = b"\xaa" * 16


class Playbook:
    """One control session and the agent's end of its wire, on a fake clock."""

    def __init__(self, *, plaintext: bool = False, now: float = 100.0) -> None:
        self.now = now
        self.agent_auth = frame_auth(KEY, CONTROL, agent=True) if plaintext else None
        ll_auth = frame_auth(KEY, CONTROL, agent=False) if plaintext else None
        self.session = LLControlSession(
            agent_id="aaaaaaaaaaaa", peer="192.0.2.7:4000", heartbeat=HEARTBEAT, now=now,
            auth=ll_auth,
        )  # fmt: skip
        self.decoder = FrameDecoder()
        self.decoder.auth = self.agent_auth

    def send(self, *messages: Message) -> Playbook:
        """`>>` the agent sends these, at the current time."""
        data = b"".join(encode(m, self.agent_auth) for m in messages)
        self.session.receive_data(data, self.now)
        return self

    def received(self) -> list[Message]:
        """`<<` what the LL sent since the last call, as the agent decodes it."""
        self.decoder.receive_data(self.session.data_to_send())
        out = []
        while (message := self.decoder.next_message()) is not None:
            out.append(message)
        return out

    def events(self) -> list[object]:
        out = []
        while (event := self.session.next_event()) is not None:
            out.append(event)
        return out

    def advance_to_deadline(self) -> None:
        deadline = self.session.next_deadline()
        assert deadline is not None
        self.now = deadline
        self.session.handle_timer(self.now)


# ---- control session: every message --------------------------------------------------


@pytest.mark.parametrize("plaintext", [False, True])
def test_ping_is_answered_with_pong(plaintext: bool) -> None:
    play = Playbook(plaintext=plaintext)
    play.send(Ping(41), Ping(42))
    assert play.received() == [Pong(41), Pong(42)]
    assert play.events() == []


def test_pong_moves_the_silence_deadline_and_answers_nothing() -> None:
    play = Playbook()
    start = play.now
    play.now += HEARTBEAT * 2.5
    play.send(Pong(0))
    assert play.received() == []
    play.session.handle_timer(start + MISSED_HEARTBEATS * HEARTBEAT)
    assert play.session.ended is None
    play.session.handle_timer(play.now + MISSED_HEARTBEATS * HEARTBEAT)
    assert play.session.ended is not None and play.session.ended.by_heartbeat


def test_open_failed_becomes_an_event_with_a_printable_reason() -> None:
    play = Playbook()
    conn_id = os.urandom(16)
    play.send(OpenFailed(conn_id, "server down\n\x1b[31mfake log line"))
    [event] = play.events()
    assert isinstance(event, OpenRefused) and event.conn_id == conn_id
    assert event.reason.startswith("agent could not serve it: server down")
    assert "\n" not in event.reason and "\x1b" not in event.reason
    assert play.session.ended is None


def test_offer_sends_open() -> None:
    play = Playbook(plaintext=True)
    message = Open(os.urandom(16), "web", "198.51.100.1", 5000, "127.0.0.1", 8000)
    play.session.offer(message)
    assert play.received() == [message]


UNEXPECTED: list[Message] = [
    Hello(2, 2, bytes(8), bytes(32)),
    Challenge(2, bytes(32), bytes(32)),
    Auth(bytes(32), bytes(16), ("web",)),
    Ready(1000, ("web",)),
    Error(ErrorCode.BAD_MESSAGE, "no"),
    Open(bytes(16), "web"),
    Data(2, bytes(16), bytes(32)),
    Pool(bytes(16), 1, bytes(32)),
    Retire(),
]


@pytest.mark.parametrize("message", UNEXPECTED, ids=lambda m: m.TYPE.name)
def test_unexpected_message_ends_the_session_with_error(message: Message) -> None:
    play = Playbook()
    play.send(message, Ping(1))  # nothing after it is acted on
    assert play.received() == [Error(ErrorCode.BAD_MESSAGE, f"unexpected {message.TYPE.name}")]
    [event] = play.events()
    assert event == SessionEnded(
        f"agent aaaaaaaaaaaa sent unexpected {message.TYPE.name}: closing its session"
    )
    assert play.session.next_deadline() is None


# ---- control session: refusals and the end of the stream -----------------------------


def test_malformed_frame_ends_the_session() -> None:
    play = Playbook()
    play.session.receive_data(bytes([200, 0, 0]), play.now)
    [event] = play.events()
    assert isinstance(event, SessionEnded) and event.warning and not event.by_heartbeat
    assert event.reason == (
        "agent aaaaaaaaaaaa at 192.0.2.7:4000 sent a bad message: unknown message type 200"
    )


def test_forged_frame_in_plaintext_ends_the_session() -> None:
    play = Playbook(plaintext=True)
    play.agent_auth = FrameAuth(os.urandom(32), os.urandom(32))  # not the session's keys
    play.send(Ping(1))
    assert play.received() == []
    [event] = play.events()
    assert isinstance(event, SessionEnded) and "failed its MAC check" in event.reason


def test_replayed_frame_in_plaintext_ends_the_session() -> None:
    play = Playbook(plaintext=True)
    assert play.agent_auth is not None
    frame = encode(Ping(1), play.agent_auth)
    play.session.receive_data(frame, play.now)
    assert play.received() == [Pong(1)]
    play.session.receive_data(frame, play.now)
    [event] = play.events()
    assert isinstance(event, SessionEnded) and "replayed" in event.reason


def test_clean_end_of_stream_is_a_disconnect_not_a_warning() -> None:
    play = Playbook()
    play.session.receive_data(b"", play.now)
    assert play.events() == [
        SessionEnded("agent aaaaaaaaaaaa at 192.0.2.7:4000 disconnected", warning=False)
    ]


def test_end_of_stream_mid_frame_is_a_bad_message() -> None:
    play = Playbook()
    play.session.receive_data(encode(Ping(1))[:5], play.now)
    assert play.events() == []
    play.session.receive_data(b"", play.now)
    [event] = play.events()
    assert isinstance(event, SessionEnded) and event.warning
    assert "closed in the middle of a frame (5 bytes)" in event.reason


def test_bytes_one_at_a_time_and_leftover_from_the_handshake() -> None:
    frames = encode(Ping(1)) + encode(Ping(2))
    session = LLControlSession(
        agent_id="a", peer="p", heartbeat=HEARTBEAT, now=0.0, received=frames[:4]
    )
    for i in range(4, len(frames)):
        session.receive_data(frames[i : i + 1], 0.0)
    decoder = FrameDecoder()
    decoder.receive_data(session.data_to_send())
    assert [decoder.next_message(), decoder.next_message()] == [Pong(1), Pong(2)]


def test_nothing_is_done_after_the_end() -> None:
    play = Playbook()
    play.session.close("replaced")
    play.send(Ping(1))
    play.session.offer(Open(bytes(16), "web"))
    play.session.handle_timer(play.now + 1000)
    assert play.received() == []
    assert play.events() == [SessionEnded("replaced", warning=False)]
    assert play.session.next_deadline() is None


# ---- control session: every timeout ---------------------------------------------------


def test_ping_every_heartbeat_with_growing_tokens() -> None:
    play = Playbook()
    start = play.now
    for token in range(3):
        play.send(Pong(token))  # an agent that answers stays
        play.advance_to_deadline()
        assert play.received() == [Ping(token)]
        assert play.now == pytest.approx(start + (token + 1) * HEARTBEAT)
    assert play.events() == []


def test_a_timer_before_its_deadline_does_nothing() -> None:
    play = Playbook()
    play.session.handle_timer(play.now + HEARTBEAT / 2)
    assert play.received() == [] and play.events() == []


def test_silent_agent_is_dropped_after_three_heartbeats() -> None:
    play = Playbook()
    start = play.now
    pings = []
    while play.session.ended is None:
        play.advance_to_deadline()
        pings += play.received()
    assert pings == [Ping(0), Ping(1)]  # the third heartbeat is the silence deadline
    assert play.now == start + MISSED_HEARTBEATS * HEARTBEAT
    assert play.events() == [
        SessionEnded(
            "agent aaaaaaaaaaaa at 192.0.2.7:4000 silent for 30 s: dropping it",
            by_heartbeat=True,
        )
    ]


def test_agent_that_reads_nothing_is_dropped_as_such() -> None:
    play = Playbook()
    play.session.write_blocked = True  # the caller stopped reading it: nothing comes in
    play.now += MISSED_HEARTBEATS * HEARTBEAT
    play.session.handle_timer(play.now)
    [event] = play.events()
    assert isinstance(event, SessionEnded) and event.by_heartbeat
    assert "reads nothing we send for 30 s" in event.reason


def test_any_message_resets_the_silence_deadline() -> None:
    play = Playbook()
    play.now += MISSED_HEARTBEATS * HEARTBEAT - 1
    play.send(Ping(9))
    play.now += MISSED_HEARTBEATS * HEARTBEAT - 1
    play.session.handle_timer(play.now)
    assert play.session.ended is None


# ---- pairing: DATA claims a waiting client ---------------------------------------------


def _table(deadline: float = 50.0) -> tuple[PairingTable[str], bytes, object]:
    table: PairingTable[str] = PairingTable()
    conn_id, agent = os.urandom(16), object()
    table.expect(
        conn_id, service="web", agent=agent, session_key=KEY, deadline=deadline, client="c1"
    )
    return table, conn_id, agent


def _data(conn_id: bytes, key: bytes = KEY, binding: bytes = BINDING) -> Data:
    return Data(MAX_VERSION, conn_id, data_proof(key, conn_id, binding))


def test_claim_with_its_proof_takes_the_client_once() -> None:
    table, conn_id, agent = _table()
    waiting = table.claim(_data(conn_id), BINDING, now=10.0)
    assert waiting.client == "c1" and waiting.agent is agent and waiting.service == "web"
    with pytest.raises(BadDataConnection, match="already used") as used:
        table.claim(_data(conn_id), BINDING, now=10.0)
    assert used.value.reason == "bad_data_id"
    assert len(table) == 0


@pytest.mark.parametrize(
    ("key", "binding"),
    [(os.urandom(32), BINDING), (KEY, os.urandom(32))],
    ids=["other-session", "other-certificate"],
)
def test_forged_claim_does_not_use_up_the_id(key: bytes, binding: bytes) -> None:
    table, conn_id, _ = _table()
    with pytest.raises(BadDataConnection, match="bad proof") as forged:
        table.claim(_data(conn_id, key, binding), BINDING, now=10.0)
    assert forged.value.reason == "certificate"
    assert table.claim(_data(conn_id), BINDING, now=10.0).client == "c1"


def test_unknown_expired_and_wrong_version_claims_are_refused() -> None:
    table, conn_id, _ = _table(deadline=50.0)
    with pytest.raises(BadDataConnection, match="unknown"):
        table.claim(_data(os.urandom(16)), BINDING, now=10.0)
    with pytest.raises(BadDataConnection, match="expired"):
        table.claim(_data(conn_id), BINDING, now=50.0)
    with pytest.raises(ProtocolError, match="speaks version 1") as old:
        table.claim(Data(1, conn_id, bytes(32)), BINDING, now=10.0)
    assert old.value.reason == "version"
    assert error_code(old.value) is ErrorCode.BAD_MESSAGE  # what the peer is told


def test_open_failed_only_from_the_agent_it_was_offered_to() -> None:
    table, conn_id, agent = _table()
    assert table.refuse(conn_id, object()) is None
    assert conn_id in table
    refused = table.refuse(conn_id, agent)
    assert refused is not None and refused.client == "c1"
    assert conn_id not in table
    with pytest.raises(BadDataConnection):  # a refused client cannot be claimed after
        table.claim(_data(conn_id), BINDING, now=10.0)


def test_expiry_agent_loss_and_forgetting() -> None:
    table, first, agent = _table(deadline=50.0)
    other_agent, second = object(), os.urandom(16)
    table.expect(
        second, service="web", agent=other_agent, session_key=KEY, deadline=70.0, client="c2"
    )
    with pytest.raises(ValueError):
        table.expect(second, service="web", agent=agent, session_key=KEY, deadline=1, client="")
    assert table.next_deadline() == 50.0
    assert table.expire(49.9) == []
    assert [w.client for w in table.expire(50.0)] == ["c1"]
    assert table.next_deadline() == 70.0
    assert table.agent_gone(agent) == []
    assert [w.client for w in table.agent_gone(other_agent)] == ["c2"]
    assert table.next_deadline() is None
    table.forget(second)  # twice is harmless
    assert len(table) == 0


# ---- POOL: proof first, then the replay window, then MAX_READY --------------------------


def _pool(counter: int, key: bytes = KEY, binding: bytes = BINDING) -> Pool:
    return Pool(AGENT, counter, pool_proof(key, AGENT, counter, binding))


def test_pool_accepted_once_per_counter() -> None:
    offers: ReadyOffers[str] = ReadyOffers(AGENT, KEY)
    assert offers.accept(_pool(1), BINDING, plaintext=False) is None
    assert offers.accept(_pool(3), BINDING, plaintext=False) is None
    assert offers.accept(_pool(2), BINDING, plaintext=False) is None  # out of order is fine
    with pytest.raises(ProtocolError, match="bad or replayed"):
        offers.accept(_pool(2), BINDING, plaintext=False)


def test_forged_pool_does_not_move_the_replay_window() -> None:
    offers: ReadyOffers[str] = ReadyOffers(AGENT, KEY)
    far = 10_000
    with pytest.raises(ProtocolError, match="bad or replayed"):
        offers.accept(_pool(far, key=os.urandom(32)), BINDING, plaintext=False)
    with pytest.raises(ProtocolError, match="bad or replayed"):
        offers.accept(_pool(far, binding=os.urandom(32)), BINDING, plaintext=False)
    # Had the forged numbers counted, 1 would now be far below the window.
    assert offers.accept(_pool(1), BINDING, plaintext=False) is None


def test_pool_for_no_session_is_refused() -> None:
    with pytest.raises(ProtocolError, match="no session here"):
        accept_pool(None, _pool(1), BINDING, plaintext=False)


def test_pool_in_plaintext_gives_the_offer_frame_macs() -> None:
    offers: ReadyOffers[str] = ReadyOffers(AGENT, KEY)
    ll_auth = accept_pool(offers, _pool(5), BINDING, plaintext=True)
    assert ll_auth is not None
    agent_auth = frame_auth(KEY, offer_context(5), agent=True)
    frame = encode(Data(MAX_VERSION, bytes(16), bytes(32)), agent_auth)
    decoder = FrameDecoder()
    decoder.auth = ll_auth
    decoder.receive_data(frame)
    assert isinstance(decoder.next_message(), Data)


def test_at_most_max_ready_connections_oldest_dropped_first() -> None:
    offers: ReadyOffers[int] = ReadyOffers(AGENT, KEY)
    assert [offers.park(i) for i in range(MAX_READY)] == [None] * MAX_READY
    assert offers.park(MAX_READY) == 0
    assert len(offers) == MAX_READY
    assert offers.take() == 1
    assert offers.drain() == list(range(2, MAX_READY + 1))
    assert offers.take() is None


# ---- answers on a ready connection ------------------------------------------------------


def test_every_answer_on_a_ready_connection() -> None:
    conn_id = os.urandom(16)

    def verdict(reply: Message | None) -> Answer:
        return classify_answer(reply, conn_id, KEY, BINDING).answer

    assert verdict(_data(conn_id)) is Answer.TAKEN
    assert verdict(_data(conn_id, key=os.urandom(32))) is Answer.BAD_PROOF
    assert verdict(_data(conn_id, binding=os.urandom(32))) is Answer.BAD_PROOF
    assert verdict(_data(os.urandom(16))) is Answer.CLOSED  # another client's id
    assert verdict(Retire()) is Answer.RETIRED
    assert verdict(OpenFailed(os.urandom(16), "x")) is Answer.CLOSED
    assert verdict(Ping(1)) is Answer.CLOSED
    assert verdict(None) is Answer.CLOSED
    refused = classify_answer(OpenFailed(conn_id, "down\r\n"), conn_id, KEY, BINDING)
    assert refused.answer is Answer.REFUSED
    assert refused.reason == "agent could not serve it: down\\r\\n"


# ---- the first frame on the agent port ---------------------------------------------------


def test_first_frame_starts_a_session_a_claim_or_a_ready_connection() -> None:
    assert classify_opening(Hello(2, 2, bytes(8), bytes(32))) is Opening.CONTROL
    assert classify_opening(_data(bytes(16))) is Opening.CLAIM
    assert classify_opening(_pool(1)) is Opening.READY
    assert classify_opening(None) is Opening.CLOSED
    with pytest.raises(ProtocolError, match="unexpected PING as first message"):
        classify_opening(Ping(7))
    assert classify_reoffer(_pool(2)) is Opening.READY
    assert classify_reoffer(None) is Opening.CLOSED
    with pytest.raises(ProtocolError, match="unexpected DATA on a used data connection"):
        classify_reoffer(_data(bytes(16)))


TLS_CLIENT_HELLO_START = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01])


def test_tls_client_hello_to_a_plaintext_ll_is_named() -> None:
    decoder = FrameDecoder(first_type=refuse_tls_record)
    decoder.receive_data(TLS_CLIENT_HELLO_START)
    with pytest.raises(WrongTransport) as wrong:
        decoder.next_message()
    assert str(wrong.value) == (
        "peer speaks TLS but this LL runs with --insecure-plaintext (both sides must agree)"
    )
    assert wrong.value.reason == "tls"


def test_only_the_first_frame_is_vetted() -> None:
    decoder = FrameDecoder(first_type=refuse_tls_record)
    decoder.receive_data(encode(Ping(1)) + TLS_CLIENT_HELLO_START)
    assert decoder.next_message() == Ping(1)
    with pytest.raises(ProtocolError, match="unknown message type 22") as later:
        decoder.next_message()
    assert not isinstance(later.value, WrongTransport)
