"""Admission of unauthenticated connections (`tcpgc.ll.admission`), without sockets: keys are
plain objects, the clock is a number, the random generator is seeded."""

from __future__ import annotations

import random
from collections.abc import Hashable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tcpgc.ll.admission import TRUST_SECONDS, PendingHandshakes, network_of


class Conn:
    """A pending connection (the LL's are `Link`s; anything hashable will do)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __repr__(self) -> str:
        return f"Conn({self.source})"


class Table:
    """A `PendingHandshakes` and the connections it still holds, on a fake clock."""

    def __init__(self, max_total: int, max_per_source: int, seed: int = 1) -> None:
        self.guard = PendingHandshakes(max_total, max_per_source, random.Random(seed))
        self.now = 1000.0
        self.pending: set[Hashable] = set()
        self.shed: list[Conn] = []

    def connect(self, source: str) -> Conn:
        conn = Conn(source)
        victims = self.guard.admit(conn, source, self.now)
        assert conn not in victims, "a newcomer is never the one shed"
        self.pending.add(conn)
        for victim in victims:
            assert isinstance(victim, Conn)
            self.pending.remove(victim)
            self.shed.append(victim)
        assert len(self.guard) == len(self.pending)
        return conn

    def done(self, conn: Conn) -> None:
        self.guard.release(conn)
        self.pending.discard(conn)

    def from_(self, prefix: str) -> list[Conn]:
        return [c for c in self.pending if isinstance(c, Conn) and c.source.startswith(prefix)]


# ---------------------------------------------------------------------------- networks


@pytest.mark.parametrize(
    ("host", "network"),
    [
        ("192.0.2.77", "192.0.2.0/24"),
        ("127.0.0.1", "127.0.0.0/24"),
        ("127.0.1.1", "127.0.1.0/24"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("::1", "::/64"),
        ("::ffff:192.0.2.9", "192.0.2.0/24"),  # IPv4-mapped: counted as IPv4
        ("fe80::1%eth0", "fe80::/64"),
        ("not-an-address", "not-an-address"),  # e.g. a Unix socket: its own source
        ("", ""),
    ],
)
def test_sources_are_counted_by_network(host: str, network: str) -> None:
    assert network_of(host) == network


# ---------------------------------------------------------------------------- caps


def test_per_source_cap_counts_a_whole_network() -> None:
    table = Table(max_total=100, max_per_source=4)
    for i in range(2, 42):  # 40 addresses of one /24
        table.connect(f"203.0.113.{i}")
    assert len(table.pending) == 4
    assert len(table.shed) == 36 == table.guard.shed
    # The same number from one IPv6 /64, and from IPv4-mapped addresses of one /24.
    for i in range(40):
        table.connect(f"2001:db8::{i:x}:1")
        table.connect(f"::ffff:198.51.100.{i}")
    assert len(table.from_("2001:db8::")) == 4
    assert len(table.from_("::ffff:198.51.100.")) == 4


def test_networks_do_not_shed_each_other_under_their_caps() -> None:
    table = Table(max_total=100, max_per_source=4)
    agent = table.connect("198.51.100.7")
    for i in range(1000):
        table.connect(f"203.0.113.{i % 250}")
    assert agent in table.pending
    assert all(c.source.startswith("203.0.113.") for c in table.shed)


def test_total_cap_sheds_from_the_largest_network() -> None:
    # 30 networks of 2 pending fill the table; one network floods with the rest.
    table = Table(max_total=64, max_per_source=32)
    quiet = [table.connect(f"10.{n}.0.{i}") for n in range(30) for i in (1, 2)]
    for i in range(500):
        table.connect(f"203.0.113.{i % 250}")
    assert set(quiet) <= table.pending, "a network with few pending was shed"
    assert len(table.pending) == 64
    assert len(table.from_("203.0.113.")) == 4


def test_many_small_networks_fall_back_to_random_drop() -> None:
    """Every network with one pending: the largest are all of them, the pick is random,
    and the newcomer still always gets in."""
    table = Table(max_total=16, max_per_source=4)
    first = [table.connect(f"10.0.{n}.1") for n in range(16)]
    later = [table.connect(f"10.1.{n}.1") for n in range(16)]
    assert len(table.pending) == 16
    assert later[-1] in table.pending
    assert set(first) & set(table.shed) and set(later) & set(table.shed)


def test_ties_between_largest_networks_are_broken_at_random() -> None:
    hit = set()
    for seed in range(20):
        table = Table(max_total=8, max_per_source=4, seed=seed)
        for i in range(4):
            table.connect(f"10.0.0.{i}")
            table.connect(f"10.0.1.{i}")
        table.connect("10.0.2.1")
        hit |= {network_of(c.source) for c in table.shed}
    assert hit == {"10.0.0.0/24", "10.0.1.0/24"}


def test_release_frees_room_and_unknown_keys_are_ignored() -> None:
    table = Table(max_total=4, max_per_source=4)
    conns = [table.connect(f"10.0.0.{i}") for i in range(4)]
    for conn in conns:
        table.done(conn)
    table.guard.release(Conn("never admitted"))
    assert len(table.guard) == 0
    for i in range(4):
        table.connect(f"10.0.1.{i}")
    assert not table.shed


def test_caps_changed_by_a_reload_apply_to_the_next_admission() -> None:
    table = Table(max_total=100, max_per_source=8)
    for i in range(8):
        table.connect(f"10.0.0.{i}")
    table.guard.max_per_source = 2
    table.connect("10.0.0.99")
    assert len(table.from_("10.0.0.")) == 2


# ---------------------------------------------------------------------------- trust


def test_an_authenticated_address_is_a_source_of_its_own() -> None:
    """A live agent's ready and data connections are neither in its network's group nor
    counted against the total: a flood from its own /24 does not shed them."""
    table = Table(max_total=8, max_per_source=4)
    table.guard.authenticated("203.0.113.1", table.now)
    ready = [table.connect("203.0.113.1") for _ in range(4)]
    for i in range(2000):
        table.connect(f"203.0.113.{2 + i % 200}")
        table.connect(f"198.51.100.{i % 200}")
    assert set(ready) <= table.pending
    assert len(table.from_("203.0.113.")) == 4 + 4
    # Still capped on its own: one more than the cap sheds one of its own.
    table.connect("203.0.113.1")
    assert len([c for c in table.pending if c.source == "203.0.113.1"]) == 4


def test_trust_outlives_the_session_for_a_reconnect_then_lapses() -> None:
    table = Table(max_total=8, max_per_source=2)
    guard = table.guard
    guard.authenticated("203.0.113.1", table.now)
    guard.authenticated("203.0.113.1", table.now)  # two agents behind one address
    guard.session_ended("203.0.113.1", table.now + 50)
    assert guard.trusted("203.0.113.1", table.now + 10_000), "one session still lives"
    guard.session_ended("203.0.113.1", table.now + 100)
    table.now += 100 + TRUST_SECONDS - 1
    assert guard.trusted("203.0.113.1", table.now)
    reconnect = table.connect("203.0.113.1")
    for i in range(100):
        table.connect(f"203.0.113.{2 + i}")
    assert reconnect in table.pending
    table.now += 2
    assert not guard.trusted("203.0.113.1", table.now)
    late = table.connect("203.0.113.1")
    for i in range(100):
        table.connect(f"203.0.113.{2 + i}")
    assert late in table.shed, "past the trust window it is one of its network again"


def test_only_the_exact_address_is_trusted() -> None:
    guard = PendingHandshakes(8, 2, random.Random(1))
    guard.authenticated("2001:db8::1", 0.0)
    assert guard.trusted("2001:db8::1", 1.0)
    assert not guard.trusted("2001:db8::2", 1.0)
    assert not guard.trusted("::ffff:192.0.2.1", 1.0)


def test_lapsed_trust_is_forgotten() -> None:
    guard = PendingHandshakes(8, 2, random.Random(1))
    for i in range(100):
        guard.authenticated(f"10.0.{i}.1", 0.0)
        guard.session_ended(f"10.0.{i}.1", 0.0)
    guard.authenticated("10.1.0.1", TRUST_SECONDS + 1)
    assert guard._trusted_until == {}


# ---------------------------------------------------------------------------- expected


def test_expected_data_connections_raise_the_agent_address_cap() -> None:
    table = Table(max_total=4, max_per_source=2)
    guard = table.guard
    guard.authenticated("198.51.100.7", table.now)
    for _ in range(10):
        guard.expect("198.51.100.7")
    burst = [table.connect("198.51.100.7") for _ in range(12)]
    assert not table.shed
    for conn in burst[:10]:
        table.done(conn)
        guard.settle("198.51.100.7")
    extra = [table.connect("198.51.100.7") for _ in range(2)]
    assert len(table.shed) == 2 and set(table.shed) <= set(burst[10:]) | set(extra)


def test_expected_connections_from_an_untrusted_address_raise_both_caps() -> None:
    # As before trust existed: an address that is expected but not (or no longer)
    # trusted has its network's cap and the total raised.
    table = Table(max_total=2, max_per_source=2)
    for _ in range(4):
        table.guard.expect("198.51.100.7")
    for _ in range(6):
        table.connect("198.51.100.7")
    assert not table.shed
    table.guard.settle("198.51.100.7")
    table.connect("198.51.100.7")
    assert len(table.shed) == 2


def test_settle_without_expect_is_harmless() -> None:
    table = Table(max_total=2, max_per_source=2)
    table.guard.settle("198.51.100.7")
    for _ in range(3):
        table.connect("198.51.100.7")
    assert len(table.shed) == 1


# ---------------------------------------------------------------------------- invariants

_SOURCES = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.1.1", "2001:db8::1", "2001:db8::2"]
_steps = st.lists(
    st.tuples(
        st.sampled_from(["admit", "release", "auth", "end", "expect", "settle", "wait"]),
        st.sampled_from(_SOURCES),
        st.integers(min_value=0, max_value=1000),
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(steps=_steps, max_total=st.integers(1, 6), max_per_source=st.integers(1, 4))
@example(
    steps=[
        ("admit", "10.0.0.1", 0),
        ("expect", "10.0.0.1", 0),
        ("admit", "10.0.0.1", 0),
        ("auth", "10.0.0.1", 0),
        ("admit", "10.0.0.1", 0),
    ],
    max_total=1,
    max_per_source=1,
)
def test_caps_hold_whatever_happens(
    steps: list[tuple[str, str, int]], max_total: int, max_per_source: int
) -> None:
    """Any sequence of events: the newcomer is never shed, every cap holds right after
    each admission, and the bookkeeping matches the connections held."""
    table = Table(max_total, max_per_source, seed=7)
    guard = table.guard
    expected: list[str] = []
    for action, source, n in steps:
        if action == "admit":
            conn = table.connect(source)
            group = guard._group_of[conn]
            if not group.trusted:
                # The total cap binds untrusted admissions: a trusted one is outside it
                # and sheds nothing, even where untrusted connections admitted while
                # its address was not yet trusted still count toward it.
                untrusted = [c for c in table.pending if not guard._group_of[c].trusted]
                due = sum(1 for s in expected if not guard.trusted(s, table.now))
                assert len(untrusted) <= max(1, max_total + due)
            mine = sum(1 for s in expected if guard._group(s, table.now) == group)
            assert len(guard._members[group]) <= max(1, max_per_source + mine)
        elif action == "release" and table.pending:
            table.done(sorted(table.pending, key=id)[n % len(table.pending)])
        elif action == "auth":
            guard.authenticated(source, table.now)
        elif action == "end":
            guard.session_ended(source, table.now)
        elif action == "expect":
            guard.expect(source)
            expected.append(source)
        elif action == "settle" and expected:
            guard.settle(expected.pop(n % len(expected)))
        elif action == "wait":
            table.now += n
        members = guard._members
        assert sum(len(m) for m in members.values()) == len(table.pending)
        assert guard._untrusted == sum(len(m) for g, m in members.items() if not g.trusted)
        assert guard._counted == {g: len(m) for g, m in members.items() if not g.trusted}
        assert all(g in guard._by_count[n] for g, n in guard._counted.items())
    assert guard.shed == len(table.shed)
