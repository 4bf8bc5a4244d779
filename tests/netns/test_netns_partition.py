"""Network failures that loopback cannot fake, in two namespaces joined by a veth pair.

The LL runs in "outside", the CC and its echo server in "inside". nftables rules in the
namespaces drop packets silently (a partition: nothing is returned, as when a NAT table or
a firewall forgets a flow) or reset one connection on one side only (so the LL still holds
a session the agent has already given up).

Traffic only ever goes to 127.0.0.1 or to the two namespaces' own veth addresses.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netns import SUPPORT, NamespacePair, check, join_tunnel, namespace_pair, skip_unless_possible
from reliability_tools import (
    RE_CC_CLOSING,
    RE_CC_NO_HEARTBEAT,
    RE_LL_CLOSING,
    RE_LL_SILENT,
    RE_REPLACES,
    log_time,
)
from support import (
    RE_CC_JOINED,
    Node,
    format_addr,
    parse_addr,
)

pytestmark = pytest.mark.netns

TOOLS = str(Path(__file__).resolve().parents[1] / "reliability_tools.py")
# A private /30 used only between this file's two namespaces.
SUBNET = "10.201.84"
OUTSIDE_IP = f"{SUBNET}.1"
INSIDE_IP = f"{SUBNET}.2"
READY_TIMEOUT = 20.0


@dataclass
class Net(NamespacePair):
    tmp: Path = Path()

    def roundtrip(self, ns: str, addr: tuple[str, int]) -> subprocess.CompletedProcess[str]:
        return self.python(ns, "roundtrip", addr[0], str(addr[1]))

    def nft(self, ns: str, ruleset: str) -> subprocess.CompletedProcess[str]:
        proc = super().nft(ns, ruleset)
        assert proc.returncode == 0, f"nft in {ns}: {proc.stderr}\n{ruleset}"
        return proc


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    skip_unless_possible("partition tests")
    with namespace_pair("p", SUBNET, Net, tmp=tmp_path) as pair:
        yield pair


@dataclass
class Tunnel:
    ll: Node
    cc: Node
    agent: tuple[str, int]
    client: tuple[str, int]
    cc_id: str
    control_port: int  # the CC's source port of its control connection


def tunnel(net: Net, heartbeat: float, connect_timeout: float = 2.0, **ll_extra: object) -> Tunnel:
    """LL outside (agents on the veth, clients on its loopback); CC and echo inside."""
    echo = net.spawn(net.inside, [sys.executable, SUPPORT, "echo", "127.0.0.1", "0"], "echo")
    echo_addr = echo.wait_for(r"echo listening on (?P<addr>\S+)", 10, stream="stdout")["addr"]
    j = join_tunnel(
        net, net.tmp, echo_addr, heartbeat=heartbeat, connect_timeout=connect_timeout,
        ready_timeout=READY_TIMEOUT, **ll_extra,
    )  # fmt: skip
    host, port = j.cc_peer
    assert host == INSIDE_IP
    served = net.roundtrip(net.outside, j.client)
    assert served.returncode == 0, served.stdout
    return Tunnel(j.ll, j.cc, j.agent, j.client, j.cc_id, port)


def test_partition_is_detected_by_heartbeats_on_both_sides_and_healed(net: Net) -> None:
    """With streams that cannot resume (`resume_window = 0`): they end when the
    partition is noticed (test_resume_netns.py has the resumable ones)."""
    heartbeat = 1.0
    t = tunnel(net, heartbeat, resume_window=0)
    hold = net.spawn(
        net.outside, [sys.executable, TOOLS, "hold", *map(str, t.client)], "client (outside)"
    )
    hold.wait_for(r"^streaming$", 10, stream="stdout")

    ll_mark, cc_mark = t.ll.mark(), t.cc.mark()
    net.nft(
        net.outside,
        f"""
table inet tcpgc_partition {{
    chain input {{
        type filter hook input priority -10; policy accept;
        iifname "{net.veth_out}" drop
    }}
    chain output {{
        type filter hook output priority -10; policy accept;
        oifname "{net.veth_out}" drop
    }}
}}
""",
    )
    cut = time.time()

    # Each side hears nothing for three intervals and gives up on its own.
    bound = 3 * heartbeat + 1.0
    silent = t.ll.wait_for(RE_LL_SILENT, bound + 5, since=ll_mark)
    lost = t.cc.wait_for(RE_CC_NO_HEARTBEAT, bound + 5, since=cc_mark)
    assert silent["id"] == t.cc_id
    for side, match in (("LL", silent), ("CC", lost)):
        took = log_time(match) - cut
        assert took <= bound, f"{side} noticed the partition after {took:.2f} s (bound {bound} s)"
    # ...and ends the connections that went through the dead link.
    assert t.ll.wait_for(RE_LL_CLOSING, 5, since=ll_mark)["n"] == "1"
    assert t.cc.wait_for(RE_CC_CLOSING, 5, since=cc_mark)["n"] == "1"
    ended = hold.wait_for(r"^ended after (?P<s>[\d.]+) s", 5, stream="stdout")
    assert float(ended["s"]) <= bound + 1.0

    # While cut off the agent keeps trying; once healed it is back within
    # connect_timeout + reconnect_max.
    t.cc.wait_for(r"cannot connect to LL \S+: timed out", 10, since=cc_mark)
    cc_mark = t.cc.mark()
    check(*net.prefix(net.outside), "nft", "delete", "table", "inet", "tcpgc_partition")
    healed = time.time()
    back = t.cc.wait_for(RE_CC_JOINED, 15, since=cc_mark)
    assert log_time(back) - healed <= 2.0 + 1.0 + 2.0
    t.ll.wait_for(rf"agent {t.cc_id} connected from", 5, since=ll_mark)
    served = net.roundtrip(net.outside, t.client)
    assert served.returncode == 0, served.stdout


def test_new_session_of_an_agent_replaces_its_stale_one(net: Net) -> None:
    """The agent loses its control connection (a reset only it sees) while the LL still
    holds the old session: the LL must take the new session and drop the stale one."""
    heartbeat = 2.0  # the LL would notice the stale session only after 6 s
    t = tunnel(net, heartbeat)
    ll_mark, cc_mark = t.ll.mark(), t.cc.mark()
    # Inside: the CC's next packet on its control connection is answered with a reset
    # made up locally; the kernel's own resets to the LL for that connection are dropped.
    conn = f"ip daddr {OUTSIDE_IP} tcp dport {t.agent[1]} tcp sport {t.control_port}"
    net.nft(
        net.inside,
        f"""
table inet tcpgc_stale {{
    chain output {{
        type filter hook output priority 0; policy accept;
        {conn} tcp flags & rst == rst drop
        {conn} reject with tcp reset
    }}
}}
""",
    )
    replaced = t.ll.wait_for(RE_REPLACES, 2 * heartbeat + 3, since=ll_mark)
    assert replaced["id"] == t.cc_id
    assert parse_addr(replaced["addr"]) == (INSIDE_IP, t.control_port)
    assert not t.ll.find_all(RE_LL_SILENT, since=ll_mark), "the LL waited for the heartbeat"
    t.cc.wait_for(RE_CC_JOINED, 5, since=cc_mark)
    # The stale session's end must not unregister the new one.
    old = re.escape(format_addr(INSIDE_IP, t.control_port))
    t.ll.wait_for(rf"agent {t.cc_id} at {old} disconnected", 5, since=ll_mark)
    for _ in range(3):
        served = net.roundtrip(net.outside, t.client)
        assert served.returncode == 0, served.stdout
    assert not t.ll.find_all(r"no agent for service", since=ll_mark)
