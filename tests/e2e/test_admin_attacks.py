"""Attacks on the admin endpoint of real ``tcpgc`` processes: idle connections held to
starve /healthz, DNS rebinding (a foreign Host) to read the status page and metrics,
and an admin endpoint exposed beyond loopback without a token."""

from __future__ import annotations

import json
import random
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import (
    READY_TIMEOUT,
    Harness,
    Node,
    parse_addr,
    recv_until_eof,
    run_tcpgc,
    tcpgc_env,
    wait_closed_by_peer,
)
from tcpgc.config import Address

RE_ADMIN = r"admin endpoint on http://(?P<addr>\S+)/"
ADMIN_TOKEN = "adm-" + "0c1d2e3f405162738495a6b7c8d9eaf0"

#: The documented limits (docs/deployment.md): connections kept per source address, and
#: the deadline for a request head.
PER_ADDRESS = 16
HEAD_DEADLINE = 5.0
#: Slack for "closed in time" on a small shared machine.
MARGIN = 2.0


def start_ll_with_admin(harness: Harness, **extra: object) -> tuple[Node, tuple[str, int]]:
    """An LL with an admin endpoint on 127.0.0.1 (config keys in `extra`), no agent:
    its /healthz answers 200 as soon as it listens."""
    state = harness.state_dir()
    lines = [
        'cc = "127.0.0.1:0"',
        f'state_dir = "{state}"',
        'admin = "127.0.0.1:0"',
        *(f"{key} = {json.dumps(value)}" for key, value in extra.items()),
        "[services.default]",
        'clients = "127.0.0.1:0"',
    ]
    config = harness.tmp_path / "ll.toml"
    config.write_text("\n".join(lines) + "\n")
    ll, _ = harness.start_ll("-c", str(config))
    return ll, parse_addr(ll.wait_for(RE_ADMIN, READY_TIMEOUT)["addr"])


def request(
    addr: tuple[str, int],
    path: str,
    host: str | None,
    *,
    token: str | None = None,
    source: str = "127.0.0.1",
    timeout: float = 10.0,
) -> tuple[int, str]:
    """(status, body) of one GET with exactly the Host header given (none if None)."""
    head = [f"GET {path} HTTP/1.1"]
    if host is not None:
        head.append(f"Host: {host}")
    if token is not None:
        head.append(f"Authorization: Bearer {token}")
    head.append("Connection: close")
    with socket.create_connection(addr, timeout=timeout, source_address=(source, 0)) as sock:
        sock.settimeout(timeout)
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        reply = recv_until_eof(sock, 1 << 24)
    status_line, _, rest = reply.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), body.decode(errors="replace")


# ---------------------------------------------------------------------------- idle connections


class IdleHolder:
    """Idle connections to one address, each from one of `sources`; `top_up` reopens those
    the node closed, so the attacker keeps as many as it wants open."""

    def __init__(self, addr: tuple[str, int], sources: list[str], count: int) -> None:
        self.addr = addr
        self.wanted = [sources[i % len(sources)] for i in range(count)]
        self.socks: list[socket.socket | None] = [None] * count

    def top_up(self) -> int:
        """Reopen every connection that is closed; returns how many were reopened."""
        reopened = 0
        for i, sock in enumerate(self.socks):
            if sock is not None and not _closed(sock):
                continue
            if sock is not None:
                sock.close()
            self.socks[i] = socket.create_connection(
                self.addr, timeout=10, source_address=(self.wanted[i], 0)
            )
            reopened += 1
        return reopened

    def open_from(self, source: str) -> int:
        return sum(
            1
            for sock, src in zip(self.socks, self.wanted, strict=True)
            if sock is not None and src == source and not _closed(sock)
        )

    def close(self) -> None:
        for sock in self.socks:
            if sock is not None:
                sock.close()


def _closed(sock: socket.socket) -> bool:
    """True once the peer closed or reset `sock` (it never sends on an idle connection)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


@pytest.mark.parametrize(
    ("sources", "count"),
    [(["127.0.0.1"], 64), ([f"127.0.0.{i}" for i in range(2, 10)], 96)],
    ids=["64-from-one-address", "96-from-eight-addresses"],
)
def test_healthz_answers_while_idle_connections_are_held(
    harness: Harness, sources: list[str], count: int
) -> None:
    """An attacker holding the admin port's connections open without a request must not
    starve the load balancer's health check, which comes from 127.0.0.1."""
    ll, admin = start_ll_with_admin(harness)
    holder = IdleHolder(admin, sources, count)
    try:
        for _ in range(3):
            holder.top_up()
            status, body = request(admin, "/healthz", "127.0.0.1", timeout=5)
            assert (status, body) == (200, "ok\n")
        # Every newcomer was taken and older idle ones were closed instead: the node
        # keeps at most PER_ADDRESS from one address (polled: the resets are in flight).
        deadline = time.monotonic() + 10
        while max(holder.open_from(s) for s in sources) > PER_ADDRESS:
            assert time.monotonic() < deadline, [holder.open_from(s) for s in sources]
            time.sleep(0.05)
        ll.wait_for(r"admin: closed \d+ connections? .*no request", 10)
        assert "Traceback" not in ll.output()
    finally:
        holder.close()
    # The attack over, the endpoint answers as before.
    assert request(admin, "/healthz", "127.0.0.1")[0] == 200


_FLOOD = """
import socket, sys, time
addr, seconds, limit = (sys.argv[1], int(sys.argv[2])), float(sys.argv[3]), int(sys.argv[4])
held, opened, end = [], 0, time.monotonic() + seconds
while time.monotonic() < end and opened < limit:
    try:
        held.append(socket.create_connection(addr, timeout=2))
        opened += 1
    except OSError:
        pass
    if opened == 100:
        print("flooding", flush=True)  # more than the node keeps: the checks may start
print(opened, flush=True)
sys.stdin.read()  # hold them all until the test is done
"""


def test_healthz_answers_during_a_connection_flood(harness: Harness) -> None:
    """An attacker opening idle connections as fast as it can and holding them all
    (from another process, bounded in time and count) while the health checks come from
    the same address: a check is shed only if its own client stalls between its connect
    and its send long enough for many newcomers to arrive."""
    ll, admin = start_ll_with_admin(harness)
    flood = subprocess.Popen(
        [sys.executable, "-c", _FLOOD, admin[0], str(admin[1]), "4", "800"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert flood.stdout is not None and flood.stdout.readline() == "flooding\n"
        answered, failures = 0, []
        for _ in range(100):
            try:
                answered += request(admin, "/healthz", "127.0.0.1", timeout=5) == (200, "ok\n")
            except (OSError, IndexError) as exc:  # reset, or closed before any reply
                failures.append(repr(exc))
        opened = int(flood.communicate("", timeout=30)[0].strip())
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait(10)
    assert opened >= 100, f"the flood opened only {opened} connections"
    assert answered >= 95, (answered, failures[:5])
    assert "Traceback" not in ll.output()


def test_a_request_head_has_a_short_deadline(harness: Harness) -> None:
    """A connection that sends part of a request and stalls is answered 408 and closed
    after HEAD_DEADLINE, not held."""
    _, admin = start_ll_with_admin(harness)
    with socket.create_connection(admin, timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127")
        seen, waited = wait_closed_by_peer(sock, HEAD_DEADLINE + MARGIN + 5)
    assert seen.startswith(b"HTTP/1.1 408 "), seen[:100]
    assert HEAD_DEADLINE - 0.5 <= waited <= HEAD_DEADLINE + MARGIN, waited


# ---------------------------------------------------------------------------- Host / rebinding


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example"])
def test_foreign_host_gets_no_status_and_no_metrics(harness: Harness, host: str) -> None:
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 sends
    `Host: evil.example`. Without an admin token it must read nothing."""
    ll, admin = start_ll_with_admin(harness)
    host = host.format(port=admin[1])
    for path in ("/", "/status.json", "/metrics", "/?token=x"):
        status, body = request(admin, path, host)
        assert status == 421, (path, status, body[:200])
        assert body.count("\n") == 1 and "admin_hosts" in body, body
        assert "tcpgc_" not in body and "{" not in body and "<" not in body, body
    # The health check stays open to load balancers, whatever name they send.
    assert request(admin, "/healthz", host) == (200, "ok\n")
    ll.wait_for(r"admin: refused request for /status\.json from \S+: Host .* not one of", 10)


@pytest.mark.parametrize(
    "host",
    [
        None,
        "127.0.0.1",
        "127.0.0.1:{port}",
        "localhost:{port}",
        "LOCALHOST.",
        "[::1]:{port}",
        "tcpgc-ll.internal:{port}",
        "192.0.2.7",
    ],
)
def test_own_names_are_served(harness: Harness, host: str | None) -> None:
    """Loopback names, IP literals (a rebinding attack needs a name) and the names the
    operator lists in admin_hosts are served; so is a request without Host (HTTP/1.0
    tools; browsers always send one)."""
    _, admin = start_ll_with_admin(harness, admin_hosts=["tcpgc-ll.internal"])
    if host is not None:
        host = host.format(port=admin[1])
    status, body = request(admin, "/status.json", host)
    assert status == 200, body
    assert json.loads(body)["role"] == "ll"
    status, body = request(admin, "/metrics", host)
    assert status == 200 and "tcpgc_agents_connected" in body


def test_a_valid_token_is_the_gate_whatever_the_host(harness: Harness, tmp_path: Path) -> None:
    """With a token, the token decides: a rebinding page cannot send it (browsers never
    add a bearer token by themselves), and Prometheus may scrape by any DNS name."""
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    token_file.chmod(0o600)
    ll, admin = start_ll_with_admin(harness, admin_token_file=str(token_file))
    status, body = request(admin, "/status.json", "evil.example", token=ADMIN_TOKEN)
    assert status == 200 and json.loads(body)["role"] == "ll"
    assert request(admin, "/metrics", "gw1.example.com:9181", token=ADMIN_TOKEN)[0] == 200
    for host in ("evil.example", "127.0.0.1"):
        status, body = request(admin, "/status.json", host)
        assert status == 401 and "{" not in body, body
    ll.stop()
    assert ADMIN_TOKEN not in ll.output()


# ---------------------------------------------------------------------------- exposure


@pytest.mark.parametrize("role", ["ll", "cc"])
@pytest.mark.parametrize("where", ["192.0.2.1:0", "[2001:db8::1]:0"])
def test_non_loopback_admin_without_token_exits_before_listening(
    harness: Harness, role: str, where: str
) -> None:
    """Non-loopback addresses that no interface here has: if the node tried to listen at
    all it would fail differently; it must refuse before binding anything."""
    state = harness.state_dir()
    if role == "ll":
        args = ["ll", "--cc", "127.0.0.1:0", "--clients", "127.0.0.1:0", "--state-dir", str(state)]
        env = None
    else:
        args = ["cc", "--ll", "127.0.0.1:1", "--server", "127.0.0.1:9"]
        env = tcpgc_env({"TCPGC_TOKEN": harness.token(state)})
    result = run_tcpgc(*args, "--admin", where, env=env, timeout=20)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, lines
    assert "admin_token_file" in lines[0] and "--admin-token-file" in lines[0], lines
    assert "127.0.0.1" in lines[0] and "::1" in lines[0], lines
    assert "listening" not in result.stderr + result.stdout


# The pure parts, without processes (imported here so that the process tests above also
# run, and fail for what they test, against a tcpgc without this module).


def test_loopback_detection() -> None:
    from tcpgc.admin_access import exposure_problem, is_loopback

    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost", "LocalHost.", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("", "0.0.0.0", "::", "192.0.2.1", "10.0.0.1", "fe80::1", "mgmt.example"):
        assert not is_loopback(host), host
    token = Path("/etc/tcpgc/admin.token")
    assert exposure_problem(None, None) is None
    assert exposure_problem(Address("127.0.0.1", 9181), None) is None
    assert exposure_problem(Address("0.0.0.0", 9181), token) is None
    for host in ("0.0.0.0", "", "::", "10.1.2.3", "mgmt.example"):
        problem = exposure_problem(Address(host, 9181), None)
        assert problem is not None and "admin_token_file" in problem, host
        assert "\n" not in problem


def test_host_allowlist() -> None:
    from tcpgc.admin_access import HostAllowlist, host_name_problem

    allow = HostAllowlist(["gw1.example.com", "Tcpgc.Internal."])
    for header in (
        None,
        "localhost",
        "localhost:9181",
        "127.0.0.1",
        "127.0.0.1:9181",
        "[::1]",
        "[::1]:9181",
        "203.0.113.9:80",
        "gw1.example.com:9181",
        "GW1.EXAMPLE.COM.",
        "tcpgc.internal",
    ):
        assert allow.allows(header), header
    for header in (
        "",
        "evil.example",
        "evil.example:9181",
        "localhost.evil.example",
        "127.0.0.1.evil.example",
        "gw1.example.com.evil.example",
        "::1",
        "[::1",
        "[evil.example]",
        "localhost:port",
        "2130706433",
    ):
        assert not allow.allows(header), header
    assert host_name_problem("gw1.example.com") is None
    assert host_name_problem("203.0.113.9") is None
    for bad in ("gw1.example.com:9181", "*.example.com", "http://gw1", "", "a" * 300, 7):
        assert host_name_problem(bad) is not None, bad


def test_shedding_spares_the_newest_and_requests_waiting() -> None:
    """The admin endpoint's guard: of two drawn, the older is dropped (so the newest is
    never), and a connection whose request waits to be read only if all others do too."""
    from tcpgc.admin_access import ConnectionCap

    guard = ConnectionCap(100, 4, rng=random.Random(7), draws=2)
    for key in range(4):
        assert guard.admit(key, "a") == []
    dropped = [guard.admit(key, "a")[0] for key in range(4, 400)]
    assert all(victim != key - 1 for victim, key in zip(dropped, range(4, 400), strict=True))
    assert len(set(dropped)) == len(dropped)

    waiting = {1, 2}
    guard = ConnectionCap(100, 3, rng=random.Random(7), draws=2, spare=waiting.__contains__)
    for key in range(3):
        guard.admit(key, "a")
    assert guard.admit(3, "a") == [0]  # 1 and 2 are spared, 3 is the newcomer
    waiting.add(3)
    assert guard.admit(4, "a")[0] in {1, 2, 3}  # all spared: any but the newcomer
