"""End-to-end tests: real ``tcpgc`` processes, real sockets on the loopback interface."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from support import (
    RE_CC_JOINED,
    RE_CC_REFUSED,
    RE_CC_SERVER_DOWN,
    RE_LL_AGENT_JOINED,
    RE_LL_HANDSHAKE_FAILED,
    RE_LL_NO_AGENT,
    READY_TIMEOUT,
    EchoServer,
    Harness,
    Tunnel,
    bound_unused_port,
    connect,
    echo_roundtrip,
    format_addr,
    make_token,
    parse_addr,
    recv_exactly,
    run_tcpgc,
    service_re,
    sink_source_exchange,
    tcpgc_env,
    wait_closed_by_peer,
)

MB = 1 << 20


# ---------------------------------------------------------------------------- harness


def test_parse_addr() -> None:
    assert parse_addr("127.0.0.1:40001") == ("127.0.0.1", 40001)
    assert parse_addr("[::1]:40001") == ("::1", 40001)
    assert format_addr("::1", 5) == "[::1]:5"
    with pytest.raises(ValueError):
        parse_addr("nonsense")


# ---------------------------------------------------------------------------- relay


def test_echo_through_tunnel(tunnel: Tunnel) -> None:
    payload = os.urandom(64 * 1024)
    assert echo_roundtrip(tunnel.client_addr, payload) == payload
    # The LL tells the operator how to start the CC (exact wording is not part of the
    # contract), in its log on stderr.
    tunnel.ll.wait_for(r"tcpgc LL is up", 5)


def test_200_simultaneous_clients(tunnel: Tunnel, echo_server: EchoServer) -> None:
    n_clients = 200
    host, port = tunnel.client_addr

    async def one_client(i: int, start: asyncio.Event) -> bytes:
        payload = i.to_bytes(4, "big") + os.urandom(4096 + i)
        await start.wait()
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(payload)
            await writer.drain()
            back = await reader.readexactly(len(payload))
            assert back == payload, f"client {i} got bytes that are not its own"
            return back
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def main() -> list[bytes | BaseException]:
        start = asyncio.Event()
        tasks = [asyncio.create_task(one_client(i, start)) for i in range(n_clients)]
        await asyncio.sleep(0)  # let every task reach start.wait(), then release them together
        start.set()
        async with asyncio.timeout(90):
            return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    failures = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} of {n_clients} clients failed, e.g. {failures[:5]}"
    assert echo_server.connections == n_clients


def test_50mb_each_way(harness: Harness) -> None:
    server = harness.sink_source_server(reply_size=50 * MB)
    tunnel = harness.tunnel(server.addr_str)
    size = sink_source_exchange(tunnel.client_addr, 50 * MB, timeout=60)
    assert size == 50 * MB
    assert server.received == [50 * MB]


def test_half_close_keeps_reply_flowing(harness: Harness) -> None:
    """Client sends, shuts down its write side, and still reads a 20 MB reply in full."""
    server = harness.sink_source_server(reply_size=20 * MB)
    tunnel = harness.tunnel(server.addr_str)
    size = sink_source_exchange(tunnel.client_addr, 100_000, timeout=60)
    assert size == 20 * MB
    assert server.received == [100_000]


def test_half_close_eof_reaches_server(tunnel: Tunnel) -> None:
    """The echo server sees our EOF (it half-closes back), but what we sent still echoes."""
    with connect(tunnel.client_addr) as sock:
        payload = os.urandom(300_000)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        back, _ = wait_closed_by_peer(sock, 10)
    assert back == payload


# ---------------------------------------------------------------------------- failures


def test_server_down_closes_client_promptly(harness: Harness) -> None:
    # Bound but not listening: connects to it are refused until we call listen().
    server_sock = bound_unused_port()
    server = EchoServer(sock=server_sock)
    try:
        tunnel = harness.tunnel(format_addr(*server.addr))
        ll_mark, cc_mark = tunnel.ll.mark(), tunnel.cc.mark()

        with connect(tunnel.client_addr) as sock:
            sock.sendall(b"hello?")
            seen, elapsed = wait_closed_by_peer(sock, 5)
        assert seen == b"", f"client received bytes from nowhere: {seen!r}"
        assert elapsed < 3.0, f"client closed only after {elapsed:.1f}s"

        m = tunnel.cc.wait_for(RE_CC_SERVER_DOWN, 5, since=cc_mark)
        assert m["name"] == "default"
        assert parse_addr(m["addr"]) == server.addr
        # The LL must also say why its client was dropped.
        tunnel.ll.wait_for(
            r"(?i)service 'default'.*(cannot reach|unreachable|refused)", 5, since=ll_mark
        )

        # Same CC, same LL: once the server is up, the next client gets through.
        server.start()
        payload = os.urandom(1000)
        assert echo_roundtrip(tunnel.client_addr, payload) == payload
        assert server.connections == 1
    finally:
        server.stop()


def test_server_down_is_not_reported_as_a_failed_handshake(harness: Harness) -> None:
    """A refused server is an ordinary event: the LL must not log a bogus handshake failure
    ("an agent refusing our certificate, or a port scan") for the CC's abandoned data link."""
    server_sock = bound_unused_port()
    try:
        tunnel = harness.tunnel(format_addr(*server_sock.getsockname()))
        for _ in range(3):
            with connect(tunnel.client_addr) as sock:
                wait_closed_by_peer(sock, 5)
        tunnel.cc.wait_for(RE_CC_SERVER_DOWN, 5)
        tunnel.cc.stop()
        tunnel.ll.stop()  # all output read
        bogus = tunnel.ll.find_all(RE_LL_HANDSHAKE_FAILED)
        assert not bogus, f"LL logged {len(bogus)} false handshake failures: {bogus[0][0]!r}"
    finally:
        server_sock.close()


def test_ipv6_loopback_tunnel(harness: Harness, echo_server: EchoServer) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support in this Python")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"::1 is not usable here: {exc}")
    state = harness.state_dir()
    token = harness.token(state)
    ll, agent_addr = harness.start_ll(
        "--clients", "[::1]:0", "--cc", "[::1]:0", "--state-dir", str(state)
    )
    client = ll.wait_for(service_re("default"), READY_TIMEOUT)["addr"]
    assert client.startswith("[::1]:"), client
    assert agent_addr[0] == "::1"
    cc = harness.start_cc(
        "--ll", format_addr(*agent_addr), "--server", echo_server.addr_str, token=token
    )
    cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)
    ll.wait_for(RE_LL_AGENT_JOINED, READY_TIMEOUT)
    payload = os.urandom(10_000)
    assert echo_roundtrip(parse_addr(client), payload) == payload


def test_insecure_plaintext_tunnel(harness: Harness, echo_server: EchoServer) -> None:
    tunnel = harness.tunnel(
        echo_server.addr_str, ll_args=["--insecure-plaintext"], cc_args=["--insecure-plaintext"]
    )
    payload = os.urandom(100_000)
    assert echo_roundtrip(tunnel.client_addr, payload) == payload


def test_cc_reconnects_after_ll_restart(harness: Harness, echo_server: EchoServer) -> None:
    tunnel = harness.tunnel(echo_server.addr_str)
    agent_port = tunnel.agent_addr[1]
    client_port = tunnel.client_addr[1]
    assert tunnel.ll.stop() is not None
    cc_mark = tunnel.cc.mark()
    # Same identity, same ports: the CC must find it again on its own.
    ll2, _ = harness.start_ll(
        "--clients", f"127.0.0.1:{client_port}", "--cc", f"127.0.0.1:{agent_port}",
        "--state-dir", str(tunnel.state_dir), name="ll (restarted)",
    )  # fmt: skip
    tunnel.cc.wait_for(RE_CC_JOINED, 30, since=cc_mark)
    ll2.wait_for(RE_LL_AGENT_JOINED, 5)
    payload = os.urandom(5000)
    assert echo_roundtrip(tunnel.client_addr, payload) == payload


def test_no_agent_closes_client_after_client_wait(harness: Harness) -> None:
    ll, _ = harness.start_ll(
        "--clients",
        "127.0.0.1:0",
        "--cc",
        "127.0.0.1:0",
        "--state-dir",
        str(harness.state_dir()),
        "--client-wait",
        "1",
    )
    client_addr = parse_addr(ll.wait_for(service_re("default"), READY_TIMEOUT)["addr"])
    with connect(client_addr) as sock:
        sock.sendall(b"anyone there?")
        seen, elapsed = wait_closed_by_peer(sock, 6)
    assert seen == b""
    assert 0.5 <= elapsed <= 3.5, f"closed after {elapsed:.2f}s with --client-wait 1"
    assert ll.wait_for(RE_LL_NO_AGENT, 5)["name"] == "default"


def test_two_services_over_one_cc(
    harness: Harness, write_private_file: Callable[..., Path]
) -> None:
    web = harness.echo_server(prefix=b"web:")
    ssh = harness.echo_server(prefix=b"ssh:")
    state = harness.state_dir()
    token = harness.token(state)

    ll_conf = write_private_file(
        "ll.toml",
        f'cc = "127.0.0.1:0"\n'
        f'state_dir = "{state}"\n'
        f"client_wait = 5.0\n"
        f'[services.web]\nclients = "127.0.0.1:0"\n'
        f'[services.ssh]\nclients = "127.0.0.1:0"\n',
    )
    ll, agent_addr = harness.start_ll("-c", str(ll_conf))
    web_addr = parse_addr(ll.wait_for(service_re("web"), READY_TIMEOUT)["addr"])
    ssh_addr = parse_addr(ll.wait_for(service_re("ssh"), READY_TIMEOUT)["addr"])
    assert web_addr != ssh_addr

    token_file = write_private_file("token", token + "\n", 0o600)
    cc_conf = write_private_file(
        "cc.toml",
        f'll = "{format_addr(*agent_addr)}"\n'
        f'token_file = "{token_file}"\n'
        f'[services.web]\nserver = "{web.addr_str}"\n'
        f'[services.ssh]\nserver = "{ssh.addr_str}"\n',
    )
    cc = harness.start_cc("-c", str(cc_conf), token=None)
    cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)
    joined = ll.wait_for(RE_LL_AGENT_JOINED, READY_TIMEOUT)
    assert set(re.findall(r"[\w.-]+", joined["services"])) >= {"web", "ssh"}

    for addr, prefix in ((web_addr, b"web:"), (ssh_addr, b"ssh:"), (web_addr, b"web:")):
        payload = os.urandom(2000)
        with connect(addr) as sock:
            sock.sendall(payload)
            assert recv_exactly(sock, len(prefix) + len(payload)) == prefix + payload
    assert (web.connections, ssh.connections) == (2, 1)


def test_one_cc_serves_two_ll_replicas(
    harness: Harness, echo_server: EchoServer, write_private_file: Callable[..., Path]
) -> None:
    """``ll`` may be a list: the CC joins every LL (replicas sharing one identity)."""
    state = harness.state_dir()
    token = harness.token(state)
    lls = []
    for name in ("ll-a", "ll-b"):
        ll, agent_addr = harness.start_ll(
            "--clients", "127.0.0.1:0", "--cc", "127.0.0.1:0", "--state-dir", str(state),
            name=name,
        )  # fmt: skip
        client_addr = parse_addr(ll.wait_for(service_re("default"), READY_TIMEOUT)["addr"])
        lls.append((ll, agent_addr, client_addr))
    ll_list = ", ".join(f'"{format_addr(*agent)}"' for _, agent, _ in lls)
    cc_conf = write_private_file(
        "cc.toml", f'll = [{ll_list}]\n[services.default]\nserver = "{echo_server.addr_str}"\n'
    )
    token_file = write_private_file("token", token + "\n", 0o600)
    cc = harness.start_cc("-c", str(cc_conf), "--token-file", str(token_file), token=None)
    for ll, agent_addr, client_addr in lls:
        cc.wait_for(rf"connected to LL {re.escape(format_addr(*agent_addr))} as agent", 20)
        ll.wait_for(RE_LL_AGENT_JOINED, READY_TIMEOUT)
        payload = os.urandom(3000)
        assert echo_roundtrip(client_addr, payload) == payload
    assert echo_server.connections == 2


def forge_token_with_same_pin(token: str) -> str:
    """The same LL pin with a random secret: passes the CC's certificate check, fails HMAC.

    Knows the token layout ``tcpgc1.<secret>.<fingerprint>`` (base64url); asserts it.
    """
    prefix, secret, pin = token.split(".")
    assert prefix == "tcpgc1", f"unexpected token layout: {token[:8]}..."
    raw_len = len(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))
    forged = base64.urlsafe_b64encode(os.urandom(raw_len)).rstrip(b"=").decode()
    return f"{prefix}.{forged}.{pin}"


@pytest.mark.parametrize("case", ["other-ll-identity", "forged-secret", "plaintext"])
def test_wrong_token_is_refused_and_gets_no_client(harness: Harness, case: str) -> None:
    inside = harness.echo_server()
    state = harness.state_dir()
    right_token = harness.token(state)
    if case == "forged-secret":
        wrong_token = forge_token_with_same_pin(right_token)
    else:
        wrong_token = harness.token(harness.state_dir("other-ll-state"))
    assert wrong_token != right_token
    plain = ["--insecure-plaintext"] if case == "plaintext" else []

    ll, agent_addr = harness.start_ll(
        "--clients", "127.0.0.1:0", "--cc", "127.0.0.1:0",
        "--state-dir", str(state), "--client-wait", "1", *plain,
    )  # fmt: skip
    client_addr = parse_addr(ll.wait_for(service_re("default"), READY_TIMEOUT)["addr"])
    cc = harness.start_cc(
        "--ll", format_addr(*agent_addr), "--server", inside.addr_str, *plain, token=wrong_token
    )
    ll.wait_for(RE_LL_HANDSHAKE_FAILED, READY_TIMEOUT)
    refused = cc.wait_for(RE_CC_REFUSED, READY_TIMEOUT)
    assert parse_addr(refused["addr"]) == agent_addr
    # It keeps retrying (with backoff) rather than giving up or spinning.
    cc.wait_for(RE_CC_REFUSED, 10, since=cc.mark())

    # While the wrong CC keeps retrying, a client arrives: it must not be relayed.
    with connect(client_addr) as sock:
        sock.sendall(b"secret request")
        seen, elapsed = wait_closed_by_peer(sock, 6)
    assert seen == b""
    assert elapsed <= 3.5
    ll.wait_for(RE_LL_NO_AGENT, 5)
    assert inside.connections == 0, "the server behind the wrong CC was dialled"
    assert not cc.find_all(RE_CC_JOINED), "a CC with the wrong token joined"
    assert not ll.find_all(RE_LL_AGENT_JOINED), "the LL accepted an agent with the wrong token"
    assert wrong_token.split(".")[1] not in ll.output() + cc.output(), "a secret reached a log"


def test_cc_with_world_readable_token_file_is_refused(
    harness: Harness, write_private_file: Callable[..., Path]
) -> None:
    token = harness.token(harness.state_dir())
    token_file = write_private_file("token", token + "\n", 0o644)
    proc = run_tcpgc(
        "cc",
        "--ll",
        "127.0.0.1:9",
        "--server",
        "127.0.0.1:9",
        "--token-file",
        str(token_file),
        timeout=15,
    )
    assert_usage_error(proc)


# ---------------------------------------------------------------------------- lifecycle


def test_sigterm_stops_nodes_promptly(tunnel: Tunnel) -> None:
    for node in (tunnel.cc, tunnel.ll):
        start = time.monotonic()
        node.stop(grace=5)
        elapsed = time.monotonic() - start
        assert elapsed < 5, f"{node.name} ignored SIGTERM for {elapsed:.1f}s"
        assert "Traceback" not in node.output(), node.output()


def test_demo_once() -> None:
    proc = run_tcpgc("demo", "--once", timeout=60)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


# ---------------------------------------------------------------------------- token


def test_token_is_stable_and_state_is_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = run_tcpgc("token", "--state-dir", str(state))
    second = run_tcpgc("token", "--state-dir", str(state))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert len(first.stdout.splitlines()) == 1 and first.stdout.strip()
    assert first.stdout == second.stdout

    files = [p for p in state.rglob("*") if p.is_file()]
    assert files, "the state dir holds no files"
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, f"{path} has mode {oct(mode)}"

    other = run_tcpgc("token", "--state-dir", str(tmp_path / "other"))
    assert other.returncode == 0 and other.stdout != first.stdout, "two identities, one token"


# ---------------------------------------------------------------------------- usage errors


def assert_usage_error(proc) -> None:  # type: ignore[no-untyped-def]
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, detail
    assert "Traceback" not in proc.stderr, detail
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr\n{detail}"


def isolated_home(tmp_path: Path) -> dict[str, str]:
    """Environment with HOME and XDG dirs in tmp_path, so defaults never touch the real home."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return tcpgc_env(
        {
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local/share"),
            "XDG_STATE_HOME": str(home / ".local/state"),
        }
    )


def test_ll_without_flags_is_usage_error(tmp_path: Path) -> None:
    assert_usage_error(run_tcpgc("ll", env=isolated_home(tmp_path), timeout=15))


def test_ll_bad_address_is_usage_error(tmp_path: Path) -> None:
    proc = run_tcpgc(
        "ll",
        "--clients",
        "nonsense",
        "--cc",
        "127.0.0.1:0",
        "--state-dir",
        str(tmp_path / "s"),
        timeout=15,
    )
    assert_usage_error(proc)


@pytest.mark.parametrize("busy", ["--clients", "--cc"])
def test_ll_port_in_use_is_usage_error(tmp_path: Path, busy: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addrs = {"--clients": "127.0.0.1:0", "--cc": "127.0.0.1:0"}
        addrs[busy] = format_addr(*taken.getsockname())
        proc = run_tcpgc(
            "ll",
            *(x for kv in addrs.items() for x in kv),
            "--state-dir",
            str(tmp_path / "s"),
            timeout=15,
        )
    assert_usage_error(proc)


def test_cc_without_token_is_usage_error() -> None:
    proc = run_tcpgc(
        "cc", "--ll", "127.0.0.1:9", "--server", "127.0.0.1:9", env=tcpgc_env(), timeout=15
    )
    assert_usage_error(proc)


@pytest.mark.parametrize("bad_token", ["not-a-token", "tcpgc1:AAAA", " "])
def test_cc_with_malformed_token_is_usage_error(bad_token: str) -> None:
    proc = run_tcpgc(
        "cc",
        "--ll",
        "127.0.0.1:9",
        "--server",
        "127.0.0.1:9",
        env=tcpgc_env({"TCPGC_TOKEN": bad_token}),
        timeout=15,
    )
    assert_usage_error(proc)


@pytest.mark.parametrize("node", ["ll", "cc"])
@pytest.mark.parametrize("problem", ["missing", "invalid-toml"])
def test_bad_config_file_is_usage_error(
    write_private_file: Callable[..., Path], tmp_path: Path, node: str, problem: str
) -> None:
    if problem == "missing":
        path = tmp_path / "does-not-exist.toml"
    else:
        path = write_private_file(f"{node}.toml", 'cc = "127.0.0.1:0\n[services.web\n')
    # A valid token, so that the only thing wrong is the config file.
    token = make_token(tmp_path / "state")
    proc = run_tcpgc(node, "-c", str(path), env=tcpgc_env({"TCPGC_TOKEN": token}), timeout=15)
    assert_usage_error(proc)


def test_unknown_flag_is_usage_error(tmp_path: Path) -> None:
    assert_usage_error(run_tcpgc("ll", "--no-such-flag", env=isolated_home(tmp_path), timeout=15))
