"""Property tests: the decoder and the handshakes take anything and fail only cleanly.

The number of examples comes from $TCPGC_FUZZ_EXAMPLES: 100 by default, so that the
unit tier stays a quick local run; CI sets 10000.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import event, given
from hypothesis import strategies as st

from fuzz_settings import fuzz, names, timeout
from tcpgc.errors import PeerRefused, ProtocolError
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.handshake import AgentHandshake, LLHandshake, State, key_id
from tcpgc.protocol.messages import (
    AGENT_ID_SIZE,
    CONN_ID_SIZE,
    HEADER,
    KEY_ID_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    MAX_VERSION,
    NONCE_SIZE,
    PROOF_SIZE,
    Auth,
    Challenge,
    Data,
    Error,
    Hello,
    Message,
    MessageType,
    Open,
    OpenFailed,
    Ping,
    Pong,
    Ready,
    encode,
)

pytestmark = timeout

# -- strategies -----------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)


def fixed(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size, max_size=size)


def messages(text: st.SearchStrategy[str]) -> st.SearchStrategy[Message]:
    return st.one_of(
        st.builds(Hello, u8, u8, fixed(KEY_ID_SIZE), fixed(NONCE_SIZE)),
        st.builds(Challenge, u8, fixed(NONCE_SIZE), fixed(PROOF_SIZE)),
        st.builds(
            Auth,
            fixed(PROOF_SIZE),
            fixed(AGENT_ID_SIZE),
            st.lists(names, max_size=6).map(tuple),
        ),
        st.builds(Ready, u32),
        st.builds(Ready, u32, st.lists(names, min_size=1, max_size=6).map(tuple)),
        st.builds(Error, u8, text),
        st.builds(Open, fixed(CONN_ID_SIZE), names),
        st.builds(OpenFailed, fixed(CONN_ID_SIZE), text),
        st.builds(Ping, u64),
        st.builds(Pong, u64),
        st.builds(Data, u8, fixed(CONN_ID_SIZE), fixed(PROOF_SIZE)),
    )


#: Texts short enough (<= 4 * 120 bytes of UTF-8 < MAX_TEXT) to survive encoding intact.
exact_messages = messages(st.text(max_size=120))
#: Any text, including texts that encoding truncates.
any_messages = messages(st.text(max_size=700))
#: For the handshakes the text does not matter; short ones keep generation cheap.
short_messages = messages(st.text(max_size=20))


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut into chunks at arbitrary points (empty chunks excluded: b"" is EOF)."""
    if not data:
        return []
    cuts = sorted(
        draw(st.sets(st.integers(1, len(data) - 1), max_size=20)) if len(data) > 1 else []
    )
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@st.composite
def chunked(draw: st.DrawFn, data_strategy: st.SearchStrategy[bytes]) -> list[bytes]:
    return draw(splits(draw(data_strategy)))


@st.composite
def mutated_streams(draw: st.DrawFn, source: st.SearchStrategy[Message] | None = None) -> bytes:
    """Valid frames with a few bytes changed, inserted or cut: reaches the payload
    parsers far more often than random bytes do."""
    msgs = draw(st.lists(any_messages if source is None else source, max_size=4))
    stream = bytearray(b"".join(encode(m) for m in msgs))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "insert" or not stream:
            stream.insert(draw(st.integers(0, len(stream))), draw(u8))
        elif op == "flip":
            stream[draw(st.integers(0, len(stream) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == "delete":
            del stream[draw(st.integers(0, len(stream) - 1))]
        else:
            del stream[draw(st.integers(0, len(stream))) :]
    return bytes(stream)


header_like = st.builds(
    lambda kind, length, rest: HEADER.pack(kind, length) + rest,
    st.one_of(st.sampled_from(list(MessageType)), u8),
    st.one_of(st.integers(0, 80), st.integers(MAX_PAYLOAD - 2, 0xFFFF)),
    st.binary(max_size=100),
)


@st.composite
def reframed(draw: st.DrawFn) -> bytes:
    """A valid payload with bytes cut off or added, in a frame whose header matches: the
    framing is right, so only the payload parser can catch it."""
    message = draw(any_messages)
    payload = message.payload()
    if draw(st.booleans()) and payload:
        payload = payload[: draw(st.integers(0, len(payload) - 1))]
    else:
        payload += draw(st.binary(min_size=1, max_size=8))
    return HEADER.pack(message.TYPE, len(payload)) + payload


any_stream = st.one_of(
    reframed(),
    st.binary(max_size=2000),
    mutated_streams(),
    header_like,
    st.builds(lambda b: MAGIC + b, st.binary(max_size=60)),
)


# -- the decoder ----------------------------------------------------------------------


def decode_chunks(chunks: list[bytes]) -> list[Message]:
    """Feed chunks then EOF, draining after each; a ProtocolError propagates.

    Every message consumes at least a header, so more than (bytes / header size + 1)
    calls per drain would mean the decoder is looping without consuming anything."""
    decoder = FrameDecoder()
    out: list[Message] = []
    budget = sum(len(c) for c in chunks) // HEADER.size + 2

    def drain() -> None:
        for _ in range(budget):
            message = decoder.next_message()
            if message is None:
                return
            out.append(message)
        raise AssertionError("next_message kept returning messages past the input size")

    for chunk in chunks:
        decoder.receive_data(chunk)
        drain()
    decoder.receive_data(b"")
    drain()
    # After a clean EOF everything has been consumed and it stays quiet.
    assert decoder.next_message() is None
    assert decoder.leftover() == b""
    return out


@fuzz
@given(chunked(any_stream))
def test_decoder_any_bytes_any_split(chunks: list[bytes]) -> None:
    try:
        out = decode_chunks(chunks)
    except ProtocolError:
        return
    data = b"".join(chunks)
    assert len(out) <= len(data) // HEADER.size
    for m in out:
        assert isinstance(m.TYPE, MessageType)
        encode(m)  # whatever came out can be sent again
    if not any(isinstance(m, Error | OpenFailed) for m in out):
        # Without free text the encoding is canonical: the input was exactly these frames.
        assert b"".join(encode(m) for m in out) == data


@fuzz
@given(st.binary(max_size=300), st.data())
def test_decoder_split_does_not_change_the_result(data: bytes, draw: st.DataObject) -> None:
    """The same bytes give the same messages, or the same failure, however they are cut."""

    def outcome(chunks: list[bytes]) -> list[Message] | str:
        try:
            return decode_chunks(chunks)
        except ProtocolError:
            return "ProtocolError"

    whole = outcome([data] if data else [])
    assert outcome(draw.draw(splits(data))) == whole
    assert outcome([data[i : i + 1] for i in range(len(data))]) == whole


@fuzz
@given(st.lists(exact_messages, max_size=6), st.data())
def test_valid_streams_round_trip_in_any_split(msgs: list[Message], draw: st.DataObject) -> None:
    stream = b"".join(encode(m) for m in msgs)
    assert decode_chunks(draw.draw(splits(stream))) == msgs


@fuzz
@given(exact_messages, st.binary(min_size=1, max_size=200))
def test_leftover_after_any_message(message: Message, tail: bytes) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode(message) + tail)
    assert decoder.next_message() == message
    assert decoder.leftover() == tail


# -- the handshakes -------------------------------------------------------------------

SECRET = b"\x5a" * 32
BINDING = b"\xb1" * 32
CC_NONCE = b"\x01" * NONCE_SIZE
LL_NONCE = b"\x02" * NONCE_SIZE
AGENT_ID = b"\x03" * AGENT_ID_SIZE


def new_agent() -> AgentHandshake:
    return AgentHandshake(
        SECRET, services=("ssh", "web"), agent_id=AGENT_ID, binding=BINDING, nonce=CC_NONCE
    )


def new_ll() -> LLHandshake:
    return LLHandshake({key_id(SECRET): SECRET}, heartbeat_ms=5000, binding=BINDING, nonce=LL_NONCE)


def _genuine() -> tuple[Hello, Challenge, Auth, Ready]:
    agent, ll = new_agent(), new_ll()
    hello = agent.start()
    challenge = ll.receive(hello)
    auth = agent.receive(challenge)
    ready = ll.receive(auth)
    assert isinstance(challenge, Challenge)
    assert isinstance(auth, Auth)
    assert isinstance(ready, Ready)
    return hello, challenge, auth, ready


#: A real exchange (fixed nonces make it valid for every fresh pair), mixed into the
#: fuzzed sequences so they reach the later states and not only the first check.
GENUINE_HELLO, GENUINE_CHALLENGE, GENUINE_AUTH, GENUINE_READY = _genuine()


def through_codec(message: Message) -> Message:
    """What the peer would actually decode: only wire-reachable messages are fed."""
    decoder = FrameDecoder()
    decoder.receive_data(encode(message))
    decoded = decoder.next_message()
    assert decoded is not None
    return decoded


genuine = st.sampled_from([GENUINE_HELLO, GENUINE_CHALLENGE, GENUINE_AUTH, GENUINE_READY])

handshake_messages = st.one_of(
    # one_of picks a branch uniformly: listing `genuine` thrice makes about a third of
    # the messages genuine, enough for many sequences to reach DONE.
    genuine,
    genuine,
    genuine,
    short_messages,
    # Near-misses of the genuine messages: one field replaced.
    st.builds(lambda n: Hello(MAX_VERSION, MAX_VERSION, key_id(SECRET), n), fixed(NONCE_SIZE)),
    st.builds(lambda p: Challenge(MAX_VERSION, LL_NONCE, p), fixed(PROOF_SIZE)),
    st.builds(lambda v: Challenge(v, LL_NONCE, GENUINE_CHALLENGE.proof), u8),
    st.builds(lambda s: Auth(GENUINE_AUTH.proof, AGENT_ID, tuple(s)), st.lists(names, max_size=3)),
).map(through_codec)


@st.composite
def near_genuine_sequences(draw: st.DrawFn) -> list[Message]:
    """The genuine exchange with messages dropped, repeated (replays) and others slipped
    in between."""
    out: list[Message] = []
    for message in (GENUINE_HELLO, GENUINE_CHALLENGE, GENUINE_AUTH, GENUINE_READY):
        out.extend(draw(st.lists(handshake_messages, max_size=2)))
        out.extend([message] * draw(st.integers(0, 2)))
    return out


handshake_sequences = st.one_of(
    st.lists(handshake_messages, max_size=8),
    near_genuine_sequences(),
)


def feed(
    receive: Callable[[Message], Message | None], sequence: list[Message]
) -> list[tuple[Message, object]]:
    """Feed every message (carrying on after failures, as a careless caller might);
    only ProtocolError (incl. its subclasses) and PeerRefused may come out."""
    results: list[tuple[Message, object]] = []
    for message in sequence:
        try:
            results.append((message, receive(message)))
        except (ProtocolError, PeerRefused) as exc:
            results.append((message, exc))
    return results


@fuzz
@given(handshake_sequences)
def test_ll_handshake_any_sequence(sequence: list[Message]) -> None:
    ll = new_ll()
    results = feed(ll.receive, sequence)
    event(f"LL ended in {ll.state.name}")
    hellos_ok = [m for m, r in results if isinstance(r, Challenge)]
    readies = [m for m, r in results if isinstance(r, Ready)]
    # At most one HELLO is ever answered, and at most one AUTH accepted.
    assert len(hellos_ok) <= 1
    assert len(readies) <= 1
    if readies:
        # READY only ever follows the genuine HELLO and the genuine AUTH: nothing forged
        # or altered gets through.
        assert hellos_ok == [GENUINE_HELLO]
        assert readies == [GENUINE_AUTH]
        assert ll.state is State.DONE
        assert ll.agent_id == AGENT_ID
        assert ll.services == GENUINE_AUTH.services
    else:
        assert ll.state is not State.DONE
        assert ll.services == ()


@fuzz
@given(handshake_sequences)
def test_agent_handshake_any_sequence(sequence: list[Message]) -> None:
    agent = new_agent()
    agent.start()
    results = feed(agent.receive, sequence)
    event(f"agent ended in {agent.state.name}")
    auths = [m for m, r in results if isinstance(r, Auth)]
    assert len(auths) <= 1
    if auths:
        # The agent only reveals its proof to the LL that proved the secret first.
        assert auths == [GENUINE_CHALLENGE]
        assert agent.version == GENUINE_CHALLENGE.version
    assert all(isinstance(r, Auth | ProtocolError | PeerRefused) or r is None for _, r in results)
    if agent.state is State.DONE:
        assert auths == [GENUINE_CHALLENGE]
    for message, result in results:
        if isinstance(message, Error):
            assert isinstance(result, PeerRefused)


@fuzz
@given(chunked(mutated_streams(handshake_messages)))
def test_ll_handshake_fed_from_raw_bytes(chunks: list[bytes]) -> None:
    """The path a real LL takes: bytes → decoder → handshake, stopping at the first error."""
    decoder, ll = FrameDecoder(), new_ll()
    try:
        for chunk in [*chunks, b""]:
            decoder.receive_data(chunk)
            for _ in range(len(chunk) // HEADER.size + 2):
                message = decoder.next_message()
                if message is None:
                    break
                ll.receive(message)
    except (ProtocolError, PeerRefused):
        assert ll.state is not State.DONE or ll.agent_id == AGENT_ID
        return
    if ll.state is State.DONE:
        assert ll.agent_id == AGENT_ID
        assert ll.services == GENUINE_AUTH.services
