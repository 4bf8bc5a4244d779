"""Reading a TOML config's values into typed ones, collecting every problem (with the
key it is about) instead of stopping at the first; and finding a key's line for them."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, TypeAlias

from tcpgc.addresses import Address, address_or_problem
from tcpgc.admin_access import host_name_problem
from tcpgc.errors import UsageError
from tcpgc.protocol.messages import is_valid_name
from tcpgc.rates import parse_rate, rate_problem


@dataclass
class NodeControls:
    """What both nodes' configurations have: how they drain, and their admin endpoint."""

    #: On SIGTERM, how long connections in flight may take to finish.
    drain_timeout: float = 30.0
    #: Admin HTTP endpoint (/metrics, /healthz, status page); off unless set.
    admin: Address | None = None
    #: File holding a bearer token the admin endpoint requires (none: no auth).
    admin_token_file: Path | None = None
    #: Host names, besides loopback ones and IP addresses, that a tokenless admin
    #: endpoint answers to (a defence against DNS rebinding).
    admin_hosts: tuple[str, ...] = ()


IPNetwork: TypeAlias = IPv4Network | IPv6Network

#: A stream's retention per direction: enough for a 300 Mbit/s link at 100 ms of round
#: trip (or 1 Gbit/s at 30 ms) without slowing it, and a small share of the memory a
#: node holds for thousands of streams (an idle stream keeps nothing).
DEFAULT_RESUME_BUFFER = 4 * 1024 * 1024
DEFAULT_RESUME_MEMORY = 256 * 1024 * 1024
#: The smallest `resume_buffer`: a receiver acknowledges every 128 KiB.
MIN_RESUME_BUFFER = 512 * 1024


def _hint(key: str, allowed: set[str]) -> str:
    near = difflib.get_close_matches(key, allowed, 1)
    return f"did you mean {near[0]!r}? " if near else ""


def _known(allowed: set[str]) -> str:
    return ", ".join(sorted(allowed))


class ConfigProblems:
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
        parsed = address_or_problem(data[key])
        if isinstance(parsed, str):
            self.add(label, parsed)
            return None
        return parsed

    def number(
        self,
        data: dict[str, Any],
        key: str,
        default: float,
        minimum: float = 0.001,
        label: str = "",
    ) -> float:
        value = data.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)  # nan passes `<`, and would break the timers
            or value < minimum
        ):
            self.add(label or key, f"expected a number of seconds >= {minimum}, got {value!r}")
            return default
        return float(value)

    def protocol(self, data: dict[str, Any], label: str) -> str:
        """A service's `protocol`: "tcp" (the default) or "udp"."""
        value = data.get("protocol", "tcp")
        if value not in ("tcp", "udp"):
            self.add(label, f'expected "tcp" or "udp", got {value!r}')
            return "tcp"
        return str(value)

    def flag(self, data: dict[str, Any], key: str) -> bool:
        value = data.get(key, False)
        if not isinstance(value, bool):
            self.add(key, f"expected true or false, got {value!r}")
            return False
        return value

    def unknown(self, data: dict[str, Any], allowed: set[str], prefix: str = "") -> None:
        for key in sorted(set(data) - allowed):
            self.add(prefix + key, f"unknown key ({_hint(key, allowed)}known: {_known(allowed)})")

    def integer(self, data: dict[str, Any], key: str, default: int, label: str = "") -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.add(label or key, f"expected a whole number >= 0, got {value!r}")
            return default
        return value

    def rate(self, data: dict[str, Any], key: str, label: str = "") -> int | None:
        """A bandwidth such as "80Mbit", in bits per second; None if absent or bad."""
        if key not in data:
            return None
        if (problem := rate_problem(data[key])) is not None:
            self.add(label or key, problem)
            return None
        return parse_rate(data[key])

    def path(self, data: dict[str, Any], key: str) -> Path | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.add(key, "expected a path string")
            return None
        return Path(value)

    def host_names(self, data: dict[str, Any], key: str) -> tuple[str, ...]:
        value = data.get(key, [])
        if not isinstance(value, list):
            self.add(key, 'expected a list of host names such as ["gw1.example.com"]')
            return ()
        names = []
        for item in value:
            if (problem := host_name_problem(item)) is not None:
                self.add(key, problem)
            else:
                names.append(item)
        return tuple(names)

    def networks(self, data: dict[str, Any], key: str, label: str) -> tuple[IPNetwork, ...]:
        value = data.get(key, [])
        if not isinstance(value, list):
            self.add(label, 'expected a list of networks such as ["10.0.0.0/8", "::1/128"]')
            return ()
        out = []
        for item in value:
            try:
                out.append(ip_network(item, strict=False))
            except (ValueError, TypeError):
                self.add(label, f"{item!r} is not an IP network (e.g. 192.0.2.0/24)")
        return tuple(out)

    def service_tables(
        self, data: dict[str, Any], key: str, allowed: set[str]
    ) -> dict[str, dict[str, Any]]:
        """The [services.NAME] tables, their unknown keys reported. A table missing
        `key` is reported once, naming its unknown keys (the likely misspelling), and
        still returned, so its other keys are checked too."""
        out: dict[str, dict[str, Any]] = {}
        table = data.get("services", {})
        if not isinstance(table, dict):
            self.add("services", "expected a table of [services.NAME] sections")
            return out
        for name, body in table.items():
            where = f"services.{name}"
            if not is_valid_name(name) or name.startswith(":"):
                self.add(where, "service names are 1-64 letters, digits, '-', '_' or '.'")
            elif not isinstance(body, dict):
                self.add(where, f"expected a table with key {key!r}")
            else:
                unknown = sorted(set(body) - allowed)
                if key not in body:
                    found = "; ".join(
                        f"{k!r} is not a key ({_hint(k, allowed)}known: {_known(allowed)})"
                        for k in unknown
                    )
                    self.add(where, f"missing key {key!r}" + (f"; {found}" if found else ""))
                else:
                    self.unknown({k: None for k in unknown}, allowed, where + ".")
                out[name] = body
        return out


def resume_buffer(p: ConfigProblems, data: dict[str, Any]) -> int:
    """`resume_buffer`, at least MIN_RESUME_BUFFER."""
    value = p.integer(data, "resume_buffer", DEFAULT_RESUME_BUFFER)
    if value < MIN_RESUME_BUFFER:
        p.add("resume_buffer", f"expected bytes >= {MIN_RESUME_BUFFER} (512 KiB), got {value}")
        return DEFAULT_RESUME_BUFFER
    return value


def find_key_line(text: str, key: str) -> int | None:
    """The 1-based line of a dotted key such as 'services.web.clients' in TOML `text`,
    for error messages; None if it cannot be told (tomllib keeps no positions)."""
    parts = re.split(r"\.|\[\d+\]", key)
    parts = [p for p in parts if p]
    if not parts:
        return None
    *table, leaf = parts
    in_table = not table
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("["):
            name = line.strip("[] ").replace('"', "")
            in_table = name == ".".join(table)
            if in_table and not leaf:
                return number
            continue
        if in_table and re.match(rf'"?{re.escape(leaf)}"?\s*=', line):
            return number
    if table:  # the key may be missing: point at its table
        for number, raw in enumerate(text.splitlines(), 1):
            if raw.strip().strip("[] ").replace('"', "") == ".".join(parts):
                return number
    return None
