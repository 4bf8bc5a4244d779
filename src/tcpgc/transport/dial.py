"""Outgoing plain TCP connections (to servers), made without a loop transport."""

from __future__ import annotations

import asyncio
import errno
import functools
import socket
from typing import Any

from tcpgc.transport.link import Link


@functools.lru_cache(maxsize=64)
def numeric_family(host: str) -> int | None:
    """AF_INET or AF_INET6 if `host` is an address literal, None for a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return family
    return None


async def dial(host: str, port: int) -> Link:
    """A plain link to `host`:`port` that reads nothing until its relay attaches to it
    (`Link.hold_reading`; a splice relay takes the socket instead). An address literal
    is dialed on a socket of our own: the link rides the lean `SocketTransport` from
    the start, and a splice relay takes the socket as it is, where a loop transport
    would be made, then duplicated and dropped. A name goes through the loop, which
    resolves it and tries each address in turn."""
    loop = asyncio.get_running_loop()
    family = numeric_family(host)
    if family is None:
        _, link = await loop.create_connection(Link, host, port)
        link.hold_reading()
        return link
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        # As the loops' own transports do: relayed bytes are not held back.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await _connect(loop, sock, (host, port))
    except BaseException:
        sock.close()
        raise
    # Named as the kernel would write it ('::1', not '0:0::1'), for logs and status.
    canonical = socket.inet_ntop(family, socket.inet_pton(family, host))
    return Link.on_socket(sock, (canonical, port))


async def _connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, address: Any) -> None:
    # What loop.sock_connect does, at a third of uvloop's cost for it: one writer
    # callback and a future, no resolving of an address that is already one.
    err = sock.connect_ex(address)
    if err == errno.EINPROGRESS:
        done: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, _wake, done)
        try:
            await done
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"Connect call failed {address}")  # as asyncio words it


def _wake(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)
