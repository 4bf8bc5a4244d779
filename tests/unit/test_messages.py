"""The frame codec: bytes in, messages out, fed whole and one byte at a time."""

from __future__ import annotations

import struct

import pytest

from tcpgc.errors import ProtocolError
from tcpgc.protocol.fields import MAX_EXPOSES, MAX_REFUSAL_TEXT, MAX_REFUSALS
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.messages import (
    AGENT_ID_SIZE,
    CONN_ID_SIZE,
    HEADER,
    KEY_ID_SIZE,
    MAGIC,
    MAX_NAME,
    MAX_PAYLOAD,
    MAX_SERVICES,
    MAX_TEXT,
    NONCE_SIZE,
    PROOF_SIZE,
    Auth,
    Challenge,
    Data,
    Error,
    ErrorCode,
    Hello,
    Message,
    MessageType,
    Open,
    OpenFailed,
    Ping,
    Pong,
    Pool,
    Ready,
    Resume,
    Resumed,
    Retire,
    decode,
    encode,
    is_valid_name,
)

CONN_ID = bytes(range(CONN_ID_SIZE))
AGENT_ID = bytes(range(100, 100 + AGENT_ID_SIZE))
NONCE = bytes(range(NONCE_SIZE))
PROOF = bytes(range(200, 200 + PROOF_SIZE))
KEY_ID = b"\x01\x02\x03\x04\x05\x06\x07\x08"

#: One instance of every message type, with field values that exercise the edges
#: (max-length names, non-ASCII text, extreme integers).
SAMPLES: list[Message] = [
    Hello(1, 1, KEY_ID, NONCE),
    Hello(0, 255, b"\xff" * KEY_ID_SIZE, b"\x00" * NONCE_SIZE),
    Challenge(1, NONCE, PROOF),
    Auth(PROOF, AGENT_ID, ("ssh", "web-1", "db_main.replica")),
    Auth(PROOF, AGENT_ID, ()),
    Auth(PROOF, AGENT_ID, ("a" * MAX_NAME,)),
    Auth(PROOF, AGENT_ID, ("web",), (("", 8010), ("127.0.0.1", 65535), ("::1", 1))),
    Auth(PROOF, AGENT_ID, (), (("", 8010),) * MAX_EXPOSES),
    Ready(15000),
    Ready(10000, ("web", "ssh")),
    Ready(10000, ("web", ":8010"), ((":8011", "naïve: outside ports 8000-8005"), ("db", ""))),
    Ready(0xFFFFFFFF),
    Error(ErrorCode.AUTHENTICATION, "bad token"),
    Error(ErrorCode.VERSION, ""),
    Error(ErrorCode.UNAVAILABLE, "naïve café ✓"),
    Open(CONN_ID, "ssh"),
    Open(CONN_ID, "web", "192.0.2.7", 40000, "2001:db8::1", 443),
    Open(CONN_ID, "web", "", 0, "127.0.0.1", 65535),
    Open(CONN_ID, "web", "", 0, "", 0, 60000),
    Open(CONN_ID, "web", "", 0, "", 0, 0xFFFFFFFF),
    OpenFailed(CONN_ID, "connection refused"),
    OpenFailed(CONN_ID, ""),
    Ping(0),
    Ping(0xFFFFFFFFFFFFFFFF),
    Pong(12345678901234),
    Data(2, CONN_ID, PROOF),
    Pool(AGENT_ID, 1, PROOF),
    Pool(AGENT_ID, 0xFFFFFFFFFFFFFFFF, PROOF),
    Retire(),
    Resume(3, CONN_ID, 1, 0, PROOF),
    Resume(3, CONN_ID, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, PROOF),
    Resumed(0, PROOF),
    Resumed(123456789, PROOF),
]


def test_samples_cover_every_message_type() -> None:
    assert {m.TYPE for m in SAMPLES} == set(MessageType)


def decode_all(data: bytes, *, chunk: int | None = None) -> list[Message]:
    """Feed `data` (whole, or in chunks of `chunk` bytes), then EOF; return every message."""
    decoder = FrameDecoder()
    out: list[Message] = []
    pieces = [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for piece in pieces:
        decoder.receive_data(piece)
        while (message := decoder.next_message()) is not None:
            out.append(message)
    decoder.receive_data(b"")
    assert decoder.next_message() is None
    assert decoder.leftover() == b""
    return out


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_whole(message: Message) -> None:
    frame = encode(message)
    kind, length = HEADER.unpack_from(frame)
    assert kind == message.TYPE
    assert length == len(frame) - HEADER.size
    assert decode_all(frame) == [message]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_one_byte_at_a_time(message: Message) -> None:
    frame = encode(message)
    decoder = FrameDecoder()
    for i, byte in enumerate(frame):
        # Nothing comes out until the last byte of the frame has arrived.
        assert decoder.next_message() is None
        decoder.receive_data(bytes([byte]))
        if i < len(frame) - 1:
            assert decoder.next_message() is None
    assert decoder.next_message() == message
    assert decoder.next_message() is None


def test_decode_function_matches_decoder() -> None:
    for message in SAMPLES:
        frame = encode(message)
        assert decode(frame[0], frame[HEADER.size :]) == message


def test_several_frames_in_one_chunk() -> None:
    stream = b"".join(encode(m) for m in SAMPLES)
    assert decode_all(stream) == SAMPLES


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_several_frames_in_any_split(chunk: int) -> None:
    stream = b"".join(encode(m) for m in SAMPLES)
    assert decode_all(stream, chunk=chunk) == SAMPLES


def test_leftover_returns_bytes_after_a_frame() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode(Data(2, CONN_ID, PROOF)) + b"SSH-2.0-OpenSSH\r\n")
    assert decoder.next_message() == Data(2, CONN_ID, PROOF)
    assert decoder.leftover() == b"SSH-2.0-OpenSSH\r\n"
    # leftover() hands the bytes over once; they are not kept.
    assert decoder.leftover() == b""
    assert decoder.next_message() is None


def test_leftover_keeps_a_following_frame_undecoded() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode(Ping(1)) + encode(Pong(2)))
    assert decoder.next_message() == Ping(1)
    assert decoder.leftover() == encode(Pong(2))


def test_leftover_empty_when_nothing_follows() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode(Ping(7)))
    assert decoder.next_message() == Ping(7)
    assert decoder.leftover() == b""


# -- limits ---------------------------------------------------------------------------


def test_oversize_header_rejected_before_payload() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(HEADER.pack(MessageType.AUTH, MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.next_message()


def test_oversize_header_rejected_one_byte_at_a_time() -> None:
    decoder = FrameDecoder()
    header = HEADER.pack(MessageType.PING, 0xFFFF)
    for byte in header[:-1]:
        decoder.receive_data(bytes([byte]))
        assert decoder.next_message() is None
    decoder.receive_data(header[-1:])
    with pytest.raises(ProtocolError):
        decoder.next_message()


def test_payload_of_exactly_max_is_accepted_by_framing() -> None:
    # A frame of exactly MAX_PAYLOAD bytes passes the size check (the limit is inclusive);
    # ERROR takes any trailing text, so this one also parses.
    payload = bytes([ErrorCode.BAD_MESSAGE]) + b"x" * (MAX_PAYLOAD - 1)
    decoder = FrameDecoder()
    decoder.receive_data(HEADER.pack(MessageType.ERROR, len(payload)) + payload)
    message = decoder.next_message()
    assert isinstance(message, Error)
    assert len(message.message) == MAX_PAYLOAD - 1


def test_custom_max_payload() -> None:
    decoder = FrameDecoder(max_payload=8)
    decoder.receive_data(HEADER.pack(MessageType.PING, 9))
    with pytest.raises(ProtocolError):
        decoder.next_message()
    small = FrameDecoder(max_payload=8)
    small.receive_data(encode(Ping(3)))
    assert small.next_message() == Ping(3)


def test_encode_refuses_oversize_payload() -> None:
    with pytest.raises(ValueError):
        encode(Auth(PROOF, AGENT_ID, tuple(f"{i:03d}" + "s" * 61 for i in range(255))))


def test_error_text_is_truncated_on_encode() -> None:
    frame = encode(Error(ErrorCode.BAD_MESSAGE, "x" * (MAX_TEXT * 2)))
    message = decode_all(frame)[0]
    assert isinstance(message, Error)
    assert message.message == "x" * MAX_TEXT


def test_encode_refuses_invalid_service_name() -> None:
    for bad in ["", "a" * (MAX_NAME + 1), "has space", "dé", "a/b"]:
        assert not is_valid_name(bad)
        with pytest.raises(ValueError):
            encode(Open(CONN_ID, bad))


# -- malformed input ------------------------------------------------------------------


def feed(data: bytes) -> Message | None:
    decoder = FrameDecoder()
    decoder.receive_data(data)
    return decoder.next_message()


def frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


@pytest.mark.parametrize("kind", [0, max(MessageType) + 1, 99, 255])
def test_unknown_type(kind: int) -> None:
    with pytest.raises(ProtocolError, match="unknown message type"):
        feed(frame(kind, b"\x00" * 8))


def test_unknown_type_rejected_from_the_header_alone() -> None:
    # The payload has not arrived yet: the type is still enough to refuse.
    with pytest.raises(ProtocolError, match="unknown message type"):
        feed(HEADER.pack(42, 100))


def test_decode_unknown_type() -> None:
    with pytest.raises(ProtocolError):
        decode(0, b"")


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_truncated_payload(message: Message) -> None:
    payload = message.payload()
    if isinstance(message, Error | OpenFailed):
        # These end in free text; only the fixed part before it can be truncated.
        fixed = 1 if isinstance(message, Error) else CONN_ID_SIZE
        cuts = range(fixed)
    else:
        cuts = range(len(payload))
    for cut in cuts:
        with pytest.raises(ProtocolError):
            feed(frame(message.TYPE, payload[:cut]))


FIXED_SIZE = [m for m in SAMPLES if not isinstance(m, Error | OpenFailed)]


@pytest.mark.parametrize("message", FIXED_SIZE, ids=lambda m: type(m).__name__)
def test_extra_bytes(message: Message) -> None:
    with pytest.raises(ProtocolError, match="extra bytes"):
        feed(frame(message.TYPE, message.payload() + b"\x00"))


@pytest.mark.parametrize("message", [Hello(1, 1, KEY_ID, NONCE), Data(2, CONN_ID, PROOF)])
def test_bad_magic(message: Message) -> None:
    payload = message.payload()
    assert payload.startswith(MAGIC)
    for i in range(len(MAGIC)):
        bad = bytearray(payload)
        bad[i] ^= 0x20
        with pytest.raises(ProtocolError, match="magic"):
            feed(frame(message.TYPE, bytes(bad)))


def test_http_request_is_not_a_tcpgc_peer() -> None:
    # b"GET / HTTP/1.1": type 'G' (71) is not a message type.
    with pytest.raises(ProtocolError):
        feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


@pytest.mark.parametrize(
    "raw_name",
    [
        b"\xff\xfe",  # not UTF-8
        b"\xc3",  # truncated UTF-8 sequence
        "dé".encode(),  # UTF-8 but not ASCII
        b"has space",
        b"a/b",
        b"nul\x00",
        b"",  # empty
        b"a" * (MAX_NAME + 1),  # too long
    ],
)
def test_invalid_service_name_in_open(raw_name: bytes) -> None:
    payload = CONN_ID + bytes([len(raw_name)]) + raw_name
    with pytest.raises(ProtocolError, match="name"):
        feed(frame(MessageType.OPEN, payload))


def test_invalid_service_name_in_auth() -> None:
    payload = PROOF + AGENT_ID + b"\x02" + b"\x03ssh" + b"\x02\xff\xfe"
    with pytest.raises(ProtocolError, match="not UTF-8"):
        feed(frame(MessageType.AUTH, payload))


def test_auth_service_count_larger_than_list() -> None:
    payload = PROOF + AGENT_ID + b"\x03" + b"\x03ssh"
    with pytest.raises(ProtocolError, match="truncated"):
        feed(frame(MessageType.AUTH, payload))


def test_error_with_non_utf8_text_still_decodes() -> None:
    # Free text is informational; it must not be a way to crash the receiver.
    message = feed(frame(MessageType.ERROR, b"\x02\xff\xfeoops"))
    assert isinstance(message, Error)
    assert message.code == 2
    assert message.message.endswith("oops")


# -- EOF ------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 2, HEADER.size, HEADER.size + 1])
def test_eof_in_the_middle_of_a_frame(cut: int) -> None:
    data = encode(Ping(99))
    decoder = FrameDecoder()
    decoder.receive_data(data[:cut])
    assert decoder.next_message() is None
    decoder.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed in the middle of a frame"):
        decoder.next_message()


def test_eof_after_a_whole_frame_is_clean() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode(Ping(1)))
    decoder.receive_data(b"")
    assert decoder.next_message() == Ping(1)
    assert decoder.next_message() is None


def test_eof_after_frame_and_partial_frame() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode(Ping(1)) + encode(Pong(2))[:5])
    decoder.receive_data(b"")
    assert decoder.next_message() == Ping(1)
    with pytest.raises(ProtocolError):
        decoder.next_message()


def test_header_layout_is_network_byte_order() -> None:
    frame_bytes = encode(Ready(0x01020304))
    # The heartbeat, then the LL's services and its refusals: none here (counts of 0).
    assert (
        frame_bytes
        == bytes([MessageType.READY]) + struct.pack("!H", 6) + b"\x01\x02\x03\x04\x00\x00"
    )


def test_open_with_an_invalid_address_is_refused() -> None:
    good = encode(Open(CONN_ID, "web", "192.0.2.7", 1, "", 0))
    bad = good.replace(b"192.0.2.7", b"192.0.2.x")
    with pytest.raises(ProtocolError, match="invalid address"):
        feed(bad)


def test_auth_naming_more_services_than_allowed_is_a_protocol_error() -> None:
    """An AUTH is parsed before its proof is checked: a count over the limit must be a
    protocol error there (one log line, the connection closed), not an exception that
    escapes the handshake and leaves the connection open."""
    names = b"".join(bytes([3]) + f"{i:03d}".encode() for i in range(MAX_SERVICES + 1))
    payload = PROOF + AGENT_ID + bytes([MAX_SERVICES + 1]) + names
    with pytest.raises(ProtocolError, match="more than 200"):
        feed(frame(MessageType.AUTH, payload))


def test_data_frame_carries_its_proof() -> None:
    message = Data(2, CONN_ID, PROOF)
    assert message.payload() == MAGIC + b"\x02" + CONN_ID + PROOF
    with pytest.raises(ProtocolError, match="truncated"):
        feed(frame(MessageType.DATA, MAGIC + b"\x02" + CONN_ID))  # a version 1 DATA


def test_exposed_port_names_are_valid_only_as_a_port() -> None:
    assert is_valid_name(":8010") and is_valid_name(":1") and is_valid_name(":65535")
    for bad in (":", ":0", ":65536", ":80a", "::80", ":-1", ":٣"):
        assert not is_valid_name(bad), bad


@pytest.mark.parametrize(
    "auth_tail",
    [
        bytes([MAX_EXPOSES + 1]) + b"\x00\x1f\x4a" * (MAX_EXPOSES + 1),  # too many
        b"\x01\x00\x00\x00",  # port 0
        b"\x01\x03abc\x1f\x4a",  # not an IP address
        b"\x02\x00\x1f\x4a",  # shorter than its count
    ],
)
def test_bad_exposes_are_refused(auth_tail: bytes) -> None:
    payload = PROOF + AGENT_ID + b"\x00" + auth_tail
    with pytest.raises(ProtocolError):
        decode(MessageType.AUTH, payload)


def test_bad_refusals_are_refused() -> None:
    head = struct.pack("!I", 1000) + b"\x00"
    too_many = bytes([MAX_REFUSALS + 1]) + (b"\x03web\x00\x00" * (MAX_REFUSALS + 1))
    too_long = b"\x01\x03web" + struct.pack("!H", MAX_REFUSAL_TEXT + 1) + b"x" * 201
    bad_name = b"\x01\x03w b\x00\x00"
    for tail in (too_many, too_long, bad_name, b"\x01\x03web\x00\x05ab"):
        with pytest.raises(ProtocolError):
            decode(MessageType.READY, head + tail)


def test_refusal_texts_are_cut_on_a_character() -> None:
    ready = Ready(1, (), ((":80", "é" * 150),))
    ((subject, text),) = decode(MessageType.READY, ready.payload()).refusals  # type: ignore[union-attr]
    assert subject == ":80" and text == "é" * (MAX_REFUSAL_TEXT // 2)
