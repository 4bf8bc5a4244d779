"""Typed, validated configuration for both nodes, from a TOML file and flags.

A config file describes one node. Every problem is reported with the key it is about;
`UsageError` carries them all, one per line, so the CLI can print them and exit 2.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from ipaddress import IPv6Address, ip_address
from pathlib import Path
from typing import Any

# Address and parse_address are also imported from here (the README, other modules).
from tcpgc.addresses import Address as Address
from tcpgc.addresses import collisions
from tcpgc.addresses import parse_address as parse_address
from tcpgc.config_cc import CCConfig as CCConfig
from tcpgc.config_cc import Expose as Expose
from tcpgc.config_cc import cc_config_from as cc_config_from
from tcpgc.config_checks import DEFAULT_RESUME_BUFFER as DEFAULT_RESUME_BUFFER
from tcpgc.config_checks import DEFAULT_RESUME_MEMORY as DEFAULT_RESUME_MEMORY
from tcpgc.config_checks import MIN_RESUME_BUFFER as MIN_RESUME_BUFFER
from tcpgc.config_checks import ConfigProblems, IPNetwork, NodeControls, resume_buffer
from tcpgc.config_checks import find_key_line as find_key_line
from tcpgc.errors import UsageError
from tcpgc.protocol.fields import UDP_SUFFIX

DEFAULT_SERVICE = "default"


@dataclass(frozen=True)
class ServiceListener:
    """Where one service takes clients on the LL, and who may connect."""

    listen: Address
    #: If set, only clients from these networks are served.
    allow: tuple[IPNetwork, ...] = ()
    #: Clients from these networks are refused (checked before `allow`).
    deny: tuple[IPNetwork, ...] = ()
    #: At most this many clients of the service at once; more are refused. 0: no cap.
    max_clients: int = 0
    #: A connection with no byte either way for this many seconds is closed. 0: never.
    idle_timeout: float = 0.0
    #: This service's own resume window (None: the LL's `resume_window`).
    resume_window: float | None = None
    #: Bits per second all clients of the service together may move, each direction
    #: (None: no limit).
    rate_limit: int | None = None
    #: Bits per second each client connection may move, each direction (None: the
    #: LL's `client_rate_limit`).
    client_rate_limit: int | None = None
    #: "tcp", or "udp": datagrams, each client address a flow (see docs/configuration.md).
    protocol: str = "tcp"
    #: A UDP flow with no datagram either way for this many seconds ends.
    udp_idle_timeout: float = 60.0
    #: UDP flows of the service at once, in all and per client IP address; past either,
    #: a new flow's datagrams are dropped (counted).
    max_flows: int = 2000
    max_flows_per_source: int = 500

    @property
    def udp(self) -> bool:
        return self.protocol == "udp"

    def admits(self, host: str) -> str | None:
        """None if a client from `host` may connect, else why not."""
        if not self.allow and not self.deny:
            return None  # the common case costs no address parsing per client
        try:
            address = ip_address(host.split("%", 1)[0])
        except ValueError:
            return "unparseable address"
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self.deny):
            return "address in the deny list"
        if self.allow and not any(address in net for net in self.allow):
            return "address not in the allow list"
        return None


@dataclass
class LLConfig(NodeControls):
    """The outside node: where agents connect and where each service takes clients."""

    #: Where agents (CC nodes) connect.
    cc: Address | None = None
    #: Service name -> where and from whom it takes clients.
    services: dict[str, ServiceListener] = field(default_factory=dict)
    #: Holds the secret, key and certificate; None means the default per-user dir.
    state_dir: Path | None = None
    #: How long a client may wait for an agent of its service before it is closed.
    client_wait: float = 10.0
    #: Deadline for a connection on the agent port to finish TLS and its handshake.
    handshake_timeout: float = 10.0
    #: Interval between heartbeats on control connections; a peer silent for three
    #: intervals is declared dead.
    heartbeat: float = 10.0
    #: Unauthenticated connections on the agent port at once, in all and per source
    #: network (/24, /64; an address where an agent authenticated is a source of its
    #: own, outside the total). Past a cap one pending is dropped: at random within the
    #: source, from the source with the most past the total (see `tcpgc.ll.admission`).
    max_pending: int = 256
    max_pending_per_source: int = 32
    #: Agent sessions at once per join token (per secret the agents prove); past it a
    #: new session is refused. 0: no cap.
    max_sessions_per_token: int = 64
    #: A certificate and key of your own PKI instead of the self-signed identity.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Require agents to present a client certificate signed by this CA bundle.
    tls_client_ca: Path | None = None
    #: TLS off on the LL-CC leg (authentication stays on). Both nodes must agree.
    insecure_plaintext: bool = False
    #: How long a stream waits for its agent to resume it after a break of the leg, in
    #: seconds (0: streams are not resumable). See docs/resume.md.
    resume_window: float = 60.0
    #: Bytes each direction of a stream keeps until they are acknowledged.
    resume_buffer: int = DEFAULT_RESUME_BUFFER
    #: Bytes all streams waiting for a resume may keep in all; past it, the oldest is
    #: given up.
    resume_memory: int = DEFAULT_RESUME_MEMORY
    #: Bits per second each client connection may move, each direction, in services
    #: without a `client_rate_limit` of their own (None: no limit).
    client_rate_limit: int | None = None

    def client_rate_of(self, service: str) -> int | None:
        """The per-client rate limit of `service`'s clients (bits per second), if any."""
        listener = self.services.get(service)
        if listener is not None and listener.client_rate_limit is not None:
            return listener.client_rate_limit
        return self.client_rate_limit

    def is_udp(self, service: str) -> bool:
        """Whether `service` (configured, or a port an agent exposes) is UDP."""
        listener = self.services.get(service)
        return listener.udp if listener is not None else service.endswith(UDP_SUFFIX)

    def window_of(self, service: str) -> float:
        """The resume window of `service`'s streams."""
        if self.is_udp(service):
            return 0.0  # datagrams are not resent: a flow is never resumed
        listener = self.services.get(service)
        if listener is not None and listener.resume_window is not None:
            return listener.resume_window
        return self.resume_window

    def require_complete(self) -> None:
        """Raise UsageError unless the LL has an agent address: a file may leave it to
        the flags. (An LL without services may serve the ports its agents expose: the
        node checks that, knowing its agents.)"""
        if self.cc is None:
            raise UsageError(
                "tcpgc ll needs --cc HOST:PORT (where agents connect) or a config file with 'cc'"
            )


_LL_KEYS = {
    "admin",
    "admin_hosts",
    "admin_token_file",
    "cc",
    "services",
    "state_dir",
    "client_wait",
    "handshake_timeout",
    "heartbeat",
    "drain_timeout",
    "max_pending",
    "max_pending_per_source",
    "max_sessions_per_token",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "insecure_plaintext",
    "resume_window",
    "resume_buffer",
    "resume_memory",
    "client_rate_limit",
}
#: Keys of a UDP service only, and keys of a TCP service only.
UDP_KEYS = ("udp_idle_timeout", "max_flows", "max_flows_per_source")
_TCP_ONLY_KEYS = ("max_clients", "idle_timeout", "resume_window", "rate_limit", "client_rate_limit")
_LL_SERVICE_KEYS = {
    "clients", "allow", "deny", "max_clients", "idle_timeout", "resume_window", "rate_limit",
    "client_rate_limit", "protocol", *UDP_KEYS,
}  # fmt: skip


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None


def ll_config_from(data: dict[str, Any], source: str) -> LLConfig:
    p = ConfigProblems(source)
    p.unknown(data, _LL_KEYS)
    services: dict[str, ServiceListener] = {}
    for name, body in p.service_tables(data, "clients", _LL_SERVICE_KEYS).items():
        where = f"services.{name}"
        listen = p.address(body, "clients", f"{where}.clients") if "clients" in body else None
        service = ServiceListener(
            listen=listen or Address("0.0.0.0", 0),
            allow=p.networks(body, "allow", f"{where}.allow"),
            deny=p.networks(body, "deny", f"{where}.deny"),
            max_clients=p.integer(body, "max_clients", 0, f"{where}.max_clients"),
            idle_timeout=p.number(body, "idle_timeout", 0.0, 0.0, f"{where}.idle_timeout"),
            resume_window=(
                p.number(body, "resume_window", 0.0, 0.0, f"{where}.resume_window")
                if "resume_window" in body
                else None
            ),
            rate_limit=p.rate(body, "rate_limit", f"{where}.rate_limit"),
            client_rate_limit=p.rate(body, "client_rate_limit", f"{where}.client_rate_limit"),
            **_udp_controls(p, body, where),
        )
        if listen is not None:
            services[name] = service
    config = LLConfig(
        cc=p.address(data, "cc", "cc") if "cc" in data else None,
        services=services,
        state_dir=p.path(data, "state_dir"),
        client_wait=p.number(data, "client_wait", LLConfig.client_wait),
        handshake_timeout=p.number(data, "handshake_timeout", LLConfig.handshake_timeout),
        heartbeat=p.number(data, "heartbeat", LLConfig.heartbeat),
        drain_timeout=p.number(data, "drain_timeout", LLConfig.drain_timeout, 0.0),
        max_pending=p.integer(data, "max_pending", LLConfig.max_pending),
        max_pending_per_source=p.integer(
            data, "max_pending_per_source", LLConfig.max_pending_per_source
        ),
        max_sessions_per_token=p.integer(
            data, "max_sessions_per_token", LLConfig.max_sessions_per_token
        ),
        tls_cert=p.path(data, "tls_cert"),
        tls_key=p.path(data, "tls_key"),
        tls_client_ca=p.path(data, "tls_client_ca"),
        insecure_plaintext=p.flag(data, "insecure_plaintext"),
        admin=p.address(data, "admin", "admin") if "admin" in data else None,
        admin_token_file=p.path(data, "admin_token_file"),
        admin_hosts=p.host_names(data, "admin_hosts"),
        resume_window=p.number(data, "resume_window", LLConfig.resume_window, 0.0),
        resume_buffer=resume_buffer(p, data),
        resume_memory=p.integer(data, "resume_memory", DEFAULT_RESUME_MEMORY),
        client_rate_limit=p.rate(data, "client_rate_limit"),
    )
    if (config.tls_cert is None) != (config.tls_key is None):
        p.add("tls_cert", "tls_cert and tls_key go together")
    if config.max_pending < 1 or config.max_pending_per_source < 1:
        p.add("max_pending", "max_pending and max_pending_per_source must be at least 1")
    for first, second in collisions(ll_listeners(config)) + collisions(ll_udp_listeners(config)):
        p.add(second, f"same port as {first}: both cannot listen ('address already in use')")
    p.check()
    return config


def _udp_controls(p: ConfigProblems, body: dict[str, Any], where: str) -> dict[str, Any]:
    """A service's protocol and the controls of a UDP service; each key of the other
    protocol is reported."""
    protocol = p.protocol(body, f"{where}.protocol")
    if protocol != "udp":
        for key in UDP_KEYS:
            if key in body:
                p.add(f"{where}.{key}", 'only for a UDP service (protocol = "udp")')
        return {}
    for key in _TCP_ONLY_KEYS:
        if key in body:
            p.add(f"{where}.{key}", "not for a UDP service (its flows have udp_idle_timeout, "
                  "max_flows and max_flows_per_source)")  # fmt: skip
    max_flows = p.integer(body, "max_flows", ServiceListener.max_flows, f"{where}.max_flows")
    per_source = p.integer(
        body, "max_flows_per_source", ServiceListener.max_flows_per_source,
        f"{where}.max_flows_per_source",
    )  # fmt: skip
    if max_flows < 1 or per_source < 1:
        p.add(f"{where}.max_flows", "max_flows and max_flows_per_source must be at least 1")
    return {
        "protocol": "udp",
        "udp_idle_timeout": p.number(
            body,
            "udp_idle_timeout",
            ServiceListener.udp_idle_timeout,
            0.001,
            f"{where}.udp_idle_timeout",
        ),  # fmt: skip
        "max_flows": max(max_flows, 1),
        "max_flows_per_source": max(per_source, 1),
    }


def ll_listeners(config: LLConfig) -> list[tuple[str, Address]]:
    """Every TCP address an LL listens on, labelled by its config key."""
    out = [("cc", config.cc)] if config.cc is not None else []
    out += [
        (f"services.{name}.clients", s.listen) for name, s in config.services.items() if not s.udp
    ]
    if config.admin is not None:
        out.append(("admin", config.admin))
    return out


def ll_udp_listeners(config: LLConfig) -> list[tuple[str, Address]]:
    """Every UDP address an LL listens on, labelled by its config key."""
    return [(f"services.{name}.clients", s.listen) for name, s in config.services.items() if s.udp]
