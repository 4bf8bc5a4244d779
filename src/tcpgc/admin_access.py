"""Who may read the admin endpoint: where it may listen without a token, which `Host`
names it answers to, and how many connections it keeps open.

The admin endpoint is plain HTTP. Without a token it must listen on loopback only, and
even there a web page can reach it through DNS rebinding: a page of
``http://evil.example:9181/`` has ``evil.example`` re-resolved to 127.0.0.1 and then
reads the endpoint as if it were its own origin. The browser still sends
``Host: evil.example:9181`` (scripts cannot set Host), so a tokenless endpoint serves
only requests naming it by one of its own names. IP literals are always its own: a
page whose origin is an IP address is the endpoint itself, and rebinding needs a name.

No I/O here, and no import of the admin server (`tcpgc check` uses this without
loading prometheus-client).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Hashable, Iterable
from ipaddress import IPv6Address, ip_address
from pathlib import Path

# From tcpgc.addresses, not tcpgc.config: config imports this module (admin_hosts).
from tcpgc.addresses import Address

#: Names that resolve to loopback without DNS, so no one can rebind them.
LOOPBACK_NAMES = frozenset({"localhost"})

# A DNS name: dot-separated labels of letters, digits, '-' and '_' (internal names such
# as container service names use '_'), 253 characters at most.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
_PORT = re.compile(r":[0-9]{1,5}")


def is_loopback(host: str) -> bool:
    """True if an endpoint bound to `host` is reachable from this machine only
    ('localhost', 127.0.0.0/8, ::1). All interfaces ('', '0.0.0.0', '::') and any other
    name are not: a name may resolve anywhere."""
    if _normalise(host) in LOOPBACK_NAMES:
        return True
    try:
        address = ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def exposure_problem(admin: Address | None, token_file: Path | None) -> str | None:
    """Why a node must not start with this admin endpoint, or None. Without a token, a
    plain-HTTP endpoint beyond loopback would hand status and metrics (client and inside
    addresses) to anyone who reaches it."""
    if admin is None or token_file is not None or is_loopback(admin.host):
        return None
    where = str(admin) if admin.host else f"every interface (:{admin.port})"
    return (
        f"the admin endpoint on {where} is not on loopback and has no token: give "
        "--admin-token-file FILE (admin_token_file in the config, a 0600 file holding "
        "the token), or bind it to 127.0.0.1 or [::1]"
    )


def host_name_problem(name: object) -> str | None:
    """None if `name` may go in `admin_hosts` (a DNS name or an IP address, without
    port, scheme or wildcard), else why not."""
    if not isinstance(name, str):
        return f"expected a host name string, got {type(name).__name__}"
    # IP addresses are always accepted; listing one (bracketed or not) is harmless.
    if _is_ip(name.removeprefix("[").removesuffix("]")) or _NAME.fullmatch(_normalise(name)):
        return None
    return f'{name!r} is not a host name (no port, scheme or wildcard: e.g. "gw1.example.com")'


class HostAllowlist:
    """The `Host` header values a tokenless admin endpoint answers: IP literals,
    LOOPBACK_NAMES and `names`, with or without a port."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names = LOOPBACK_NAMES | {_normalise(name) for name in names}

    def allows(self, header: str | None) -> bool:
        """True if a request with this Host header (None: none sent) may be served.
        No browser sends a request without Host, so such a request is no rebinding."""
        if header is None:
            return True
        host = _host_of(header)
        if host is None:
            return False
        return _is_ip(host) or host in self.names


def _host_of(header: str) -> str | None:
    """The host of a Host header value ('name', 'name:port', '[v6]:port'), lower-cased
    and without a trailing dot; None if malformed."""
    value = header.strip()
    if value.startswith("["):
        inside, sep, rest = value[1:].partition("]")
        if not sep or (rest and not _PORT.fullmatch(rest)):
            return None
        # Only an IPv6 literal may be bracketed.
        return inside if _is_ip(inside) and ":" in inside else None
    host, sep, port = value.rpartition(":")
    if not sep:
        host = value
    elif not _PORT.fullmatch(":" + port):
        return None
    if not host or ":" in host:
        return None
    return _normalise(host)


def _is_ip(text: str) -> bool:
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


def _normalise(name: str) -> str:
    # Names are case-insensitive; 'localhost.' is the same name as 'localhost'.
    return name.lower().removesuffix(".")


class ConnectionCap:
    """Admin connections open at once, in all and per source address. A newcomer is
    always taken; past a cap another open connection is closed instead: of `draws`
    drawn at random the one open longest (so the newest is never the one, and peers
    that finish at once are favoured over peers that linger), sparing those for which
    `spare` is true (say, a request already waiting to be read) unless all are."""

    def __init__(
        self,
        max_total: int,
        max_per_source: int,
        *,
        draws: int = 2,
        spare: Callable[[Hashable], bool] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.draws = draws
        self.spare = spare
        self._rng = rng or random.Random()
        # Dicts keep insertion order: oldest first, which is what "open longest" needs.
        self._source_of: dict[Hashable, str] = {}
        self._by_source: dict[str, dict[Hashable, None]] = {}

    def __len__(self) -> int:
        return len(self._source_of)

    def admit(self, key: Hashable, source: str) -> list[Hashable]:
        """Register `key` from `source`; returns the open keys to close (never `key`)."""
        self._source_of[key] = source
        group = self._by_source.setdefault(source, {})
        group[key] = None
        victims: list[Hashable] = []
        while len(group) > self.max_per_source:
            victims.append(self._evict(self._pick(list(group), key)))
        while len(self._source_of) > self.max_total:
            victims.append(self._evict(self._pick(list(self._source_of), key)))
        return victims

    def release(self, key: Hashable) -> None:
        """`key` was served or closed."""
        if key in self._source_of:
            self._evict(key)

    def _pick(self, candidates: list[Hashable], keep: Hashable) -> Hashable:
        others = [key for key in candidates if key != keep]
        if self.spare is not None:
            others = [key for key in others if not self.spare(key)] or others
        drawn = self._rng.sample(range(len(others)), min(self.draws, len(others)))
        return others[min(drawn)]

    def _evict(self, key: Hashable) -> Hashable:
        source = self._source_of.pop(key)
        group = self._by_source[source]
        del group[key]
        if not group:
            del self._by_source[source]
        return key
