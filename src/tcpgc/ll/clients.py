"""The clients of every service: admitted by their service's controls, paired with a
data connection (`tcpgc.ll.pairing`), relayed, counted, and closed when idle."""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

from tcpgc.config import Address, ServiceListener
from tcpgc.ll.agents import AgentSession
from tcpgc.ll.pairing import ClientPairing
from tcpgc.ll.ready import ReadyConnections
from tcpgc.ll.resumes import LLResumes
from tcpgc.metrics import BothCounters, Metrics
from tcpgc.relay.factory import start_chunked_relay
from tcpgc.relay.rate_limit import RateLimits, combine
from tcpgc.relay.result import AnyRelay, RelayResult
from tcpgc.relay.resumable import ResumableRelay
from tcpgc.task_set import TaskSet
from tcpgc.transport.link import Link

log = logging.getLogger("tcpgc.ll")

#: What a removed service limit becomes for the relays that hold its buckets.
UNLIMITED = 10**15


class Listener(Protocol):
    """What a service listens with: an asyncio.Server (TCP), or its UDP flows'
    sockets (`tcpgc.ll.udp_flows.UdpFlows`)."""

    @property
    def sockets(self) -> Sequence[socket.socket]: ...
    def close(self) -> None: ...
    def is_serving(self) -> bool: ...


@dataclass(eq=False)
class Service:
    """One service's listener and its clients."""

    name: str
    config: ServiceListener
    server: Listener
    address: Address
    relays: set[AnyRelay] = field(default_factory=set)
    clients: int = 0  # waiting or relayed
    reaper: asyncio.Task[Any] | None = None
    #: For a port an agent exposes (named ':PORT'): the agent that asked for it first.
    exposed_by: str = ""
    #: The buckets all its clients share, if it has a `rate_limit`.
    limits: RateLimits | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.config.rate_limit is not None:
            self.limits = RateLimits.of(self.config.rate_limit)

    def reconfigure(self, config: ServiceListener) -> None:
        """New controls (a reload). A changed or removed rate limit applies to the
        clients being relayed too; one added, to those that come after."""
        self.config = config
        if config.rate_limit is None:
            if self.limits is not None:  # lifted for the clients it held
                self.limits.reconfigure(UNLIMITED)
            self.limits = None
        elif self.limits is None:
            self.limits = RateLimits.of(config.rate_limit)
        else:
            self.limits.reconfigure(config.rate_limit)


class Clients:
    """Takes each client of `services` from accept to the end of its relay."""

    def __init__(
        self,
        services: dict[str, Service],
        *,
        pairing: ClientPairing,
        ready: ReadyConnections,
        resumes: LLResumes,
        metrics: Metrics,
        tasks: TaskSet,
    ) -> None:
        self._services = services
        self._pairing = pairing
        self._resumes = resumes
        self._ready = ready
        self._metrics = metrics
        self._tasks = tasks
        #: Clients refused by a service's controls, by service and reason.
        self.refused: collections.Counter[tuple[str, str]] = collections.Counter()
        #: Set while no client waits or is relayed (a drain waits for it).
        self.none_left = asyncio.Event()
        self.none_left.set()

    def count(self) -> int:
        return sum(service.clients for service in self._services.values())

    def connected(self, name: str, link: Link) -> None:
        """A new client of service `name` (the `on_made` of its Link)."""
        service = self._services.get(name)
        if service is None:  # removed by a reload while this connection was accepted
            link.abort()
            return
        refusal = service.config.admits(link.peer_host)
        if refusal is None and 0 < service.config.max_clients <= service.clients:
            refusal = f"service at its limit of {service.config.max_clients} clients"
        if refusal is not None:
            self.refused[name, refusal] += 1
            self._metrics.child(self._metrics.clients_refused, name, refusal.split(" ")[0]).inc()
            log.info("refused client %s of service '%s': %s", link.peer, name, refusal)
            link.abort()
            return
        service.clients += 1
        self._metrics.child(self._metrics.clients_accepted, name).inc()
        self.none_left.clear()
        self._tasks.spawn(self._serve(service, link), f"client {link.peer} of {name}")

    async def _serve(self, service: Service, link: Link) -> None:
        paired = None
        try:
            # One loop turn first: asyncio runs this task before it reads the client's
            # first bytes, and the bytes read by the time OPEN leaves go with it.
            await asyncio.sleep(0)
            paired = await self._pairing.pair(service.name, link)
        finally:
            if paired is None:
                self._gone(service)
        if paired is not None and not paired[1].alive:
            # Its agent's session ended (revoked) as they were paired: a relay started
            # now would outlive it.
            paired[0].abort()
            link.abort()
            self._gone(service)
        elif paired is not None:
            # From here on callbacks, not this task, see the client through: a task and
            # its frames per idle connection would cost kilobytes each.
            self._relay(service, link, *paired)

    def _gone(self, service: Service) -> None:
        service.clients -= 1
        if not any(s.clients for s in self._services.values()):
            self.none_left.set()

    def _relay(
        self,
        service: Service,
        link: Link,
        data_link: Link,
        agent: AgentSession,
        early: int,
        stream_id: bytes,
    ) -> None:
        m = self._metrics
        counters = (m.child(m.bytes, service.name, "in"), m.child(m.bytes, service.name, "out"))
        if m.registry is not None:  # and by agent
            who = agent.metric_label
            counters = (
                BothCounters(counters[0], m.child(m.agent_bytes, who, "in")),
                BothCounters(counters[1], m.child(m.agent_bytes, who, "out")),
            )
        sent_early = link.buffered[:early]
        link.consume(early)  # the agent has them: they went behind OPEN
        limits = self._limits(service, agent)
        # The data connection carries the client chunked, and is reused after it.
        relay: AnyRelay
        if self._resumes.config.window_of(service.name) > 0:
            relay = self._resumes.start(
                service.name, link, data_link, agent, stream_id, sent_early, counters,
                self._ready.data_connection_idle, limits,
            )  # fmt: skip
        else:
            relay = start_chunked_relay(
                link, data_link, *counters, on_idle=self._ready.data_connection_idle,
                limits=limits,
            )  # fmt: skip
        if early:
            relay.result.bytes_a_to_b += early
            counters[0].inc(early)
        service.relays.add(relay)
        agent.relays.add(relay)
        m.child(m.clients_active, service.name).inc()
        # A partial, not a closure or a future: it lives as long as the connection.
        relay.on_done = partial(self._finished, service, agent, link, relay)

    def _limits(self, service: Service, agent: AgentSession) -> RateLimits | None:
        """The buckets a client of `service` served by `agent` answers to: the
        service's, its own, the agent's; None (no cost at all) if there are none."""
        per_client = self._resumes.config.client_rate_of(service.name)
        if per_client is None and service.limits is None and agent.rate is None:
            return None  # the common case, at no cost
        own = RateLimits.of(per_client) if per_client is not None else None
        limits = combine(service.limits, own, agent.rate)
        if limits is None:
            return None
        m = self._metrics
        by_service = m.child(m.rate_limited, service.name)
        by_agent = m.child(m.agent_rate_limited, agent.metric_label)

        def limited() -> None:
            by_service.inc()
            by_agent.inc()
            agent.limited += 1

        return replace(limits, on_limited=limited)

    def _finished(
        self, service: Service, agent: AgentSession, link: Link, relay: AnyRelay, _: RelayResult
    ) -> None:
        self._metrics.child(self._metrics.clients_active, service.name).dec()
        service.relays.discard(relay)
        agent.relays.discard(relay)
        if isinstance(relay, ResumableRelay):
            self._resumes.forget(relay)
        self._gone(service)
        result = relay.result
        agent.bytes_in += result.bytes_a_to_b
        agent.bytes_out += result.bytes_b_to_a
        log.info(
            "client %s of service '%s' done after %.3f s: %d bytes in, %d bytes out, %s",
            link.peer,
            service.name,
            result.duration,
            result.bytes_a_to_b,
            result.bytes_b_to_a,
            result.ended,
        )

    def start_reaper(self, service: Service) -> None:
        """(Re)start closing `service`'s idle connections, if it has an idle timeout."""
        if service.reaper is not None:
            service.reaper.cancel()
            service.reaper = None
        if service.config.idle_timeout > 0:
            service.reaper = self._tasks.spawn(self._reap_idle(service), f"idle {service.name}")

    async def _reap_idle(self, service: Service) -> None:
        """Close connections of `service` that moved no byte for its idle timeout."""
        limit = service.config.idle_timeout
        while True:
            await asyncio.sleep(min(limit / 4, 5.0))
            now = time.monotonic()
            for relay in list(service.relays):
                if now - relay.result.last_activity > limit:
                    relay.result.ended = f"idle for {limit:.0f} s"
                    relay.close()
