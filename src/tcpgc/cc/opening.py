"""Serving one OPEN: check the agent's caps, dial the service's server, claim the client
from the LL with a data connection, and relay between the two.

How the client is claimed depends on where the OPEN came from, and is the `Claim`'s
business (`tcpgc.cc.claims`): on the control connection a new data connection is
dialed; on a ready connection that connection itself answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Protocol

from tcpgc.addresses import format_endpoint
from tcpgc.cc.open_limits import OpenLimits, RefusalLog
from tcpgc.cc.resumer import CCResumes
from tcpgc.cc.udp_flow import flow_counters, open_server_socket, start_flow
from tcpgc.config import Address, CCConfig
from tcpgc.errors import TcpgcError
from tcpgc.metrics import Metrics
from tcpgc.protocol.messages import Open
from tcpgc.relay.datagrams import DatagramRelay
from tcpgc.relay.factory import start_chunked_relay
from tcpgc.relay.result import AnyRelay, RelayEnd, RelayResult
from tcpgc.relay.resumable import ResumableRelay
from tcpgc.transport.dial import dial
from tcpgc.transport.failures import transport_error
from tcpgc.transport.link import Link
from tcpgc.transport.proxy_protocol import header

log = logging.getLogger("tcpgc.cc")

#: Called with a data connection whose client is done, to be offered again.
OnIdle = Callable[[Link], None]


class Claim(Protocol):
    """How the client of one OPEN is taken from the LL, or refused."""

    @property
    def session_key(self) -> bytes:
        """The key of the session the OPEN came in (resumable streams derive theirs)."""

    def refuse(self, reason: str) -> None:
        """Tell the LL this client will not be served (OPEN_FAILED)."""

    async def connect(self) -> tuple[Link, bytes, bytes] | None:
        """The data connection carrying the client, the frame that claims it (not yet
        sent), and the client's first bytes if they came with the OPEN; None (logged)
        if the client cannot be claimed any more."""


class Opener:
    """Serves OPENs and keeps the clients being relayed, per LL. `config` may be
    replaced (on reload): the next OPEN uses it."""

    def __init__(
        self, config: CCConfig, metrics: Metrics, refusals: RefusalLog, resumes: CCResumes
    ) -> None:
        self.config = config
        self.resumes = resumes
        self.metrics = metrics
        self.limits = OpenLimits(config.max_connections_per_ll, config.max_connections_per_service)
        self._refusals = refusals
        #: The clients being relayed through each LL, with the OPEN that brought each.
        self.relays: dict[Address, dict[AnyRelay, Open]] = {}
        self._opening = 0
        #: Set while no client is being opened or relayed (what a drain waits for).
        self.idle = asyncio.Event()
        self.idle.set()

    def reconfigure(self, config: CCConfig) -> None:
        self.config = config
        self.limits.per_ll = config.max_connections_per_ll
        self.limits.per_service = config.max_connections_per_service

    def active(self) -> int:
        """Clients being opened or relayed."""
        return self._opening + sum(len(relays) for relays in self.relays.values())

    def close_relays(self, ll: Address, ended: str) -> int:
        """End every client relayed through `ll` now, but resumable streams, which wait
        for a resume; how many were ended."""
        relays = [r for r in self.relays.get(ll, {}) if not isinstance(r, ResumableRelay)]
        for relay in relays:
            relay.result.ended = ended
            relay.close()
        return len(relays)

    def end_flows(self, why: str) -> None:
        """End every UDP flow now, telling the LL (its end marker)."""
        for relays in self.relays.values():
            for relay in list(relays):
                if isinstance(relay, DatagramRelay):
                    relay.finish(why)

    def close_all(self) -> None:
        for relays in self.relays.values():
            for relay in list(relays):
                relay.close()

    async def serve(self, ll: Address, request: Open, claim: Claim, on_idle: OnIdle) -> None:
        """Serve one OPEN from LL `ll`. The relay, once started, is seen through by
        callbacks, not by this task: idle connections then cost no task."""
        over = self.limits.acquire(ll, request.service)
        if over is not None:
            # Each connection costs two sockets: an LL must not be able to take them all.
            self._refusals.refused(
                f"refused OPEN for service '{request.service}' from LL {ll}: {over}"
            )
            claim.refuse("the agent is at its connection limit")
            self.metrics.child(self.metrics.clients_refused, request.service, "agent_limit").inc()
            return
        self._opening += 1
        self.idle.clear()
        relay = None
        try:
            relay = await self._connect_both(ll, request, claim, on_idle)
        finally:
            self._opening -= 1
            if relay is None:
                self.limits.release(ll, request.service)
        if relay is None:
            self._check_idle()
            return
        relays = self.relays.setdefault(ll, {})
        relays[relay] = request
        if not isinstance(relay, DatagramRelay):
            self.metrics.child(self.metrics.clients_active, request.service).inc()
        relay.on_done = partial(self._finished, ll, relays, relay)

    def _finished(
        self, ll: Address, relays: dict[AnyRelay, Open], relay: AnyRelay, _: RelayResult
    ) -> None:
        request = relays.pop(relay)
        if isinstance(relay, ResumableRelay):
            self.resumes.forget(relay)
        self.limits.release(ll, request.service)
        self._check_idle()
        result = relay.result
        if isinstance(relay, DatagramRelay):
            self.metrics.child(self.metrics.udp_flows_active, request.service).dec()
            log.info(
                "udp flow of service '%s' (client %s) ended after %.1f s (%s): %d datagrams "
                "in (%d bytes), %d out (%d bytes), %d dropped",
                request.service, format_endpoint(request.client_host, request.client_port),
                result.duration, result.ended, relay.datagrams_down, result.bytes_b_to_a,
                relay.datagrams_up, result.bytes_a_to_b, relay.dropped,
            )  # fmt: skip
            return
        self.metrics.child(self.metrics.clients_active, request.service).dec()
        log.info(
            "service '%s' connection done after %.3f s: %d bytes to server, %d bytes from it, %s",
            request.service,
            result.duration,
            result.bytes_b_to_a,
            result.bytes_a_to_b,
            result.ended,
        )

    def _check_idle(self) -> None:
        if not self.active():
            self.idle.set()

    async def _dial_server(self, ll: Address, request: Open, claim: Claim) -> Link | None:
        server = self.config.services.get(request.service)
        if server is None:
            log.warning(
                "LL %s asked for service '%s', which this agent does not serve", ll, request.service
            )
            claim.refuse(f"service '{request.service}' is not served by this agent")
            return None
        try:
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    return await dial(server.connect_host, server.port)
            except (OSError, TimeoutError) as exc:
                raise transport_error(exc) from exc
        except TcpgcError as exc:
            log.warning("cannot reach server %s for service '%s': %s", server, request.service, exc)
            claim.refuse(f"cannot reach its server: {exc}")
            self.metrics.child(
                self.metrics.clients_refused, request.service, "server_unreachable"
            ).inc()
            return None

    async def _open_flow(
        self, request: Open, claim: Claim, on_idle: OnIdle, idle_timeout: float
    ) -> AnyRelay | None:
        """A UDP flow: its own socket toward the server, then the flow claimed."""
        server = self.config.services[request.service]
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                end = await open_server_socket(server)
        except (OSError, TimeoutError) as exc:
            failure = transport_error(exc)
            log.warning("cannot reach server %s for service '%s': %s", server, request.service,
                        failure)  # fmt: skip
            claim.refuse(f"cannot reach its server: {failure}")
            return None
        claimed = await _claim(claim, end)
        if claimed is None:
            return None
        data_link, data_frame, first = claimed
        data_link.write(data_frame)
        m = self.metrics
        m.child(m.udp_flows, request.service).inc()
        m.child(m.udp_flows_active, request.service).inc()
        counters = flow_counters(m, request.service)
        return start_flow(end, data_link, first, counters, idle_timeout, on_idle)

    async def _connect_both(
        self, ll: Address, request: Open, claim: Claim, on_idle: OnIdle
    ) -> AnyRelay | None:
        """Dial the server, then claim the client. The server comes first so that a
        refusal is reported to the LL as such (OPEN_FAILED) instead of as a connection
        that closes."""
        udp_idle = self.config.udp_services.get(request.service)
        if request.udp != (udp_idle is not None) and request.service in self.config.services:
            theirs, ours = ("UDP", "TCP") if request.udp else ("TCP", "UDP")
            self._refusals.refused(
                f"LL {ll} has service '{request.service}' as {theirs}, this agent as {ours}: "
                f"refused; give it the same protocol on both nodes ([services."
                f'{request.service}] protocol = "{theirs.lower()}")'
            )
            claim.refuse(f"service '{request.service}' is {ours} on this agent")
            self.metrics.child(self.metrics.clients_refused, request.service, "protocol").inc()
            return None
        if udp_idle is not None:
            return await self._open_flow(request, claim, on_idle, udp_idle)
        server_link = await self._dial_server(ll, request, claim)
        if server_link is None:
            return None
        claimed = await _claim(claim, server_link)
        if claimed is None:
            return None
        data_link, data_frame, early = claimed
        version = self.config.proxy_protocol.get(request.service)
        if version:
            client = (request.client_host, request.client_port)
            server_link.write(header(version, client, (request.local_host, request.local_port)))
        if early:
            # The client's first bytes go to the server before anything else is done:
            # its answer is then on its way while the relay is being set up.
            server_link.write(early)
            if server_link.is_closing:
                early = b""  # not delivered (the server went away): not counted
        data_link.write(data_frame)
        self.metrics.child(self.metrics.clients_accepted, request.service).inc()
        counted = self.metrics.bytes
        counters = (
            self.metrics.child(counted, request.service, "out"),
            self.metrics.child(counted, request.service, "in"),
        )
        # The data connection carries the client chunked, and is reused after it.
        relay: AnyRelay
        if request.resume_window_ms:
            relay = self.resumes.start(
                ll, request, server_link, data_link, early, claim.session_key, counters, on_idle
            )
        else:
            relay = start_chunked_relay(server_link, data_link, *counters, on_idle=on_idle)
        if early:
            relay.result.bytes_b_to_a += len(early)
            counters[1].inc(len(early))
        return relay


async def _claim(claim: Claim, server_side: RelayEnd) -> tuple[Link, bytes, bytes] | None:
    """`claim.connect()`; the server's side is let go of if the client cannot be
    claimed (or the claim is cancelled: the session or the node is stopping)."""
    try:
        claimed = await claim.connect()
    except BaseException:
        server_side.abort()
        raise
    if claimed is None:
        server_side.abort()
    return claimed
