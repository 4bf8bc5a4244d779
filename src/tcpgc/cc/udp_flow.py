"""The agent's side of a UDP flow: a socket of its own connected to the service's
server, so the server sees one source port per client and its replies to that port go
to that client only; relayed over the flow's data connection by
`tcpgc.relay.datagrams`."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from tcpgc.config import Address
from tcpgc.metrics import Metrics
from tcpgc.relay.datagrams import DatagramRelay, FlowCounters
from tcpgc.transport.datagram_sockets import RECEIVE_SIZE, connect_datagram
from tcpgc.transport.link import Link

#: Datagrams read per wake-up of a flow's reader: at least what one read of the data
#: connection (256 KiB) can bring of 64-byte requests, about 3,800. A smaller budget
#: lets the server's replies overflow this socket while requests keep coming: work
#: done for nothing, dropped at the last step (flat out, throughput fell fivefold).
READ_BUDGET = 4096


class ServerFlowEnd:
    """A flow's socket toward its server: the UDP end of its relay on the agent."""

    __slots__ = ("sock", "server", "relay", "_loop", "_fd")

    def __init__(self, sock: socket.socket, server: Address) -> None:
        self.sock = sock
        self.server = server
        self.relay: DatagramRelay | None = None
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()

    @property
    def peer(self) -> str:
        return str(self.server)

    def send(self, payload: bytes) -> None:
        self.sock.send(payload)

    def relay_with(self, relay: DatagramRelay) -> None:
        """Start reading: what the server sends goes to `relay`."""
        self.relay = relay
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        relay = self.relay
        if relay is None:
            return
        sock = self.sock
        for _ in range(READ_BUDGET):
            try:
                data = sock.recv(RECEIVE_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # ECONNREFUSED: an earlier datagram met a closed port (ICMP). The
                # server may come back: the flow goes on until it is idle.
                relay.drop("send_failed")
                return
            relay.send_up(data)

    def abort(self) -> None:
        if self.sock.fileno() >= 0:
            if self.relay is not None:
                self._loop.remove_reader(self._fd)
            self.sock.close()


async def open_server_socket(server: Address) -> ServerFlowEnd:
    """The flow's socket, connected to `server`; OSError if it cannot be (the name
    does not resolve, no route)."""
    sock = await connect_datagram(server.connect_host, server.port)
    return ServerFlowEnd(sock, server)


def flow_counters(metrics: Metrics, service: str) -> FlowCounters:
    """A flow's metrics on the agent: what it reads from the server goes out to the
    client ('out'), what comes from the LL goes in to the server ('in')."""
    m = metrics

    def drop(reason: str) -> None:
        m.child(m.udp_drops, service, reason).inc()

    return FlowCounters(
        m.counting(m.udp_datagrams, service, "out"),
        m.counting(m.udp_datagrams, service, "in"),
        m.counting(m.udp_bytes, service, "out"),
        m.counting(m.udp_bytes, service, "in"),
        drop,
    )


def start_flow(
    end: ServerFlowEnd,
    data_link: Link,
    first: bytes,
    counters: FlowCounters,
    idle_timeout: float,
    on_idle: Callable[[Link], None],
) -> DatagramRelay:
    """Relay a flow whose first datagram (if it came behind OPEN) is `first`: it goes
    to the server before any that follow it on the data connection."""
    if first:
        try:
            end.send(first)
        except OSError:
            first = b""
            if counters.drop is not None:
                counters.drop("send_failed")
    try:
        relay = DatagramRelay(end, data_link, counters, idle_timeout, on_idle, "the LL")
    except BaseException:
        end.abort()
        data_link.abort()
        raise
    if first:
        relay.sent_ahead(len(first), up=False)
    if not relay.ended:  # else its socket is closed: no reader for a number reused
        end.relay_with(relay)
    return relay
