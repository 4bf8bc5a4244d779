"""The fields tcpgc messages are made of: sizes, the reader that takes them off a
payload, and the encoders that write them (names, texts, endpoints, service lists).

`tcpgc.protocol.messages` builds its messages from these; nothing here knows a message.
"""

from __future__ import annotations

import functools
import ipaddress
import struct

from tcpgc.errors import ProtocolError
from tcpgc.safe_text import shared

#: Every tcpgc connection from an agent starts with this, so a stray HTTP client or a
#: port scanner is told apart from a real agent at the first bytes.
MAGIC = b"TGC"

#: The most services one AUTH or READY names (see `messages.MAX_PAYLOAD`).
MAX_SERVICES = 200
#: The most ports one agent declares in AUTH (`--expose`): an LL caps each agent lower.
MAX_EXPOSES = 32
#: The most refusals one READY carries, and the longest text of each: enough to say
#: what an agent may do; more would only make READY bigger than any real setup needs.
MAX_REFUSALS = 16
MAX_REFUSAL_TEXT = 200

NONCE_SIZE = 32
PROOF_SIZE = 32
KEY_ID_SIZE = 8
CONN_ID_SIZE = 16
AGENT_ID_SIZE = 16
MAX_NAME = 64
MAX_TEXT = 512


class FieldReader:
    """Reads fields off the payload of a message named `what`; any shortfall or
    leftover is a ProtocolError that names the message."""

    def __init__(self, what: str, payload: bytes) -> None:
        self.what = what
        self.view = memoryview(payload)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.view):
            raise ProtocolError(f"{self.what} message is truncated")
        out = bytes(self.view[self.pos : self.pos + n])
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        value: int = struct.unpack("!I", self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack("!Q", self.take(8))[0]
        return value

    def name(self) -> str:
        raw = self.take(self.u8())
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.what} message has a name that is not UTF-8") from None
        if not is_valid_name(text):
            raise ProtocolError(f"{self.what} message has an invalid name {text[:64]!r}")
        # Shared, like addresses below: an OPEN is kept for the life of its connection,
        # and thousands of them name the same few services and hosts.
        return shared(text)

    def endpoint(self) -> tuple[str, int]:
        """An IP address as text (or empty: unknown) and a port."""
        raw = self.take(self.u8())
        port: int = struct.unpack("!H", self.take(2))[0]
        if not raw:
            return "", port
        try:
            return _address(raw), port
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError(f"{self.what} message has an invalid address") from None

    def services(self) -> tuple[str, ...]:
        """A services list as `services_blob` writes it."""
        count = self.u8()
        if count > MAX_SERVICES:
            raise ProtocolError(f"{self.what} names {count} services, more than {MAX_SERVICES}")
        return tuple(self.name() for _ in range(count))

    def exposes(self) -> tuple[tuple[str, int], ...]:
        """An exposes list as `exposes_blob` writes it: (host, port), host "" for the
        LL's default, port 1-65535."""
        count = self.u8()
        if count > MAX_EXPOSES:
            raise ProtocolError(f"{self.what} declares {count} ports, more than {MAX_EXPOSES}")
        out = tuple(self.endpoint() for _ in range(count))
        if any(not port for _, port in out):
            raise ProtocolError(f"{self.what} declares port 0")
        return out

    def refusals(self) -> tuple[tuple[str, str], ...]:
        """A refusals list as `refusals_blob` writes it: (what, why)."""
        count = self.u8()
        if count > MAX_REFUSALS:
            raise ProtocolError(f"{self.what} has {count} refusals, more than {MAX_REFUSALS}")
        out = []
        for _ in range(count):
            subject = self.name()
            length = struct.unpack("!H", self.take(2))[0]
            if length > MAX_REFUSAL_TEXT:
                raise ProtocolError(f"{self.what} has a refusal text of {length} bytes")
            out.append((subject, self.take(length).decode("utf-8", errors="replace")))
        return tuple(out)

    def magic(self) -> None:
        if self.take(len(MAGIC)) != MAGIC:
            raise ProtocolError("not a tcpgc peer (bad magic)")

    def text(self) -> str:
        return self.take(len(self.view) - self.pos).decode("utf-8", errors="replace")

    def end(self) -> None:
        if self.pos != len(self.view):
            raise ProtocolError(f"{self.what} message has {len(self.view) - self.pos} extra bytes")


@functools.lru_cache(maxsize=4096)
def _address(raw: bytes) -> str:
    """An IP address checked and in its normal form, once per distinct address: every
    OPEN carries two, and `ipaddress` costs tens of microseconds a parse. Bounded: peers
    choose these bytes. Raises ValueError (or UnicodeDecodeError) for a bad one."""
    return shared(str(ipaddress.ip_address(raw.decode("ascii"))))


def is_valid_name(name: str) -> bool:
    """Service names: 1-64 of ASCII letters, digits, '-', '_' and '.'; or, for a port
    an agent exposes, ':' and the port, and '/udp' for a UDP one (see `expose_name`)."""
    if name[:1] == ":":
        port = name[1:].removesuffix(UDP_SUFFIX)
        return port.isdecimal() and port.isascii() and 0 < int(port) < 65536
    return 0 < len(name) <= MAX_NAME and all(
        c.isascii() and (c.isalnum() or c in "-_.") for c in name
    )


#: What ends the name of a UDP port an agent exposes.
UDP_SUFFIX = "/udp"


def expose_name(port: int, udp: bool = False) -> str:
    """The service name of a port an agent exposes, on the wire and in logs, metrics
    and the status page: ':8010', or ':5353/udp' for a UDP one. A configured service's
    name never starts with ':'."""
    return f":{port}{UDP_SUFFIX}" if udp else f":{port}"


def exposes_blob(exposes: tuple[tuple[str, int], ...]) -> bytes:
    """The exposes list as sent in AUTH; also part of what the agent's proof covers."""
    if len(exposes) > MAX_EXPOSES:
        raise ValueError(f"an agent can expose at most {MAX_EXPOSES} ports")
    return bytes([len(exposes)]) + b"".join(endpoint_field(h, p) for h, p in exposes)


def request_blob(exposes: tuple[tuple[str, int], ...], udp: tuple[tuple[str, int], ...]) -> bytes:
    """AUTH's two exposes lists, TCP then UDP, as sent; part of what the proof covers."""
    return exposes_blob(exposes) + exposes_blob(udp)


def refusals_blob(refusals: tuple[tuple[str, str], ...]) -> bytes:
    """READY's refusals: what (a service name) and why, the text cut to MAX_REFUSAL_TEXT."""
    if len(refusals) > MAX_REFUSALS:
        raise ValueError(f"at most {MAX_REFUSALS} refusals")
    out = bytearray([len(refusals)])
    for subject, text in refusals:
        raw = text.encode("utf-8")[:MAX_REFUSAL_TEXT]
        raw = raw.decode("utf-8", errors="ignore").encode("utf-8")  # never cut a character
        out += name_field(subject) + struct.pack("!H", len(raw)) + raw
    return bytes(out)


def name_field(value: str) -> bytes:
    """A service name, length-prefixed; ValueError if it is not a valid name."""
    raw = value.encode("utf-8")
    if not is_valid_name(value):
        raise ValueError(f"invalid service name {value!r}")
    return bytes([len(raw)]) + raw


def text_field(value: str) -> bytes:
    """Free text to the end of the payload, cut to MAX_TEXT bytes."""
    raw = value.encode("utf-8")[:MAX_TEXT]
    return raw.decode("utf-8", errors="ignore").encode("utf-8")  # never cut a character


def endpoint_field(host: str, port: int) -> bytes:
    """An IP address as text (empty: unknown), length-prefixed, and a port."""
    raw = host.encode("ascii")
    return bytes([len(raw)]) + raw + struct.pack("!H", port)


def services_blob(services: tuple[str, ...]) -> bytes:
    """The services list as sent in AUTH; also part of what the agent's proof covers."""
    if len(services) > MAX_SERVICES:
        raise ValueError(f"an agent can serve at most {MAX_SERVICES} services")
    return bytes([len(services)]) + b"".join(name_field(s) for s in services)
