"""Classic mode's settings, from the nodes' parsed configuration: one service, no
identity, and the warning both nodes log when they start."""

from __future__ import annotations

from dataclasses import dataclass

from tcpgc.config import DEFAULT_SERVICE, Address, CCConfig, LLConfig
from tcpgc.errors import UsageError

WARNING = (
    "classic mode speaks the seed's socat protocol: NO authentication and NO encryption; "
    "anyone who reaches the agent port gets the next client's bytes. Use it only while "
    "migrating from socat."
)

#: The CC's wait after a refused or failed attempt. The seed polls every 2 s; half of
#: that halves a client's worst-case wait for the cost of one SYN a second while idle.
DEFAULT_INTERVAL = 1.0

#: Connections on which the LL has sent nothing yet that the CC holds at most. A real
#: client usually speaks at once, or as soon as a server-first banner reaches it; an
#: LL that accepts and stays silent is exactly what must not grow without bound.
MAX_SILENT = 32


@dataclass
class ClassicLLConfig:
    """The classic LL: one client port, one agent port, no identity."""

    #: Where clients connect.
    clients: Address
    #: Where a socat or classic CC connects; listened on only while clients wait.
    cc: Address
    #: How long a client may wait for a CC connection before it is closed.
    client_wait: float = 10.0

    @classmethod
    def from_config(cls, config: LLConfig) -> ClassicLLConfig:
        if config.cc is None or len(config.services) != 1:
            raise UsageError(
                "classic mode carries one service: give --clients HOST:PORT and --cc HOST:PORT"
            )
        (service,) = config.services.values()
        return cls(service.listen, config.cc, config.client_wait)


@dataclass
class ClassicCCConfig:
    """The classic CC: the LL agent ports to poll and the one server behind them."""

    ll: list[Address]
    server: Address
    #: Seconds to wait after the LL refused (no client waiting) or an attempt failed.
    interval: float = DEFAULT_INTERVAL
    #: Deadline to connect to the LL or to the server.
    connect_timeout: float = 10.0
    #: See MAX_SILENT.
    max_silent: int = MAX_SILENT

    @classmethod
    def from_config(cls, config: CCConfig, interval: float | None = None) -> ClassicCCConfig:
        if not config.ll or list(config.services) != [DEFAULT_SERVICE]:
            raise UsageError(
                "classic mode carries one service: give --ll HOST:PORT and --server HOST:PORT"
            )
        if interval is not None and not interval > 0:
            raise UsageError("--interval must be a positive number of seconds")
        return cls(
            list(config.ll),
            config.services[DEFAULT_SERVICE],
            DEFAULT_INTERVAL if interval is None else interval,
            config.connect_timeout,
        )
