"""The one exception tree of tcpgc.

Every exception class tcpgc defines derives from `TcpgcError`, and is defined here.
Library errors (`OSError`, `ssl.SSLError`, `TimeoutError`) are mapped where they enter
(dialing, the LL dial, the TLS handshake: see `tcpgc.transport.failures`) into a
`TransportError` that carries its `reason`. Metric labels and log wording come from
these attributes, never from parsing an error's text.

This module imports nothing, so the sans-I/O protocol code can use it.
"""

from __future__ import annotations


class TcpgcError(Exception):
    """Base of every error tcpgc raises on purpose.

    `reason` is a label from a small fixed set, for metrics: never free text, which
    would let a peer create unbounded label sets."""

    reason: str = "error"

    def __init__(self, message: str = "", *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class UsageError(TcpgcError):
    """Bad flags, config, address or token: the user must change something (exit 2)."""

    reason = "usage"


# ---- the peer broke the protocol -------------------------------------------------------


class ProtocolError(TcpgcError):
    """The peer sent bytes that are not a valid tcpgc message in this state."""

    reason = "protocol"


class VersionMismatch(ProtocolError):
    """The peer speaks no protocol version we speak."""

    reason = "version"


class AuthenticationError(ProtocolError):
    """The peer failed to prove knowledge of the shared secret, or we failed to."""

    reason = "authentication"


class BadDataConnection(ProtocolError):
    """A data connection named an unknown, expired or used id, or proved it badly."""

    reason = "bad_data_id"


class ResumeRefused(ProtocolError):
    """A RESUME the LL does not accept: `reason` says why (unknown stream, bad proof)."""

    reason = "proof"


class WrongTransport(ProtocolError):
    """The peer speaks TLS to a plaintext node (or the reverse)."""

    reason = "tls"


class BadRequest(ProtocolError):
    """An HTTP request to the admin endpoint that is answered with `status` and the
    message, then closed."""

    reason = "bad_request"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---- the peer said no ------------------------------------------------------------------


class PeerRefused(TcpgcError):
    """The peer closed the handshake with an explicit error message, or an agent
    answered that it cannot serve a client."""

    reason = "refused"


class TooManySessions(TcpgcError):
    """An LL refused an agent because its join token already holds the most sessions
    allowed. Counted with authentication failures: it is the credential that is refused."""

    reason = "authentication"


class Unanswered(TcpgcError):
    """A client's first bytes went to an agent that then neither took the client nor
    refused it: that agent may have passed them to a server, so offering them to
    another would deliver them twice."""

    reason = "unanswered"


# ---- the network failed ----------------------------------------------------------------


class TransportError(TcpgcError):
    """A connection could not be made or kept: mapped from the OS or TLS error where it
    entered, with its `reason` label (timeout, resolve, refused, unreachable, reset,
    closed, tls, certificate, heartbeat) and a message worded for a log line."""

    reason = "network"


class TimedOut(TransportError):
    reason = "timeout"


class ConnectionClosed(TransportError):
    """The peer closed or reset the connection before the exchange was done."""

    reason = "closed"


class TlsFailed(TransportError):
    """The TLS handshake failed."""

    reason = "tls"


class PinMismatch(TlsFailed):
    """The LL presented another certificate than the join token pins."""

    reason = "certificate"


class CertificateChanged(TlsFailed):
    """A later connection of a session presented another certificate than its control
    connection: someone in the middle, or the LL changed certificates under us."""

    reason = "certificate"


class HeartbeatLost(TransportError):
    """The peer stopped answering on a control connection."""

    reason = "heartbeat"


class Shed(TransportError):
    """An unauthenticated connection closed by admission control to make room."""

    reason = "shed"
