"""The flows of one UDP service: each client address a flow, paired with a data
connection like a TCP client (`tcpgc.ll.pairing`), relayed one datagram per chunk
(`tcpgc.relay.datagrams`), ended when idle.

A datagram from a new address starts a flow if the service's controls admit it: its
allow and deny lists, `max_flows` in all and `max_flows_per_source` per client IP
address. So a flood of spoofed source addresses costs at most `max_flows` flows, and
one source cannot take them all. Datagrams that come while a flow waits for its agent
are queued, at most `WAIT_QUEUE` of them; the first rides behind OPEN. Everything
refused or past a bound is dropped and counted by reason, never buffered without limit.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from typing import Any, Protocol

from tcpgc.config import ServiceListener
from tcpgc.ll.admission import network_of
from tcpgc.ll.agents import AgentSession
from tcpgc.ll.pairing import EARLY_BYTES, ClientPairing
from tcpgc.ll.ready import ReadyConnections
from tcpgc.metrics import Metrics
from tcpgc.relay.datagrams import DatagramRelay, FlowCounters
from tcpgc.relay.result import AnyRelay, RelayResult
from tcpgc.task_set import TaskSet
from tcpgc.transport.datagram_sockets import RECEIVE_SIZE, DatagramServer, bind_datagram
from tcpgc.transport.peer_address import endpoint_of, format_peer

log = logging.getLogger("tcpgc.ll")

#: Datagrams read per wake-up of a socket's reader, so that one busy service cannot
#: hold the loop from the others.
READ_BUDGET = 1024
#: Datagrams, and their bytes, a flow may queue while it waits for its agent, and the
#: bytes all of a service's waiting flows may queue together: a flood of new addresses
#: while no agent answers must cost little.
WAIT_QUEUE = 64
WAIT_QUEUE_BYTES = 256 * 1024
WAITING_BYTES = 4 * 1024 * 1024
#: At most one warning per this many seconds about flows refused at a cap.
WARN_EVERY = 10.0


class ServiceView(Protocol):
    """What the flows need of their service (`tcpgc.ll.clients.Service`)."""

    config: ServiceListener
    relays: set[AnyRelay]


class Flow:
    """One client address of a UDP service: what `ClientPairing` waits on for it (the
    shape of a client `Link`), then the UDP end of its relay."""

    __slots__ = ("flows", "sock", "address", "source", "queue", "queued", "relay", "_closed")

    def __init__(self, flows: UdpFlows, sock: socket.socket, address: Any, source: str) -> None:
        self.flows = flows
        self.sock = sock
        self.address = address
        self.source = source
        self.queue: list[bytes] = []
        self.queued = 0
        self.relay: DatagramRelay | None = None
        self._closed: asyncio.Future[None] | None = None

    @property
    def peer(self) -> str:
        return format_peer(self.peer_endpoint)

    @property
    def peer_endpoint(self) -> tuple[str, int]:
        return endpoint_of(self.address)

    @property
    def local_endpoint(self) -> tuple[str, int]:
        return endpoint_of(self.sock.getsockname())

    @property
    def closed(self) -> asyncio.Future[None]:
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        return self._closed

    @property
    def buffered(self) -> bytes:
        """The first datagram, to ride behind OPEN whole, if it is small enough."""
        if self.queue and len(self.queue[0]) <= EARLY_BYTES:
            return self.queue[0]
        return b""

    def send(self, payload: bytes) -> None:
        self.sock.sendto(payload, self.address)

    def abort(self) -> None:
        """The flow is over (relayed, or never paired): forget it."""
        self.flows.forget(self)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    reset = abort


class UdpFlows:
    """The socket(s) and flows of one UDP service. `service` is set by the node once
    the service exists; it is what `sockets` and `close()` serve as (its `server`)."""

    def __init__(
        self,
        name: str,
        config: ServiceListener,
        *,
        pairing: ClientPairing,
        ready: ReadyConnections,
        metrics: Metrics,
        tasks: TaskSet,
        reuse_port: bool = False,
        server: DatagramServer | None = None,
    ) -> None:
        """`server`: the socket(s) to take datagrams on, if already bound (a port an
        agent exposes); else bound here, on the service's address."""
        self.name = name
        self._server = server or bind_datagram(config.listen, f"service '{name}'", reuse_port)
        self.sockets = self._server.sockets
        self.service: ServiceView | None = None
        self._pairing = pairing
        self._ready = ready
        self._metrics = metrics
        self._tasks = tasks
        self.flows: dict[Any, Flow] = {}
        self._per_source: collections.Counter[str] = collections.Counter()
        self._waiting_bytes = 0  # queued by flows waiting for their agent
        self._warned = 0.0
        m = metrics
        self._drops = {
            reason: m.child(m.udp_drops, name, reason)
            for reason in ("queue_full", "max_flows", "source_flows", "denied", "no_agent",
                           "send_failed", "empty", "rate_limited")
        }  # fmt: skip
        self._counters = FlowCounters(
            m.counting(m.udp_datagrams, name, "in"),
            m.counting(m.udp_datagrams, name, "out"),
            m.counting(m.udp_bytes, name, "in"),
            m.counting(m.udp_bytes, name, "out"),
            self._drop,
        )
        self._server.read_with(self._readable)

    def _drop(self, reason: str, count: int = 1) -> None:
        self._drops[reason].inc(count)

    # ---- datagrams in ----------------------------------------------------------------

    def _readable(self, sock: socket.socket) -> None:
        flows = self.flows
        for _ in range(READ_BUDGET):
            try:
                data, address = sock.recvfrom(RECEIVE_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # an error queued on the socket: it is read, and reading goes on
            flow = flows.get(address)
            if flow is not None and flow.relay is not None:
                flow.relay.send_up(data)
            elif flow is not None:
                self._queue(flow, data)
            else:
                self._new_flow(sock, address, data)

    def _queue(self, flow: Flow, data: bytes) -> None:
        if (
            len(flow.queue) >= WAIT_QUEUE
            or flow.queued + len(data) > WAIT_QUEUE_BYTES
            or self._waiting_bytes + len(data) > WAITING_BYTES
        ):
            self._drop("queue_full")
            return
        flow.queue.append(data)
        flow.queued += len(data)
        self._waiting_bytes += len(data)

    def _new_flow(self, sock: socket.socket, address: Any, data: bytes) -> None:
        service = self.service
        if service is None:
            return
        config = service.config
        host = endpoint_of(address)[0]
        if not data:
            self._drop("empty")  # a 0-byte datagram cannot cross (protocol.md)
            return
        if self._waiting_bytes + len(data) > WAITING_BYTES:
            self._drop("queue_full")
            return
        if config.admits(host) is not None:
            self._drop("denied")
            return
        if len(self.flows) >= config.max_flows:
            self._refuse("max_flows", f"at its limit of {config.max_flows} flows")
            return
        # A source is an IPv4 address, or an IPv6 /64: one host may hold a whole /64.
        source = network_of(host) if ":" in host else host
        if self._per_source[source] >= config.max_flows_per_source:
            self._refuse(
                "source_flows",
                f"{source} at its limit of {config.max_flows_per_source} flows",
            )
            return
        flow = Flow(self, sock, address, source)
        flow.queue.append(data)
        flow.queued = len(data)
        self._waiting_bytes += len(data)
        self.flows[address] = flow
        self._per_source[source] += 1
        m = self._metrics
        m.child(m.udp_flows, self.name).inc()
        m.child(m.udp_flows_active, self.name).inc()
        self._tasks.spawn(self._pair(flow), f"udp flow {flow.peer} of {self.name}")

    def _refuse(self, reason: str, why: str) -> None:
        self._drop(reason)
        self._warn(
            f"UDP service '{self.name}' {why}: datagrams of new flows are dropped (counted in "
            f'tcpgc_udp_drops_total{{reason="{reason}"}})'
        )

    def _warn(self, text: str) -> None:
        """Log `text` as a warning, at most once per WARN_EVERY seconds: what a flood
        of spoofed addresses causes must not flood the log too."""
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            log.warning("%s", text)

    # ---- pairing and relaying ---------------------------------------------------------

    async def _pair(self, flow: Flow) -> None:
        paired = await self._pairing.pair(self.name, flow, quiet=True)
        service = self.service
        if paired is None and self.is_serving():
            self._warn(
                f"UDP service '{self.name}': no agent took flow {flow.peer} within "
                f"{self._pairing.config.client_wait:g} s (its datagrams are dropped, counted "
                'in tcpgc_udp_drops_total{reason="no_agent"}; at most one such line per '
                f"{WARN_EVERY:g} s)"
            )
        if paired is None or service is None or self.flows.get(flow.address) is not flow:
            if paired is not None:
                paired[0].abort()
            flow.abort()
            return
        data_link, agent, early, _ = paired
        if not agent.alive:  # revoked as they were paired
            data_link.abort()
            flow.abort()
            return
        queue, flow.queue = flow.queue, []
        self._waiting_bytes -= flow.queued
        flow.queued = 0
        first = queue.pop(0) if early else b""  # it went behind OPEN
        relay = DatagramRelay(
            flow, data_link, self._counters, service.config.udp_idle_timeout,
            on_idle=self._ready.data_connection_idle, peer_node="the agent",
            limits=agent.rate,  # its --rate covers its UDP flows too
        )  # fmt: skip
        if first:
            relay.sent_ahead(len(first))
        relay.on_done = lambda result: self._finished(service, agent, flow, relay, result)
        if relay.ended:  # the agent's DATA came with the flow's end (or a fault)
            self._drop("no_agent", len(queue))
            return
        flow.relay = relay
        for datagram in queue:
            relay.send_up(datagram)
        service.relays.add(relay)
        agent.relays.add(relay)

    def _finished(
        self,
        service: ServiceView,
        agent: AgentSession,
        flow: Flow,
        relay: DatagramRelay,
        result: RelayResult,
    ) -> None:
        service.relays.discard(relay)
        agent.relays.discard(relay)
        agent.bytes_in += result.bytes_a_to_b
        agent.bytes_out += result.bytes_b_to_a
        log.info(
            "udp flow %s of service '%s' ended after %.1f s (%s): %d datagrams in "
            "(%d bytes), %d out (%d bytes), %d dropped",
            flow.peer, self.name, result.duration, result.ended, relay.datagrams_up,
            result.bytes_a_to_b, relay.datagrams_down, result.bytes_b_to_a, relay.dropped,
        )  # fmt: skip

    def forget(self, flow: Flow) -> None:
        """`flow` is over: a new datagram from its address starts a new one."""
        if self.flows.get(flow.address) is not flow:
            return
        del self.flows[flow.address]
        self._per_source[flow.source] -= 1
        if not self._per_source[flow.source]:
            del self._per_source[flow.source]
        if flow.queue:  # never paired: what it queued is lost
            self._drop("no_agent", len(flow.queue))
            self._waiting_bytes -= flow.queued
            flow.queue, flow.queued = [], 0
        m = self._metrics
        m.child(m.udp_flows_active, self.name).dec()

    def is_serving(self) -> bool:
        return self._server.is_serving()

    def close(self) -> None:
        """Stop taking datagrams and end every flow: a datagram has nowhere to go
        without the socket its client sent it to."""
        self._server.close()
        for flow in list(self.flows.values()):
            if flow.relay is not None:
                flow.relay.close()
            flow.abort()
