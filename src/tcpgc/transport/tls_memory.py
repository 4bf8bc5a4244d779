"""TLS over memory BIOs, for one `tcpgc.transport.link.Link`: bytes from the socket in,
plaintext and TLS records out, no I/O of its own.

asyncio's own TLS transport cannot half-close (no `write_eof`) and keeps large buffers
per connection, so the link does TLS itself through an `ssl.SSLObject`. TLS 1.3 lets
one side send close_notify and keep reading, which is how half-close crosses the tunnel.
"""

from __future__ import annotations

import ssl
from enum import Enum

#: Largest piece fed to a TLS memory BIO at once, which bounds what each BIO keeps
#: allocated for the rest of the connection (OpenSSL never shrinks it).
BIO_SLICE = 32 * 1024

#: How much decrypted data one SSLObject.read call returns at most.
TLS_READ_SIZE = 64 * 1024


class ReadStatus(Enum):
    """What `MemoryTls.decrypt` found after the records it returned."""

    MORE = "more"  # the stream goes on: feed more
    ENDED = "ended"  # the peer's close_notify (or end of stream)
    FAILED = "failed"  # a TLS error: the connection is to be reset


class MemoryTls:
    """One TLS session over a pair of memory BIOs. The link feeds it what the socket
    reads (`feed`), drives the handshake (`handshake`), takes plaintext (`decrypt`) and
    sends what `take_output` and `encrypt` return."""

    __slots__ = ("_ssl", "_incoming", "_outgoing")

    def __init__(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )

    def feed(self, data: bytes | memoryview) -> None:
        """Bytes read from the socket (at most BIO_SLICE at a time: see BIO_SLICE)."""
        self._incoming.write(data)

    def handshake(self) -> bool:
        """Advance the handshake with what was fed: True once it is complete. Raises
        `ssl.SSLError` or `OSError` if it failed. Either way, `take_output` then holds
        what is to be sent."""
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def decrypt(self, plain: list[bytes]) -> ReadStatus:
        """Append every whole record's plaintext to `plain`."""
        while True:
            try:
                chunk = self._ssl.read(TLS_READ_SIZE)
            except ssl.SSLWantReadError:
                return ReadStatus.MORE
            except ssl.SSLZeroReturnError:
                return ReadStatus.ENDED
            except ssl.SSLError:
                return ReadStatus.FAILED
            if not chunk:
                return ReadStatus.ENDED
            plain.append(chunk)

    def encrypt(self, data: bytes | memoryview, prefix: bytes = b"") -> bytes:
        """`prefix` then `data` as TLS records, in one piece for one socket write (a
        chunk header then costs no record of its own). Raises `ssl.SSLError`."""
        view = memoryview(data)
        records: list[bytes] = []
        first = 0
        if prefix:
            first = BIO_SLICE - len(prefix)
            self._ssl.write(prefix + view[:first])
            records.append(self._outgoing.read())
        for start in range(first, len(view), BIO_SLICE):  # see BIO_SLICE
            self._ssl.write(view[start : start + BIO_SLICE])
            records.append(self._outgoing.read())
        return records[0] if len(records) == 1 else b"".join(records)

    def close_notify(self) -> None:
        """End our direction (close_notify, in `take_output`); TLS 1.3 lets us go on
        reading."""
        try:
            self._ssl.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass

    def take_output(self) -> bytes:
        """The records due to the peer (handshake, alerts, key updates), b"" if none."""
        return self._outgoing.read() if self._outgoing.pending else b""

    @property
    def peer_certificate(self) -> bytes | None:
        """DER of the peer's certificate, once the handshake got it."""
        return self._ssl.getpeercert(binary_form=True)

    @property
    def context(self) -> ssl.SSLContext:
        """The context in use: after SNI selection, the one that was chosen."""
        return self._ssl.context
