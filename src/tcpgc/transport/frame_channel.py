"""Awaitable frames over a Link, for the control connection and a data connection's
first frame. Decoding stays in the sans-I/O codec; this only waits for it."""

from __future__ import annotations

import asyncio

from tcpgc.protocol.frame_auth import FrameAuth
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.messages import MAX_PAYLOAD, Message, encode
from tcpgc.transport.link import Link


class FrameChannel:
    """The handler of a link that carries frames.

    Reading stops for either of two reasons, and resumes only when neither holds: the
    frames read are not handled yet (our buffer), or the peer does not read what we
    send (the link's write buffer is past its high-water mark). The second matters
    because every PING we read makes a PONG we write: a peer that sends and never
    reads would otherwise make us buffer answers without limit."""

    def __init__(self, link: Link, decoder: FrameDecoder | None = None) -> None:
        self.link = link
        self._decoder = decoder or FrameDecoder()
        self._buffered = 0
        self._eof = False
        self._lost = False
        #: The peer is not reading: our writes wait in the link's buffer.
        self.write_blocked = False
        self._wakeup = asyncio.Event()
        link.attach(self)

    # LinkHandler
    def on_data(self, data: bytes) -> None:
        self._decoder.receive_data(data)
        self._buffered += len(data)
        if self._buffered > 2 * MAX_PAYLOAD:
            # The peer sends faster than we handle frames: stop reading until we catch up.
            self.link.pause_reading()
        self._wakeup.set()

    def on_eof(self) -> None:
        self._eof = True
        self._wakeup.set()

    def on_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self._wakeup.set()

    def on_pause(self) -> None:
        self.write_blocked = True
        self.link.pause_reading()

    def on_resume(self) -> None:
        self.write_blocked = False
        if self._buffered <= 2 * MAX_PAYLOAD:
            self.link.resume_reading()

    async def recv(self, within: float | None = None) -> Message | None:
        """The next message; None when the peer closed cleanly between frames.
        Raises ProtocolError for bad bytes and TimeoutError after `within` seconds."""
        async with asyncio.timeout(within):
            while True:
                message = self._decoder.next_message()
                if message is not None:
                    self._buffered = 0
                    if not self.write_blocked:
                        self.link.resume_reading()
                    return message
                if self._eof or self._lost:
                    self._decoder.receive_data(b"")
                    self._decoder.next_message()  # raises if the stream ended mid-frame
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()

    @property
    def auth(self) -> FrameAuth | None:
        """Frame MACs of this connection (plaintext mode after the handshake), else None.
        Set it between frames: it applies to the next frame either way."""
        return self._decoder.auth

    @auth.setter
    def auth(self, auth: FrameAuth | None) -> None:
        self._decoder.auth = auth

    def encode(self, message: Message) -> bytes:
        """`message` as this connection sends it (with its MAC, if it has `auth`)."""
        return encode(message, self._decoder.auth)

    def send(self, message: Message) -> None:
        self.link.write(self.encode(message))

    def detach(self) -> None:
        """Hand the link back to buffering, with any bytes read past the last frame.
        Reading resumes: a pause of ours was for our buffer, and the link's own buffer
        pauses by itself when it needs to."""
        self.link.detach(self._decoder.leftover(), self._eof)
        self.link.resume_reading()
