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
            self.rate_limited = _UNCOUNTED
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
        if role != "cc":
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

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: prometheus-client's lookup costs tens of
        microseconds, paid on every connection otherwise."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


_UNCOUNTED: Any = _Uncounted()
