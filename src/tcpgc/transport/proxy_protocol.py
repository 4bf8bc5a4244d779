"""PROXY protocol headers (HAProxy's spec, versions 1 and 2), so the inside server sees
the real client's address instead of the agent's. Pure functions: addresses in, bytes out.
"""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21  # version 2, command PROXY
_V2_LOCAL = 0x20  # version 2, command LOCAL: no address information
_TCP4 = 0x11
_TCP6 = 0x21

Endpoint = tuple[str, int]


def _addresses(
    source: Endpoint, destination: Endpoint
) -> (
    tuple[
        ipaddress.IPv4Address | ipaddress.IPv6Address, ipaddress.IPv4Address | ipaddress.IPv6Address
    ]
    | None
):
    """Both addresses in one family (IPv4 mapped into IPv6 if they differ), or None if
    either is unknown."""
    try:
        # No IPv6 zone ("%eth0"): it means nothing to the server and v1 forbids it.
        src = ipaddress.ip_address(source[0].split("%", 1)[0])
        dst = ipaddress.ip_address(destination[0].split("%", 1)[0])
    except ValueError:
        return None
    if src.version != dst.version:
        if isinstance(src, ipaddress.IPv4Address):
            src = ipaddress.IPv6Address(f"::ffff:{src}")
        if isinstance(dst, ipaddress.IPv4Address):
            dst = ipaddress.IPv6Address(f"::ffff:{dst}")
    return src, dst


def v1(source: Endpoint, destination: Endpoint) -> bytes:
    """'PROXY TCP4 1.2.3.4 5.6.7.8 1234 80\\r\\n' (or TCP6, or UNKNOWN)."""
    pair = _addresses(source, destination)
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = pair
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {_text(src)} {_text(dst)} {source[1]} {destination[1]}\r\n".encode()


def _text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"  # the form servers' log parsers expect
    return str(address)


def v2(source: Endpoint, destination: Endpoint) -> bytes:
    """The binary header: signature, command, family, addresses and ports."""
    pair = _addresses(source, destination)
    if pair is None:
        return V2_SIGNATURE + bytes([_V2_LOCAL, 0x00]) + struct.pack("!H", 0)
    src, dst = pair
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    family = _TCP4 if src.version == 4 else _TCP6
    return V2_SIGNATURE + bytes([_V2_PROXY, family]) + struct.pack("!H", len(body)) + body


def header(version: int, source: Endpoint, destination: Endpoint) -> bytes:
    if version == 1:
        return v1(source, destination)
    if version == 2:
        return v2(source, destination)
    raise ValueError(f"PROXY protocol version {version} does not exist (1 or 2)")
