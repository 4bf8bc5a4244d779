"""The chunked stream of reusable data connections and the POOL replay window (sans-I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpgc.errors import ProtocolError
from tcpgc.protocol.chunks import END, MAX_CHUNK, ChunkDecoder, chunk_header
from tcpgc.protocol.replay_window import ReplayWindow


def encode(payloads: list[bytes]) -> bytes:
    return b"".join(chunk_header(len(p)) + p for p in payloads if p) + END


@given(
    st.lists(st.binary(min_size=0, max_size=300), max_size=8),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    st.binary(max_size=40),
)
def test_payload_and_leftover_survive_any_split(
    payloads: list[bytes], cuts: list[int], after: bytes
) -> None:
    stream = encode(payloads) + after
    edges = sorted({c % (len(stream) + 1) for c in cuts})
    decoder = ChunkDecoder()
    out = bytearray()
    leftover = b""
    start = 0
    for stop in [*edges, len(stream)]:
        piece = stream[start:stop]
        start = stop
        if not piece:
            continue
        if decoder.ended:
            leftover += piece  # what the relay keeps for the next message
            continue
        for part in decoder.feed(piece):
            out += part
        if decoder.ended:
            leftover += decoder.leftover
    assert decoder.ended
    assert bytes(out) == b"".join(payloads)
    assert leftover == after


def test_not_ended_before_the_marker() -> None:
    decoder = ChunkDecoder()
    assert [bytes(p) for p in decoder.feed(chunk_header(3) + b"abc" + END[:2])] == [b"abc"]
    assert not decoder.ended
    assert decoder.feed(END[2:] + b"next") == []
    assert decoder.ended and decoder.leftover == b"next"


def test_oversized_chunk_is_refused() -> None:
    with pytest.raises(ProtocolError, match="at most"):
        ChunkDecoder().feed((MAX_CHUNK + 1).to_bytes(4, "big"))


def test_bytes_after_the_end_are_refused() -> None:
    decoder = ChunkDecoder()
    decoder.feed(END)
    with pytest.raises(ProtocolError):
        decoder.feed(b"x")


def test_header_lengths() -> None:
    assert chunk_header(1) == b"\0\0\0\1"
    for bad in (0, MAX_CHUNK + 1):
        with pytest.raises(ValueError):
            chunk_header(bad)


def test_replay_window_accepts_each_counter_once_in_any_order() -> None:
    window = ReplayWindow(width=8)
    assert window.accept(3)
    assert window.accept(1)  # late, but new and within the window
    assert not window.accept(3)
    assert not window.accept(1)
    assert window.accept(2)
    assert window.accept(20)
    assert not window.accept(12)  # too far below the highest: could be a replay
    assert window.accept(13)
    assert not window.accept(0)
    assert not window.accept(-1)


@given(st.lists(st.integers(min_value=1, max_value=400), max_size=60))
def test_replay_window_never_accepts_twice(counters: list[int]) -> None:
    window = ReplayWindow(width=32)
    accepted: set[int] = set()
    for counter in counters:
        if window.accept(counter):
            assert counter not in accepted
            accepted.add(counter)
        else:
            assert counter in accepted or counter <= window.highest - 32
