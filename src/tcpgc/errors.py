"""One small exception tree. Library errors are translated at the boundary."""


class TcpgcError(Exception):
    """Base of every error tcpgc raises on purpose."""


class UsageError(TcpgcError):
    """Bad flags, config, address or token: the user must change something (exit 2)."""


class ProtocolError(TcpgcError):
    """The peer sent bytes that are not a valid tcpgc message in this state."""


class AuthenticationError(ProtocolError):
    """The peer failed to prove knowledge of the shared secret, or we failed to."""


class PeerRefused(TcpgcError):
    """The peer closed the handshake with an explicit error message."""
