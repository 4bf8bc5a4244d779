"""A whole tunnel over IPv6 loopback: clients, agent and server all on [::1]."""

from __future__ import annotations

import os
import re
import socket

import pytest

from support import (
    RE_CC_JOINED,
    RE_LL_AGENT_JOINED,
    READY_TIMEOUT,
    Harness,
    connect,
    echo_roundtrip,
    format_addr,
    parse_addr,
    service_re,
)


def _ipv6_loopback_problem() -> str | None:
    if not socket.has_ipv6:
        return "Python was built without IPv6"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError as exc:
        return f"cannot bind [::1]: {exc.strerror or exc} (IPv6 disabled here?)"
    return None


pytestmark = pytest.mark.skipif(
    _ipv6_loopback_problem() is not None, reason=str(_ipv6_loopback_problem())
)


def test_echo_over_ipv6(harness: Harness) -> None:
    echo = harness.echo_server(host="::1")
    state = harness.state_dir()
    token = harness.token(state)
    ll, agent = harness.start_ll(
        "--clients", "[::1]:0", "--cc", "[::1]:0", "--state-dir", str(state)
    )
    assert agent[0] == "::1", agent
    clients = parse_addr(ll.wait_for(service_re("default"), READY_TIMEOUT)["addr"])
    assert clients[0] == "::1", clients
    cc = harness.start_cc("--ll", format_addr(*agent), "--server", echo.addr_str, token=token)
    cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)
    joined = ll.wait_for(RE_LL_AGENT_JOINED, READY_TIMEOUT)
    assert parse_addr(joined["addr"])[0] == "::1", joined["addr"]  # the agent came over v6

    payload = os.urandom(256 * 1024)
    assert echo_roundtrip(clients, payload) == payload

    # The relayed client is seen (and logged) with its IPv6 address.
    with connect(clients) as sock:
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        local = format_addr(*sock.getsockname()[:2])
    ll.wait_for(rf"client {re.escape(local)} of service 'default' done", READY_TIMEOUT)
