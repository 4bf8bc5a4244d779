"""Listening sockets: one server per address, both families on one port when the
address names no host, and SO_REUSEPORT for a listener handed over on reload."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from tcpgc.addresses import Address
from tcpgc.errors import UsageError


async def listen(
    factory: Callable[[], asyncio.BaseProtocol],
    address: Address,
    what: str,
    reuse_port: bool = False,
) -> asyncio.Server:
    """A server on `address` for `what` (worded for errors); UsageError if it cannot."""
    loop = asyncio.get_running_loop()
    tries = 1
    port = address.port
    if address.bind_host is None and port == 0:
        # Both families on any free port: the same one for both, or a client would
        # need to know which family it was given.
        tries = 5
    for attempt in range(tries):
        if tries > 1:
            with socket.socket() as probe:
                probe.bind(("", 0))
                port = probe.getsockname()[1]
        try:
            return await loop.create_server(
                factory,
                address.bind_host,
                port,
                reuse_address=True,
                reuse_port=reuse_port or None,
                backlog=1024,
            )
        except socket.gaierror as exc:
            raise UsageError(
                f"cannot listen on {address} for {what}: host {address.host!r} does not "
                f"resolve ({exc.strerror})"
            ) from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and attempt + 1 < tries:
                continue  # taken in between by someone else: pick another
            reason = exc.strerror or exc
            raise UsageError(f"cannot listen on {address} for {what}: {reason}") from None
    raise AssertionError("unreachable")


class HasSockets(Protocol):
    """A TCP server, or a UDP service's sockets."""

    @property
    def sockets(self) -> Sequence[socket.socket]: ...


def bound(server: HasSockets, wanted: Address) -> Address:
    """The address `server` listens on: `wanted`'s host, with the port it got."""
    host, port = server.sockets[0].getsockname()[:2]
    return Address(wanted.host, port)


def set_reuse_port(servers: Iterable[HasSockets], on: bool) -> None:
    """Let (or stop letting) another listener share these servers' ports."""
    for server in servers:
        for sock in server.sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(on))
