"""What `ExposedPorts.grant` gives an agent of what it asks, in process on real loopback
sockets (it binds the ports it grants): the credential's scope decides, the LL's own ports
and other agents' ports are not for taking, and a port goes back when it is not used."""

from __future__ import annotations

import asyncio
import socket
import time
from unittest.mock import MagicMock

import pytest

from agent_tools import connect_refused, free_port_range
from loops import LOOPS, loop_turns, run_on
from tcpgc.config import Address, LLConfig, ServiceListener
from tcpgc.identity.agents import AgentCredential, AgentScope
from tcpgc.ll.agents import AgentSession
from tcpgc.ll.exposes import ExposedPorts
from tcpgc.metrics import Metrics

pytestmark = pytest.mark.timeout(60)


def credential(name: str, ports: tuple[int, int] | None, services=(), max_ports=0):  # type: ignore[no-untyped-def]
    span = 0 if ports is None else ports[1] - ports[0] + 1
    scope = AgentScope(tuple(services), ports, max_ports or span)
    return AgentCredential(name, name.encode().ljust(32, b"s"), scope)


def session(cred: AgentCredential | None, raw_id: bytes) -> AgentSession:
    return AgentSession(
        raw_id.hex()[:12], "127.0.0.1:1", "127.0.0.1", (), MagicMock(),
        raw_id=raw_id, credential=cred, key_id=cred.key_id if cred else b"shared",
    )  # fmt: skip


class Ports:
    """An LL's config (agent port base, service 'web' base+1, 'db' base+2) and its
    ExposedPorts; agents may ask for base+3 onwards."""

    def __init__(self, window: float = 60.0) -> None:
        self.base = free_port_range(12)
        self.config = LLConfig(
            cc=Address("127.0.0.1", self.base),
            services={
                "web": ServiceListener(Address("127.0.0.1", self.base + 1)),
                "db": ServiceListener(Address("127.0.0.1", self.base + 2)),
            },
            resume_window=window,
        )
        self.services: dict = {}
        self.exposes = ExposedPorts(
            self.config, self.services, MagicMock(), Metrics("ll", enabled=False)
        )

    def grant(self, cred, exposes, services=(), raw_id=b"\x01" * 16):  # type: ignore[no-untyped-def]
        return self.exposes.grant(cred, raw_id, (tuple(services), tuple(exposes), ()))

    def close(self) -> None:
        for entry in list(self.exposes._ports.values()):
            if entry.sock is not None:
                entry.sock.close()
        self.exposes._ports.clear()


@pytest.fixture
def ports():  # type: ignore[no-untyped-def]
    made = Ports()
    yield made
    made.close()


def reasons(grant) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return dict(grant[1])


def test_the_shared_token_gets_every_service_and_no_port(ports: Ports) -> None:
    p = ports.base + 3
    (granted, refusals), claim = ports.grant(None, [("", p)], services=("web", "ssh"))
    assert granted == ("web", "db")
    assert claim.services == ("web", "ssh") and claim.ports == []
    assert "shared join token may expose no port" in dict(refusals)[f":{p}"]
    assert connect_refused(p)


def test_a_scoped_agent_gets_its_services_and_ports(ports: Ports) -> None:
    p = ports.base + 3
    cred = credential("a", (p, p + 1), services=("web",))
    grant, claim = ports.grant(cred, [("", p), ("", p + 5)], services=("web", "db"))
    granted, refusals = grant
    assert granted == ("web", f":{p}")
    assert claim.services == ("web", f":{p}")
    why = dict(refusals)
    assert why["db"] == "service 'db' refused: agent 'a' may serve only web"
    assert why[f":{p + 5}"] == (
        f"expose of port {p + 5} refused: agent 'a' may expose only ports {p}-{p + 1}"
    )
    assert len(claim.fresh) == 1 and not connect_refused(p), "a granted port is not bound"
    assert connect_refused(p + 5)
    ports.exposes.cancel(claim)
    assert connect_refused(p), "a cancelled claim kept its port"


def test_declared_twice_and_more_than_max_ports_are_refused(ports: Ports) -> None:
    p = ports.base + 3
    cred = credential("a", (p, p + 5), max_ports=2)
    grant, claim = ports.grant(cred, [("", p), ("", p), ("", p + 1), ("", p + 2)])
    assert grant[0] == (f":{p}", f":{p + 1}")
    assert reasons(grant) == {
        f":{p}": f"expose of port {p} refused: declared twice",
        f":{p + 2}": f"expose of port {p + 2} refused: agent 'a' may expose at most 2 at once",
    }
    assert connect_refused(p + 2)


def test_the_lls_own_ports_are_not_for_agents(ports: Ports) -> None:
    cred = credential("a", (ports.base, ports.base + 3))
    grant, claim = ports.grant(cred, [("", ports.base), ("", ports.base + 1), ("", ports.base + 2)])
    assert grant[0] == () and claim.fresh == []
    b = ports.base
    assert [text.split(": ", 1)[1] for _, text in grant[1]] == [
        f"port {b} is this LL's cc port",
        f"port {b + 1} is service 'web' of this LL",
        f"port {b + 2} is service 'db' of this LL",
    ]


def test_a_port_in_use_is_refused_with_the_reason(ports: Ports) -> None:
    p = ports.base + 3
    with socket.create_server(("127.0.0.1", p)):
        grant, claim = ports.grant(credential("a", (p, p)), [("127.0.0.1", p)])
    assert grant[0] == () and claim.fresh == []
    assert f"cannot listen on 127.0.0.1:{p}" in grant[1][0][1]


def test_an_address_that_is_not_the_lls_is_refused(ports: Ports) -> None:
    p = ports.base + 3
    grant, _ = ports.grant(credential("a", (p, p)), [("192.0.2.77", p)])
    assert grant[0] == () and "cannot listen on" in grant[1][0][1]


def test_another_agents_port_on_another_address_is_refused(ports: Ports) -> None:
    p = ports.base + 3
    a, b = credential("a", (p, p)), credential("b", (p, p))
    first, _ = ports.grant(a, [("", p)], raw_id=b"\x01" * 16)
    assert first[0] == (f":{p}",)
    second, claim = ports.grant(b, [("127.0.0.1", p)], raw_id=b"\x02" * 16)
    assert second[0] == () and claim.ports == []
    assert second[1][0][1] == (
        f"expose of port {p} refused: port {p} is exposed on all addresses by agent 'a'"
    )


def in_use(port: int) -> bool:
    """Whether something listens on `port` (probed by binding it, so no connection is
    left for the loop to clean up)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.mark.parametrize("loop_name", LOOPS)
def test_ports_stay_for_the_resume_window_unless_revoked(loop_name: str) -> None:
    made = Ports(window=0.5)
    p = made.base + 3
    cred = credential("a", (p, p + 1))

    async def main() -> None:
        first = session(cred, b"\x01" * 16)
        _, claim = made.grant(cred, [("", p), ("", p + 1)])
        await made.exposes.start(first, claim)
        assert f":{p}" in made.services and f":{p + 1}" in made.services
        made.exposes.release(first)
        await loop_turns()
        assert in_use(p), "closed before its window"
        # the agent comes back within the window: the port is its again
        second = session(cred, b"\x02" * 16)
        _, claim = made.grant(cred, [("", p)], raw_id=second.raw_id)
        assert claim.fresh == [] and len(claim.ports) == 1
        await made.exposes.start(second, claim)
        start = time.monotonic()
        while in_use(p + 1):  # the one it did not ask again for goes
            assert time.monotonic() - start < 5, f"port {p + 1} outlived its window"
            await asyncio.sleep(0.05)
        assert time.monotonic() - start >= 0.2 and in_use(p)
        made.exposes.release(second, at_once=True)
        await loop_turns()
        assert not in_use(p) and f":{p}" not in made.services

    try:
        run_on(loop_name, main)
    finally:
        made.close()


def test_a_port_name_offered_as_a_service_is_refused_to_every_credential(ports: Ports) -> None:
    """':PORT' offered as a service (not an expose) would join the agents of that port
    and take their clients, past every scope check."""
    p = ports.base + 3
    for cred in (None, credential("a", (p, p))):
        (granted, refusals), claim = ports.grant(cred, [], services=("web", f":{p}", f":0{p}"))
        assert f":{p}" not in granted and f":{p}" not in claim.services
        assert f":0{p}" not in claim.services
        assert "declare an exposed port with --expose" in dict(refusals)[f":{p}"]


@pytest.mark.parametrize("loop_name", LOOPS)
def test_max_ports_counts_the_ports_waiting_for_the_agent(loop_name: str) -> None:
    """Leaving and coming back asking for other ports must not add up past max_ports:
    the ports waiting out their resume window are still the credential's."""
    made = Ports(window=60)
    p = made.base + 3
    cred = credential("a", (p, p + 1), max_ports=1)

    async def main() -> None:
        first = session(cred, b"\x01" * 16)
        _, claim = made.grant(cred, [("", p)], raw_id=first.raw_id)
        await made.exposes.start(first, claim)
        made.exposes.release(first)  # away: p waits for it
        assert in_use(p)
        grant, claim = made.grant(cred, [("", p + 1)], raw_id=b"\x02" * 16)
        assert grant[0] == () and "at most 1" in reasons(grant)[f":{p + 1}"]
        assert connect_refused(p + 1)
        made.exposes.cancel(claim)
        grant, claim = made.grant(cred, [("", p)], raw_id=b"\x02" * 16)
        assert grant[0] == (f":{p}",), reasons(grant)  # its own port back
        made.exposes.cancel(claim)
        made.exposes.revoked({cred.key_id})  # and a revocation closes it at once
        await loop_turns()
        assert not in_use(p) and f":{p}" not in made.services

    try:
        run_on(loop_name, main)
    finally:
        made.close()


def _udp_grant(ports: Ports, cred, tcp, udp):  # type: ignore[no-untyped-def]
    return ports.exposes.grant(cred, b"\x01" * 16, ((), tuple(tcp), tuple(udp)))


def test_a_udp_port_is_its_own_expose_and_counts_against_max_ports(ports: Ports) -> None:
    p = ports.base + 3
    cred = credential("a", (p, p + 1), max_ports=3)
    grant, claim = _udp_grant(ports, cred, [("", p), ("", p + 1)], [("", p), ("", p + 1)])
    assert grant[0] == (f":{p}", f":{p + 1}", f":{p}/udp")
    assert reasons(grant) == {f":{p + 1}/udp": "expose of UDP port " + str(p + 1)
                              + " refused: agent 'a' may expose at most 3 at once"}  # fmt: skip
    entry = ports.exposes._ports[p, True]
    assert entry.udp and entry.sock is not None and entry.sock.sockets[0].type == socket.SOCK_DGRAM
    ports.exposes.cancel(claim)
    assert not ports.exposes._ports


def test_a_udp_port_the_ll_serves_is_refused_but_the_same_tcp_port_may_go(ports: Ports) -> None:
    p = ports.base + 4
    ports.config.services["dns"] = ServiceListener(Address("127.0.0.1", p), protocol="udp")
    cred = credential("a", (p, p), max_ports=2)
    grant, claim = _udp_grant(ports, cred, [("", p)], [("", p)])
    assert grant[0] == (f":{p}",)
    assert reasons(grant) == {f":{p}/udp": f"expose of UDP port {p} refused: port {p} is "
                              "service 'dns' of this LL"}  # fmt: skip
    ports.exposes.cancel(claim)
