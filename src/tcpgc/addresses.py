"""Addresses as the config writes them: 'host:port', '[v6]:port', ':port'; and which
listen addresses cannot be bound together."""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from tcpgc.errors import UsageError


def format_endpoint(host: object, port: int) -> str:
    """'host:port', or '[v6]:port' for an IPv6 address: the one way tcpgc writes an
    endpoint, in logs, the status page and error messages."""
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return format_endpoint(self.host, self.port)

    @property
    def bind_host(self) -> str | None:
        """What to give asyncio's create_server: None binds all interfaces, IPv4 and
        IPv6; '::' alone is IPv6 only (asyncio sets IPV6_V6ONLY), '0.0.0.0' IPv4 only."""
        return self.host or None

    @property
    def connect_host(self) -> str:
        return self.host or "localhost"


_HOST_NAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)


def parse_address(text: object, what: str) -> Address:
    """'host:port', '[v6]:port' or ':port' (all interfaces). The host must be an IP
    address or a well-formed host name: '10.0.0.300' is refused here, not at start.
    Raises UsageError naming `what` and the problem."""
    parsed = address_or_problem(text)
    if isinstance(parsed, str):
        raise UsageError(f"{what}: {parsed}")
    return parsed


def address_or_problem(text: object) -> Address | str:
    """The address `text` names, or what is wrong with it (for a config file's list of
    problems, which names the key itself)."""
    if not isinstance(text, str):
        return f"expected a 'HOST:PORT' string, got {type(text).__name__}"
    host, sep, port_text = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    elif ":" in host:
        return f"{text!r} is ambiguous: write IPv6 addresses as [ADDR]:PORT"
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        return f"{text!r} is not HOST:PORT with a port from 0 to 65535"
    if bracketed:
        try:
            IPv6Address(host)
        except ValueError:
            return f"{host!r} in {text!r} is not an IPv6 address"
    elif re.fullmatch(r"[0-9.]+", host):
        try:
            IPv4Address(host)
        except ValueError:
            return f"{host!r} in {text!r} is not an IPv4 address"
    elif host and not _HOST_NAME.fullmatch(host):
        return f"{host!r} in {text!r} is not an IP address or a host name"
    # An empty host (":PORT") means every interface of both families.
    return Address(host, int(port_text))


def _reach(host: str) -> tuple[set[int], bool] | None:
    """The address families a listener on `host` takes, and whether it takes every
    address of them; None for a host name (known only once resolved)."""
    if host == "":
        return {4, 6}, True  # asyncio binds 0.0.0.0 and [::] (IPV6_V6ONLY)
    try:
        address = ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    return {address.version}, address.is_unspecified


def listeners_collide(a: Address, b: Address) -> bool:
    """Whether listening on both `a` and `b` fails with 'address already in use'."""
    if a.port != b.port or a.port == 0:
        return False
    reach_a, reach_b = _reach(a.host), _reach(b.host)
    if reach_a is None or reach_b is None:
        return a.host == b.host
    if not reach_a[0] & reach_b[0]:
        return False
    return reach_a[1] or reach_b[1] or ip_address(a.host) == ip_address(b.host)


def collisions(listeners: list[tuple[str, Address]]) -> list[tuple[str, str]]:
    """Pairs of labels whose addresses cannot both be listened on."""
    return [
        (label_a, label_b)
        for i, (label_a, a) in enumerate(listeners)
        for label_b, b in listeners[i + 1 :]
        if listeners_collide(a, b)
    ]
