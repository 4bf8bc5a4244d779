"""What each node counts, in Prometheus form (through `prometheus-client`).

Every node owns a registry of its own, so several nodes embedded in one process (the
demo, tests) do not mix their figures. Only a node with an admin endpoint counts: the
endpoint is the one way to read the figures, and prometheus-client with what it imports
costs 5.5 MB of memory per process.
"""

from __future__ import annotations

from typing import Any

#: Buckets for the time a client waits between arriving and being claimed by an
#: agent's data connection: sub-millisecond on a LAN with ready connections, up to the
#: default client wait of 10 s.
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _Uncounted:
    """Stands for every metric of a node that does not count: takes any label and any
    update, and keeps nothing."""

    def labels(self, *labels: str) -> _Uncounted:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


class Metrics:
    """The counters of one node; with `enabled` false, stand-ins that count nothing
    (and prometheus-client is not loaded)."""

    registry: Any

    def __init__(self, role: str, enabled: bool = True) -> None:
        self.role = role
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        if not enabled:
            self.registry = None
            self.agents = self.clients_accepted = self.clients_refused = _UNCOUNTED
            self.clients_active = self.bytes = self.handshake_failures = _UNCOUNTED
            self.data_wait = self.pool_size = self.reused = _UNCOUNTED
            self.resumed = self.replayed = self.resumes_failed = self.waiting = _UNCOUNTED
            self.agent_sessions = self.agent_bytes = self.agent_refusals = _UNCOUNTED
            self.exposed_ports = self.agent_rate_limited = _UNCOUNTED
            self.rate_limited = _UNCOUNTED
            self.udp_flows = self.udp_flows_active = self.udp_datagrams = _UNCOUNTED
            self.udp_bytes = self.udp_drops = _UNCOUNTED
            return
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.agents = Gauge(
            "tcpgc_agents_connected",
            "Authenticated control sessions (LL: agents connected; CC: LLs connected to)",
            registry=r,
        )
        self.clients_accepted = Counter(
            "tcpgc_clients_accepted", "Client connections accepted", ["service"], registry=r
        )
        self.clients_refused = Counter(
            "tcpgc_clients_refused",
            "Client connections refused or closed before being relayed",
            ["service", "reason"],
            registry=r,
        )
        self.clients_active = Gauge(
            "tcpgc_clients_active", "Client connections being relayed", ["service"], registry=r
        )
        self.bytes = Counter(
            "tcpgc_bytes",
            "Bytes relayed; direction 'in' is client to server, 'out' server to client",
            ["service", "direction"],
            registry=r,
        )
        self.handshake_failures = Counter(
            "tcpgc_handshake_failures",
            "Connections on the agent port (LL) or to the LL (CC) that failed before a session",
            ["reason"],
            registry=r,
        )
        self.data_wait = Histogram(
            "tcpgc_data_connection_wait_seconds",
            "Time from a client's arrival to its data connection being claimed",
            ["service"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.resumed = Counter(
            "tcpgc_streams_resumed", "Streams resumed after a break of the leg", ["service"],
            registry=r,
        )  # fmt: skip
        self.replayed = Counter(
            "tcpgc_resume_replayed_bytes", "Bytes sent again on resuming streams", registry=r
        )
        self.resumes_failed = Counter(
            "tcpgc_resumes_failed",
            "Streams given up or resumes refused (window, memory, proof, unknown, closed)",
            ["reason"],
            registry=r,
        )
        self.waiting = Gauge(
            "tcpgc_streams_waiting", "Streams waiting for a resume after a break", registry=r
        )
        self.rate_limited = Counter(
            "tcpgc_rate_limited",
            "Pauses of a client's relay (one direction) to keep within a rate limit",
            ["service"],
            registry=r,
        )
        self._udp_metrics(r)
        if role != "cc":
            self._agent_metrics(r)
            # The agent holds the ready connections: on the LL both would read 0 forever.
            self.pool_size = self.reused = _UNCOUNTED
            return
        self.pool_size = Gauge(
            "tcpgc_pool_size", "Ready data connections held for new clients", registry=r
        )
        self.reused = Counter(
            "tcpgc_data_connections_reused",
            "TLS data connections offered again after their client was done",
            registry=r,
        )

    def _udp_metrics(self, r: Any) -> None:
        """UDP services' figures: flows, datagrams, bytes, and what was dropped."""
        from prometheus_client import Counter, Gauge

        self.udp_flows = Counter("tcpgc_udp_flows", "UDP flows started", ["service"], registry=r)
        self.udp_flows_active = Gauge(
            "tcpgc_udp_flows_active", "UDP flows open now", ["service"], registry=r
        )
        self.udp_datagrams = Counter(
            "tcpgc_udp_datagrams",
            "UDP datagrams relayed; direction 'in' is client to server, 'out' server to client",
            ["service", "direction"],
            registry=r,
        )
        self.udp_bytes = Counter(
            "tcpgc_udp_bytes", "UDP payload bytes relayed, by direction as for datagrams",
            ["service", "direction"], registry=r,
        )  # fmt: skip
        self.udp_drops = Counter(
            "tcpgc_udp_drops",
            "UDP datagrams dropped, by reason (queue_full, max_flows, source_flows, denied, "
            "no_agent, send_failed, empty)",
            ["service", "reason"],
            registry=r,
        )

    def _agent_metrics(self, r: Any) -> None:
        """The LL's figures by agent. The label is the agent's credential name (chosen
        by the operator: few values), or 'shared' for the LL's shared join token; never
        an agent id, which each agent picks."""
        from prometheus_client import Counter, Gauge

        self.agent_sessions = Gauge(
            "tcpgc_agent_sessions", "Control sessions by agent credential", ["agent"], registry=r
        )
        self.agent_bytes = Counter(
            "tcpgc_agent_bytes",
            "Bytes relayed by agent credential; 'in' is client to server",
            ["agent", "direction"],
            registry=r,
        )
        self.agent_refusals = Counter(
            "tcpgc_agent_refusals",
            "Services or ports an agent asked for and its scope does not allow",
            ["agent"],
            registry=r,
        )
        self.agent_rate_limited = Counter(
            "tcpgc_agent_rate_limited",
            "Pauses of its clients' relays (one direction) to keep within a rate limit",
            ["agent"],
            registry=r,
        )
        self.exposed_ports = Gauge(
            "tcpgc_exposed_ports", "Ports the LL listens on for agents (--expose)", registry=r
        )

    def counting(self, metric: Any, *labels: str) -> Any:
        """Like `child`, but None when this node does not count: a relay then has one
        counter fewer to feed."""
        return None if self.registry is None else self.child(metric, *labels)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: prometheus-client's lookup costs tens of
        microseconds, paid on every connection otherwise."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


_UNCOUNTED: Any = _Uncounted()


class BothCounters:
    """Two counters fed as one (a service's bytes and its agent's)."""

    __slots__ = ("first", "second")

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second

    def inc(self, amount: float = 1) -> None:
        self.first.inc(amount)
        self.second.inc(amount)
