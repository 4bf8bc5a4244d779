"""Sans-I/O tests of what binds a connection to its session: the per-frame MACs of
plaintext connections, the DATA and POOL proofs, and the transport in the handshake
transcript. Bytes in, messages or errors out; no sockets."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpgc.errors import AuthenticationError, ProtocolError
from tcpgc.protocol.frame_auth import CONTROL, TAG_SIZE, FrameAuth, frame_auth, offer_context
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.handshake import (
    AgentHandshake,
    LLHandshake,
    data_proof,
    key_id,
    pool_proof,
)
from tcpgc.protocol.messages import (
    HEADER,
    Error,
    ErrorCode,
    Message,
    Open,
    OpenFailed,
    Ping,
    encode,
)

SESSION_KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
CONN_ID = b"\x07" * 16
CERT = b"\x42" * 32
OTHER_CERT = b"\x43" * 32
MESSAGES: list[Message] = [
    Open(CONN_ID, "web", "192.0.2.1", 4000, "198.51.100.2", 443),
    Ping(1),
    OpenFailed(CONN_ID, "server down"),
    Error(ErrorCode.BAD_MESSAGE, "bye"),
]


def pair(context: bytes = CONTROL) -> tuple[FrameAuth, FrameAuth]:
    """(the LL's, the agent's) FrameAuth of one connection."""
    return (
        frame_auth(SESSION_KEY, context, agent=False),
        frame_auth(SESSION_KEY, context, agent=True),
    )


def receive(auth: FrameAuth, stream: bytes, *, one_byte_at_a_time: bool = False) -> list[Message]:
    decoder = FrameDecoder()
    decoder.auth = auth
    chunks = [stream[i : i + 1] for i in range(len(stream))] if one_byte_at_a_time else [stream]
    out = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        while (message := decoder.next_message()) is not None:
            out.append(message)
    return out


@pytest.mark.parametrize("one_byte", [False, True])
def test_sealed_frames_arrive_in_both_directions(one_byte: bool) -> None:
    ll, agent = pair()
    to_agent = b"".join(encode(m, ll) for m in MESSAGES)
    assert receive(agent, to_agent, one_byte_at_a_time=one_byte) == MESSAGES
    ll2, agent2 = pair()
    to_ll = b"".join(encode(m, agent2) for m in MESSAGES)
    assert receive(ll2, to_ll, one_byte_at_a_time=one_byte) == MESSAGES


def test_each_frame_carries_a_tag() -> None:
    ll, _ = pair()
    assert len(encode(Ping(1), ll)) == len(encode(Ping(1))) + TAG_SIZE


def test_injected_unsealed_frame_is_refused() -> None:
    """An attacker on the path without the session key cannot inject an OPEN."""
    _, agent = pair()
    with pytest.raises(ProtocolError, match="MAC"):
        receive(agent, encode(MESSAGES[0]))


def test_frame_with_a_guessed_tag_is_refused() -> None:
    _, agent = pair()
    payload = MESSAGES[0].payload() + os.urandom(TAG_SIZE)
    frame = HEADER.pack(MESSAGES[0].TYPE, len(payload)) + payload
    with pytest.raises(ProtocolError, match="MAC"):
        receive(agent, frame)


@pytest.mark.parametrize("position", ["type", "payload", "tag"])
def test_any_changed_byte_is_refused(position: str) -> None:
    ll, agent = pair()
    frame = bytearray(encode(MESSAGES[2], ll))
    index = {"type": 0, "payload": HEADER.size + 3, "tag": len(frame) - 1}[position]
    frame[index] ^= 0x01 if position != "type" else (MESSAGES[2].TYPE ^ MESSAGES[1].TYPE)
    with pytest.raises(ProtocolError):
        receive(agent, bytes(frame))


def test_replayed_frame_is_refused() -> None:
    ll, agent = pair()
    first = encode(Ping(1), ll)
    decoder = FrameDecoder()
    decoder.auth = agent
    decoder.receive_data(first)
    assert decoder.next_message() == Ping(1)
    decoder.receive_data(first)
    with pytest.raises(ProtocolError, match="MAC"):
        decoder.next_message()


def test_reordered_or_dropped_frames_are_refused() -> None:
    ll, agent = pair()
    first, second = encode(Ping(1), ll), encode(Ping(2), ll)
    with pytest.raises(ProtocolError, match="MAC"):
        receive(agent, second + first)
    _, agent = pair()
    with pytest.raises(ProtocolError, match="MAC"):
        receive(agent, second)  # the first one was dropped


def test_frame_reflected_back_to_its_sender_is_refused() -> None:
    ll, _ = pair()
    ll_again, _ = pair()
    with pytest.raises(ProtocolError, match="MAC"):
        receive(ll_again, encode(Ping(1), ll))


def test_frame_moved_to_another_connection_or_session_is_refused() -> None:
    ll, _ = pair(CONTROL)
    frame = encode(MESSAGES[0], ll)
    _, offer_agent = pair(offer_context(1))
    with pytest.raises(ProtocolError, match="MAC"):
        receive(offer_agent, frame)
    offered_ll, _ = pair(offer_context(1))
    _, next_offer = pair(offer_context(2))
    with pytest.raises(ProtocolError, match="MAC"):
        receive(next_offer, encode(MESSAGES[0], offered_ll))
    other_session = frame_auth(OTHER_KEY, CONTROL, agent=True)
    with pytest.raises(ProtocolError, match="MAC"):
        receive(other_session, frame)


@settings(deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_to_a_sealed_decoder_parse_or_raise_the_protocol_error(data: bytes) -> None:
    _, agent = pair()
    try:
        receive(agent, data)
    except ProtocolError:
        pass


@settings(deadline=None)
@given(st.data())
def test_any_change_to_a_sealed_stream_is_detected(data: st.DataObject) -> None:
    ll, agent = pair()
    stream = bytearray(b"".join(encode(m, ll) for m in MESSAGES))
    index = data.draw(st.integers(0, len(stream) - 1))
    stream[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ProtocolError):
        messages = receive(agent, bytes(stream))
        # A changed length can leave the stream cut short: no forged frame came out.
        assert messages == MESSAGES[: len(messages)]
        raise ProtocolError("cut short")


def test_data_proof_binds_session_connection_and_certificate() -> None:
    proof = data_proof(SESSION_KEY, CONN_ID, CERT)
    assert proof == data_proof(SESSION_KEY, CONN_ID, CERT)
    assert proof != data_proof(OTHER_KEY, CONN_ID, CERT)
    assert proof != data_proof(SESSION_KEY, b"\x08" * 16, CERT)
    assert proof != data_proof(SESSION_KEY, CONN_ID, OTHER_CERT)
    # Another label: a ready connection's proof is never a data connection's.
    assert proof != pool_proof(SESSION_KEY, CONN_ID, 0, CERT)


def test_pool_proof_binds_the_certificate_seen_on_that_connection() -> None:
    agent_id = b"\x03" * 16
    assert pool_proof(SESSION_KEY, agent_id, 5, CERT) != pool_proof(
        SESSION_KEY, agent_id, 5, OTHER_CERT
    )


def test_transport_is_bound_into_the_handshake() -> None:
    """An agent that meant TLS and an LL that meant plaintext (or the reverse) never
    agree on a session, even over the same certificate fingerprint."""
    secret = os.urandom(32)
    for agent_tls in (True, False):
        agent = AgentHandshake(secret, services=("web",), binding=CERT, tls=agent_tls)
        ll = LLHandshake(
            {key_id(secret): secret}, heartbeat_ms=1000, binding=CERT, tls=not agent_tls
        )
        challenge = ll.receive(agent.start())
        with pytest.raises(AuthenticationError):
            agent.receive(challenge)
