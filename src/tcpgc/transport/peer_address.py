"""A link's peer and local addresses, as the logs and PROXY protocol headers want them."""

from __future__ import annotations

from tcpgc.addresses import format_endpoint


def format_peer(address: object) -> str:
    """'1.2.3.4:5' or '[::1]:5' for a socket address tuple."""
    if isinstance(address, tuple) and len(address) >= 2:
        return format_endpoint(address[0], address[1])
    return str(address)


def endpoint_of(address: object) -> tuple[str, int]:
    """(host, port) of a socket address tuple, as a PROXY header carries it; ("", 0)
    for anything else."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0]).split("%", 1)[0]  # no IPv6 zone: it means nothing remotely
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]  # an IPv4 client of a dual-stack listener
        return host, int(address[1])
    return "", 0
