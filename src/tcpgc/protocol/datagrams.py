"""The datagrams of a UDP flow on its data connection (sans-I/O).

A UDP flow travels like a TCP client's stream (`tcpgc.protocol.chunks`), with one rule
more: each chunk is exactly one datagram. A sender writes every datagram as one chunk
and never splits or merges them; a receiver hands on each chunk whole, once all of it
has come. So a datagram arrives whole or not at all, and in order within its flow. The
end marker (a chunk of length 0) ends the flow, as it ends a stream; a datagram of 0
bytes therefore cannot cross, and is dropped where it arrives. No UDP payload is longer
than 65,535 bytes: a longer chunk on a flow is a protocol error, caught from its header
before a byte of it is buffered.
"""

from __future__ import annotations

from tcpgc.errors import ProtocolError
from tcpgc.protocol.chunks import END, HEADER_SIZE

__all__ = ["END", "MAX_DATAGRAM", "DatagramDecoder", "encode_datagram"]

#: The largest payload a UDP datagram can have (65,507 over IPv4, 65,527 over IPv6).
MAX_DATAGRAM = 65535 - 8


def encode_datagram(payload: bytes | memoryview) -> bytes:
    """One datagram as its chunk (1 to MAX_DATAGRAM bytes)."""
    if not 0 < len(payload) <= MAX_DATAGRAM:
        raise ValueError(f"datagram of {len(payload)} bytes out of range")
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


class DatagramDecoder:
    """Bytes of a data connection in, whole datagrams out.

    After the end marker, `ended` is True and `leftover` holds the bytes that followed
    it (the agent's next frame on the connection); feeding more is an error."""

    __slots__ = ("_buffer", "ended", "leftover")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.ended = False
        self.leftover = b""

    @property
    def pending(self) -> int:
        """Bytes held: a datagram not yet whole."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        if self.ended:
            raise ProtocolError("bytes after the end of a UDP flow")
        buffer = self._buffer
        if buffer:
            buffer += data
            view = memoryview(bytes(buffer))
            buffer.clear()
        else:
            view = memoryview(data)
        datagrams: list[bytes] = []
        start, size = 0, len(view)
        while size - start >= HEADER_SIZE:
            length = int.from_bytes(view[start : start + HEADER_SIZE], "big")
            if length == 0:
                self.ended = True
                self.leftover = bytes(view[start + HEADER_SIZE :])
                return datagrams
            if length > MAX_DATAGRAM:
                raise ProtocolError(f"datagram of {length} bytes (at most {MAX_DATAGRAM})")
            end = start + HEADER_SIZE + length
            if end > size:
                break
            datagrams.append(bytes(view[start + HEADER_SIZE : end]))
            start = end
        if start < size:
            buffer += view[start:]
        return datagrams
