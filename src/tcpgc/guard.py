"""Admission of unauthenticated connections on the agent port.

Anyone who can reach the LL can open connections there and never finish a handshake.
Refusing newcomers once a cap is reached would let such a peer lock the real agents
out, even from the same address (agents behind the attacker's NAT). Instead, like
OpenSSH's MaxStartups random early drop, a newcomer is always admitted and, past a cap,
a *random* pending connection is shed. A real agent finishes its handshake in a few
round trips, so the chance that it is the one picked before it is done stays small,
while an attacker's connections, which linger, are the ones that get shed.

Data connections are unauthenticated until their first frame too, and an agent opens
one per client: when 200 clients arrive at once, 200 are pending from the agent's
address. Each OPEN the LL sends therefore raises the caps for the agent's address by
one (`expect`) until that client is claimed or given up (`settle`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable


class PendingHandshakes:
    """Tracks pending connections by source; `admit` says which ones to drop."""

    def __init__(
        self,
        max_total: int,
        max_per_source: int,
        rng: random.Random | None = None,
        draws: int = 1,
        spare: Callable[[Hashable], bool] | None = None,
    ) -> None:
        """`draws` > 1: draw that many pending connections at random and drop the one
        pending longest. The choice stays unpredictable, but the newest pending one is
        never dropped (it is never the older of two) and the next newest rarely, which
        favours peers that finish at once over peers that linger. `spare`: connections
        for which it is true are dropped only when every other candidate is spared too
        (e.g. those whose request is already waiting to be read)."""
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.draws = draws
        self.spare = spare
        self._rng = rng or random.Random()
        self._source_of: dict[Hashable, str] = {}
        self._by_source: dict[str, list[Hashable]] = {}
        self._expected: dict[str, int] = {}
        self._expected_total = 0
        self.shed = 0

    def __len__(self) -> int:
        return len(self._source_of)

    def admit(self, key: Hashable, source: str) -> list[Hashable]:
        """Register `key` from `source`; returns the pending keys to drop (never `key`)."""
        self._source_of[key] = source
        self._by_source.setdefault(source, []).append(key)
        victims: list[Hashable] = []
        group = self._by_source[source]
        while len(group) > self.max_per_source + self._expected.get(source, 0):
            victims.append(self._evict(self._pick(group, key)))
        while len(self._source_of) > self.max_total + self._expected_total:
            victims.append(self._evict(self._pick(list(self._source_of), key)))
        self.shed += len(victims)
        return victims

    def expect(self, source: str) -> None:
        """A data connection from `source` is due (an OPEN was sent to an agent there)."""
        self._expected[source] = self._expected.get(source, 0) + 1
        self._expected_total += 1

    def settle(self, source: str) -> None:
        """The data connection announced by `expect` arrived or is no longer wanted."""
        left = self._expected.get(source, 0) - 1
        if left > 0:
            self._expected[source] = left
        else:
            self._expected.pop(source, None)
        self._expected_total -= 1

    def release(self, key: Hashable) -> None:
        """`key` finished its handshake or closed."""
        if key in self._source_of:
            self._evict(key)

    def _pick(self, candidates: list[Hashable], keep: Hashable) -> Hashable:
        if self.draws > 1 or self.spare is not None:
            # `candidates` are in order of arrival (dict and list insertion order).
            others = [key for key in candidates if key != keep]
            if self.spare is not None:
                others = [key for key in others if not self.spare(key)] or others
            drawn = self._rng.sample(range(len(others)), min(self.draws, len(others)))
            return others[min(drawn)]
        while True:
            victim = self._rng.choice(candidates)
            if victim != keep:
                return victim

    def _evict(self, key: Hashable) -> Hashable:
        source = self._source_of.pop(key)
        group = self._by_source[source]
        group.remove(key)
        if not group:
            del self._by_source[source]
        return key
