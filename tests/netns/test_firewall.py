"""The product's reason to exist, in two network namespaces joined by a veth pair.

"inside" runs an nftables firewall that drops every new connection arriving on its veth
(loopback and outbound still work). The echo server lives inside; a client outside cannot
reach it directly, and reaches it through an LL outside and a CC inside.

Traffic only ever goes to 127.0.0.1 or to the two namespaces' own veth addresses.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns import SUPPORT, NamespacePair, check, namespace_pair, skip_unless_possible
from support import (
    RE_CC_JOINED,
    RE_LL_AGENT_JOINED,
    RE_LL_AGENT_PORT,
    format_addr,
    make_token,
    parse_addr,
    service_re,
)

pytestmark = pytest.mark.netns

# A private /30 used only between the two test namespaces.
SUBNET = "10.201.83"
OUTSIDE_IP = f"{SUBNET}.1"
INSIDE_IP = f"{SUBNET}.2"
READY_TIMEOUT = 20.0


@pytest.fixture
def namespaces() -> Iterator[NamespacePair]:
    skip_unless_possible("firewall tests")
    with namespace_pair("", SUBNET) as pair:
        yield pair


def install_inside_firewall(ns: NamespacePair) -> None:
    ruleset = f"""
table inet tcpgc_test_fw {{
    chain input {{
        type filter hook input priority 0; policy accept;
        ct state established,related accept
        iifname "{ns.veth_in}" ct state new drop
    }}
}}
"""
    proc = ns.nft(ns.inside, ruleset)
    if proc.returncode != 0:
        pytest.skip(f"cannot load an nftables ruleset in a namespace: {proc.stderr.strip()}")
    listed = check("ip", "netns", "exec", ns.inside, "nft", "list", "ruleset")
    assert "ct state new drop" in listed, listed


def test_client_outside_reaches_server_inside_only_through_tcpgc(
    namespaces: NamespacePair, tmp_path: Path
) -> None:
    ns = namespaces
    # Echo server inside, on every inside address, so the firewall is the only thing that
    # could stop a direct connection from outside.
    echo = ns.spawn(ns.inside, [sys.executable, SUPPORT, "echo", "0.0.0.0", "0"], name="echo")
    _, echo_port = parse_addr(
        echo.wait_for(r"echo listening on (?P<addr>\S+)", 10, stream="stdout")["addr"]
    )

    # Control: without the firewall, outside reaches the server directly.
    direct = ns.python(ns.outside, "roundtrip", INSIDE_IP, str(echo_port), "--timeout", "3")
    assert direct.returncode == 0, f"setup broken, no direct route: {direct.stdout}"

    install_inside_firewall(ns)

    # Now a direct connection from outside must fail (the SYN is dropped: a timeout).
    direct = ns.python(ns.outside, "probe", INSIDE_IP, str(echo_port), "--timeout", "3")
    assert direct.returncode == 1, f"firewall let a new inbound connection in: {direct.stdout}"
    # ...while loopback inside still works.
    local = ns.python(ns.inside, "roundtrip", "127.0.0.1", str(echo_port), "--timeout", "3")
    assert local.returncode == 0, f"firewall broke loopback inside: {local.stdout}"

    state = tmp_path / "ll-state"
    token = make_token(state)
    ll = ns.tcpgc(
        ns.outside,
        "ll", "--clients", "127.0.0.1:0", "--cc", f"{OUTSIDE_IP}:0", "--state-dir", str(state),
        "--client-wait", "3",
        name="ll (outside)",
    )  # fmt: skip
    agent_addr = parse_addr(ll.wait_for(RE_LL_AGENT_PORT, READY_TIMEOUT)["addr"])
    assert agent_addr[0] == OUTSIDE_IP
    client_addr = parse_addr(ll.wait_for(service_re("default"), READY_TIMEOUT)["addr"])

    cc = ns.tcpgc(
        ns.inside,
        "cc", "--ll", format_addr(*agent_addr), "--server", f"127.0.0.1:{echo_port}",
        name="cc (inside)",
        token=token,
    )  # fmt: skip
    cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)
    joined = ll.wait_for(RE_LL_AGENT_JOINED, READY_TIMEOUT)
    assert parse_addr(joined["addr"])[0] == INSIDE_IP

    via_tunnel = ns.python(
        ns.outside, "roundtrip", client_addr[0], str(client_addr[1]), "--timeout", "5",
        "--size", "100000",
    )  # fmt: skip
    assert via_tunnel.returncode == 0, (
        f"round trip through tcpgc failed: {via_tunnel.stdout}\n{ll.output()}\n{cc.output()}"
    )

    # The firewall is still in force: the direct path stays closed.
    direct = ns.python(ns.outside, "probe", INSIDE_IP, str(echo_port), "--timeout", "2")
    assert direct.returncode == 1, direct.stdout
