"""Bandwidth limits measured by iperf3 through real nodes: an LL with two services, one
with `rate_limit = "80Mbit"` and one without, an agent in front of one iperf3 server.
Each direction of the limited service stays within 10 % of its rate (iperf3's receiver
says so); the unlimited one is far above it. Over TLS with resumable streams (the
default) and over plaintext without (splice, or copy under TCPGC_NO_SPLICE)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_tools import free_port_range, re_exposed, start_agents_ll
from support import (
    RE_CC_JOINED,
    RE_LL_AGENT_JOINED,
    RE_LL_AGENT_PORT,
    Harness,
    Node,
    Process,
    free_port,
    node_toml,
    parse_addr,
    service_re,
)

READY = 20.0
LIMIT = 80.0  # Mbit/s
SECONDS = 3

pytestmark = pytest.mark.skipif(
    shutil.which("iperf3") is None, reason="iperf3 is not installed (scripts/test.sh installs it)"
)


@pytest.fixture
def iperf3_server() -> Iterator[int]:
    """An iperf3 server on 127.0.0.1; yields its port."""
    port = free_port()
    server = Process(
        ["iperf3", "-s", "--forceflush", "-B", "127.0.0.1", "-p", str(port)], name="iperf3 -s"
    )
    try:
        server.wait_for(r"Server listening on", READY, stream="stdout")
        yield port
    finally:
        server.stop()


def _iperf3(port: int, *args: str) -> float:
    """Run an iperf3 client to 127.0.0.1:`port`; the receiver's rate in Mbit/s. The
    server serves one test at a time: the last one's tail, queued in socket buffers
    beyond the limit, may still be draining at the limited rate, and it says so (or
    resets the new test's control connection)."""
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(SECONDS), "--json", *args]
    deadline = time.monotonic() + 30
    while True:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=SECONDS + 30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{' '.join(argv)} still running after {SECONDS + 30} s") from None
        report = json.loads(done.stdout)
        error = report.get("error", "")
        # A busy server may also just reset the new control connection (seen on the
        # portable path, where the last test's tail drains longer): try again too.
        busy = "busy" in error or "reset by peer" in error
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # iperf3 has no way to wait for its server to be free
    assert done.returncode == 0 and not error, (done.returncode, error, done.stderr)
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e6


def _ll_toml(top: dict[str, object], limit: str) -> str:
    return node_toml(
        top,
        {
            "limited": {"clients": "127.0.0.1:0", "rate_limit": limit},
            "free": {"clients": "127.0.0.1:0"},
        },
    )


def _tunnel(harness: Harness, iperf3_port: int, mode: str) -> tuple[Node, dict[str, int]]:
    """An LL (config in tmp_path/ll.toml) with services 'limited' (80 Mbit/s) and
    'free', and an agent serving both with the iperf3 server; the LL and each
    service's port."""
    state = harness.state_dir()
    token = harness.token(state)
    ll_toml = harness.tmp_path / "ll.toml"
    ll_toml.write_text(_ll_toml(_ll_top(state, mode), "80Mbit"))
    ll = harness.node("ll", "-c", str(ll_toml), name="ll")
    agent = ll.wait_for(RE_LL_AGENT_PORT, READY)["addr"]
    ports = {name: parse_addr(ll.wait_for(service_re(name), READY)["addr"])[1]
             for name in ("limited", "free")}  # fmt: skip
    server = f"127.0.0.1:{iperf3_port}"
    cc_top: dict[str, object] = {"ll": agent}
    if mode == "plaintext":
        cc_top["insecure_plaintext"] = True
    cc_toml = harness.tmp_path / "cc.toml"
    cc_toml.write_text(
        node_toml(cc_top, {"limited": {"server": server}, "free": {"server": server}})
    )
    cc = harness.start_cc("-c", str(cc_toml), token=token)
    cc.wait_for(RE_CC_JOINED, READY)
    ll.wait_for(RE_LL_AGENT_JOINED, READY)
    return ll, ports


def _ll_top(state: Path, mode: str) -> dict[str, object]:
    top: dict[str, object] = {"cc": "127.0.0.1:0", "state_dir": str(state)}
    if mode == "plaintext":
        top.update(insecure_plaintext=True, resume_window=0)
    return top


@pytest.mark.parametrize("mode", ["tls-resumable", "plaintext"])
def test_rate_limit_holds_each_direction_and_spares_the_unlimited_service(
    harness: Harness, iperf3_server: int, mode: str
) -> None:
    _, ports = _tunnel(harness, iperf3_server, mode)
    up = _iperf3(ports["limited"])
    down = _iperf3(ports["limited"], "-R")
    free = _iperf3(ports["free"])
    print(f"{mode}: limited up {up:.1f}, down {down:.1f}, unlimited {free:.0f} Mbit/s")
    assert 0.9 * LIMIT <= up <= 1.1 * LIMIT, f"client to server: {up:.1f} Mbit/s"
    assert 0.9 * LIMIT <= down <= 1.1 * LIMIT, f"server to client: {down:.1f} Mbit/s"
    assert free > 3 * LIMIT, f"the unlimited service: {free:.1f} Mbit/s"


def test_reload_changes_the_limit_of_a_running_client(harness: Harness, iperf3_server: int) -> None:
    ll, ports = _tunnel(harness, iperf3_server, "tls-resumable")
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(ports["limited"]), "-R", "-t", "6"]
    client = Process([*argv, "-i", "1", "--forceflush", "-f", "m"], name="iperf3 -c")
    try:
        client.wait_for(r"\]\s+1\.\d+-2\.\d+\s+sec", READY, stream="stdout")
        ll_toml = harness.tmp_path / "ll.toml"
        ll_toml.write_text(_ll_toml(_ll_top(harness.state_dir(), "tls-resumable"), "40Mbit"))
        ll.proc.send_signal(signal.SIGHUP)
        ll.wait_for(r"service 'limited' controls updated", READY)
        assert client.proc.wait(READY) == 0, client.output()
    finally:
        client.stop()
    interval = re.compile(r"\s(?P<start>\d+\.\d+)-\d+\.\d+\s+sec.*\s(?P<rate>[\d.]+) Mbits/sec")
    rates = {
        round(float(m["start"])): float(m["rate"])
        for m in map(interval.search, client.stdout_lines)
        if m is not None
    }
    print("Mbit/s each second:", rates)
    assert 0.8 * LIMIT <= rates[1] <= 1.2 * LIMIT, rates
    # The reload came after the second second: the last two are at the new rate.
    for second in (4, 5):
        assert 0.8 * LIMIT / 2 <= rates[second] <= 1.2 * LIMIT / 2, rates


def test_an_agents_rate_caps_the_port_it_exposes(harness: Harness, iperf3_server: int) -> None:
    """`tcpgc agent add --rate 40Mbit`: the port the agent exposes (and anything else
    it serves) stays within 40 Mbit/s each way; the LL's unlimited service, served by
    another agent, does not."""
    env = start_agents_ll(harness, ("free",))
    port = free_port_range(1)
    server = f"127.0.0.1:{iperf3_server}"
    slow = env.add("slow", "--ports", str(port), "--rate", "40Mbit")
    env.start_cc(slow, name="slow", exposes=[f"127.0.0.1:{port}={server}"])
    env.ll.wait_for(re_exposed(port), READY)
    env.start_cc(env.harness.token(env.state_dir), name="shared", services={"free": server})
    env.ll.wait_for(r"services: free\)", READY)
    up = _iperf3(port)
    down = _iperf3(port, "-R")
    free = _iperf3(env.client_addrs["free"][1])
    print(f"agent at 40 Mbit/s: up {up:.1f}, down {down:.1f}; unlimited {free:.0f} Mbit/s")
    assert 0.9 * 40 <= up <= 1.1 * 40, f"client to server: {up:.1f} Mbit/s"
    assert 0.9 * 40 <= down <= 1.1 * 40, f"server to client: {down:.1f} Mbit/s"
    assert free > 3 * LIMIT, f"the unlimited service: {free:.1f} Mbit/s"
