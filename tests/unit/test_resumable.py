"""The resumable stream without I/O: records, retention, acknowledgements, replay, and
the proofs of RESUME and RESUMED."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpgc.errors import ProtocolError
from tcpgc.protocol.chunks import END, MAX_CHUNK
from tcpgc.protocol.handshake import resume_proof, resumed_proof, stream_key
from tcpgc.protocol.resumable import (
    RESET_RECORD,
    RecordDecoder,
    Retention,
    ack_record,
    chunk_records,
)

KEY = bytes(range(32))
OTHER = bytes(32)
SID = b"s" * 16
BINDING = b"f" * 32


def records(*parts: bytes) -> bytes:
    return b"".join(parts)


def chunks(data: bytes) -> bytes:
    return b"".join(bytes(piece) for piece in chunk_records(data))


def feed_bytewise(decoder: RecordDecoder, data: bytes) -> bytes:
    out = bytearray()
    for i in range(len(data)):
        for piece in decoder.feed(data[i : i + 1]):
            out += piece
        if decoder.finished or decoder.aborted:
            break
    return bytes(out)


# ---- records ----------------------------------------------------------------------


def test_chunks_acks_and_the_end_decode_whole_or_byte_by_byte() -> None:
    stream = records(chunks(b"hello"), ack_record(7), chunks(b" world"), END, ack_record(9))
    for split in (False, True):
        decoder = RecordDecoder()
        decoder.done_at = 9  # our end: 8 bytes sent, plus one
        got = feed_bytewise(decoder, stream) if split else b"".join(decoder.feed(stream))
        assert got == b"hello world"
        assert (decoder.received, decoder.offset, decoder.acked) == (11, 12, 9)
        assert decoder.ended and decoder.finished


def test_what_follows_the_stream_is_leftover_once_both_ends_are_known() -> None:
    decoder = RecordDecoder()
    decoder.done_at = 1
    pieces = decoder.feed(records(END, ack_record(1), b"POOL frame"))
    assert pieces == []
    assert decoder.finished and decoder.leftover == b"POOL frame"
    with pytest.raises(ProtocolError):
        decoder.feed(b"more")


def test_the_stream_is_not_over_before_our_end_is_acknowledged() -> None:
    decoder = RecordDecoder()
    decoder.feed(records(chunks(b"x"), END))
    assert decoder.ended and not decoder.finished
    decoder.done_at = 4
    decoder.feed(ack_record(3))
    assert not decoder.finished
    decoder.feed(ack_record(4))
    assert decoder.finished


def test_a_reset_record_says_the_peer_reset_its_side() -> None:
    decoder = RecordDecoder()
    assert bytes(b"".join(decoder.feed(records(chunks(b"ab"), RESET_RECORD)))) == b"ab"
    assert decoder.aborted


@pytest.mark.parametrize(
    "bad",
    [
        (MAX_CHUNK + 1).to_bytes(4, "big"),  # too long a chunk
        (0xFFFFFFFD).to_bytes(4, "big"),  # no such record
        records(END, chunks(b"after the end")),
    ],
)
def test_malformed_records_are_refused(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        RecordDecoder().feed(bad)


def test_a_broken_connection_leaves_nothing_half_read() -> None:
    decoder = RecordDecoder()
    decoder.feed(chunks(b"abcdef")[:6])  # the header and 2 of 6 bytes
    assert decoder.received == 2
    decoder.reset_partial()
    # The resumed connection starts again at a record boundary.
    assert bytes(b"".join(decoder.feed(chunks(b"cdef")))) == b"cdef"
    assert decoder.received == 6


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048), st.lists(st.integers(1, 64), max_size=40))
def test_any_bytes_decode_or_raise_protocol_error(data: bytes, cuts: list[int]) -> None:
    decoder = RecordDecoder()
    position = 0
    try:
        for cut in [*cuts, len(data)]:
            decoder.feed(data[position : position + cut])
            position += cut
            if decoder.finished or decoder.aborted or position >= len(data):
                break
    except ProtocolError:
        pass


# ---- retention --------------------------------------------------------------------


def test_retention_keeps_what_is_not_acknowledged_and_replays_from_any_kept_offset() -> None:
    out = Retention()
    for piece in (b"aaaa", b"bbbb", b"cccc"):
        out.keep(piece)
    assert (out.sent, out.kept, out.acked) == (12, 12, 0)
    out.ack(6)
    assert (out.kept, out.acked) == (6, 6)
    kept, end_again = out.replay(8)
    assert b"".join(kept) == b"cccc" and not end_again
    assert out.acked == 8


def test_the_end_marker_is_replayed_until_acknowledged() -> None:
    out = Retention()
    out.keep(b"xyz")
    out.end()
    assert out.end_offset == 4 and not out.all_acked
    kept, end_again = out.replay(3)
    assert kept == [] and end_again
    out.ack(4)
    assert out.all_acked
    assert out.replay(4) == ([], False)


def test_offsets_outside_what_is_kept_are_refused() -> None:
    out = Retention()
    out.keep(b"0123456789")
    out.ack(5)
    with pytest.raises(ProtocolError):
        out.replay(3)  # dropped already
    with pytest.raises(ProtocolError):
        out.ack(11)  # never sent
    with pytest.raises(ProtocolError):
        out.replay(12)


def test_first_bytes_sent_before_the_relay_are_retained() -> None:
    out = Retention(sent=5, kept=b"hello")
    assert (out.acked, out.kept) == (0, 5)
    kept, _ = out.replay(2)
    assert b"".join(kept) == b"llo"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=20), st.data())
def test_replay_gives_exactly_the_bytes_after_the_offset(
    pieces: list[bytes], data: st.DataObject
) -> None:
    out = Retention()
    for piece in pieces:
        out.keep(piece)
    whole = b"".join(pieces)
    acked = data.draw(st.integers(0, len(whole)))
    out.ack(acked)
    received = data.draw(st.integers(acked, len(whole)))
    kept, _ = out.replay(received)
    assert b"".join(kept) == whole[received:]
    assert out.kept == len(whole) - received


# ---- proofs -------------------------------------------------------------------------


def test_a_resume_proof_binds_every_field() -> None:
    key = stream_key(KEY, SID)
    proof = resume_proof(key, KEY, SID, 1, 100, BINDING)
    variants = [
        resume_proof(stream_key(OTHER, SID), KEY, SID, 1, 100, BINDING),  # another stream key
        resume_proof(key, OTHER, SID, 1, 100, BINDING),  # another current session
        resume_proof(key, KEY, b"t" * 16, 1, 100, BINDING),  # another stream
        resume_proof(key, KEY, SID, 2, 100, BINDING),  # another epoch
        resume_proof(key, KEY, SID, 1, 101, BINDING),  # another offset
        resume_proof(key, KEY, SID, 1, 100, b"g" * 32),  # another certificate
    ]
    assert len({proof, *variants}) == 1 + len(variants)
    assert resumed_proof(key, SID, 1, 100) != resumed_proof(key, SID, 1, 101)
    assert resumed_proof(key, SID, 1, 100) != proof  # labels differ: no reflection
    assert stream_key(KEY, SID) != stream_key(KEY, b"t" * 16)
