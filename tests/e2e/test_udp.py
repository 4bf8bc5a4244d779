"""UDP services end to end: real `tcpgc ll` and `tcpgc cc` processes started from TOML
files, a real DNS server (dnsmasq) asked by `dig`, echo servers that remember every
source port, datagrams of every size up to the largest IPv4 and IPv6 carry, a hundred
clients at once, flows that end when idle on both nodes, a TCP and a UDP service side by
side, and what `tcpgc check` says of UDP keys."""

from __future__ import annotations

import os
import re
import select
import subprocess
import threading
from pathlib import Path

import pytest

from support import Harness, connect, format_addr, make_token, recv_exactly, run_tcpgc, tcpgc_env
from udp_tools import (
    MAX_V4,
    MAX_V6,
    UdpClient,
    dns_tools_or_skip,
    echo_server,
    free_udp_port,
    ipv6_loopback_or_skip,
    metric,
    numbered,
    open_flows,
    re_cc_flow_end,
    re_ll_flow_end,
    scrape,
    send_windowed,
    start_dnsmasq,
    start_tunnel,
    status_json,
    tagged,
    udp_service,
    wait_metrics,
)

pytestmark = pytest.mark.timeout(60)

LOCAL = "127.0.0.1"


# ---------------------------------------------------------------------------- dns


def _txt_strings() -> list[str]:
    """Eight TXT strings of 200 characters: an RRset answer of about 1,700 bytes."""
    return [f"s{i}-" + "abcdefghij" * 19 + "klmnopq" for i in range(8)]


def _dig(dig: str, port: int, *args: str) -> str:
    done = subprocess.run(
        [dig, "@127.0.0.1", "-p", str(port), *args, "+tries=1", "+time=3"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 0, f"dig {args} exited {done.returncode}: {done.stdout}{done.stderr}"
    return done.stdout


def _big_txt(dig: str, port: int) -> tuple[int, str, str]:
    """(MSG SIZE rcvd, the header's flags, the whole output) of the big TXT answer."""
    out = _dig(dig, port, "big.test.internal", "TXT", "+bufsize=4096", "+notcp", "+ignore")
    size = re.search(r"MSG SIZE\s+rcvd: (\d+)", out)
    flags = re.search(r";; flags: ([^;]*);", out)
    assert size is not None and flags is not None, out
    return int(size[1]), flags[1], out


def test_dig_asks_dnsmasq_through_the_tunnel(harness: Harness) -> None:
    dnsmasq, dig = dns_tools_or_skip()
    dns_port = free_udp_port()
    strings = _txt_strings()
    server = start_dnsmasq(
        harness,
        dnsmasq,
        dns_port,
        [
            "--address=/test.internal/10.1.2.3",
            "--edns-packet-max=4096",
            *(f"--txt-record=big.test.internal,{text}" for text in strings),
        ],
    )
    # dnsmasq itself gives the big answer whole over UDP: what the tunnel must keep.
    direct, flags, out = _big_txt(dig, dns_port)
    assert direct > 1400 and "tc" not in flags.split(), (direct, flags, server.output())
    port = free_udp_port()
    tunnel = start_tunnel(
        harness,
        {"dns": udp_service(f"127.0.0.1:{port}")},
        {"dns": {"server": f"127.0.0.1:{dns_port}", "protocol": "udp"}},
    )
    answer = _dig(dig, port, "test.internal", "A", "+short")
    assert answer.split() == ["10.1.2.3"], answer
    size, flags, out = _big_txt(dig, port)
    assert size == direct, f"{size} bytes through the tunnel, {direct} straight:\n{out}"
    assert size > 1400
    assert "tc" not in flags.split(), f"truncated: {flags}\n{out}"
    for text in strings:
        assert f'"{text}"' in out, f"{text[:10]}... missing:\n{out}"
    ll = scrape(tunnel.ll_admin)
    assert metric(ll, "tcpgc_udp_flows_total", service="dns") == 2, "one flow per dig"
    assert metric(ll, "tcpgc_udp_datagrams_total", service="dns", direction="in") == 2
    assert metric(ll, "tcpgc_udp_datagrams_total", service="dns", direction="out") == 2
    assert metric(ll, "tcpgc_udp_bytes_total", service="dns", direction="out") >= size


# ---------------------------------------------------------------------------- sizes


def _sizes_through(harness: Harness, host: str, sizes: list[int], window: int) -> None:
    server = echo_server(harness, host)
    port = free_udp_port(host)
    tunnel = start_tunnel(
        harness,
        {"echo": udp_service(format_addr(host, port))},
        {"echo": {"server": server.addr_str, "protocol": "udp"}},
    )
    payloads = [numbered(seq, size) for seq, size in enumerate(sizes)]
    with UdpClient((host, port)) as client:
        replies = send_windowed(client, payloads, window)
        pairs = enumerate(zip(payloads, replies, strict=True))
        mismatched = [(i, len(p), len(r)) for i, (p, r) in pairs if p != r]
        assert not mismatched, (
            f"(index, sent, got) of replies not whole or out of order: {mismatched}"
        )
        assert client.pending() == [], "more replies than datagrams"
    [source] = server.sources()
    assert server.from_source(source) == payloads, "the server got them changed or out of order"
    ll = scrape(tunnel.ll_admin)
    assert metric(ll, "tcpgc_udp_datagrams_total", service="echo", direction="in") == len(sizes)
    assert metric(ll, "tcpgc_udp_bytes_total", service="echo", direction="in") == sum(sizes)
    assert metric(ll, "tcpgc_udp_drops_total", service="echo") == 0


def test_datagrams_of_every_size_arrive_whole_and_in_order(harness: Harness) -> None:
    sizes = [1] * 8 + [1400] * 8 + [8000] * 8 + [MAX_V4] * 6 + [1, MAX_V4, 1400, 8000] * 3
    _sizes_through(harness, LOCAL, sizes, window=140_000)


def test_datagrams_over_ipv6(harness: Harness) -> None:
    ipv6_loopback_or_skip()
    sizes = [1, 1400, 8000, 8000, 8000, MAX_V6, 1, MAX_V6, 8000]
    _sizes_through(harness, "::1", sizes, window=140_000)


# ---------------------------------------------------------------------------- many clients


def test_a_hundred_clients_each_get_their_own_replies(harness: Harness) -> None:
    clients_n, rounds, tag = 100, 20, b"E:"
    server = echo_server(harness, tag=tag)
    port = free_udp_port()
    tunnel = start_tunnel(
        harness,
        {"echo": udp_service(f"127.0.0.1:{port}")},
        {"echo": {"server": server.addr_str, "protocol": "udp"}},
    )
    clients = [UdpClient((LOCAL, port)) for _ in range(clients_n)]
    by_fd = {c.sock.fileno(): i for i, c in enumerate(clients)}
    foreign: list[tuple[int, bytes]] = []
    try:
        for seq in range(rounds):
            expected = {}
            for i, client in enumerate(clients):
                expected[i] = tag + tagged(i, seq)
                client.send(expected[i][len(tag) :])
            waiting = set(expected)
            deadline = 10.0
            while waiting:
                ready, _, _ = select.select([clients[i].sock for i in waiting], [], [], deadline)
                assert ready, f"round {seq}: no reply for clients {sorted(waiting)}"
                for sock in ready:
                    i = by_fd[sock.fileno()]
                    reply = clients[i].recv(1)
                    if reply != expected[i]:
                        foreign.append((i, reply[:20]))
                    waiting.discard(i)
            assert not foreign, f"(client, reply) not its own: {foreign[:10]}"
        extra = [(i, c.pending()) for i, c in enumerate(clients)]
        assert not [e for e in extra if e[1]], "replies beyond one per datagram"
    finally:
        for client in clients:
            client.close()
    sources = server.sources()
    assert len(sources) == clients_n, f"{len(sources)} source addresses at the server"
    assert len({port for _, port in sources}) == clients_n
    for source in sources:
        owners = {data[:5] for data in server.from_source(source)}
        assert len(owners) == 1, f"one source port carried clients {owners}"
        assert len(server.from_source(source)) == rounds
    for base in (tunnel.ll_admin, tunnel.cc_admin):
        samples = scrape(base)
        assert open_flows(samples, "echo") == clients_n, base
        assert metric(samples, "tcpgc_udp_flows_total", service="echo") == clients_n, base
        assert metric(samples, "tcpgc_udp_drops_total", service="echo") == 0, base
    [service] = status_json(tunnel.ll_admin)["services"]
    assert (service["protocol"], service["flows"]) == ("udp", clients_n), service


# ---------------------------------------------------------------------------- idle


@pytest.mark.parametrize("cc_idle", [1, None], ids=["cc-idle-1s", "cc-idle-default"])
def test_an_idle_flow_ends_on_both_nodes_and_the_next_datagram_starts_a_new_one(
    harness: Harness, cc_idle: int | None
) -> None:
    tag = b"E:"
    server = echo_server(harness, tag=tag)
    port = free_udp_port()
    cc_service: dict[str, object] = {"server": server.addr_str, "protocol": "udp"}
    if cc_idle is not None:
        cc_service["udp_idle_timeout"] = cc_idle
    tunnel = start_tunnel(
        harness,
        {"echo": udp_service(f"127.0.0.1:{port}", udp_idle_timeout=1)},
        {"echo": cc_service},
    )
    with UdpClient((LOCAL, port)) as client:
        me = format_addr(*client.local)
        ll_mark, cc_mark = tunnel.ll.mark(), tunnel.cc.mark()
        assert client.roundtrip(b"first") == tag + b"first"
        ll_end = tunnel.ll.wait_for(re_ll_flow_end("echo"), 10, since=ll_mark)
        cc_end = tunnel.cc.wait_for(re_cc_flow_end("echo"), 10, since=cc_mark)
        assert ll_end["client"] == me and cc_end["client"] == me, (ll_end.string, cc_end.string)
        # Whichever node's timer fires first ends the flow (both are 1 s, or the LL's).
        assert "idle" in ll_end["why"] + cc_end["why"], (ll_end.string, cc_end.string)
        if cc_idle is None:
            assert "idle" in ll_end["why"], ll_end.string
        counts = [ll_end[k] for k in ("din", "bin", "dout", "bout", "dropped")]
        assert counts == ["1", "5", "1", str(len(tag) + 5), "0"], ll_end.string
        assert 1.0 <= float(ll_end["secs"]) < 5.0, ll_end.string
        for base in (tunnel.ll_admin, tunnel.cc_admin):
            wait_metrics(base, lambda s: open_flows(s, "echo") == 0, 5, f"{base}: flows to 0")
        assert len(tunnel.ll.find_all(re_ll_flow_end("echo"), since=ll_mark)) == 1
        assert len(tunnel.cc.find_all(re_cc_flow_end("echo"), since=cc_mark)) == 1
        # The same client socket again: a new flow, so a new source port at the server.
        assert client.roundtrip(b"second") == tag + b"second"
    first, second = server.source_of(b"first"), server.source_of(b"second")
    assert first[1] != second[1], "the second datagram came through the ended flow"
    assert len(server.sources()) == 2
    for base in (tunnel.ll_admin, tunnel.cc_admin):
        samples = wait_metrics(
            base,
            lambda s: metric(s, "tcpgc_udp_flows_total", service="echo") >= 2,
            5,
            f"{base}: a second flow",
        )
        assert metric(samples, "tcpgc_udp_flows_total", service="echo") == 2, base


# ---------------------------------------------------------------------------- tcp + udp


def test_a_tcp_and_a_udp_service_of_one_agent_work_at_once(harness: Harness) -> None:
    tcp_server = harness.echo_server()
    udp_server = echo_server(harness, tag=b"U:")
    port = free_udp_port()
    tunnel = start_tunnel(
        harness,
        {"web": {"clients": "127.0.0.1:0"}, "dns": udp_service(f"127.0.0.1:{port}")},
        {
            "web": {"server": tcp_server.addr_str},
            "dns": {"server": udp_server.addr_str, "protocol": "udp"},
        },
    )
    errors: list[str] = []
    done = threading.Event()

    def tcp_echo() -> None:
        try:
            with connect(tunnel.clients["web"]) as sock:
                for _ in range(200):
                    block = os.urandom(4096)
                    sock.sendall(block)
                    if recv_exactly(sock, len(block)) != block:
                        errors.append("tcp: bytes changed")
                        return
                    if done.is_set():
                        break
        except (OSError, AssertionError) as exc:
            errors.append(f"tcp: {exc!r}")

    tcp = threading.Thread(target=tcp_echo)
    tcp.start()
    try:
        with UdpClient((LOCAL, port)) as client:
            for seq in range(200):
                payload = tagged(0, seq, 300)
                assert client.roundtrip(payload) == b"U:" + payload, f"udp datagram {seq}"
    finally:
        done.set()
        tcp.join(30)
    assert not tcp.is_alive() and not errors, errors
    assert tcp_server.connections == 1
    assert len(udp_server.sources()) == 1 and udp_server.count() == 200


# ---------------------------------------------------------------------------- check

_LL_UDP = 'cc = "127.0.0.1:0"\n[services.dns]\nclients = "127.0.0.1:5353"\nprotocol = "udp"\n'
_CC_UDP = 'll = "127.0.0.1:8001"\n[services.dns]\nserver = "127.0.0.1:53"\nprotocol = "udp"\n'
_LL_TCP = 'cc = "127.0.0.1:0"\n[services.web]\nclients = "127.0.0.1:8000"\n'
_CC_TCP = 'll = "127.0.0.1:8001"\n[services.web]\nserver = "127.0.0.1:80"\n'


def _case(role: str, text: str, line: int, key: str, name: str) -> object:
    return pytest.param(role, text, line, key, id=f"{role}-{name}")


@pytest.mark.parametrize(
    ("role", "text", "line", "key"),
    [
        _case("ll", _LL_UDP.replace('"udp"', '"sctp"'), 4, "services.dns.protocol", "sctp"),
        _case("ll", _LL_UDP + "max_flows = -1\n", 5, "services.dns.max_flows", "max_flows"),
        _case(
            "ll",
            _LL_UDP + "max_flows_per_source = -1\n",
            5,
            "services.dns.max_flows_per_source",
            "max_flows_per_source",
        ),  # fmt: skip
        _case(
            "ll",
            _LL_UDP + 'udp_idle_timeout = "x"\n',
            5,
            "services.dns.udp_idle_timeout",
            "idle-not-a-number",
        ),  # fmt: skip
        _case(
            "ll",
            _LL_UDP + "udp_idle_timeout = -1\n",
            5,
            "services.dns.udp_idle_timeout",
            "idle-negative",
        ),  # fmt: skip
        _case("ll", _LL_TCP + "max_flows = 10\n", 4, "services.web.max_flows", "tcp-max_flows"),
        _case(
            "ll",
            _LL_TCP + "udp_idle_timeout = 5\n",
            4,
            "services.web.udp_idle_timeout",
            "tcp-udp_idle_timeout",
        ),  # fmt: skip
        _case(
            "ll",
            _LL_TCP + "max_flows_per_source = 5\n",
            4,
            "services.web.max_flows_per_source",
            "tcp-max_flows_per_source",
        ),  # fmt: skip
        _case("cc", _CC_UDP.replace('"udp"', '"sctp"'), 4, "services.dns.protocol", "sctp"),
        _case(
            "cc",
            _CC_UDP + 'udp_idle_timeout = "x"\n',
            5,
            "services.dns.udp_idle_timeout",
            "idle-not-a-number",
        ),  # fmt: skip
        _case(
            "cc",
            _CC_UDP + "udp_idle_timeout = -1\n",
            5,
            "services.dns.udp_idle_timeout",
            "idle-negative",
        ),  # fmt: skip
        _case(
            "cc",
            _CC_TCP + "udp_idle_timeout = 5\n",
            4,
            "services.web.udp_idle_timeout",
            "tcp-udp_idle_timeout",
        ),  # fmt: skip
    ],
)
def test_check_names_a_bad_udp_key_in_one_line(
    tmp_path: Path, role: str, text: str, line: int, key: str
) -> None:
    path = tmp_path / f"{role}.toml"
    path.write_text(text)
    env = tcpgc_env({"TCPGC_TOKEN": make_token(tmp_path / "state")})
    result = run_tcpgc("check", "-c", str(path), "--role", role, env=env)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"{path}:{line}: {key}: " in lines[0], lines


def test_check_accepts_good_udp_configs(tmp_path: Path) -> None:
    env = tcpgc_env({"TCPGC_TOKEN": make_token(tmp_path / "state")})
    ll = tmp_path / "ll.toml"
    ll.write_text(
        _LL_UDP
        + "udp_idle_timeout = 30\nmax_flows = 500\nmax_flows_per_source = 20\n"
        + 'allow = ["127.0.0.0/8"]\n'
        + '[services.dns6]\nclients = "[::1]:5353"\nprotocol = "udp"\n'
        # a TCP service on the UDP service's port: TCP and UDP ports are apart
        + '[services.web]\nclients = "127.0.0.1:5353"\nprotocol = "tcp"\n'
    )
    result = run_tcpgc("check", "-c", str(ll), env=env)
    assert result.returncode == 0, result.stderr
    assert "valid LL config" in result.stdout, result.stdout
    cc = tmp_path / "cc.toml"
    cc.write_text(_CC_UDP + "udp_idle_timeout = 30\n" + _CC_TCP.split("\n", 1)[1])
    result = run_tcpgc("check", "-c", str(cc), env=env)
    assert result.returncode == 0, result.stderr
    assert "valid CC config" in result.stdout, result.stdout
