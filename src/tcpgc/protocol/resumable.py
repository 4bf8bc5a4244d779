"""The resumable stream (sans-I/O): offsets, acknowledgements and retention.

A resumable stream is the chunked stream of `tcpgc.protocol.chunks` plus ACK records,
so that it can outlive the data connection carrying it. Each direction counts the
payload bytes it carries; its end marker counts as one more. The receiver acknowledges
what it has delivered (written to the client or the server), and the sender keeps what
is not acknowledged yet (`Retention`), at most a bounded amount: past it, the sender
stops reading its source. When the data connection breaks, a new one takes the stream
over (RESUME / RESUMED carry each side's received offset) and each side sends again
what the other has not received.

Records, each direction::

    chunk  length (u32, 1..MAX_CHUNK) | bytes
    end    0 (u32)
    ack    0xFFFFFFFF (u32) | offset (u64)
    reset  0xFFFFFFFE (u32): the sender's side was reset; so must the receiver's be

A reset travels as a record, not as a TCP reset of the data connection: a reset (or
silence) of the data connection is what a broken network looks like, after which the
stream waits to be resumed.

A stream is over, and its data connection free for the next client, once a node has
received the peer's end marker and the peer has acknowledged its own: the records after
that (a POOL offer) belong to the connection, not to the stream.
"""

from __future__ import annotations

import struct

from tcpgc.errors import ProtocolError
from tcpgc.protocol.chunks import END, HEADER_SIZE, MAX_CHUNK, chunk_header

ACK_MARK = 0xFFFFFFFF
RESET_MARK = 0xFFFFFFFE
_ACK = struct.Struct("!IQ")
ACK_SIZE = _ACK.size
RESET_RECORD = RESET_MARK.to_bytes(HEADER_SIZE, "big")


def ack_record(offset: int) -> bytes:
    """The record acknowledging `offset` (bytes delivered, plus one after the end)."""
    return _ACK.pack(ACK_MARK, offset)


def chunk_records(data: bytes | memoryview) -> list[bytes | memoryview]:
    """`data` as chunks: header, payload, header, payload... (at most MAX_CHUNK each)."""
    view = memoryview(data)
    out: list[bytes | memoryview] = []
    for start in range(0, len(view), MAX_CHUNK):
        piece = view[start : start + MAX_CHUNK]
        out += (chunk_header(len(piece)), piece)
    return out


class Retention:
    """One direction's sender: what it sent, what the receiver acknowledged, and the
    bytes in between, kept for a replay. `acked` may exceed the bytes only by the end
    marker's one."""

    __slots__ = ("acked", "sent", "ended", "_kept", "kept")

    def __init__(self, sent: int = 0, kept: bytes = b"") -> None:
        self.sent = sent  # payload bytes sent (or queued) so far
        self.acked = sent - len(kept)  # offset the receiver confirmed
        self.ended = False  # the end marker was sent
        # A list, not a deque: an idle stream's empty list costs a tenth of an empty
        # deque, and thousands of streams are held at once.
        self._kept: list[bytes | memoryview] = [kept] if kept else []
        self.kept = len(kept)  # bytes retained

    @property
    def end_offset(self) -> int:
        """The offset an acknowledgement of everything, end marker included, carries."""
        return self.sent + 1

    @property
    def all_acked(self) -> bool:
        return self.ended and self.acked == self.end_offset

    def keep(self, data: bytes) -> None:
        """`data` was sent: keep it until it is acknowledged."""
        if data:
            self._kept.append(data)
            self.kept += len(data)
            self.sent += len(data)

    def end(self) -> None:
        self.ended = True

    def ack(self, offset: int) -> None:
        """The receiver has everything before `offset`: drop it. Raises ProtocolError
        for an offset never sent (a confused or lying peer)."""
        limit = self.end_offset if self.ended else self.sent
        if offset > limit:
            raise ProtocolError(f"acknowledgement of offset {offset}, beyond the {limit} sent")
        if offset <= self.acked:
            return
        drop = min(offset, self.sent) - self.acked
        self.acked = offset
        kept = self._kept
        while drop and kept:
            head = kept[0]
            if len(head) <= drop:
                del kept[0]
                drop -= len(head)
                self.kept -= len(head)
            else:
                kept[0] = memoryview(head)[drop:]  # a view: no copy of the rest
                self.kept -= drop
                drop = 0

    def replay(self, received: int) -> tuple[list[bytes | memoryview], bool]:
        """What to send again to a receiver that has `received`: the bytes after it,
        and whether the end marker goes again too. Raises ProtocolError if `received` is
        outside what is retained (before the acknowledged offset or past the sent one)."""
        self.ack(received)
        if received < self.acked:
            raise ProtocolError(
                f"resume from offset {received}, before the acknowledged {self.acked}"
            )
        return list(self._kept), self.ended and received <= self.sent


class RecordDecoder:
    """One direction's receiver: bytes in; payload pieces, acknowledgements and the end
    out. `done_at`, once our own end marker is sent, is the acknowledgement that
    completes the stream; after both ends the remaining bytes are `leftover`."""

    __slots__ = (
        "_header", "_remaining", "received", "ended", "acked", "done_at", "finished",
        "leftover", "aborted",
    )  # fmt: skip

    def __init__(self, received: int = 0) -> None:
        self._header = bytearray()
        self._remaining = 0  # payload bytes still due in the current chunk, or ack bytes
        self.received = received  # payload bytes received (the end not counted)
        self.ended = False
        self.acked = -1  # the highest acknowledgement received, -1: none
        self.done_at: int | None = None
        self.finished = False
        self.leftover = b""
        self.aborted = False  # the peer reset its side

    @property
    def offset(self) -> int:
        """What this side has received: bytes, plus one for the end marker."""
        return self.received + self.ended

    def reset_partial(self) -> None:
        """A new data connection takes over: what a broken one left half-read is void."""
        self._header.clear()
        self._remaining = 0

    def feed(self, data: bytes) -> list[memoryview]:
        """The payload pieces in `data`; `acked`, `ended`, `finished` are updated."""
        if self.finished:
            raise ProtocolError("bytes after the end of a resumable stream")
        view = memoryview(data)
        pieces: list[memoryview] = []
        header = self._header
        while view:
            if self._remaining:
                take = min(self._remaining, len(view))
                pieces.append(view[:take])
                self._remaining -= take
                self.received += take
                view = view[take:]
                continue
            need = (ACK_SIZE if header[:HEADER_SIZE] == b"\xff" * 4 else HEADER_SIZE) - len(header)
            header += view[:need]
            view = view[need:]
            if len(header) < HEADER_SIZE:
                break
            mark = int.from_bytes(header[:HEADER_SIZE], "big")
            if mark == ACK_MARK:
                if len(header) < ACK_SIZE:
                    continue  # the offset follows
                self.acked = max(self.acked, _ACK.unpack(header)[1])
                header.clear()
            elif mark == RESET_MARK:
                header.clear()
                self.aborted = True
                break
            elif mark > MAX_CHUNK:
                raise ProtocolError(f"chunk of {mark} bytes (at most {MAX_CHUNK})")
            elif self.ended:
                raise ProtocolError("a chunk after the end of a resumable stream")
            elif mark == 0:
                header.clear()
                self.ended = True
            else:
                header.clear()
                self._remaining = mark
            if self.ended and self.done_at is not None and self.acked >= self.done_at:
                self.finished = True
                self.leftover = bytes(view)
                break
        return pieces

    def check_finished(self) -> bool:
        """Whether the stream is over now that `done_at` may have been set."""
        if self.ended and self.done_at is not None and self.acked >= self.done_at:
            self.finished = True
        return self.finished


__all__ = [
    "ACK_SIZE",
    "END",
    "RESET_RECORD",
    "Retention",
    "RecordDecoder",
    "ack_record",
    "chunk_records",
]
