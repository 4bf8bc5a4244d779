"""Admission of unauthenticated connections on the agent port.

Anyone who can reach the LL can open connections there and never finish a handshake.
Refusing newcomers once a cap is reached would let such a peer lock the real agents
out, even from the same address (agents behind the attacker's NAT). Instead, like
OpenSSH's MaxStartups random early drop, a newcomer is always admitted and, past a cap,
a pending connection is shed. A real agent finishes its handshake in a few round trips,
so the chance that it is the one picked before it is done stays small, while an
attacker's connections, which linger, are the ones that get shed.

Sources are counted by network, not by address: an IPv6 /64 is one customer, one host
even, and an attacker with a /24 or a /64 must not count as hundreds of sources. Past
the total cap, the connection shed comes from the network with the most pending, so
that a flood from one network sheds itself rather than everyone at random.

An address from which an agent authenticated (while its session lives, and for
`TRUST_SECONDS` after it ends, to cover reconnects) is a source of its own, outside its
network and outside the total cap: the ready and data connections of a live agent are
not crowded out by a flood from its neighbours. Only a token holder makes an address
trusted, so these are few; each stays under the per-source cap.

Data connections are unauthenticated until their first frame too, and an agent opens
one per client: when 200 clients arrive at once, 200 are pending from the agent's
address. Each OPEN the LL sends therefore raises the cap for the agent's address by one
(`expect`) until that client is claimed or given up (`settle`).

No I/O and no clock here: the caller passes the time (`now`, any monotonic clock).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Hashable
from typing import NamedTuple

#: How long an address stays trusted after its last agent session ended: long enough
#: for the agent's reconnect backoff, short enough that a stale address loses it soon.
TRUST_SECONDS = 300.0

_IPV4_MAPPED = bytes(10) + b"\xff\xff"


def network_of(host: str) -> str:
    """The network a source address is counted in: its /24 for IPv4 (an IPv4-mapped
    IPv6 address is IPv4), its /64 for IPv6 (the smallest networks routed to one
    customer); anything else, such as a Unix socket's name, is a network of its own."""
    # inet_pton rather than `ipaddress`: this runs for every connection of a flood, and
    # is several times faster.
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
    except OSError:
        try:
            packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])  # no zone
        except OSError:
            return host
        if packed[:12] != _IPV4_MAPPED:
            return f"{socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8))}/64"
        packed = packed[12:]
    return f"{packed[0]}.{packed[1]}.{packed[2]}.0/24"


class _Group(NamedTuple):
    """Whom a pending connection is counted with: a trusted address, or a network."""

    trusted: bool
    name: str


class PendingHandshakes:
    """Tracks pending connections by source; `admit` says which ones to drop."""

    def __init__(
        self,
        max_total: int,
        max_per_source: int,
        rng: random.Random | None = None,
        trust_seconds: float = TRUST_SECONDS,
    ) -> None:
        #: Pending connections from untrusted sources at once, before one is shed.
        self.max_total = max_total
        #: Pending connections per network (or per trusted address) before one is shed.
        self.max_per_source = max_per_source
        self.trust_seconds = trust_seconds
        self._rng = rng or random.Random()
        self._group_of: dict[Hashable, _Group] = {}
        self._members: dict[_Group, list[Hashable]] = {}
        # Untrusted groups by how many of their connections count against the total,
        # so that the largest is found without looking at every group.
        self._counted: dict[_Group, int] = {}
        self._by_count: dict[int, dict[_Group, None]] = {}
        self._untrusted = 0
        self._expected: dict[str, int] = {}
        self._sessions: dict[str, int] = {}
        self._trusted_until: dict[str, float] = {}
        #: Connections shed so far.
        self.shed = 0

    def __len__(self) -> int:
        return len(self._group_of)

    def admit(self, key: Hashable, source: str, now: float) -> list[Hashable]:
        """Register `key` from `source`; returns the pending keys to drop (never `key`)."""
        group = self._group(source, now)
        self._group_of[key] = group
        members = self._members.setdefault(group, [])
        members.append(key)
        allowance, untrusted_expected = self._allowances(group, now)
        victims: list[Hashable] = []
        while len(members) > max(1, self.max_per_source + allowance):
            victims.append(self._evict(self._pick(members, key)))
        if not group.trusted:
            # `key` is counted only once the excess is shed: it is never the one picked.
            limit = max(1, self.max_total + untrusted_expected)
            while self._untrusted + 1 > limit:
                victims.append(self._evict(self._pick(self._largest(), key)))
            self._count(group, 1)
        self.shed += len(victims)
        return victims

    def release(self, key: Hashable) -> None:
        """`key` finished its handshake or closed."""
        if key in self._group_of:
            self._evict(key)

    def expect(self, source: str) -> None:
        """A data connection from `source` is due (an OPEN was sent to an agent there)."""
        self._expected[source] = self._expected.get(source, 0) + 1

    def settle(self, source: str) -> None:
        """The data connection announced by `expect` arrived or is no longer wanted."""
        left = self._expected.get(source, 0) - 1
        if left > 0:
            self._expected[source] = left
        else:
            self._expected.pop(source, None)

    def authenticated(self, source: str, now: float) -> None:
        """An agent session from `source` began: the address is trusted while it lives."""
        self._sessions[source] = self._sessions.get(source, 0) + 1
        self._forget_lapsed(now)

    def session_ended(self, source: str, now: float) -> None:
        """An agent session from `source` ended: once none is left, the address stays
        trusted for `trust_seconds` (for the agent to reconnect)."""
        left = self._sessions.get(source, 0) - 1
        if left > 0:
            self._sessions[source] = left
        else:
            self._sessions.pop(source, None)
        self._forget_lapsed(now)
        self._trusted_until[source] = now + self.trust_seconds

    def trusted(self, source: str, now: float) -> bool:
        """Whether an agent authenticated from `source` and is live or recently was."""
        return source in self._sessions or now < self._trusted_until.get(source, now)

    def _group(self, source: str, now: float) -> _Group:
        if self.trusted(source, now):
            return _Group(True, source)
        return _Group(False, network_of(source))

    def _allowances(self, group: _Group, now: float) -> tuple[int, int]:
        """Data connections expected from `group`, and from all untrusted groups (one is
        expected from an agent's address, which is trusted unless its trust lapsed)."""
        mine = untrusted = 0
        for source, count in self._expected.items():
            of = self._group(source, now)
            if of == group:
                mine += count
            if not of.trusted:
                untrusted += count
        return mine, untrusted

    def _largest(self) -> list[Hashable]:
        """The members of the untrusted group with the most pending (one at random
        among equals)."""
        largest = self._by_count[max(self._by_count)]
        return self._members[self._rng.choice(list(largest))]

    def _pick(self, candidates: list[Hashable], keep: Hashable) -> Hashable:
        while True:
            victim = self._rng.choice(candidates)
            if victim != keep:
                return victim

    def _evict(self, key: Hashable) -> Hashable:
        group = self._group_of.pop(key)
        members = self._members[group]
        members.remove(key)
        if not members:
            del self._members[group]
        if not group.trusted:
            self._count(group, -1)
        return key

    def _count(self, group: _Group, change: int) -> None:
        before = self._counted.get(group, 0)
        after = before + change
        self._untrusted += change
        if before:
            bucket = self._by_count[before]
            del bucket[group]
            if not bucket:
                del self._by_count[before]
        if after:
            self._counted[group] = after
            self._by_count.setdefault(after, {})[group] = None
        else:
            del self._counted[group]

    def _forget_lapsed(self, now: float) -> None:
        lapsed = [source for source, until in self._trusted_until.items() if until <= now]
        for source in lapsed:
            del self._trusted_until[source]
