"""Typed, validated configuration for both nodes, from a TOML file and flags.

A config file describes one node. Every problem is reported with the key it is about;
`UsageError` carries them all, one per line, so the CLI can print them and exit 2.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tcpgc.errors import UsageError
from tcpgc.protocol.messages import is_valid_name

DEFAULT_SERVICE = "default"


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: object, what: str) -> Address:
    """'host:port', '[v6]:port' or ':port' (all interfaces)."""
    if not isinstance(text, str):
        raise UsageError(f"{what}: expected a 'HOST:PORT' string, got {type(text).__name__}")
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"{what}: {text!r} is ambiguous: write IPv6 addresses as [ADDR]:PORT")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"{what}: {text!r} is not HOST:PORT with a port from 0 to 65535")
    return Address(host or "0.0.0.0", int(port_text))


@dataclass
class LLConfig:
    """The outside node: where agents connect and where each service takes clients."""

    #: Where agents (CC nodes) connect.
    cc: Address | None = None
    #: Service name -> where its clients connect.
    services: dict[str, Address] = field(default_factory=dict)
    #: Holds the secret, key and certificate; None means the default per-user dir.
    state_dir: Path | None = None
    #: How long a client may wait for an agent of its service before it is closed.
    client_wait: float = 10.0
    #: Deadline for a connection on the agent port to finish TLS and its first message.
    handshake_timeout: float = 10.0
    #: Interval between heartbeats on control connections; a peer silent for three
    #: intervals is declared dead.
    heartbeat: float = 10.0
    #: TLS off on the LL-CC leg (authentication stays on). Both nodes must agree.
    insecure_plaintext: bool = False


@dataclass
class CCConfig:
    """The inside node: which LLs to serve and which server each service reaches."""

    ll: list[Address] = field(default_factory=list)
    services: dict[str, Address] = field(default_factory=dict)
    token_file: Path | None = None
    #: Deadline to connect to the LL (TCP + TLS + handshake) and to a server.
    connect_timeout: float = 10.0
    #: Reconnect backoff: first delay and cap, in seconds (with jitter).
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    insecure_plaintext: bool = False


_LL_KEYS = {
    "cc",
    "services",
    "state_dir",
    "client_wait",
    "handshake_timeout",
    "heartbeat",
    "insecure_plaintext",
}
_CC_KEYS = {
    "ll",
    "services",
    "token_file",
    "connect_timeout",
    "reconnect_min",
    "reconnect_max",
    "insecure_plaintext",
}


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


class _Problems:
    """Collects every problem in a config instead of stopping at the first."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{self.source}: {key}: {message}")

    def check(self) -> None:
        if self.items:
            raise UsageError("\n".join(self.items))

    def address(self, data: dict[str, Any], key: str, label: str) -> Address | None:
        try:
            return parse_address(data[key], label)
        except UsageError as exc:
            self.add(label, str(exc).split(": ", 1)[1])
            return None

    def number(
        self, data: dict[str, Any], key: str, default: float, minimum: float = 0.001
    ) -> float:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            self.add(key, f"expected a number of seconds >= {minimum}, got {value!r}")
            return default
        return float(value)

    def flag(self, data: dict[str, Any], key: str) -> bool:
        value = data.get(key, False)
        if not isinstance(value, bool):
            self.add(key, f"expected true or false, got {value!r}")
            return False
        return value

    def unknown(self, data: dict[str, Any], allowed: set[str], prefix: str = "") -> None:
        for key in sorted(set(data) - allowed):
            self.add(prefix + key, f"unknown key (known: {', '.join(sorted(allowed))})")

    def services(self, data: dict[str, Any], key: str) -> dict[str, Address]:
        out: dict[str, Address] = {}
        table = data.get("services", {})
        if not isinstance(table, dict):
            self.add("services", "expected a table of [services.NAME] sections")
            return out
        for name, body in table.items():
            where = f"services.{name}"
            if not is_valid_name(name):
                self.add(where, "service names are 1-64 letters, digits, '-', '_' or '.'")
                continue
            if not isinstance(body, dict):
                self.add(where, f"expected a table with key {key!r}")
                continue
            self.unknown(body, {key}, where + ".")
            if key not in body:
                self.add(where, f"missing key {key!r}")
                continue
            address = self.address(body, key, f"{where}.{key}")
            if address is not None:
                out[name] = address
        return out


def ll_config_from(data: dict[str, Any], source: str) -> LLConfig:
    p = _Problems(source)
    p.unknown(data, _LL_KEYS)
    config = LLConfig(
        cc=p.address(data, "cc", "cc") if "cc" in data else None,
        services=p.services(data, "clients"),
        client_wait=p.number(data, "client_wait", LLConfig.client_wait),
        handshake_timeout=p.number(data, "handshake_timeout", LLConfig.handshake_timeout),
        heartbeat=p.number(data, "heartbeat", LLConfig.heartbeat),
        insecure_plaintext=p.flag(data, "insecure_plaintext"),
    )
    if "state_dir" in data:
        if isinstance(data["state_dir"], str):
            config.state_dir = Path(data["state_dir"])
        else:
            p.add("state_dir", "expected a path string")
    p.check()
    return config


def cc_config_from(data: dict[str, Any], source: str) -> CCConfig:
    p = _Problems(source)
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
    config = CCConfig(
        ll=addresses,
        services=p.services(data, "server"),
        connect_timeout=p.number(data, "connect_timeout", CCConfig.connect_timeout),
        reconnect_min=p.number(data, "reconnect_min", CCConfig.reconnect_min),
        reconnect_max=p.number(data, "reconnect_max", CCConfig.reconnect_max),
        insecure_plaintext=p.flag(data, "insecure_plaintext"),
    )
    if "token_file" in data:
        if isinstance(data["token_file"], str):
            config.token_file = Path(data["token_file"])
        else:
            p.add("token_file", "expected a path string")
    if config.reconnect_max < config.reconnect_min:
        p.add("reconnect_max", "must not be smaller than reconnect_min")
    p.check()
    return config
