"""Where library errors enter tcpgc: `OSError`, `ssl.SSLError` and `TimeoutError` from a
dial or a TLS handshake become typed `TransportError`s that carry their reason label
and a message worded for one log line. Callers log `str(error)` and count
`error.reason`; nothing downstream looks at an error's text again.
"""

from __future__ import annotations

import os
import socket
import ssl

from tcpgc.errors import (
    ConnectionClosed,
    TcpgcError,
    TimedOut,
    TlsFailed,
    TransportError,
)

#: What OpenSSL says when the first bytes are not a TLS record (plaintext to a TLS port).
_NOT_TLS = "WRONG_VERSION_NUMBER"


def transport_error(exc: BaseException, *, peer_plaintext_hint: str = "") -> TcpgcError:
    """`exc` as a typed error. A `TcpgcError` is returned as it is; anything else is
    mapped by its type and errno, never by its text. `peer_plaintext_hint` is added to
    TLS failures: what to check when the peer may not speak TLS."""
    if isinstance(exc, TcpgcError):
        return exc
    if isinstance(exc, TimeoutError):
        return TimedOut("timed out")
    if isinstance(exc, socket.gaierror):
        # Its errno is a resolver code (EAI_*), which os.strerror calls 'unknown error'.
        return TransportError(f"the host name does not resolve ({exc.strerror})", reason="resolve")
    if isinstance(exc, ssl.SSLError):
        detail = exc.reason or exc.strerror or type(exc).__name__
        hint = f"; {peer_plaintext_hint}" if peer_plaintext_hint else ""
        return TlsFailed(f"TLS failed ({detail}){hint}")
    if isinstance(exc, ConnectionRefusedError):
        return TransportError(_strerror(exc, "connection refused"), reason="refused")
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return ConnectionClosed(_strerror(exc, "connection reset"), reason="reset")
    if isinstance(exc, OSError):
        return TransportError(_strerror(exc, type(exc).__name__), reason="unreachable")
    return TransportError(str(exc) or type(exc).__name__)


def tls_dial_error(exc: BaseException, *, peer_plaintext_hint: str = "") -> TcpgcError:
    """A TLS handshake we started, as a client, that failed. A `ConnectionResetError`
    without an errno is the link's own report of an orderly close during the handshake
    (see `Link.eof_received`): what a peer that does not speak TLS does, so it is a TLS
    failure and gets the hint too. A reset from the OS (with its errno) is not."""
    if isinstance(exc, ConnectionResetError) and not exc.errno:
        hint = f"; {peer_plaintext_hint}" if peer_plaintext_hint else ""
        return TlsFailed(f"{str(exc) or 'connection closed'}{hint}")
    return transport_error(exc, peer_plaintext_hint=peer_plaintext_hint)


def handshake_tls_error(exc: ssl.SSLError | OSError, *, we_speak_tls: bool) -> TcpgcError:
    """A TLS handshake that failed on the LL's agent port, worded for its operator."""
    if isinstance(exc, ssl.SSLError) and exc.reason == _NOT_TLS:
        return TlsFailed(
            "peer does not speak TLS (an agent with --insecure-plaintext, or not a tcpgc agent)"
        )
    if isinstance(exc, ssl.SSLError):
        return TlsFailed(f"TLS failed: {exc}")  # OpenSSL's words: what operators search
    if not we_speak_tls:
        return transport_error(exc)
    return ConnectionClosed(f"TLS failed: {_strerror(exc, type(exc).__name__)}")


def _strerror(exc: OSError, default: str) -> str:
    if exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or default
