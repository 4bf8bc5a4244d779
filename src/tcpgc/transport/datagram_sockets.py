"""UDP sockets: the ones a UDP service takes datagrams on (the LL), and a flow's own
socket connected to its server (the agent).

Both are plain non-blocking sockets read from a loop reader, not asyncio datagram
transports: a reader drains its socket until EAGAIN in one wake-up, which moves several
times more datagrams per second than one protocol callback per datagram.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

from tcpgc.addresses import Address
from tcpgc.errors import UsageError

#: Buffers asked of each socket: a burst of small datagrams costs about a kilobyte
#: each of the receive buffer, so the default (208 KiB) holds only some 200 of them.
#: The kernel caps what is asked at net.core.rmem_max (wmem_max), unless the process
#: may exceed it (CAP_NET_ADMIN: root), as tcpgc then does.
RECEIVE_BUFFER = 4 * 1024 * 1024
#: Large enough for any datagram.
RECEIVE_SIZE = 65536


_FORCED = {socket.SO_RCVBUF: 33, socket.SO_SNDBUF: 32}  # SO_RCVBUFFORCE, SO_SNDBUFFORCE


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    for option, forced in _FORCED.items():
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, RECEIVE_BUFFER)
            continue
        except OSError:  # not permitted (or not Linux): within the system's cap
            pass
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER)
        except OSError:
            pass  # the default size works, with more drops under bursts


class DatagramServer:
    """The UDP socket(s) of one service (what `asyncio.Server` is to a TCP one):
    `sockets`, a reader for each, and `close()`."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        self._loop: asyncio.AbstractEventLoop | None = None  # once it reads

    def read_with(self, on_readable: Callable[[socket.socket], None]) -> None:
        """Call `on_readable(sock)` whenever one of the sockets has datagrams."""
        self._loop = asyncio.get_running_loop()
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), on_readable, sock)

    def is_serving(self) -> bool:
        return any(sock.fileno() >= 0 for sock in self.sockets)

    def close(self) -> None:
        for sock in self.sockets:
            if sock.fileno() >= 0:
                if self._loop is not None:
                    self._loop.remove_reader(sock.fileno())
                sock.close()


def bind_datagram(address: Address, what: str, reuse_port: bool = False) -> DatagramServer:
    """UDP socket(s) on `address` for `what` (worded for errors): one socket for both
    families when the address is all of them; UsageError if it cannot."""
    host = address.bind_host
    try:
        if host is None:
            try:
                sock = _bound(socket.AF_INET6, ("::", address.port), reuse_port, dual=True)
            except OSError as exc:
                if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    raise
                sock = _bound(socket.AF_INET, ("0.0.0.0", address.port), reuse_port)
            return DatagramServer([sock])
        infos = socket.getaddrinfo(
            host, address.port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, sockaddr = infos[0]
        return DatagramServer([_bound(family, sockaddr, reuse_port)])
    except socket.gaierror as exc:
        raise UsageError(
            f"cannot listen on {address} (UDP) for {what}: host {address.host!r} does not "
            f"resolve ({exc.strerror})"
        ) from None
    except OSError as exc:
        reason = exc.strerror or exc
        raise UsageError(f"cannot listen on {address} (UDP) for {what}: {reason}") from None


def _bound(
    family: int, sockaddr: tuple[object, ...], reuse_port: bool, dual: bool = False
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if dual:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _tune(sock)
        sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_datagram(host: str, port: int) -> socket.socket:
    """A UDP socket connected to `host`:`port` (the first address that takes it): it
    sends there only, and takes datagrams from there only."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    error: OSError = OSError(errno.EHOSTUNREACH, f"no address for {host}")
    for family, _, _, _, sockaddr in infos:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            _tune(sock)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error
