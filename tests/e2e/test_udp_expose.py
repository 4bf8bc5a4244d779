"""`tcpgc cc --expose udp:PORT=SERVER`, end to end: an agent with a credential of its
own has the LL take datagrams on a UDP port for it, beside a TCP port of the same
number; its scope's port range applies to UDP ports too; the shared join token may
expose none; and the port closes when the agent is revoked."""

from __future__ import annotations

import socket

import pytest

from agent_tools import agent_revoke, free_port_range, start_agents_ll
from support import Harness, echo_roundtrip
from udp_tools import UdpEchoServer, echo_server, free_udp_port, start_tunnel

pytestmark = pytest.mark.timeout(90)

LOCAL = "127.0.0.1"


@pytest.fixture
def udp_echo(harness: Harness) -> UdpEchoServer:
    """Answers each datagram with b'echo:' + it; stopped with the harness."""
    return echo_server(harness, tag=b"echo:")


def ask(port: int, payload: bytes, timeout: float = 3.0) -> bytes | None:
    """One datagram to the LL's UDP `port` and its answer (None if none came)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(timeout)
        client.sendto(payload, (LOCAL, port))
        try:
            return client.recv(65535)
        except TimeoutError:
            return None


def test_an_agent_exposes_a_udp_port_beside_a_tcp_port_of_the_same_number(
    harness: Harness, udp_echo: UdpEchoServer
) -> None:
    base = free_port_range(4)
    env = start_agents_ll(harness)
    token = env.add("edge", "--ports", f"{base}-{base + 1}")
    tcp_server = harness.echo_server()
    mark = env.ll.mark()
    cc = env.start_cc(
        token,
        name="cc-edge",
        exposes=[
            f"udp:{base}={udp_echo.addr_str}",
            f"{base}={tcp_server.addr_str}",
            f"udp:{base + 3}={udp_echo.addr_str}",  # outside its range
        ],
    )
    env.ll.wait_for(rf"UDP port {base} exposed by agent 'edge'", 10, since=mark)
    assert ask(base, b"ping") == b"echo:ping"
    assert echo_roundtrip((LOCAL, base), b"tcp bytes") == b"tcp bytes"
    why = cc.wait_for(rf"expose of UDP port {base + 3} refused: (?P<why>.*)", 10)["why"]
    assert f"agent 'edge' may expose only ports {base}-{base + 1}" in why
    assert ask(base + 3, b"lost", timeout=0.5) is None  # the LL does not take it

    agent_revoke(env.state_dir, "edge")
    env.ll.wait_for(rf"UDP port {base} no longer exposed: its agent was revoked", 10)
    assert ask(base, b"after", timeout=0.5) is None


def test_the_shared_join_token_may_expose_no_udp_port(
    harness: Harness, udp_echo: UdpEchoServer
) -> None:
    base = free_port_range(1)
    env = start_agents_ll(harness)
    shared = harness.token(env.state_dir)
    cc = env.start_cc(shared, name="cc-shared", exposes=[f"udp:{base}={udp_echo.addr_str}"])
    why = cc.wait_for(rf"expose of UDP port {base} refused: (?P<why>.*)", 10)["why"]
    assert "shared join token may expose no port" in why
    assert ask(base, b"lost", timeout=0.5) is None


def test_a_service_udp_on_the_ll_and_tcp_on_the_agent_is_refused_and_said_so(
    harness: Harness, udp_echo: UdpEchoServer
) -> None:
    """The LL's OPEN says the client is a UDP flow: an agent that serves the name as a
    TCP service refuses it, saying how to fix it, instead of dialing TCP with datagrams."""
    port = free_udp_port()
    tunnel = start_tunnel(
        harness,
        {"dns": {"clients": f"{LOCAL}:{port}", "protocol": "udp"}},
        {"dns": {"server": f"{udp_echo.addr_str}"}},  # TCP on the agent: a mistake
        ll_options={"client_wait": 2.0},
    )
    assert ask(port, b"query", timeout=1.0) is None
    line = tunnel.cc.wait_for(
        r"has service 'dns' as UDP, this agent as TCP: refused(?P<rest>.*)", 10
    )
    assert 'protocol = "udp"' in line["rest"]
