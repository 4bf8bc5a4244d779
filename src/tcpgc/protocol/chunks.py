"""The chunked stream of a reusable data connection (sans-I/O).

A TLS data connection can only be reused for another client if the end of each client's
stream is marked inside it: a TCP or TLS close would end the connection itself. So on a
ready data connection over TLS, each direction of the client's stream is a sequence of
chunks, each a 4-byte big-endian length and that many bytes, and it ends with a chunk of
length 0. Once both directions have ended, the connection is idle again and the agent
may offer it anew (a fresh POOL frame). A connection that closes before its end marker
ended abnormally: the stream it carried is reset, never silently cut short.
"""

from __future__ import annotations

from tcpgc.errors import ProtocolError

HEADER_SIZE = 4
#: The end of one direction of a client's stream.
END = bytes(HEADER_SIZE)
#: A chunk's largest length. A sender chunks what it reads (at most a socket read, 256 KiB).
MAX_CHUNK = 1 << 20


def chunk_header(length: int) -> bytes:
    """The header of a chunk of `length` bytes (1 to MAX_CHUNK)."""
    if not 0 < length <= MAX_CHUNK:
        raise ValueError(f"chunk length {length} out of range")
    return length.to_bytes(HEADER_SIZE, "big")


def parse_chunk_header(buffer: bytes | bytearray | memoryview) -> int | None:
    """The length announced by the chunk header at the start of `buffer` (0: the end
    marker), or None while fewer than HEADER_SIZE bytes are there. Raises ProtocolError
    for a length above MAX_CHUNK."""
    if len(buffer) < HEADER_SIZE:
        return None
    length = int.from_bytes(buffer[:HEADER_SIZE], "big")
    if length > MAX_CHUNK:
        raise ProtocolError(f"chunk of {length} bytes (at most {MAX_CHUNK})")
    return length


class ChunkDecoder:
    """Bytes in, payload out: `feed` returns the payload pieces found in `data`.

    After the end marker, `ended` is True and `leftover` holds the bytes that followed it
    (the next message on the connection); feeding more after that is an error."""

    __slots__ = ("_header", "_remaining", "ended", "leftover")

    def __init__(self) -> None:
        self._header = bytearray()
        self._remaining = 0  # payload bytes still due in the current chunk
        self.ended = False
        self.leftover = b""

    @property
    def remaining(self) -> int:
        """Payload bytes still due in the current chunk."""
        return self._remaining

    @property
    def partial_header(self) -> bytes:
        """The part of the next header already fed."""
        return bytes(self._header)

    def feed(self, data: bytes) -> list[memoryview]:
        if self.ended:
            raise ProtocolError("bytes after the end of a chunked stream")
        view = memoryview(data)
        pieces: list[memoryview] = []
        while view:
            if self._remaining:
                take = min(self._remaining, len(view))
                pieces.append(view[:take])
                self._remaining -= take
                view = view[take:]
                continue
            need = HEADER_SIZE - len(self._header)
            self._header += view[:need]
            view = view[need:]
            length = parse_chunk_header(self._header)
            if length is None:
                break
            self._header.clear()
            if length == 0:
                self.ended = True
                self.leftover = bytes(view)
                break
            self._remaining = length
        return pieces
