"""Where the agent's dial errors enter: a library error raised while dialing the LL or
awaiting its TLS handshake becomes a typed error with its reason label and log wording,
by its type and by where it happened, never by its text."""

from __future__ import annotations

import errno
import socket
import ssl

from tcpgc.cc.ll_dial import PLAINTEXT_HINT
from tcpgc.errors import ConnectionClosed, TimedOut, TlsFailed, TransportError
from tcpgc.transport.failures import tls_dial_error, transport_error


def test_an_orderly_close_during_the_tls_handshake_points_at_plaintext() -> None:
    # What Link.eof_received reports: no errno, the peer closed in an orderly way.
    exc = ConnectionResetError("peer closed the connection during the TLS handshake")
    error = tls_dial_error(exc, peer_plaintext_hint=PLAINTEXT_HINT)
    assert isinstance(error, TlsFailed) and error.reason == "tls"
    assert str(error) == (
        "peer closed the connection during the TLS handshake; "
        "is the LL running with --insecure-plaintext?"
    )


def test_a_reset_from_the_os_during_the_tls_handshake_is_a_reset() -> None:
    exc = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    error = tls_dial_error(exc, peer_plaintext_hint=PLAINTEXT_HINT)
    assert isinstance(error, ConnectionClosed) and error.reason == "reset"
    assert str(error) == "connection reset by peer"


def test_a_tls_alert_gets_the_hint() -> None:
    exc = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    exc.reason = "WRONG_VERSION_NUMBER"
    error = tls_dial_error(exc, peer_plaintext_hint=PLAINTEXT_HINT)
    assert isinstance(error, TlsFailed)
    assert str(error) == (
        "TLS failed (WRONG_VERSION_NUMBER); is the LL running with --insecure-plaintext?"
    )


def test_dial_failures_keep_their_log_wording() -> None:
    refused = transport_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert (str(refused), refused.reason) == ("connection refused", "refused")
    unresolved = transport_error(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert str(unresolved) == "the host name does not resolve (Name or service not known)"
    assert unresolved.reason == "resolve" and isinstance(unresolved, TransportError)
    timed_out = transport_error(TimeoutError())
    assert isinstance(timed_out, TimedOut) and str(timed_out) == "timed out"
