"""Resumable streams across real breaks of the LL–CC leg, in two namespaces joined by a
veth pair: the LL and the clients outside, the agent and the servers inside.

Each break takes down every connection of the leg while the LL, the agent, the client
and the server stay up: the agent's address changes (as when a NAT rebinds), the leg is
dropped silently for longer than three heartbeats, every packet of it is answered with
a reset, or it stays cut for longer than the resume window. Streams must come through
the first three intact with only a delay, and be closed on both ends in time after the
last, leaving no descriptor behind.

Traffic only ever goes to 127.0.0.1 or to the namespaces' own veth addresses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netns import SUPPORT, NamespacePair, check, join_tunnel, namespace_pair, skip_unless_possible
from reliability_tools import RE_CC_NO_HEARTBEAT, RE_LL_SILENT
from resume_tools import (
    RE_CC_NOT_RESUMED,
    RE_CC_RESUMED,
    RE_LL_NOT_RESUMED,
    RE_LL_RESUMED,
    RE_LL_WAITS,
    Interactive,
    open_fds,
)
from support import (
    RE_CC_JOINED,
    RE_LL_AGENT_JOINED,
    Node,
    Process,
    parse_addr,
    tcpgc_env,
)

pytestmark = pytest.mark.netns

TOOLS = str(Path(__file__).resolve().parents[1] / "resume_tools.py")
# Private /30s used only between this file's two namespaces: the veth's own, and the
# one the agent moves to.
SUBNET = "10.201.86"
OUTSIDE_IP = f"{SUBNET}.1"
INSIDE_IP = f"{SUBNET}.2"
MOVED_SUBNET = "10.201.87"
MOVED_OUTSIDE_IP = f"{MOVED_SUBNET}.1"
MOVED_INSIDE_IP = f"{MOVED_SUBNET}.2"
READY_TIMEOUT = 20.0
#: Each way at once, paced over SECONDS.
SIZE = 50_000_000
SECONDS = 10.0
HEARTBEAT = 0.5


@dataclass
class Net(NamespacePair):
    tmp: Path = Path()

    def nft(self, ns: str, ruleset: str) -> subprocess.CompletedProcess[str]:
        proc = super().nft(ns, ruleset)
        assert proc.returncode == 0, f"nft in {ns}: {proc.stderr}\n{ruleset}"
        return proc

    def tool(self, ns: str, name: str, *args: str) -> Process:
        """``python resume_tools.py ARGS`` running in ``ns`` until the test ends."""
        return self.spawn(ns, [sys.executable, TOOLS, *args], name)

    def server(self, kind: str, *args: str) -> tuple[Process, str]:
        """A ``resume_tools.py`` server (``paced-server``, ``echo-log``) on the inside
        loopback, and its address."""
        proc = self.tool(self.inside, kind, kind, "127.0.0.1", "0", *args)
        return proc, proc.wait_for(r"listening on (?P<addr>\S+)", 10, stream="stdout")["addr"]

    # -- breaks of the leg, all made outside on its veth (or inside, for the move)

    def cut(self) -> None:
        """Drop every packet of the leg, silently."""
        self.nft(self.outside, rules("tcpgc_cut", self.veth_out, "drop", "drop"))

    def heal(self, table: str = "tcpgc_cut") -> None:
        check(*self.prefix(self.outside), "nft", "delete", "table", "inet", table)

    def reset_everything(self) -> None:
        """Answer every TCP packet of the leg, either way, with a reset; the resets
        themselves pass (so the agent's side gets them too)."""
        reject = "meta l4proto tcp reject with tcp reset"
        let_resets_out = "tcp flags & rst == rst accept\n        oifname {veth} " + reject
        self.nft(
            self.outside,
            rules("tcpgc_reset", self.veth_out, reject, let_resets_out.format(veth=self.veth_out)),
        )

    def move_agent(self) -> None:
        """The agent's address changes under its open connections, as when a NAT
        rebinds: its old address is gone (packets to it vanish) and the LL is reached
        from a new one on another subnet."""
        check(
            "ip", "-n", self.outside, "addr", "add", f"{MOVED_OUTSIDE_IP}/30", "dev", self.veth_out
        )
        check("ip", "-n", self.inside, "addr", "add", f"{MOVED_INSIDE_IP}/30", "dev", self.veth_in)
        check("ip", "-n", self.inside, "addr", "del", f"{INSIDE_IP}/30", "dev", self.veth_in)
        check("ip", "-n", self.inside, "route", "add", f"{OUTSIDE_IP}/32", "dev", self.veth_in)


def rules(table: str, veth: str, inbound: str, outbound: str) -> str:
    return f"""
table inet {table} {{
    chain input {{
        type filter hook input priority -10; policy accept;
        iifname "{veth}" {inbound}
    }}
    chain output {{
        type filter hook output priority -10; policy accept;
        oifname "{veth}" {outbound}
    }}
}}
"""


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    skip_unless_possible("resume tests")
    with namespace_pair("z", SUBNET, Net, tmp=tmp_path) as pair:
        yield pair


@dataclass
class Tunnel:
    ll: Node
    cc: Node
    client: tuple[str, int]
    cc_id: str


def tunnel(net: Net, server: str, *, heartbeat: float = HEARTBEAT, **ll_extra: object) -> Tunnel:
    """LL outside (agents on the veth, clients on its loopback), agent inside serving
    ``server``, joined."""
    j = join_tunnel(
        net, net.tmp, server, heartbeat=heartbeat, ready_timeout=READY_TIMEOUT, **ll_extra
    )
    return Tunnel(j.ll, j.cc, j.client, j.cc_id)


def paced_transfer_survives(net: Net, make_break: Callable[[Tunnel], None]) -> Tunnel:
    """SIZE bytes each way at once through the tunnel, paced over SECONDS; a tenth in,
    ``make_break`` breaks the leg. Both digests must match and the client see no error;
    the stream must have waited for its agent and resumed on both nodes."""
    _, server = net.server("paced-server", "--size", str(SIZE), "--seconds", str(SECONDS))
    t = tunnel(net, server)
    client = net.tool(
        net.outside,
        "client (outside)",
        "paced-client",
        *map(str, t.client),
        "--size",
        str(SIZE),
        "--seconds",
        str(SECONDS),
    )
    peer = client.wait_for(r"^connected from (?P<addr>\S+)", 10, stream="stdout")["addr"]
    client.wait_for(r"^streaming$", 20, stream="stdout")
    ll_mark, cc_mark = t.ll.mark(), t.cc.mark()
    make_break(t)

    waits = t.ll.wait_for(RE_LL_WAITS, 3 * HEARTBEAT + 5, since=ll_mark)
    assert waits["peer"] == peer and waits["svc"] == "default"
    resumed = t.ll.wait_for(RE_LL_RESUMED, 20, since=ll_mark)
    assert resumed["peer"] == peer
    assert t.cc.wait_for(RE_CC_RESUMED, 5, since=cc_mark)["svc"] == "default"
    result = client.wait_for(r"^(ok|failed)", 30, stream="stdout")
    assert result.string.startswith("ok"), result.string
    assert client.proc.wait(5) == 0
    assert not t.ll.find_all(RE_LL_NOT_RESUMED, since=ll_mark)
    return t


# ---------------------------------------------------------------------------- the breaks


@pytest.mark.timeout(60)
def test_two_way_transfer_survives_the_agents_address_changing(net: Net) -> None:
    marks: list[int] = []

    def rebind(t: Tunnel) -> None:
        marks.append(t.ll.mark())
        net.move_agent()

    t = paced_transfer_survives(net, rebind)
    joined = t.ll.find_all(RE_LL_AGENT_JOINED, since=marks[0])
    assert [(m["id"], parse_addr(m["addr"])[0]) for m in joined] == [(t.cc_id, MOVED_INSIDE_IP)], (
        "the agent did not come back, once, from its new address"
    )


@pytest.mark.timeout(60)
def test_two_way_transfer_survives_a_silent_partition(net: Net) -> None:
    def partition(t: Tunnel) -> None:
        ll_mark, cc_mark = t.ll.mark(), t.cc.mark()
        net.cut()
        # Both sides hear nothing for three heartbeats and give the old leg up; only
        # then does the leg come back.
        assert t.ll.wait_for(RE_LL_SILENT, 3 * HEARTBEAT + 3, since=ll_mark)["id"] == t.cc_id
        t.cc.wait_for(RE_CC_NO_HEARTBEAT, 3 * HEARTBEAT + 3, since=cc_mark)
        net.heal()

    paced_transfer_survives(net, partition)


@pytest.mark.timeout(60)
def test_two_way_transfer_survives_resets_of_every_packet(net: Net) -> None:
    def resets(t: Tunnel) -> None:
        net.reset_everything()
        time.sleep(1.0)  # the resets must go on for this long: the agent redials into them
        net.heal("tcpgc_reset")

    paced_transfer_survives(net, resets)


@pytest.mark.timeout(60)
def test_200_streams_in_flight_all_resume_after_one_partition(net: Net) -> None:
    streams = 200
    echo = net.spawn(net.inside, [sys.executable, SUPPORT, "echo", "127.0.0.1", "0"], "echo")
    t = tunnel(net, echo.wait_for(r"echo listening on (?P<addr>\S+)", 10, stream="stdout")["addr"])
    done = net.tmp / "finish"
    client = net.tool(
        net.outside,
        "clients (outside)",
        "echo-many",
        *map(str, t.client),
        "--streams",
        str(streams),
        "--until",
        str(done),
    )
    client.wait_for(rf"^streaming {streams}$", 30, stream="stdout")
    ll_mark, cc_mark = t.ll.mark(), t.cc.mark()
    net.cut()
    t.ll.wait_for(RE_LL_SILENT, 3 * HEARTBEAT + 3, since=ll_mark)
    t.cc.wait_for(RE_CC_NO_HEARTBEAT, 3 * HEARTBEAT + 3, since=cc_mark)
    net.heal()

    peers = {m["peer"] for m in t.ll.wait_count(RE_LL_RESUMED, streams, 30, since=ll_mark)}
    assert len(peers) == streams, "some clients resumed twice, others not at all"
    t.cc.wait_count(RE_CC_RESUMED, streams, 10, since=cc_mark)
    done.touch()
    result = client.wait_for(r"^(done|failed)", 30, stream="stdout")
    assert result.string == f"done: {streams} of {streams} intact, 0 idle after resume: []", (
        result.string
    )
    assert not t.ll.find_all(RE_LL_NOT_RESUMED, since=ll_mark)


def stable_fds(pid: int, timeout: float = 10.0) -> int:
    """The descriptor count of ``pid`` once two readings 0.3 s apart agree (the ready
    connections are being topped up just after a join)."""
    deadline = time.monotonic() + timeout
    last = open_fds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = open_fds(pid)
        if now == last:
            return now
        last = now
    raise AssertionError(f"descriptor count of {pid} never settled (last {last})")


def wait_fds_at_most(node: Node, level: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (count := open_fds(node.pid)) > level:
        assert time.monotonic() < deadline, (
            f"{node.name} holds {count} descriptors, {level} before the stream"
        )
        time.sleep(0.1)


@pytest.mark.timeout(60)
def test_partition_longer_than_the_window_closes_both_ends_and_frees_everything(
    net: Net,
) -> None:
    window = 3.0
    server, server_addr = net.server("echo-log")
    t = tunnel(net, server_addr, resume_window=window)
    ll_fds, cc_fds = stable_fds(t.ll.pid), stable_fds(t.cc.pid)

    client = net.tool(net.outside, "client (outside)", "hold", *map(str, t.client))
    client.wait_for(r"^streaming$", 10, stream="stdout")
    ll_mark, cc_mark = t.ll.mark(), t.cc.mark()
    net.cut()
    cut = time.time()
    bound = window + 3 * HEARTBEAT + 1.5
    closed = server.wait_for(r"^closed at (?P<t>[\d.]+)", bound + 5, stream="stdout")
    ended = client.wait_for(r"^ended at (?P<t>[\d.]+): (?P<why>.*)", bound + 5, stream="stdout")
    for side, match in (("server", closed), ("client", ended)):
        took = float(match["t"]) - cut
        assert window - 0.25 <= took <= bound, f"{side} closed {took:.2f} s after the cut"
    gave_up = t.ll.wait_for(RE_LL_NOT_RESUMED, 5, since=ll_mark)
    assert float(gave_up["w"]) == window and gave_up["svc"] == "default"
    assert float(t.cc.wait_for(RE_CC_NOT_RESUMED, 5, since=cc_mark)["w"]) == window
    assert not t.ll.find_all(RE_LL_RESUMED, since=ll_mark)

    net.heal()
    t.cc.wait_for(RE_CC_JOINED, 10, since=cc_mark)
    wait_fds_at_most(t.ll, ll_fds, 10)
    wait_fds_at_most(t.cc, cc_fds, 10)


# ---------------------------------------------------------------------------- ssh


def ssh_files(tmp: Path, port: int) -> tuple[Path, Path]:
    """A throwaway host key, a client key authorized for root, and an sshd_config for
    127.0.0.1:``port``; returns (sshd_config, client key)."""
    for name in ("host_key", "client_key"):
        check("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name))
    authorized = tmp / "authorized_keys"
    authorized.write_text((tmp / "client_key.pub").read_text())
    os.chmod(authorized, 0o600)
    config = tmp / "sshd_config"
    config.write_text(
        f"""\
ListenAddress 127.0.0.1:{port}
HostKey {tmp / "host_key"}
AuthorizedKeysFile {authorized}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
PidFile none
LogLevel VERBOSE
"""
    )
    return config, tmp / "client_key"


@pytest.mark.timeout(60)
def test_ssh_session_survives_a_ten_second_partition(net: Net) -> None:
    sshd, ssh = shutil.which("sshd", path="/usr/sbin:/usr/bin:/sbin:/bin"), shutil.which("ssh")
    if sshd is None or ssh is None:
        pytest.skip("needs OpenSSH (sshd and ssh), which is not installed")
    port = 2222  # the inside namespace is empty: any port is free there
    config, key = ssh_files(net.tmp, port)
    # sshd wants its privilege separation directory; it gets one on a tmpfs of its own
    # mount namespace, so the host's /run is never touched.
    daemon = net.spawn(
        net.inside,
        [
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs -o mode=0755 tmpfs /run && mkdir -m 0755 /run/sshd && exec "$0" "$@"',
            sshd, "-D", "-e", "-f", str(config),
        ],
        "sshd (inside)",
    )  # fmt: skip
    daemon.wait_for(rf"Server listening on 127\.0\.0\.1 port {port}", 10)
    t = tunnel(net, f"127.0.0.1:{port}", heartbeat=1.0)

    session = Interactive(
        [
            *net.prefix(net.outside), ssh, "-T", "-F", "/dev/null", "-i", str(key),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ServerAliveInterval=0", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
            "-p", str(t.client[1]), f"root@{t.client[0]}",
            'while read -r line; do eval "$line"; done',
        ],
        name="ssh (outside)",
        env=tcpgc_env(),
    )  # fmt: skip
    try:
        session.send('echo "one $((6 * 7)) $$"')
        shell = session.wait_for(r"^one 42 (?P<pid>\d+)$", 15)["pid"]
        ll_mark, cc_mark = t.ll.mark(), t.cc.mark()
        net.cut()
        session.send('echo "two $((6 * 8))"')  # typed during the partition
        time.sleep(10.0)  # the partition lasts this long, whatever the nodes do
        net.heal()
        session.send('echo "three $$"')
        session.wait_for(r"^two 48$", 15)
        # The same shell answers: the session is the one from before the partition.
        session.wait_for(rf"^three {shell}$", 5)
        assert t.ll.wait_for(RE_LL_RESUMED, 5, since=ll_mark)["svc"] == "default"
        t.cc.wait_for(RE_CC_RESUMED, 5, since=cc_mark)
        assert t.ll.find_all(RE_LL_SILENT, since=ll_mark), "the partition went unnoticed"
        assert session.proc.poll() is None, "ssh ended"
        assert session.close(10) == 0
    finally:
        session.stop()
        print(session.output())
    logins = daemon.find_all(r"Accepted publickey for root")
    assert len(logins) == 1, [m.string for m in logins]
