"""The datagrams of a UDP flow on its data connection (sans-I/O), fuzzed: whatever the
segmentation, each datagram comes out whole, in order, never merged or split; the end
marker ends the flow and keeps what follows it; bad headers are refused before a byte
of the announced payload is held."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_settings import fuzz, timeout
from tcpgc.errors import ProtocolError
from tcpgc.protocol.chunks import END, HEADER_SIZE
from tcpgc.protocol.datagrams import MAX_DATAGRAM, DatagramDecoder, encode_datagram
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.messages import HEADER, MessageType, Open, encode

pytestmark = timeout

datagrams = st.lists(st.binary(min_size=1, max_size=2000), max_size=12)


def feed_in_pieces(decoder: DatagramDecoder, stream: bytes, cuts: list[int]) -> list[bytes]:
    edges = sorted({c % (len(stream) + 1) for c in cuts})
    out: list[bytes] = []
    start = 0
    for stop in [*edges, len(stream)]:
        piece = stream[start:stop]
        start = stop
        if piece and not decoder.ended:
            out += decoder.feed(piece)
    return out


@fuzz
@given(datagrams, st.lists(st.integers(min_value=0, max_value=40_000), max_size=20))
def test_datagrams_come_out_whole_and_in_order_whatever_the_segmentation(
    sent: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode_datagram(d) for d in sent)
    decoder = DatagramDecoder()
    got = feed_in_pieces(decoder, stream, cuts)
    assert got == sent
    assert not decoder.ended
    assert decoder.pending == 0


@fuzz
@given(datagrams, st.binary(max_size=64), st.lists(st.integers(0, 40_000), max_size=20))
def test_the_end_marker_ends_the_flow_and_keeps_what_follows(
    sent: list[bytes], after: bytes, cuts: list[int]
) -> None:
    stream = b"".join(encode_datagram(d) for d in sent) + END + after
    decoder = DatagramDecoder()
    got = feed_in_pieces(decoder, stream, [c for c in cuts if c < len(stream) - len(after)])
    assert got == sent
    assert decoder.ended
    assert decoder.leftover == after
    with pytest.raises(ProtocolError):
        decoder.feed(b"more")


@fuzz
@given(st.binary(max_size=4096), st.lists(st.integers(0, 5000), max_size=10))
def test_any_bytes_give_datagrams_or_a_protocol_error_and_nothing_else(
    garbage: bytes, cuts: list[int]
) -> None:
    decoder = DatagramDecoder()
    try:
        got = feed_in_pieces(decoder, garbage, cuts)
    except ProtocolError:
        return
    # Everything handed out was announced by a valid header, whole.
    assert all(0 < len(d) <= MAX_DATAGRAM for d in got)
    assert sum(len(d) + HEADER_SIZE for d in got) <= len(garbage)
    assert decoder.pending <= HEADER_SIZE + MAX_DATAGRAM


@fuzz
@given(st.integers(min_value=MAX_DATAGRAM + 1, max_value=2**32 - 1))
def test_an_oversized_datagram_is_refused_from_its_header(length: int) -> None:
    decoder = DatagramDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(length.to_bytes(HEADER_SIZE, "big") + b"x")
    # Not one byte of the announced payload was kept.
    assert decoder.pending == 0


def test_largest_datagrams_cross_and_out_of_range_ones_cannot_be_encoded() -> None:
    biggest = bytes(range(256)) * (MAX_DATAGRAM // 256) + b"z" * (MAX_DATAGRAM % 256)
    assert len(biggest) == MAX_DATAGRAM
    decoder = DatagramDecoder()
    assert decoder.feed(encode_datagram(biggest) + encode_datagram(b"\x00")) == [biggest, b"\x00"]
    for bad in (b"", b"x" * (MAX_DATAGRAM + 1)):
        with pytest.raises(ValueError):
            encode_datagram(bad)


def test_a_datagram_split_inside_its_header_waits_for_the_rest() -> None:
    decoder = DatagramDecoder()
    wire = encode_datagram(b"hello")
    assert decoder.feed(wire[:2]) == []
    assert decoder.feed(wire[2:6]) == []
    assert decoder.pending == 6
    assert decoder.feed(wire[6:]) == [b"hello"]
    assert decoder.pending == 0


# ---- OPEN says whether the client is a UDP flow ------------------------------------


@fuzz
@given(st.booleans(), st.integers(min_value=0, max_value=2**32 - 1))
def test_open_carries_whether_its_client_is_a_udp_flow(udp: bool, window: int) -> None:
    sent = Open(bytes(16), "dns", "192.0.2.7", 40000, "198.51.100.1", 53, window, udp)
    decoder = FrameDecoder()
    decoder.receive_data(encode(sent))
    assert decoder.next_message() == sent


@fuzz
@given(st.integers(min_value=2, max_value=255))
def test_an_open_with_any_other_protocol_flag_is_refused(flag: int) -> None:
    payload = Open(bytes(16), "dns").payload()[:-1] + bytes([flag])
    decoder = FrameDecoder()
    decoder.receive_data(HEADER.pack(MessageType.OPEN, len(payload)) + payload)
    with pytest.raises(ProtocolError):
        decoder.next_message()
