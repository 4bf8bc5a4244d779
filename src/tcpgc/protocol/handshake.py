"""The mutual challenge-response that opens every control connection.

    agent (CC)                                  LL
    HELLO(versions, key_id, nonce_c)   ─────▶
                                       ◀─────   CHALLENGE(version, nonce_l, proof_l)
    AUTH(proof_c, agent_id, services,  ─────▶
         exposes, udp_exposes)
                                       ◀─────   READY(heartbeat, services, refusals)
                                                or ERROR

Both proofs are HMAC-SHA256 under the shared secret over a transcript holding both
nonces, the chosen version, the transport (TLS or plaintext) and the LL's certificate
fingerprint (the `binding`), under different labels, so neither proof can be reflected
as the other. The agent's proof also covers what it asks for (its services and the
ports it exposes), so nobody in between can widen or change the request. The secret
never crosses the wire; a captured handshake is useless because the other side's nonce is
fresh. The agent checks the LL's proof before it sends its own, and before it will act
on any request: a fake LL learns nothing and can make the agent dial nothing.

Which secret the agent proved (`key_id`) says which credential it holds; what that
credential may do is the LL's to decide (`grant`), never the agent's claim.

No I/O here: each side takes decoded messages and returns the message to send.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from enum import Enum, auto

from tcpgc.errors import AuthenticationError, PeerRefused, ProtocolError, VersionMismatch
from tcpgc.protocol.messages import (
    AGENT_ID_SIZE,
    MAX_REFUSALS,
    MAX_SERVICES,
    MAX_VERSION,
    MIN_VERSION,
    NONCE_SIZE,
    Auth,
    Challenge,
    Error,
    ErrorCode,
    Hello,
    Message,
    Ready,
    expose_name,
    request_blob,
    services_blob,
)
from tcpgc.safe_text import printable

#: What an agent asks for in AUTH: its services, and the TCP and the UDP ports it
#: exposes (host, port).
Request = tuple[tuple[str, ...], tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]
#: What the LL grants: the services it will send the agent clients of, and each refusal
#: as (what, why). See `LLHandshake`'s `grant`.
Grant = tuple[tuple[str, ...], tuple[tuple[str, str], ...]]

_LL_LABEL = b"tcpgc ll proof\x00"
_CC_LABEL = b"tcpgc cc proof\x00"


def key_id(secret: bytes) -> bytes:
    """Public 8-byte name of a secret, so an LL holding several (during a rotation)
    knows which one the agent uses without the secret being revealed."""
    return hashlib.sha256(b"tcpgc key id\x00" + secret).digest()[:8]


def _mac(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, label + b"".join(parts), hashlib.sha256).digest()


_SESSION_LABEL = b"tcpgc session key\x00"
_POOL_LABEL = b"tcpgc pool\x00"
_DATA_LABEL = b"tcpgc data\x00"


def pool_proof(session_key: bytes, agent_id: bytes, counter: int, binding: bytes) -> bytes:
    """What a ready data connection presents (see `messages.Pool`): the session (its key
    and agent id), the offer's number, and the certificate the agent saw on *this*
    connection (`binding`), so a connection to someone else cannot be offered."""
    return _mac(session_key, _POOL_LABEL, agent_id, counter.to_bytes(8, "big"), binding)


def data_proof(session_key: bytes, conn_id: bytes, binding: bytes) -> bytes:
    """What a data connection claiming client `conn_id` presents (see `messages.Data`):
    the session the client was offered to (its key), the single-use client id, and the
    certificate the agent saw on this connection. An id read off the wire is not enough."""
    return _mac(session_key, _DATA_LABEL, conn_id, binding)


_STREAM_LABEL = b"tcpgc stream\x00"
_RESUME_LABEL = b"tcpgc resume\x00"
_RESUMED_LABEL = b"tcpgc resumed\x00"
_RESUME_SESSION_LABEL = b"tcpgc resume session\x00"


def stream_key(session_key: bytes, stream_id: bytes) -> bytes:
    """The key a stream's resumes are proven with: derived from the session the stream
    began in, so only that session's agent can resume it, even after its session ended.
    Never sent; each node derives it when the stream starts."""
    return _mac(session_key, _STREAM_LABEL, stream_id)


def resume_proof(
    key: bytes, session_key: bytes, stream_id: bytes, epoch: int, received: int, binding: bytes
) -> bytes:
    """What RESUME presents: the stream's key, the agent's *current* session (its key),
    the stream, which resume this is (`epoch`: each is accepted once), the offset the
    agent asks the replay from, and the certificate seen on this connection. A recorded
    RESUME is refused: its epoch is used up, and a later session has another key."""
    current = _mac(session_key, _RESUME_SESSION_LABEL)
    numbers = epoch.to_bytes(4, "big") + received.to_bytes(8, "big")
    return _mac(key, _RESUME_LABEL, current, stream_id, numbers, binding)


def resumed_proof(key: bytes, stream_id: bytes, epoch: int, received: int) -> bytes:
    """What RESUMED presents: that the LL holding the stream's key answered this resume."""
    numbers = epoch.to_bytes(4, "big") + received.to_bytes(8, "big")
    return _mac(key, _RESUMED_LABEL, stream_id, numbers)


class State(Enum):
    START = auto()
    WAIT_CHALLENGE = auto()
    WAIT_HELLO = auto()
    WAIT_AUTH = auto()
    WAIT_READY = auto()
    DONE = auto()
    FAILED = auto()  # after any error: nothing more is accepted


def _transcript(hello: Hello, version: int, ll_nonce: bytes, binding: bytes, tls: bool) -> bytes:
    # The transport is bound too: both sides must have meant the same one.
    return hello.payload() + bytes([version]) + ll_nonce + (b"\x01" if tls else b"\x00") + binding


class AgentHandshake:
    """The agent's (CC's) side."""

    def __init__(
        self,
        secret: bytes,
        *,
        services: tuple[str, ...],
        exposes: tuple[tuple[str, int], ...] = (),
        udp_exposes: tuple[tuple[str, int], ...] = (),
        agent_id: bytes | None = None,
        binding: bytes = b"",
        tls: bool = True,
        nonce: bytes | None = None,
        versions: tuple[int, int] = (MIN_VERSION, MAX_VERSION),
    ) -> None:
        self._secret = secret
        self._services = services
        self._exposes = exposes
        self._udp_exposes = udp_exposes
        self.agent_id = agent_id or secrets.token_bytes(AGENT_ID_SIZE)
        #: The LL certificate's fingerprint this session is bound to: every later
        #: connection of the session must present the same one.
        self.binding = binding
        self.tls = tls
        self._hello = Hello(
            versions[0], versions[1], key_id(secret), nonce or secrets.token_bytes(NONCE_SIZE)
        )
        self.state = State.START
        self.version = 0
        self.heartbeat_ms = 0
        #: The services the LL will send us clients of, as it said in READY (its own
        #: within our scope, and the ports granted to us as ':PORT').
        self.ll_services: tuple[str, ...] = ()
        #: What the LL refused of our request, each as (what, why).
        self.refusals: tuple[tuple[str, str], ...] = ()
        #: Known to both sides once authenticated, never sent: keys ready data connections.
        self.session_key = b""

    def start(self) -> Hello:
        self._expect(State.START, "start")
        self.state = State.WAIT_CHALLENGE
        return self._hello

    def receive(self, message: Message) -> Message | None:
        """Process one message from the LL; returns the reply to send, if any."""
        try:
            return self._receive(message)
        except (ProtocolError, PeerRefused):
            if self.state is not State.DONE:  # a finished handshake stays finished
                self.state = State.FAILED
            raise

    def _receive(self, message: Message) -> Message | None:
        if isinstance(message, Error):
            raise PeerRefused(f"the LL refused us: {printable(message.message)}")
        if isinstance(message, Challenge):
            self._expect(State.WAIT_CHALLENGE, "CHALLENGE")
            if not self._hello.min_version <= message.version <= self._hello.max_version:
                raise VersionMismatch(
                    f"the LL chose protocol version {message.version}, we speak "
                    f"{self._hello.min_version}-{self._hello.max_version}"
                )
            transcript = _transcript(
                self._hello, message.version, message.nonce, self.binding, self.tls
            )
            if not hmac.compare_digest(message.proof, _mac(self._secret, _LL_LABEL, transcript)):
                raise AuthenticationError(
                    "the LL does not hold our token's secret (wrong token, or not the LL we think)"
                )
            self.version = message.version
            self.state = State.WAIT_READY
            exposes = (self._exposes, self._udp_exposes)
            request = services_blob(self._services) + request_blob(*exposes)
            proof = _mac(self._secret, _CC_LABEL, transcript, self.agent_id, request)
            self.session_key = _mac(self._secret, _SESSION_LABEL, transcript, self.agent_id)
            return Auth(proof, self.agent_id, self._services, *exposes)
        if isinstance(message, Ready):
            self._expect(State.WAIT_READY, "READY")
            self.heartbeat_ms = message.heartbeat_ms
            self.ll_services = message.services
            self.refusals = message.refusals
            self.state = State.DONE
            return None
        raise ProtocolError(
            f"unexpected {message.TYPE.name} during the handshake (state {self.state.name})"
        )

    def _expect(self, state: State, what: str) -> None:
        if self.state is not state:
            raise ProtocolError(f"unexpected {what} in handshake state {self.state.name}")


class LLHandshake:
    """The LL's side. `secrets_by_id` maps key ids to secrets: the LL's own (two while
    it is rotated) and each agent credential's. `grant(key_id, request)` decides, once
    the agent has proven its secret, what of its request (services, exposes) it gets;
    without it, the agent gets every service of the LL and no exposed port."""

    def __init__(
        self,
        secrets_by_id: dict[bytes, bytes],
        *,
        heartbeat_ms: int,
        binding: bytes = b"",
        tls: bool = True,
        services: tuple[str, ...] = (),
        nonce: bytes | None = None,
        grant: Callable[[bytes, Request], Grant] | None = None,
    ) -> None:
        self._secrets = secrets_by_id
        self._grant = grant
        self._heartbeat_ms = heartbeat_ms
        #: The LL's own services, told to the agent in READY (at most MAX_SERVICES).
        self._ll_services = services[:MAX_SERVICES]
        self._binding = binding
        self._tls = tls
        self._nonce = nonce or secrets.token_bytes(NONCE_SIZE)
        self._secret = b""
        self._transcript = b""
        self.state = State.WAIT_HELLO
        self.version = 0
        self.agent_id = b""
        self.services: tuple[str, ...] = ()
        #: The ports the agent asked to expose, as (host, port): TCP, and UDP.
        self.exposes: tuple[tuple[str, int], ...] = ()
        self.udp_exposes: tuple[tuple[str, int], ...] = ()
        self.session_key = b""
        #: Which of the LL's secrets (credentials) the agent proved, once it has.
        self.key_id = b""

    def receive(self, message: Message) -> Message:
        """Process one message from the agent; returns the reply to send."""
        try:
            return self._receive(message)
        except ProtocolError:
            if self.state is not State.DONE:  # a finished handshake stays finished
                self.state = State.FAILED
            raise

    def _receive(self, message: Message) -> Message:
        if isinstance(message, Hello):
            self._expect(State.WAIT_HELLO, "HELLO")
            version = min(message.max_version, MAX_VERSION)
            if version < max(message.min_version, MIN_VERSION):
                raise VersionMismatch(
                    f"agent speaks protocol versions {message.min_version}-{message.max_version}, "
                    f"this LL speaks {MIN_VERSION}-{MAX_VERSION}: upgrade the older side"
                )
            secret = self._secrets.get(message.key_id)
            if secret is None:
                raise AuthenticationError("agent presented a token this LL does not accept")
            self._secret = secret
            self.version = version
            self._transcript = _transcript(message, version, self._nonce, self._binding, self._tls)
            self.state = State.WAIT_AUTH
            return Challenge(version, self._nonce, _mac(secret, _LL_LABEL, self._transcript))
        if isinstance(message, Auth):
            self._expect(State.WAIT_AUTH, "AUTH")
            exposes = (message.exposes, message.udp_exposes)
            request = services_blob(message.services) + request_blob(*exposes)
            expected = _mac(self._secret, _CC_LABEL, self._transcript, message.agent_id, request)
            if not hmac.compare_digest(message.proof, expected):
                raise AuthenticationError("agent's proof of the secret is wrong")
            self.agent_id = message.agent_id
            self.key_id = key_id(self._secret)
            self.services = message.services
            self.exposes, self.udp_exposes = exposes
            self.session_key = _mac(
                self._secret, _SESSION_LABEL, self._transcript, message.agent_id
            )
            self.state = State.DONE
            if self._grant is None:
                why = "this LL grants no exposed port"
                refused = tuple((expose_name(port), why) for _, port in message.exposes) + tuple(
                    (expose_name(port, udp=True), why) for _, port in message.udp_exposes
                )
                return Ready(self._heartbeat_ms, self._ll_services, refused[:MAX_REFUSALS])
            granted, refusals = self._grant(self.key_id, (message.services, *exposes))
            return Ready(self._heartbeat_ms, granted[:MAX_SERVICES], refusals[:MAX_REFUSALS])
        raise ProtocolError(
            f"unexpected {message.TYPE.name} during the handshake (state {self.state.name})"
        )

    def _expect(self, state: State, what: str) -> None:
        if self.state is not state:
            raise ProtocolError(f"unexpected {what} in handshake state {self.state.name}")


def error_code(exc: ProtocolError) -> ErrorCode:
    """The code to send the peer for a failed handshake."""
    if isinstance(exc, VersionMismatch):
        return ErrorCode.VERSION
    if isinstance(exc, AuthenticationError):
        return ErrorCode.AUTHENTICATION
    return ErrorCode.BAD_MESSAGE
