"""The product's reason to exist, in two network namespaces joined by a veth pair.

"inside" runs an nftables firewall that drops every new connection arriving on its veth
(loopback and outbound still work). The echo server lives inside; a client outside cannot
reach it directly, and reaches it through an LL outside and a CC inside.

Traffic only ever goes to 127.0.0.1 or to the two namespaces' own veth addresses.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import (
    RE_CC_JOINED,
    RE_LL_AGENT_JOINED,
    RE_LL_AGENT_PORT,
    Node,
    Process,
    format_addr,
    make_token,
    parse_addr,
    service_re,
    tcpgc_env,
)

pytestmark = pytest.mark.netns

SUPPORT = str(Path(__file__).with_name("support.py"))
# A private /30 used only between the two test namespaces.
OUTSIDE_IP = "10.201.83.1"
INSIDE_IP = "10.201.83.2"
PREFIX_LEN = 30
CMD_TIMEOUT = 10.0
READY_TIMEOUT = 20.0


def run(*argv: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, input=input, capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False
    )


def check(*argv: str, input: str | None = None) -> str:
    proc = run(*argv, input=input)
    assert proc.returncode == 0, f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr}"
    return proc.stdout


@dataclass
class Namespaces:
    inside: str
    outside: str
    veth_in: str
    veth_out: str
    procs: list[Process] = field(default_factory=list)

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def python(self, ns: str, *args: str) -> subprocess.CompletedProcess[str]:
        """A short-lived ``python support.py ...`` inside namespace ``ns``."""
        return subprocess.run(
            [*self.exec_prefix(ns), sys.executable, SUPPORT, *args],
            capture_output=True,
            text=True,
            timeout=CMD_TIMEOUT,
            env=tcpgc_env(),
            check=False,
        )

    def spawn(self, ns: str, argv: list[str], name: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        proc = Process(argv, name=name, env=env or tcpgc_env(), prefix=self.exec_prefix(ns))
        self.procs.append(proc)
        return proc

    def tcpgc(self, ns: str, *args: str, name: str, env: dict[str, str] | None = None) -> Node:
        node = Node(*args, name=name, env=env or tcpgc_env(), prefix=self.exec_prefix(ns))
        self.procs.append(node)
        return node


def _skip_unless_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("firewall test needs root (network namespaces and nftables)")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            pytest.skip(f"firewall test needs the `{tool}` command, which is not installed")


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    _skip_unless_possible()
    suffix = secrets.token_hex(3)
    ns = Namespaces(
        inside=f"tcpgc-in-{suffix}",
        outside=f"tcpgc-out-{suffix}",
        veth_in=f"tgi{suffix}",  # interface names are limited to 15 characters
        veth_out=f"tgo{suffix}",
    )
    created: list[str] = []
    try:
        for name in (ns.inside, ns.outside):
            proc = run("ip", "netns", "add", name)
            if proc.returncode != 0:
                pytest.skip(f"cannot create network namespace {name}: {proc.stderr.strip()}")
            created.append(name)
        # Create the veth pair directly inside the namespaces: the host's own network is
        # never touched.
        check(
            "ip", "-n", ns.outside, "link", "add", ns.veth_out,
            "type", "veth", "peer", "name", ns.veth_in, "netns", ns.inside,
        )  # fmt: skip
        for name, veth, ip in (
            (ns.outside, ns.veth_out, OUTSIDE_IP),
            (ns.inside, ns.veth_in, INSIDE_IP),
        ):
            check("ip", "-n", name, "addr", "add", f"{ip}/{PREFIX_LEN}", "dev", veth)
            check("ip", "-n", name, "link", "set", veth, "up")
            check("ip", "-n", name, "link", "set", "lo", "up")
        yield ns
    finally:
        for proc in reversed(ns.procs):
            proc.stop(grace=3)
        # Shown by pytest when the test fails.
        print("\n".join(proc.output() for proc in ns.procs))
        for name in created:
            # Anything still running in our own namespace was started by this test.
            pids = run("ip", "netns", "pids", name).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            run("ip", "netns", "del", name)


def install_inside_firewall(ns: Namespaces) -> None:
    ruleset = f"""
table inet tcpgc_test_fw {{
    chain input {{
        type filter hook input priority 0; policy accept;
        ct state established,related accept
        iifname "{ns.veth_in}" ct state new drop
    }}
}}
"""
    proc = run("ip", "netns", "exec", ns.inside, "nft", "-f", "-", input=ruleset)
    if proc.returncode != 0:
        pytest.skip(f"cannot load an nftables ruleset in a namespace: {proc.stderr.strip()}")
    listed = check("ip", "netns", "exec", ns.inside, "nft", "list", "ruleset")
    assert "ct state new drop" in listed, listed


def test_client_outside_reaches_server_inside_only_through_tcpgc(
    namespaces: Namespaces, tmp_path: Path
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
        env=tcpgc_env({"TCPGC_TOKEN": token}),
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
