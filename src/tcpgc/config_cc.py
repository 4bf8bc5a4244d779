"""The agent's (CC's) configuration: which LLs to serve and which server each service
reaches. `tcpgc.config` re-exports what is public here."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from tcpgc.addresses import Address, address_or_problem
from tcpgc.config_checks import (
    DEFAULT_RESUME_BUFFER,
    DEFAULT_RESUME_MEMORY,
    ConfigProblems,
    NodeControls,
    resume_buffer,
)
from tcpgc.errors import UsageError
from tcpgc.protocol.messages import MAX_EXPOSES, MAX_SERVICES, expose_name

#: How long a UDP flow may be idle before the agent ends it, unless configured.
DEFAULT_UDP_IDLE = 60.0


@dataclass(frozen=True)
class Expose:
    """A port the agent asks each LL to take clients on for it (`--expose`), and the
    server those clients reach. `host` is where on the LL ("" for all its addresses)."""

    host: str
    port: int
    server: Address
    #: A UDP port (`udp:PORT=...`): each client address a flow, as in a UDP service.
    udp: bool = False

    @property
    def name(self) -> str:
        """The service's name, as the LL and the logs give it: ':PORT' (':PORT/udp')."""
        return expose_name(self.port, self.udp)

    def __str__(self) -> str:
        where = str(Address(self.host, self.port)) if self.host else str(self.port)
        return f"{'udp:' if self.udp else ''}{where}={self.server}"


_EXPOSE_FORM = (
    "expected [udp:][HOST:]PORT=SERVERHOST:SERVERPORT, e.g. 8080=127.0.0.1:80 or "
    "udp:5353=127.0.0.1:53"
)


def expose_or_problem(text: object) -> Expose | str:
    """`[udp:|tcp:][HOST:]PORT=SERVERHOST:SERVERPORT` as an Expose, or what is wrong
    with it."""
    if not isinstance(text, str) or text.count("=") != 1:
        return f"{_EXPOSE_FORM}, got {text!r}"
    where, server_text = (part.strip() for part in text.split("="))
    protocol, sep, rest = where.partition(":")
    udp = sep and protocol.lower() == "udp"
    if sep and protocol.lower() in ("udp", "tcp"):
        where = rest
    host, port_text = "", where
    if not where.isdecimal():
        listen = address_or_problem(where)
        if isinstance(listen, str):
            return f"{listen} (in {text!r}; {_EXPOSE_FORM})"
        host, port_text = listen.host, str(listen.port)
    port = int(port_text) if port_text.isdecimal() and port_text.isascii() else 0
    if not 0 < port < 65536:
        return f"port {port_text!r} is not 1-65535 (in {text!r})"
    if host:
        try:
            ip_address(host)
        except ValueError:
            return f"{host!r} is not an IP address of the LL (in {text!r})"
    server = address_or_problem(server_text)
    if isinstance(server, str):
        return f"{server} (in {text!r}; {_EXPOSE_FORM})"
    if not server.port:
        return f"the server's port cannot be 0 (in {text!r})"
    return Expose(host, port, server, bool(udp))


@dataclass
class CCConfig(NodeControls):
    """The inside node: which LLs to serve and which server each service reaches."""

    ll: list[Address] = field(default_factory=list)
    #: Service name -> its server. Holds the exposed ports too, as ':PORT'.
    services: dict[str, Address] = field(default_factory=dict)
    #: Ports the agent asks each LL to take clients on for it (`--expose`).
    exposes: list[Expose] = field(default_factory=list)
    token_file: Path | None = None
    #: Deadline to connect to the LL (TCP + TLS + handshake) and to a server.
    connect_timeout: float = 10.0
    #: Reconnect backoff: first delay and cap, in seconds (with jitter).
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    #: Authenticated data connections kept open to each LL, ready for new clients
    #: (0: dial one per client). Each one idle for `pool_ttl` seconds is replaced.
    pool_size: int = 4
    pool_ttl: float = 60.0
    #: Service name -> PROXY protocol version (1 or 2) to send its server first.
    proxy_protocol: dict[str, int] = field(default_factory=dict)
    #: The UDP services (the others are TCP): name -> how long one of its flows may be
    #: idle, in seconds, before the agent ends it.
    udp_services: dict[str, float] = field(default_factory=dict)
    #: Verify the LL's certificate chain and name against this CA bundle instead of
    #: pinning the fingerprint from the token.
    tls_ca: Path | None = None
    #: Client certificate and key to present to an LL that requires one (mutual TLS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure_plaintext: bool = False
    #: Client connections being opened or relayed at once through one LL, and of one
    #: service through all LLs; past either an OPEN is refused. 0: no cap. Each costs
    #: two sockets: the defaults keep 18,000 descriptors of a 20,000 limit in use.
    max_connections_per_ll: int = 9000
    max_connections_per_service: int = 9000
    #: Bytes each direction of a stream keeps until they are acknowledged, and bytes
    #: all streams waiting for a resume may keep in all (see docs/resume.md). The
    #: window is the LL's: it comes with each OPEN.
    resume_buffer: int = DEFAULT_RESUME_BUFFER
    resume_memory: int = DEFAULT_RESUME_MEMORY

    @property
    def configured_services(self) -> tuple[str, ...]:
        """The services the LLs configure that this agent serves (not its exposed ports)."""
        return tuple(name for name in self.services if not name.startswith(":"))

    def add_expose(self, expose: Expose) -> None:
        """Expose one more port; UsageError if the port is exposed already."""
        if expose.name in self.services:
            raise UsageError(f"port {expose.port} is exposed twice ({expose})")
        if len(self.exposes) >= MAX_EXPOSES:
            raise UsageError(f"an agent exposes at most {MAX_EXPOSES} ports")
        self.exposes.append(expose)
        self.services[expose.name] = expose.server
        if expose.udp:
            self.udp_services[expose.name] = DEFAULT_UDP_IDLE

    def require_complete(self) -> None:
        """Raise UsageError unless the agent has an LL to serve and a service: a file
        may leave either to the flags, but a node cannot start without both."""
        if not self.ll:
            raise UsageError(
                "tcpgc cc needs --ll HOST:PORT (the LL's agent address) or a config file with 'll'"
            )
        if not self.services:
            raise UsageError(
                "tcpgc cc needs --server HOST:PORT, --expose PORT=HOST:PORT, or a config "
                "file with [services.NAME] sections or 'expose'"
            )


_CC_KEYS = {
    "admin",
    "admin_hosts",
    "admin_token_file",
    "ll",
    "services",
    "token_file",
    "connect_timeout",
    "reconnect_min",
    "reconnect_max",
    "drain_timeout",
    "pool_size",
    "pool_ttl",
    "max_connections_per_ll",
    "max_connections_per_service",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "insecure_plaintext",
    "resume_buffer",
    "resume_memory",
    "expose",
}
_CC_SERVICE_KEYS = {"server", "proxy_protocol", "protocol", "udp_idle_timeout"}


def _cc_services(
    p: ConfigProblems, data: dict[str, Any]
) -> tuple[dict[str, Address], dict[str, int], dict[str, float]]:
    """Each service's server, the PROXY protocol version of those that send it, and the
    idle timeout of the UDP ones."""
    services: dict[str, Address] = {}
    proxy: dict[str, int] = {}
    udp: dict[str, float] = {}
    table = data.get("services", {})
    if isinstance(table, dict) and len(table) > MAX_SERVICES:
        p.add("services", f"an agent serves at most {MAX_SERVICES} services")
    for name, body in p.service_tables(data, "server", _CC_SERVICE_KEYS).items():
        if "server" in body:
            address = p.address(body, "server", f"services.{name}.server")
            if address is not None:
                services[name] = address
        version = body.get("proxy_protocol", 0)
        if version not in (0, 1, 2) or isinstance(version, bool):
            p.add(f"services.{name}.proxy_protocol", f"expected 1, 2 or 0 (off), got {version!r}")
        elif version:
            proxy[name] = version
        where = f"services.{name}"
        if p.protocol(body, f"{where}.protocol") == "udp":
            udp[name] = p.number(
                body, "udp_idle_timeout", DEFAULT_UDP_IDLE, 0.001, f"{where}.udp_idle_timeout"
            )
            if version:
                p.add(f"{where}.proxy_protocol", "not for a UDP service")
        elif "udp_idle_timeout" in body:
            p.add(f"{where}.udp_idle_timeout", 'only for a UDP service (protocol = "udp")')
    return services, proxy, udp


def cc_config_from(data: dict[str, Any], source: str) -> CCConfig:
    p = ConfigProblems(source)
    p.unknown(data, _CC_KEYS)
    ll_value = data.get("ll", [])
    lls = [ll_value] if isinstance(ll_value, str) else ll_value
    addresses: list[Address] = []
    if not isinstance(lls, list):
        p.add("ll", "expected 'HOST:PORT' or a list of them")
    else:
        for i, item in enumerate(lls):
            address = p.address(
                {"ll": item}, "ll", f"ll[{i}]" if isinstance(ll_value, list) else "ll"
            )
            if address is not None:
                addresses.append(address)
    services, proxy, udp = _cc_services(p, data)
    config = CCConfig(
        ll=addresses,
        services=services,
        proxy_protocol=proxy,
        udp_services=udp,
        connect_timeout=p.number(data, "connect_timeout", CCConfig.connect_timeout),
        reconnect_min=p.number(data, "reconnect_min", CCConfig.reconnect_min),
        reconnect_max=p.number(data, "reconnect_max", CCConfig.reconnect_max),
        drain_timeout=p.number(data, "drain_timeout", CCConfig.drain_timeout, 0.0),
        pool_size=p.integer(data, "pool_size", CCConfig.pool_size),
        pool_ttl=p.number(data, "pool_ttl", CCConfig.pool_ttl),
        max_connections_per_ll=p.integer(
            data, "max_connections_per_ll", CCConfig.max_connections_per_ll
        ),
        max_connections_per_service=p.integer(
            data, "max_connections_per_service", CCConfig.max_connections_per_service
        ),
        insecure_plaintext=p.flag(data, "insecure_plaintext"),
        resume_buffer=resume_buffer(p, data),
        resume_memory=p.integer(data, "resume_memory", DEFAULT_RESUME_MEMORY),
    )
    _exposes(p, data, config)
    config.token_file = p.path(data, "token_file")
    config.admin = p.address(data, "admin", "admin") if "admin" in data else None
    config.admin_token_file = p.path(data, "admin_token_file")
    config.admin_hosts = p.host_names(data, "admin_hosts")
    config.tls_ca = p.path(data, "tls_ca")
    config.tls_cert = p.path(data, "tls_cert")
    config.tls_key = p.path(data, "tls_key")
    if (config.tls_cert is None) != (config.tls_key is None):
        p.add("tls_cert", "tls_cert and tls_key go together")
    if config.reconnect_max < config.reconnect_min:
        p.add("reconnect_max", "must not be smaller than reconnect_min")
    p.check()
    return config


def _exposes(p: ConfigProblems, data: dict[str, Any], config: CCConfig) -> None:
    value = data.get("expose", [])
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        p.add("expose", f'expected a list such as ["8080=127.0.0.1:80"], got {value!r}')
        return
    for i, item in enumerate(items):
        label = f"expose[{i}]" if isinstance(value, list) else "expose"
        expose = expose_or_problem(item)
        if isinstance(expose, str):
            p.add(label, expose)
            continue
        try:
            config.add_expose(expose)
        except UsageError as exc:
            p.add(label, str(exc))
