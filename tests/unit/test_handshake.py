"""The mutual challenge-response, driven through the real frame codec (sans-I/O)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from tcpgc.errors import AuthenticationError, PeerRefused, ProtocolError
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.handshake import (
    AgentHandshake,
    LLHandshake,
    State,
    VersionMismatch,
    error_code,
    key_id,
    pool_proof,
)
from tcpgc.protocol.messages import (
    MAX_VERSION,
    MIN_VERSION,
    NONCE_SIZE,
    Auth,
    Challenge,
    Error,
    ErrorCode,
    Hello,
    Message,
    Ping,
    Ready,
    encode,
)

SECRET = bytes(range(1, 33))
OTHER_SECRET = bytes(range(101, 133))
AGENT_ID = b"A" * 16
SERVICES = ("ssh", "web")
BINDING = b"\x42" * 32
HEARTBEAT = 15000
CC_NONCE = b"\x11" * NONCE_SIZE
LL_NONCE = b"\x22" * NONCE_SIZE


def make_agent(**overrides: object) -> AgentHandshake:
    kwargs: dict[str, object] = {
        "services": SERVICES,
        "agent_id": AGENT_ID,
        "binding": BINDING,
        "nonce": CC_NONCE,
    }
    kwargs.update(overrides)
    secret = kwargs.pop("secret", SECRET)
    return AgentHandshake(secret, **kwargs)  # type: ignore[arg-type]


def make_ll(**overrides: object) -> LLHandshake:
    kwargs: dict[str, object] = {"heartbeat_ms": HEARTBEAT, "binding": BINDING, "nonce": LL_NONCE}
    kwargs.update(overrides)
    secrets_by_id = kwargs.pop("secrets_by_id", {key_id(SECRET): SECRET})
    return LLHandshake(secrets_by_id, **kwargs)  # type: ignore[arg-type]


def wire(message: Message, *, one_byte: bool = False) -> Message:
    """Send `message` through encode + FrameDecoder, as a peer would receive it."""
    data = encode(message)
    decoder = FrameDecoder()
    received: list[Message] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if one_byte else [data]
    for chunk in chunks:
        decoder.receive_data(chunk)
        while (m := decoder.next_message()) is not None:
            received.append(m)
    assert decoder.leftover() == b""
    assert received == [message]
    return received[0]


class Transcript:
    """Every byte each side put on the wire."""

    def __init__(self) -> None:
        self.to_ll: list[bytes] = []
        self.to_agent: list[bytes] = []

    def all_bytes(self) -> bytes:
        return b"".join(self.to_ll + self.to_agent)


def run(
    agent: AgentHandshake, ll: LLHandshake, *, one_byte: bool = False
) -> tuple[Transcript, Hello, Challenge, Auth, Ready]:
    """A complete handshake, every message crossing the real codec."""
    t = Transcript()
    hello = agent.start()
    t.to_ll.append(encode(hello))
    challenge = ll.receive(wire(hello, one_byte=one_byte))
    assert isinstance(challenge, Challenge)
    t.to_agent.append(encode(challenge))
    auth = agent.receive(wire(challenge, one_byte=one_byte))
    assert isinstance(auth, Auth)
    t.to_ll.append(encode(auth))
    ready = ll.receive(wire(auth, one_byte=one_byte))
    assert isinstance(ready, Ready)
    t.to_agent.append(encode(ready))
    assert agent.receive(wire(ready, one_byte=one_byte)) is None
    return t, hello, challenge, auth, ready


def flip(data: bytes, index: int = 0, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


# -- success --------------------------------------------------------------------------


@pytest.mark.parametrize("one_byte", [False, True], ids=["whole", "one-byte"])
def test_full_handshake(one_byte: bool) -> None:
    agent, ll = make_agent(), make_ll()
    run(agent, ll, one_byte=one_byte)
    assert agent.state is State.DONE
    assert ll.state is State.DONE
    assert agent.version == ll.version == MAX_VERSION
    assert ll.services == SERVICES
    assert ll.agent_id == agent.agent_id == AGENT_ID
    assert agent.heartbeat_ms == HEARTBEAT


def test_full_handshake_with_random_nonces_and_agent_id() -> None:
    agent = AgentHandshake(SECRET, services=("db",))
    ll = LLHandshake({key_id(SECRET): SECRET}, heartbeat_ms=1000)
    run(agent, ll)
    assert ll.state is State.DONE
    assert ll.agent_id == agent.agent_id
    assert len(agent.agent_id) == 16
    assert ll.services == ("db",)


def test_handshake_with_no_services() -> None:
    agent, ll = make_agent(services=()), make_ll()
    run(agent, ll)
    assert ll.services == ()
    assert ll.state is State.DONE


def test_ll_with_several_secrets_picks_the_agents() -> None:
    ll = make_ll(secrets_by_id={key_id(OTHER_SECRET): OTHER_SECRET, key_id(SECRET): SECRET})
    run(make_agent(), ll)
    assert ll.state is State.DONE


def test_hello_names_the_key_not_the_secret() -> None:
    hello = make_agent().start()
    assert hello.key_id == key_id(SECRET)
    assert len(hello.key_id) == 8
    assert key_id(SECRET) != key_id(OTHER_SECRET)
    assert hello.nonce == CC_NONCE
    assert (hello.min_version, hello.max_version) == (MIN_VERSION, MAX_VERSION)


def test_random_nonces_differ() -> None:
    a, b = AgentHandshake(SECRET, services=()), AgentHandshake(SECRET, services=())
    assert a.start().nonce != b.start().nonce
    ll1 = LLHandshake({key_id(SECRET): SECRET}, heartbeat_ms=1)
    ll2 = LLHandshake({key_id(SECRET): SECRET}, heartbeat_ms=1)
    hello = make_agent().start()
    c1, c2 = ll1.receive(hello), ll2.receive(hello)
    assert isinstance(c1, Challenge) and isinstance(c2, Challenge)
    assert c1.nonce != c2.nonce
    assert c1.proof != c2.proof


def test_secret_never_on_the_wire() -> None:
    t, *_ = run(make_agent(), make_ll())
    data = t.all_bytes()
    assert SECRET not in data
    # Not even a recognisable piece of it.
    for i in range(0, len(SECRET) - 8 + 1):
        assert SECRET[i : i + 8] not in data


def test_proofs_differ_by_direction() -> None:
    # The LL's proof must not be usable as the agent's (reflection).
    _, _, challenge, auth, _ = run(make_agent(), make_ll())
    assert challenge.proof != auth.proof


# -- tampering with the CHALLENGE -----------------------------------------------------


def agent_after_hello() -> tuple[AgentHandshake, Challenge]:
    agent = make_agent()
    challenge = make_ll().receive(agent.start())
    assert isinstance(challenge, Challenge)
    return agent, challenge


@pytest.mark.parametrize("index", [0, 17, 31])
@pytest.mark.parametrize("field", ["proof", "nonce"])
def test_tampered_challenge_rejected_by_agent(field: str, index: int) -> None:
    agent, challenge = agent_after_hello()
    tampered = dataclasses.replace(challenge, **{field: flip(getattr(challenge, field), index)})
    sent: list[Message | None] = []
    with pytest.raises(AuthenticationError):
        sent.append(agent.receive(wire(tampered)))
    assert sent == []  # no AUTH
    assert agent.state is not State.WAIT_READY
    assert agent.state is not State.DONE


def test_challenge_from_ll_with_other_secret_rejected() -> None:
    agent = make_agent()
    hello = agent.start()
    # A fake LL that accepts any key id, but holds a different secret.
    fake = make_ll(secrets_by_id={hello.key_id: OTHER_SECRET})
    challenge = fake.receive(hello)
    with pytest.raises(AuthenticationError):
        agent.receive(wire(challenge))
    assert agent.state is State.FAILED


def test_replayed_challenge_fails_against_fresh_agent() -> None:
    _, _, captured, _, _ = run(make_agent(), make_ll())
    fresh = make_agent(nonce=b"\x33" * NONCE_SIZE)
    fresh.start()
    with pytest.raises(AuthenticationError):
        fresh.receive(wire(captured))


def test_agent_checks_version_in_challenge() -> None:
    agent, challenge = agent_after_hello()
    with pytest.raises(VersionMismatch):
        agent.receive(dataclasses.replace(challenge, version=MAX_VERSION + 1))


def test_agent_rejects_challenge_with_tampered_version_inside_range() -> None:
    # A CHALLENGE whose version was changed is caught by the proof even when the new
    # version is one the agent speaks (the transcript covers the version).
    agent = make_agent(versions=(0, MAX_VERSION))
    challenge = make_ll().receive(agent.start())
    assert isinstance(challenge, Challenge)
    with pytest.raises(AuthenticationError):
        agent.receive(dataclasses.replace(challenge, version=0))


# -- tampering with the AUTH ----------------------------------------------------------


def ll_and_auth() -> tuple[LLHandshake, Auth]:
    agent, ll = make_agent(), make_ll()
    challenge = ll.receive(wire(agent.start()))
    auth = agent.receive(wire(challenge))
    assert isinstance(auth, Auth)
    return ll, auth


@pytest.mark.parametrize(
    "tamper",
    [
        lambda a: dataclasses.replace(a, proof=flip(a.proof)),
        lambda a: dataclasses.replace(a, proof=flip(a.proof, 31, 7)),
        lambda a: dataclasses.replace(a, agent_id=flip(a.agent_id)),
        lambda a: dataclasses.replace(a, services=("ssh",)),
        lambda a: dataclasses.replace(a, services=("ssh", "web", "admin")),
        lambda a: dataclasses.replace(a, services=("web", "ssh")),
        lambda a: dataclasses.replace(a, services=("ssh", "wec")),
        lambda a: dataclasses.replace(a, exposes=(("", 8010),)),
    ],
    ids=[
        "proof-bit0",
        "proof-lastbit",
        "agent_id",
        "service-removed",
        "service-added",
        "services-reordered",
        "service-renamed",
        "expose-added",
    ],
)
def test_tampered_auth_refused_by_ll(tamper: Callable[[Auth], Auth]) -> None:
    ll, auth = ll_and_auth()
    tampered = tamper(auth)
    assert tampered != auth
    with pytest.raises(AuthenticationError):
        ll.receive(wire(tampered))
    assert ll.state is not State.DONE
    assert ll.services == ()
    assert ll.agent_id == b""


def test_reflected_challenge_proof_refused_as_auth() -> None:
    agent, ll = make_agent(), make_ll()
    challenge = ll.receive(agent.start())
    assert isinstance(challenge, Challenge)
    with pytest.raises(AuthenticationError):
        ll.receive(Auth(challenge.proof, AGENT_ID, SERVICES))


def test_replayed_auth_fails_against_fresh_ll() -> None:
    _, hello, _, captured_auth, _ = run(make_agent(), make_ll())
    # The attacker replays the whole agent side; the fresh LL picks a new nonce.
    fresh = make_ll(nonce=b"\x44" * NONCE_SIZE)
    challenge = fresh.receive(wire(hello))
    assert isinstance(challenge, Challenge)
    assert challenge.nonce != LL_NONCE
    with pytest.raises(AuthenticationError):
        fresh.receive(wire(captured_auth))
    assert fresh.state is not State.DONE


def test_replayed_auth_fails_against_fresh_ll_with_random_nonce() -> None:
    _, hello, _, captured_auth, _ = run(make_agent(), make_ll())
    fresh = LLHandshake({key_id(SECRET): SECRET}, heartbeat_ms=HEARTBEAT, binding=BINDING)
    fresh.receive(wire(hello))
    with pytest.raises(AuthenticationError):
        fresh.receive(wire(captured_auth))


# -- wrong secret / binding / version -------------------------------------------------


def test_unknown_key_id_refused_by_ll() -> None:
    agent = make_agent(secret=OTHER_SECRET)
    ll = make_ll()
    with pytest.raises(AuthenticationError):
        ll.receive(wire(agent.start()))
    assert ll.state is State.FAILED


def test_right_key_id_wrong_secret_refused() -> None:
    # The LL files SECRET under the id of OTHER_SECRET: the ids match, the secrets not.
    agent = make_agent(secret=OTHER_SECRET)
    ll = make_ll(secrets_by_id={key_id(OTHER_SECRET): SECRET})
    challenge = ll.receive(wire(agent.start()))
    with pytest.raises(AuthenticationError):
        agent.receive(wire(challenge))


def test_error_code_for_failures() -> None:
    assert error_code(AuthenticationError("x")) is ErrorCode.AUTHENTICATION
    assert error_code(VersionMismatch("x")) is ErrorCode.VERSION
    assert error_code(ProtocolError("x")) is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize(
    ("agent_binding", "ll_binding"),
    [(BINDING, b"\x43" * 32), (b"", BINDING), (BINDING, b"")],
)
def test_different_binding_fails(agent_binding: bytes, ll_binding: bytes) -> None:
    agent = make_agent(binding=agent_binding)
    ll = make_ll(binding=ll_binding)
    challenge = ll.receive(wire(agent.start()))
    # The agent is the one that notices first: the LL's proof covers the binding.
    with pytest.raises(AuthenticationError):
        agent.receive(wire(challenge))


def test_different_binding_fails_at_ll_too() -> None:
    # Even a (hypothetical) agent that skipped the check could not get READY.
    agent = make_agent(binding=BINDING)
    ll = make_ll(binding=b"\x43" * 32)
    honest_ll = make_ll(binding=BINDING)
    hello = agent.start()
    good_challenge = honest_ll.receive(hello)
    ll.receive(hello)
    auth = agent.receive(good_challenge)
    assert isinstance(auth, Auth)
    with pytest.raises(AuthenticationError):
        ll.receive(wire(auth))


def test_version_mismatch_names_both_ranges() -> None:
    newer = (MAX_VERSION + 1, MAX_VERSION + 2)
    agent = make_agent(versions=newer)
    ll = make_ll()
    hello = agent.start()
    assert (hello.min_version, hello.max_version) == newer
    with pytest.raises(VersionMismatch) as info:
        ll.receive(wire(hello))
    text = str(info.value)
    assert f"{newer[0]}-{newer[1]}" in text
    assert f"{MIN_VERSION}-{MAX_VERSION}" in text
    assert isinstance(info.value, ProtocolError)
    assert error_code(info.value) is ErrorCode.VERSION


def test_version_range_overlapping_is_accepted() -> None:
    agent = make_agent(versions=(MIN_VERSION, MAX_VERSION + 5))
    ll = make_ll()
    run(agent, ll)
    assert agent.version == ll.version == MAX_VERSION


def test_inverted_version_range_is_refused() -> None:
    ll = make_ll()
    hello = Hello(1, 0, key_id(SECRET), CC_NONCE)
    with pytest.raises(VersionMismatch):
        ll.receive(wire(hello))


# -- order ----------------------------------------------------------------------------


def test_auth_before_hello() -> None:
    _, auth = ll_and_auth()
    with pytest.raises(ProtocolError, match="AUTH"):
        make_ll().receive(auth)


def test_second_hello() -> None:
    agent, ll = make_agent(), make_ll()
    hello = agent.start()
    ll.receive(hello)
    with pytest.raises(ProtocolError, match="HELLO"):
        ll.receive(hello)


def test_hello_after_done() -> None:
    agent, ll = make_agent(), make_ll()
    _, hello, *_ = run(agent, ll)
    with pytest.raises(ProtocolError):
        ll.receive(hello)


def test_second_auth_after_done() -> None:
    agent, ll = make_agent(), make_ll()
    _, _, _, auth, _ = run(agent, ll)
    with pytest.raises(ProtocolError):
        ll.receive(auth)


def test_ready_before_challenge() -> None:
    agent = make_agent()
    agent.start()
    with pytest.raises(ProtocolError, match="READY"):
        agent.receive(Ready(HEARTBEAT))
    assert agent.state is State.FAILED
    assert agent.heartbeat_ms == 0


def test_challenge_before_start() -> None:
    _, challenge = agent_after_hello()
    fresh = make_agent()
    with pytest.raises(ProtocolError):
        fresh.receive(challenge)


def test_second_challenge() -> None:
    agent, challenge = agent_after_hello()
    agent.receive(challenge)
    with pytest.raises(ProtocolError, match="CHALLENGE"):
        agent.receive(challenge)


def test_start_twice() -> None:
    agent = make_agent()
    agent.start()
    with pytest.raises(ProtocolError):
        agent.start()


@pytest.mark.parametrize("message", [Ping(1), Hello(1, 1, b"\0" * 8, CC_NONCE)])
def test_agent_rejects_unexpected_types(message: Message) -> None:
    agent = make_agent()
    agent.start()
    with pytest.raises(ProtocolError, match="unexpected"):
        agent.receive(message)


@pytest.mark.parametrize("message", [Ping(1), Ready(1), Error(ErrorCode.BAD_MESSAGE, "x")])
def test_ll_rejects_unexpected_types(message: Message) -> None:
    with pytest.raises(ProtocolError, match="unexpected"):
        make_ll().receive(message)


# -- refusal --------------------------------------------------------------------------


@pytest.mark.parametrize("after", ["start", "auth"])
def test_error_from_ll_raises_peer_refused(after: str) -> None:
    agent, ll = make_agent(), make_ll()
    hello = agent.start()
    if after == "auth":
        agent.receive(ll.receive(hello))
    refusal = Error(ErrorCode.AUTHENTICATION, "agent presented a token this LL does not accept")
    with pytest.raises(PeerRefused, match="does not accept"):
        agent.receive(wire(refusal))
    assert agent.state is not State.DONE


def test_refusal_flow_through_error_code() -> None:
    # What the LL would do: turn its exception into an ERROR; the agent refuses it.
    agent = make_agent(secret=OTHER_SECRET)
    ll = make_ll()
    hello = agent.start()
    with pytest.raises(ProtocolError) as info:
        ll.receive(wire(hello))
    reply = Error(error_code(info.value), str(info.value))
    with pytest.raises(PeerRefused) as refused:
        agent.receive(wire(reply))
    assert str(info.value) in str(refused.value)
    assert not isinstance(refused.value, ProtocolError)


def test_failed_handshake_accepts_nothing_more() -> None:
    """After an error the state machine is spent: a second try is not processed."""
    agent = make_agent()
    hello = agent.start()
    ll = make_ll()
    challenge = ll.receive(hello)
    tampered = Challenge(challenge.version, challenge.nonce, bytes(32))
    with pytest.raises(AuthenticationError):
        agent.receive(tampered)
    with pytest.raises(ProtocolError):
        agent.receive(challenge)  # the genuine one, too late
    assert agent.state is State.FAILED


def test_both_sides_derive_the_same_session_key_and_never_send_it() -> None:
    """Ready data connections prove the session key; it must match on both sides,
    differ between sessions, and never cross the wire."""
    agent, ll = make_agent(), make_ll()
    transcript = run(agent, ll)[0]
    assert agent.session_key == ll.session_key
    assert len(agent.session_key) == 32
    assert agent.session_key not in transcript.all_bytes()
    other_agent = AgentHandshake(SECRET, services=SERVICES)
    other_ll = LLHandshake({key_id(SECRET): SECRET}, heartbeat_ms=HEARTBEAT)
    run(other_agent, other_ll)
    assert other_agent.session_key != agent.session_key
    proof = pool_proof(agent.session_key, agent.agent_id, 1, BINDING)
    assert proof == pool_proof(ll.session_key, ll.agent_id, 1, BINDING)
    assert proof != pool_proof(agent.session_key, agent.agent_id, 2, BINDING)
    assert proof != pool_proof(other_agent.session_key, agent.agent_id, 1, BINDING)
    assert proof != pool_proof(agent.session_key, agent.agent_id, 1, b"\x43" * 32)


def test_agent_learns_the_services_the_ll_has() -> None:
    agent = make_agent()
    ll = make_ll(services=("web", "db"))
    run(agent, ll)
    assert agent.ll_services == ("web", "db")
    assert agent.heartbeat_ms == HEARTBEAT


# -- what the agent asks for, and what the LL grants ----------------------------------


def test_the_proof_covers_the_exposed_ports() -> None:
    agent = make_agent(exposes=(("", 8010),))
    ll = make_ll()
    challenge = ll.receive(wire(agent.start()))
    auth = agent.receive(wire(challenge))
    assert isinstance(auth, Auth) and auth.exposes == (("", 8010),)
    for altered in ((("", 8011),), (("0.0.0.0", 8010),), (("", 8010), ("", 22)), ()):
        fresh = make_ll()
        fresh.receive(wire(make_agent(exposes=(("", 8010),)).start()))
        with pytest.raises(AuthenticationError):
            fresh.receive(wire(dataclasses.replace(auth, exposes=altered)))


def test_the_ll_grants_what_its_grant_decides_with_the_proven_key() -> None:
    asked: list[tuple[bytes, object]] = []

    def grant(kid: bytes, request: object) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
        asked.append((kid, request))
        return ("web", ":8010"), (("ssh", "service 'ssh' refused: may serve web"),)

    agent = make_agent(exposes=(("", 8010),))
    _, _, _, _, ready = run(agent, make_ll(grant=grant))
    assert asked == [(key_id(SECRET), (SERVICES, (("", 8010),), ()))]
    assert ready.services == ("web", ":8010")
    assert agent.ll_services == ("web", ":8010")
    assert agent.refusals == (("ssh", "service 'ssh' refused: may serve web"),)


def test_without_a_grant_the_ll_refuses_every_exposed_port() -> None:
    agent = make_agent(exposes=(("", 8010), ("127.0.0.1", 9000)))
    _, _, _, _, ready = run(agent, make_ll(services=("ssh", "web")))
    assert ready.services == ("ssh", "web")
    assert [subject for subject, _ in ready.refusals] == [":8010", ":9000"]


def test_grant_is_not_asked_before_the_proof_checks_out() -> None:
    called = []
    ll = make_ll(grant=lambda kid, request: called.append(kid) or ((), ()))
    agent = make_agent()
    challenge = ll.receive(wire(agent.start()))
    auth = agent.receive(wire(challenge))
    assert isinstance(auth, Auth)
    with pytest.raises(AuthenticationError):
        ll.receive(wire(dataclasses.replace(auth, proof=flip(auth.proof))))
    assert called == []
