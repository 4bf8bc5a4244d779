"""What a new user met on the way: resolver errors in words, rotation output, and
metrics that only the CC can fill."""

from __future__ import annotations

import socket
import urllib.request

from support import RE_CC_JOINED, Harness, Tunnel, run_tcpgc

READY = 20.0
RE_ADMIN = r"admin endpoint on http://(?P<addr>\S+)/"


def test_ll_host_that_does_not_resolve_is_named(harness: Harness) -> None:
    state = harness.state_dir()
    token = harness.token(state)
    echo = harness.echo_server()
    cc = harness.start_cc(
        "--ll", "gw.no-such-host.invalid:8001", "--server", echo.addr_str, token=token
    )
    line = cc.wait_for(r"cannot connect to LL gw\.no-such-host\.invalid:8001: (?P<why>.*)", READY)
    assert line["why"].startswith("the host name does not resolve"), line.string
    assert "unknown error" not in cc.output().lower()


def test_server_host_that_does_not_resolve_is_named(harness: Harness) -> None:
    tunnel: Tunnel = harness.tunnel("server.no-such-host.invalid:7200")
    with socket.create_connection(tunnel.client_addr, timeout=10) as sock:
        sock.settimeout(10)
        sock.sendall(b"x")
        try:
            sock.recv(1)
        except OSError:
            pass
    line = tunnel.cc.wait_for(r"server\.no-such-host\.invalid:7200.*", READY)
    assert "does not resolve" in line.string, line.string
    assert "unknown error" not in tunnel.cc.output().lower()


def test_retire_previous_prints_no_token_and_says_sighup(harness: Harness) -> None:
    state = harness.state_dir()
    token = harness.token(state)
    rotated = run_tcpgc("token", "--state-dir", str(state), "--rotate")
    assert rotated.returncode == 0 and "SIGHUP" in rotated.stderr, rotated.stderr
    retired = run_tcpgc("token", "--state-dir", str(state), "--retire-previous")
    assert retired.returncode == 0, retired.stderr
    assert retired.stdout == "", "the token was printed again"
    assert "SIGHUP" in retired.stderr and "tcpgc1." not in retired.stderr
    assert token not in retired.stderr


def test_pool_metrics_only_on_the_cc(harness: Harness) -> None:
    echo = harness.echo_server()
    admin = ("--admin", "127.0.0.1:0")
    tunnel = harness.tunnel(echo.addr_str, ll_args=admin, cc_args=admin)
    tunnel.cc.wait_for(RE_CC_JOINED, READY)

    def metrics(node_admin: str) -> str:
        with urllib.request.urlopen(f"http://{node_admin}/metrics", timeout=10) as response:
            return str(response.read().decode())

    ll_text = metrics(tunnel.ll.wait_for(RE_ADMIN, READY)["addr"])
    cc_text = metrics(tunnel.cc.wait_for(RE_ADMIN, READY)["addr"])
    assert "tcpgc_agents_connected" in ll_text
    assert "tcpgc_pool_size" not in ll_text and "data_connections_reused" not in ll_text
    assert "tcpgc_pool_size" in cc_text
