"""Bytes in, messages out: the frame decoder every connection of the protocol reads with."""

from __future__ import annotations

from collections.abc import Callable

from tcpgc.errors import ProtocolError
from tcpgc.protocol.frame_auth import TAG_SIZE, FrameAuth
from tcpgc.protocol.messages import HEADER, MAX_PAYLOAD, PARSERS, Message, decode


class FrameDecoder:
    """Bytes in, messages out. Feed with `receive_data`; b"" marks the end of the stream.
    Once `auth` is set, every later frame must carry its MAC (plaintext connections).
    `first_type` vets the first frame's type byte (see `ll_pairing.refuse_tls_record`)."""

    def __init__(
        self, max_payload: int = MAX_PAYLOAD, *, first_type: Callable[[int], None] | None = None
    ) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload
        self._eof = False
        self.auth: FrameAuth | None = None
        #: Called with the first frame's type byte before anything else is checked: it
        #: may raise a ProtocolError of its own (an LL tells a TLS ClientHello this way).
        self._first_type = first_type

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
        self._buffer += data

    def next_message(self) -> Message | None:
        """The next whole message, or None if more bytes are needed."""
        if len(self._buffer) < HEADER.size:
            self._check_eof()
            return None
        kind, length = HEADER.unpack_from(self._buffer)
        if self._first_type is not None:
            check, self._first_type = self._first_type, None
            check(kind)
        if length > self._max_payload + (TAG_SIZE if self.auth is not None else 0):
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self._max_payload}")
        if kind not in PARSERS:
            raise ProtocolError(f"unknown message type {kind}")
        end = HEADER.size + length
        if len(self._buffer) < end:
            self._check_eof()
            return None
        payload = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        if self.auth is not None:
            payload = self.auth.open(kind, payload)
        return decode(kind, payload)

    def _check_eof(self) -> None:
        if self._eof and self._buffer:
            raise ProtocolError(
                f"connection closed in the middle of a frame ({len(self._buffer)} bytes)",
                reason="closed",
            )

    def leftover(self) -> bytes:
        """Bytes received after the last message: the start of a relayed stream."""
        out = bytes(self._buffer)
        self._buffer.clear()
        return out
