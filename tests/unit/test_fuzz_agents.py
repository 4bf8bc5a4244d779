"""Property tests for what agents with credentials of their own put on the wire: AUTH's
exposed ports and READY's refusals decode from anything or fail only with the protocol
error, round-trip when well formed, and the proof covers every exposed port.

Examples per test: $TCPGC_FUZZ_EXAMPLES (100 by default), as in test_fuzz.py.
"""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_settings import fuzz, names, timeout
from tcpgc.errors import AuthenticationError, ProtocolError
from tcpgc.protocol.fields import MAX_REFUSAL_TEXT
from tcpgc.protocol.handshake import AgentHandshake, LLHandshake, key_id
from tcpgc.protocol.messages import (
    AGENT_ID_SIZE,
    MAX_EXPOSES,
    MAX_REFUSALS,
    PROOF_SIZE,
    Auth,
    MessageType,
    Ready,
    decode,
    exposes_blob,
)

pytestmark = timeout

SECRET = bytes(range(32))
ports = st.integers(1, 65535)
hosts = st.sampled_from(["", "127.0.0.1", "::1", "10.1.2.3", "2001:db8::7"])
exposes = st.lists(st.tuples(hosts, ports), max_size=MAX_EXPOSES).map(tuple)
refusal_subjects = st.one_of(names, ports.map(lambda p: f":{p}"))
refusals = st.lists(st.tuples(refusal_subjects, st.text(max_size=300)), max_size=MAX_REFUSALS).map(
    tuple
)


def _auth_payload(tail: bytes) -> bytes:
    return bytes(PROOF_SIZE) + bytes(AGENT_ID_SIZE) + b"\x00" + tail


@fuzz
@given(st.binary(max_size=400))
def test_ready_from_random_bytes_decodes_or_is_a_protocol_error(payload: bytes) -> None:
    try:
        message = decode(MessageType.READY, payload)
    except ProtocolError:
        return
    assert isinstance(message, Ready)
    assert len(message.refusals) <= MAX_REFUSALS
    assert all(len(why.encode()) <= MAX_REFUSAL_TEXT * 3 for _, why in message.refusals)


@fuzz
@given(st.integers(0, 2**32 - 1), st.binary(max_size=300))
def test_ready_refusals_after_a_valid_head_fail_only_cleanly(beat: int, tail: bytes) -> None:
    try:
        decode(MessageType.READY, struct.pack("!I", beat) + b"\x00" + tail)
    except ProtocolError:
        pass


@fuzz
@given(st.integers(0, 2**32 - 1), st.lists(names, max_size=5).map(tuple), refusals)
def test_ready_refusals_round_trip(beat: int, services: tuple[str, ...], why: tuple) -> None:
    back = decode(MessageType.READY, Ready(beat, services, why).payload())
    assert isinstance(back, Ready) and back.services == services
    assert [s for s, _ in back.refusals] == [s for s, _ in why]
    for (_, sent), (_, got) in zip(why, back.refusals, strict=True):
        assert len(got.encode()) <= MAX_REFUSAL_TEXT and sent.startswith(got)


@fuzz
@given(st.binary(max_size=400))
def test_auth_exposes_from_random_bytes_decode_or_fail_cleanly(tail: bytes) -> None:
    try:
        message = decode(MessageType.AUTH, _auth_payload(tail))
    except ProtocolError:
        return
    assert isinstance(message, Auth)
    assert len(message.exposes) <= MAX_EXPOSES
    assert len(message.udp_exposes) <= MAX_EXPOSES
    assert all(0 < port < 65536 for _, port in message.exposes + message.udp_exposes)


@fuzz
@given(exposes)
def test_auth_exposes_round_trip(asked: tuple[tuple[str, int], ...]) -> None:
    auth = Auth(bytes(PROOF_SIZE), bytes(AGENT_ID_SIZE), ("web",), asked)
    back = decode(MessageType.AUTH, auth.payload())
    assert isinstance(back, Auth) and back.exposes == asked


@fuzz
@given(exposes, exposes)
def test_auth_udp_exposes_round_trip_apart_from_the_tcp_ones(
    tcp: tuple[tuple[str, int], ...], udp: tuple[tuple[str, int], ...]
) -> None:
    auth = Auth(bytes(PROOF_SIZE), bytes(AGENT_ID_SIZE), ("web",), tcp, udp)
    back = decode(MessageType.AUTH, auth.payload())
    assert isinstance(back, Auth) and (back.exposes, back.udp_exposes) == (tcp, udp)


@pytest.mark.parametrize(
    "tail",
    [
        b"\x01\x00\x00\x00",  # port 0
        b"\x01\x09127.0.0.1\x00\x00",  # port 0 on an address
        bytes([MAX_EXPOSES + 1]) + b"\x00\x1f\x40" * (MAX_EXPOSES + 1),
        b"\xff" + b"\x00\x1f\x40" * 255,
        b"\x01\x00\x1f",  # a port cut short
        b"\x01\x00\x1f\x40\x00\x00",  # a byte too many (after the empty UDP list)
        b"\x00\x01\x00\x00\x00",  # UDP port 0
        b"\x00\x01\x00\x1f",  # a UDP port cut short
        b"\x00" + bytes([MAX_EXPOSES + 1]) + b"\x00\x1f\x40" * (MAX_EXPOSES + 1),
        b"\x01\x04\xff\xfe\xfd\xfc\x1f\x40",  # an address that is not text
        b"\x01\x0f127.0.0.1%eth0\x1f\x40",  # a scoped address
    ],
)
def test_bad_exposes_are_protocol_errors(tail: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(MessageType.AUTH, _auth_payload(tail))


def test_a_port_past_65535_cannot_be_sent() -> None:
    with pytest.raises((ValueError, struct.error)):
        exposes_blob((("", 65536),))
    with pytest.raises((ValueError, struct.error)):
        exposes_blob((("", 8000),) * (MAX_EXPOSES + 1))


def _challenge_and_auth(asked: tuple[tuple[str, int], ...]) -> tuple[LLHandshake, Auth]:
    agent = AgentHandshake(SECRET, services=("web",), exposes=asked, binding=b"b" * 32)
    ll = LLHandshake(
        {key_id(SECRET): SECRET}, heartbeat_ms=1000, binding=b"b" * 32,
        grant=lambda kid, request: ((), ()),
    )  # fmt: skip
    challenge = ll.receive(decode(MessageType.HELLO, agent.start().payload()))
    auth = agent.receive(decode(challenge.TYPE, challenge.payload()))
    assert isinstance(auth, Auth)
    return ll, auth


@fuzz
@given(st.lists(st.tuples(hosts, ports), min_size=1, max_size=8).map(tuple), st.data())
def test_any_change_to_the_exposes_after_the_proof_is_refused(
    asked: tuple[tuple[str, int], ...], data: st.DataObject
) -> None:
    ll, auth = _challenge_and_auth(asked)
    changed = data.draw(exposes.filter(lambda other: other != asked), label="changed")
    forged = dataclasses.replace(auth, exposes=changed)
    with pytest.raises(AuthenticationError):
        ll.receive(decode(MessageType.AUTH, forged.payload()))


def test_duplicates_pass_the_decoder_and_are_left_to_the_grant() -> None:
    """The decoder keeps a repeated port; the LL's grant refuses it ("declared twice",
    see tests/sockets/test_exposes.py). What the grant is asked is what was proven."""
    asked = (("", 8000), ("127.0.0.1", 8000))
    seen: list[object] = []
    ll, auth = _challenge_and_auth(asked)
    ll._grant = lambda kid, request: seen.append(request) or ((), ())  # type: ignore[assignment]
    ll.receive(decode(MessageType.AUTH, auth.payload()))
    assert seen == [(("web",), asked, ())]


@fuzz
@given(exposes.filter(bool))
def test_moving_exposes_between_the_tcp_and_the_udp_list_breaks_the_proof(
    asked: tuple[tuple[str, int], ...],
) -> None:
    """The proof covers which protocol each port is asked for: nobody in between can
    turn an agent's TCP port into a UDP one, or the other way round."""
    ll, auth = _challenge_and_auth(asked)
    forged = dataclasses.replace(auth, exposes=(), udp_exposes=asked)
    with pytest.raises(AuthenticationError):
        ll.receive(decode(MessageType.AUTH, forged.payload()))
