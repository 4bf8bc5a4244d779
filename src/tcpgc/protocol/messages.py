"""The tcpgc wire format: frames and the messages they carry.

Every message travels in one frame: a 3-byte header (type: u8, payload length: u16,
network byte order) followed by the payload. The decoder consumes a frame only when it
is whole, so it can be fed any split of the byte stream, down to one byte at a time.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, TypeAlias, get_args

from tcpgc.errors import ProtocolError
from tcpgc.protocol.fields import AGENT_ID_SIZE as AGENT_ID_SIZE
from tcpgc.protocol.fields import CONN_ID_SIZE as CONN_ID_SIZE
from tcpgc.protocol.fields import KEY_ID_SIZE as KEY_ID_SIZE
from tcpgc.protocol.fields import MAGIC as MAGIC
from tcpgc.protocol.fields import MAX_EXPOSES as MAX_EXPOSES
from tcpgc.protocol.fields import MAX_NAME as MAX_NAME
from tcpgc.protocol.fields import MAX_REFUSALS as MAX_REFUSALS
from tcpgc.protocol.fields import MAX_SERVICES as MAX_SERVICES
from tcpgc.protocol.fields import MAX_TEXT as MAX_TEXT
from tcpgc.protocol.fields import NONCE_SIZE as NONCE_SIZE
from tcpgc.protocol.fields import PROOF_SIZE as PROOF_SIZE
from tcpgc.protocol.fields import FieldReader, endpoint_field, name_field, text_field
from tcpgc.protocol.fields import expose_name as expose_name
from tcpgc.protocol.fields import exposes_blob as exposes_blob
from tcpgc.protocol.fields import is_valid_name as is_valid_name
from tcpgc.protocol.fields import refusals_blob as refusals_blob
from tcpgc.protocol.fields import request_blob as request_blob
from tcpgc.protocol.fields import services_blob as services_blob
from tcpgc.protocol.frame_auth import FrameAuth

#: Protocol versions this implementation speaks. A peer offering a disjoint range is
#: refused with a message naming both ranges. Version 2 binds data connections to their
#: session (DATA carries a proof; POOL's covers the certificate) and authenticates every
#: plaintext frame. Version 3 makes streams resumable (OPEN carries the resume window;
#: RESUME, RESUMED and the stream's ACK records). Version 4 makes agents principals:
#: AUTH declares the ports the agent exposes, READY says what the agent may serve and
#: what was refused. Version 5 adds UDP: AUTH's second exposes list is of UDP ports.
#: Peers of versions 1 to 4 are refused.
MIN_VERSION = 5
MAX_VERSION = 5

HEADER = struct.Struct("!BH")

#: Largest payload accepted. The biggest legitimate message is a READY naming every
#: service an agent may serve (at most MAX_SERVICES names of at most 64 bytes: 13 KiB)
#: with its refusals (at most MAX_REFUSALS of some 270 bytes: 4.3 KiB); 24 KiB leaves
#: room for that while keeping what one unauthenticated peer can make us buffer small.
MAX_PAYLOAD = 24 * 1024


class MessageType(IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    READY = 4
    ERROR = 5
    OPEN = 6
    OPEN_FAILED = 7
    PING = 8
    PONG = 9
    DATA = 10
    POOL = 11
    RETIRE = 12
    RESUME = 13
    RESUMED = 14


class ErrorCode(IntEnum):
    VERSION = 1
    AUTHENTICATION = 2
    BAD_MESSAGE = 3
    UNAVAILABLE = 4
    UNKNOWN_STREAM = 5


@dataclass(frozen=True)
class Hello:
    """Agent → LL, first frame of a control connection: versions, key id, nonce."""

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    min_version: int
    max_version: int
    key_id: bytes
    nonce: bytes

    def payload(self) -> bytes:
        return MAGIC + bytes([self.min_version, self.max_version]) + self.key_id + self.nonce

    @classmethod
    def parse(cls, r: FieldReader) -> Hello:
        r.magic()
        return cls(r.u8(), r.u8(), r.take(KEY_ID_SIZE), r.take(NONCE_SIZE))


@dataclass(frozen=True)
class Challenge:
    """LL → agent: chosen version, the LL's nonce and its proof of the secret."""

    TYPE: ClassVar[MessageType] = MessageType.CHALLENGE
    version: int
    nonce: bytes
    proof: bytes

    def payload(self) -> bytes:
        return bytes([self.version]) + self.nonce + self.proof

    @classmethod
    def parse(cls, r: FieldReader) -> Challenge:
        return cls(r.u8(), r.take(NONCE_SIZE), r.take(PROOF_SIZE))


@dataclass(frozen=True)
class Auth:
    """Agent → LL: the agent's proof, its instance id, the services it serves, and the
    TCP and the UDP ports it asks the LL to take clients on for it (`--expose`: host, ""
    for the LL's default, and port)."""

    TYPE: ClassVar[MessageType] = MessageType.AUTH
    proof: bytes
    agent_id: bytes
    services: tuple[str, ...]
    exposes: tuple[tuple[str, int], ...] = ()
    udp_exposes: tuple[tuple[str, int], ...] = ()

    def payload(self) -> bytes:
        blobs = services_blob(self.services) + request_blob(self.exposes, self.udp_exposes)
        return self.proof + self.agent_id + blobs

    @classmethod
    def parse(cls, r: FieldReader) -> Auth:
        proof, agent_id = r.take(PROOF_SIZE), r.take(AGENT_ID_SIZE)
        return cls(proof, agent_id, r.services(), r.exposes(), r.exposes())


@dataclass(frozen=True)
class Ready:
    """LL → agent: the session is up; the LL's heartbeat interval in milliseconds, the
    services it will send this agent clients of (its own within the agent's scope, and
    the ports granted to it, as ':PORT'), and what it refused, each with why (a
    service or a port outside the agent's scope, a port it cannot listen on)."""

    TYPE: ClassVar[MessageType] = MessageType.READY
    heartbeat_ms: int
    services: tuple[str, ...] = ()
    refusals: tuple[tuple[str, str], ...] = ()

    def payload(self) -> bytes:
        head = struct.pack("!I", self.heartbeat_ms) + services_blob(self.services)
        return head + refusals_blob(self.refusals)

    @classmethod
    def parse(cls, r: FieldReader) -> Ready:
        return cls(r.u32(), r.services(), r.refusals())


@dataclass(frozen=True)
class Error:
    """Either way: why the sender is closing the connection."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    code: int
    message: str

    def payload(self) -> bytes:
        return bytes([self.code]) + text_field(self.message)

    @classmethod
    def parse(cls, r: FieldReader) -> Error:
        return cls(r.u8(), r.text())


@dataclass(frozen=True)
class Open:
    """LL → agent: a client of `service` waits; claim it with a data connection. With
    the client's address and the one it connected to (PROXY protocol; empty: unknown),
    `resume_window_ms` (0: not resumable), and `udp`: the client is a UDP flow."""

    TYPE: ClassVar[MessageType] = MessageType.OPEN
    conn_id: bytes
    service: str
    client_host: str = ""
    client_port: int = 0
    local_host: str = ""
    local_port: int = 0
    resume_window_ms: int = 0
    udp: bool = False

    def payload(self) -> bytes:
        return (
            self.conn_id
            + name_field(self.service)
            + endpoint_field(self.client_host, self.client_port)
            + endpoint_field(self.local_host, self.local_port)
            + struct.pack("!IB", self.resume_window_ms, self.udp)
        )

    @classmethod
    def parse(cls, r: FieldReader) -> Open:
        conn_id, service = r.take(CONN_ID_SIZE), r.name()
        client_host, client_port = r.endpoint()
        local_host, local_port = r.endpoint()
        window, udp = r.u32(), r.u8()
        if udp > 1:
            raise ProtocolError(f"OPEN has a protocol flag of {udp}")
        ends = (client_host, client_port, local_host, local_port)
        return cls(conn_id, service, *ends, window, bool(udp))


@dataclass(frozen=True)
class OpenFailed:
    """Agent → LL: the client `conn_id` cannot be served (e.g. its server is down)."""

    TYPE: ClassVar[MessageType] = MessageType.OPEN_FAILED
    conn_id: bytes
    reason: str

    def payload(self) -> bytes:
        return self.conn_id + text_field(self.reason)

    @classmethod
    def parse(cls, r: FieldReader) -> OpenFailed:
        return cls(r.take(CONN_ID_SIZE), r.text())


@dataclass(frozen=True)
class Ping:
    TYPE: ClassVar[MessageType] = MessageType.PING
    token: int

    def payload(self) -> bytes:
        return struct.pack("!Q", self.token)

    @classmethod
    def parse(cls, r: FieldReader) -> Ping:
        return cls(r.u64())


@dataclass(frozen=True)
class Pong:
    TYPE: ClassVar[MessageType] = MessageType.PONG
    token: int

    def payload(self) -> bytes:
        return struct.pack("!Q", self.token)

    @classmethod
    def parse(cls, r: FieldReader) -> Pong:
        return cls(r.u64())


@dataclass(frozen=True)
class Data:
    """Agent → LL, the only frame of a data connection: which waiting client it carries,
    and a proof (see `handshake.data_proof`) that it comes from the session that client
    was offered to, over the certificate the agent saw on this connection. Every byte
    after it is the client's stream."""

    TYPE: ClassVar[MessageType] = MessageType.DATA
    version: int
    conn_id: bytes
    proof: bytes

    def payload(self) -> bytes:
        return MAGIC + bytes([self.version]) + self.conn_id + self.proof

    @classmethod
    def parse(cls, r: FieldReader) -> Data:
        r.magic()
        return cls(r.u8(), r.take(CONN_ID_SIZE), r.take(PROOF_SIZE))


@dataclass(frozen=True)
class Pool:
    """Agent → LL, first frame of a ready data connection, opened before any client:
    which agent's session it belongs to, proven with a MAC under that session's key
    over a counter that must grow, so a recorded frame cannot be played again.
    The LL then sends OPEN on it when a client comes, and the agent answers DATA
    (then the stream) or OPEN_FAILED."""

    TYPE: ClassVar[MessageType] = MessageType.POOL
    agent_id: bytes
    counter: int
    proof: bytes

    def payload(self) -> bytes:
        return MAGIC + self.agent_id + struct.pack("!Q", self.counter) + self.proof

    @classmethod
    def parse(cls, r: FieldReader) -> Pool:
        r.magic()
        return cls(r.take(AGENT_ID_SIZE), r.u64(), r.take(PROOF_SIZE))


@dataclass(frozen=True)
class Retire:
    """Agent → LL, on a ready data connection the agent is about to close (renewed after
    `pool_ttl` idle): it will not act on anything sent on it, so an OPEN that crossed it
    may go to another connection, first bytes and all."""

    TYPE: ClassVar[MessageType] = MessageType.RETIRE

    def payload(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, r: FieldReader) -> Retire:
        return cls()


@dataclass(frozen=True)
class Resume:
    """Agent → LL, first frame of a data connection that takes over stream `stream_id`
    after a break: the `epoch`-th resume of it, what the agent has received of it
    (`received`, the end marker counting one), and a proof (`handshake.resume_proof`)
    under the stream's key, bound to the agent's current session and to the LL
    certificate seen on this connection."""

    TYPE: ClassVar[MessageType] = MessageType.RESUME
    version: int
    stream_id: bytes
    epoch: int
    received: int
    proof: bytes

    def payload(self) -> bytes:
        head = MAGIC + bytes([self.version]) + self.stream_id
        return head + struct.pack("!IQ", self.epoch, self.received) + self.proof

    @classmethod
    def parse(cls, r: FieldReader) -> Resume:
        r.magic()
        version, stream_id = r.u8(), r.take(CONN_ID_SIZE)
        return cls(version, stream_id, r.u32(), r.u64(), r.take(PROOF_SIZE))


@dataclass(frozen=True)
class Resumed:
    """LL → agent, the answer to RESUME: what the LL has received of the stream, and a
    proof under the stream's key that the LL holding it answered. The stream follows."""

    TYPE: ClassVar[MessageType] = MessageType.RESUMED
    received: int
    proof: bytes

    def payload(self) -> bytes:
        return struct.pack("!Q", self.received) + self.proof

    @classmethod
    def parse(cls, r: FieldReader) -> Resumed:
        return cls(r.u64(), r.take(PROOF_SIZE))


Message: TypeAlias = (
    Hello
    | Challenge
    | Auth
    | Ready
    | Error
    | Open
    | OpenFailed
    | Ping
    | Pong
    | Data
    | Pool
    | Retire
    | Resume
    | Resumed
)

#: Every message class by its type byte.
PARSERS: dict[MessageType, type[Message]] = {cls.TYPE: cls for cls in get_args(Message)}


def encode(message: Message, auth: FrameAuth | None = None) -> bytes:
    """The frame carrying `message`, with its MAC if the connection has `auth`."""
    payload = message.payload()
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(
            f"{message.TYPE.name} payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}"
        )
    if auth is not None:
        payload = auth.seal(message.TYPE, payload)
    return HEADER.pack(message.TYPE, len(payload)) + payload


def decode(kind: int, payload: bytes) -> Message:
    """Parse one frame's payload; raises ProtocolError for anything malformed."""
    try:
        mtype = MessageType(kind)
    except ValueError:
        raise ProtocolError(f"unknown message type {kind}") from None
    reader = FieldReader(mtype.name, payload)
    message = PARSERS[mtype].parse(reader)
    reader.end()
    return message
