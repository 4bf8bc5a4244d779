"""Hostile clients of a UDP service, against real `tcpgc ll` and `tcpgc cc` processes: a
flood of new source ports against `max_flows`, one address opening more flows than
`max_flows_per_source`, and garbage or empty datagrams. Each time the flows that were
there keep working, and what was turned away is counted by reason."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from attack_tools import rss_kib
from support import Harness
from udp_tools import (
    UdpClient,
    echo_server,
    free_udp_port,
    metric,
    open_flows,
    scrape,
    send_windowed,
    start_tunnel,
    udp_service,
    wait_metrics,
)

pytestmark = pytest.mark.timeout(60)

LOCAL = "127.0.0.1"
TAG = b"E:"


def test_a_flood_of_new_sources_stays_within_max_flows(harness: Harness) -> None:
    max_flows, bursts, burst = 50, 30, 100
    server = echo_server(harness, tag=TAG)
    port = free_udp_port()
    tunnel = start_tunnel(
        harness,
        {"echo": udp_service(f"127.0.0.1:{port}", max_flows=max_flows)},
        {"echo": {"server": server.addr_str, "protocol": "udp"}},
    )
    with UdpClient((LOCAL, port)) as keeper:
        assert keeper.roundtrip(b"keep") == TAG + b"keep"
        rss_before = rss_kib(tunnel.ll.proc.pid)
        peak = 0.0
        for n in range(bursts):
            # `burst` sockets, one datagram each, closed at once: a new source port each.
            for i in range(burst):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flooder:
                    flooder.sendto(b"flood %d" % (n * burst + i), (LOCAL, port))
            # The flow that was there first is answered between bursts, every time.
            ping = b"keep %d" % n
            assert keeper.roundtrip(ping, timeout=3) == TAG + ping, f"after burst {n}"
            if n % 5 == 4:
                flows = open_flows(scrape(tunnel.ll_admin), "echo")
                assert flows <= max_flows, f"{flows} flows open after burst {n}"
                peak = max(peak, flows)
        rss_after = rss_kib(tunnel.ll.proc.pid)
        for n in range(5):
            assert keeper.roundtrip(b"after %d" % n) == TAG + b"after %d" % n
    assert tunnel.ll.proc.poll() is None and tunnel.cc.proc.poll() is None
    flooded = bursts * burst
    ll = scrape(tunnel.ll_admin)
    assert peak == max_flows and open_flows(ll, "echo") == max_flows, (peak, ll)
    assert metric(ll, "tcpgc_udp_flows_total", service="echo") == max_flows
    dropped = metric(ll, "tcpgc_udp_drops_total", service="echo", reason="max_flows")
    # Every flood datagram past the first 49 is dropped and counted, but for the few
    # whose (reused) source port is one of an open flow, and any the kernel dropped.
    assert 0.9 * flooded <= dropped <= flooded - (max_flows - 1), dropped
    assert open_flows(scrape(tunnel.cc_admin), "echo") <= max_flows
    assert len(server.sources()) <= max_flows
    grown = rss_after - rss_before
    assert grown < 20 * 1024, f"the LL grew by {grown} KiB under the flood"


def test_one_address_gets_max_flows_per_source_and_the_others_go_on(harness: Harness) -> None:
    server = echo_server(harness, tag=TAG)
    port = free_udp_port()
    tunnel = start_tunnel(
        harness,
        {"echo": udp_service(f"127.0.0.1:{port}", max_flows_per_source=5)},
        {"echo": {"server": server.addr_str, "protocol": "udp"}},
    )
    five = [UdpClient((LOCAL, port)) for _ in range(5)]
    sixth = UdpClient((LOCAL, port))
    other = UdpClient((LOCAL, port), bind_host="127.0.0.2")
    try:
        for i, client in enumerate(five):
            assert client.roundtrip(b"flow %d" % i) == TAG + b"flow %d" % i
        sixth.send(b"sixth")
        wait_metrics(
            tunnel.ll_admin,
            lambda s: (
                metric(s, "tcpgc_udp_drops_total", service="echo", reason="source_flows") >= 1
            ),
            5,
            "the sixth flow of 127.0.0.1 dropped",
        )
        # Another address is not held back by 127.0.0.1's flows.
        assert other.roundtrip(b"other") == TAG + b"other"
        for i, client in enumerate(five):
            assert client.roundtrip(b"again %d" % i) == TAG + b"again %d" % i
        assert sixth.pending() == [], "the sixth flow was relayed"
    finally:
        for client in (*five, sixth, other):
            client.close()
    assert b"sixth" not in [data for _, data in server.seen]
    assert len(server.sources()) == 6
    ll = scrape(tunnel.ll_admin)
    assert metric(ll, "tcpgc_udp_drops_total", service="echo", reason="source_flows") == 1
    assert open_flows(ll, "echo") == 6
    assert metric(ll, "tcpgc_udp_flows_total", service="echo") == 6


def test_a_denied_address_and_a_service_without_agent_are_dropped_and_counted(
    harness: Harness,
) -> None:
    server = echo_server(harness, tag=TAG)
    port, orphan_port = free_udp_port(), free_udp_port()
    tunnel = start_tunnel(
        harness,
        {
            "echo": udp_service(f"127.0.0.1:{port}", deny=["127.0.0.2/32"]),
            "orphan": udp_service(f"127.0.0.1:{orphan_port}"),  # no agent serves it
        },
        {"echo": {"server": server.addr_str, "protocol": "udp"}},
        ll_options={"client_wait": 1.0},
    )
    with (
        UdpClient((LOCAL, port), bind_host="127.0.0.2") as denied,
        UdpClient((LOCAL, orphan_port)) as orphan,
        UdpClient((LOCAL, port)) as allowed,
    ):
        denied.send(b"denied")
        orphan.send(b"orphan")
        assert allowed.roundtrip(b"allowed") == TAG + b"allowed"
        samples = wait_metrics(
            tunnel.ll_admin,
            lambda s: metric(s, "tcpgc_udp_drops_total", service="orphan", reason="no_agent") >= 1,
            10,
            "the orphan service's datagram dropped for want of an agent",
        )
        assert metric(samples, "tcpgc_udp_drops_total", service="echo", reason="denied") == 1
        assert allowed.roundtrip(b"still") == TAG + b"still"
        assert denied.pending() == [] and orphan.pending() == []
    assert [data for _, data in server.seen] == [b"allowed", b"still"]
    assert tunnel.ll.find_all(r"'orphan'.*no agent"), "no warning of the agentless flow"


def _until(client: UdpClient, wanted: bytes) -> list[bytes]:
    """Datagrams received up to and including `wanted` (at most 3 before it)."""
    got = [client.recv()]
    while got[-1] != wanted:
        assert len(got) <= 3, f"waiting for {wanted!r}, got {got}"
        got.append(client.recv())
    return got


def _garbage() -> list[bytes]:
    """Payloads that look like the tunnel's own framing, or like other protocols, then
    random ones: a UDP service carries every byte as data."""
    shaped = [
        b"\x00\x00\x00\x00",  # a chunk header of length 0: the end marker
        b"\x00" * 64,
        b"\x00",
        b"\xff\xff\xff\xff" + os.urandom(60),  # a chunk header claiming 4 GiB
        struct.pack("!I", 65_536) + os.urandom(100),  # longer than any datagram
        struct.pack("!I", 5) + b"abc",  # a chunk cut short
        struct.pack("!I", 3) + b"abc" + struct.pack("!I", 0),  # a chunk and an end marker
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(40),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    sizes = [1 + int.from_bytes(os.urandom(2), "big") % 3000 for _ in range(200)]
    return shaped + [os.urandom(size) for size in sizes]


def test_garbage_and_empty_datagrams_break_no_flow(harness: Harness) -> None:
    server = echo_server(harness)  # no tag: an empty datagram echoes as an empty one
    port = free_udp_port()
    tunnel = start_tunnel(
        harness,
        {"echo": udp_service(f"127.0.0.1:{port}")},
        {"echo": {"server": server.addr_str, "protocol": "udp"}},
    )
    target = (LOCAL, port)
    with UdpClient(target) as keeper, UdpClient(target) as mid, UdpClient(target) as first:
        assert keeper.roundtrip(b"keep") == b"keep"
        # An empty datagram inside a flow: carried as one (an empty reply) or dropped;
        # either way the flow goes on, through the same source port at the server.
        assert mid.roundtrip(b"before") == b"before"
        mid.send(b"")
        mid.send(b"after")
        assert _until(mid, b"after") in ([b"after"], [b"", b"after"])
        assert server.source_of(b"before") == server.source_of(b"after")
        seen = server.from_source(server.source_of(b"before"))
        assert seen in ([b"before", b"after"], [b"before", b"", b"after"]), seen
        # An empty datagram as the first of a new client.
        first.send(b"")
        first.send(b"first")
        assert _until(first, b"first") in ([b"first"], [b"", b"first"])
        assert keeper.roundtrip(b"keep 2") == b"keep 2"
        # Garbage is data: every byte of it comes back, whole and in order.
        with UdpClient(target) as junk:
            payloads = _garbage()
            assert send_windowed(junk, payloads, 64_000) == payloads
            assert junk.pending() == []
        assert keeper.roundtrip(b"keep 3") == b"keep 3"
    assert tunnel.ll.proc.poll() is None and tunnel.cc.proc.poll() is None
    ll = scrape(tunnel.ll_admin)
    assert metric(ll, "tcpgc_udp_flows_total", service="echo") == 4, "a flow restarted"
    assert open_flows(ll, "echo") == 4
    drops = {
        dict(labels).get("reason"): v
        for (name, labels), v in ll.items()
        if name == "tcpgc_udp_drops_total" and v
    }
    assert set(drops) <= {"empty"}, f"datagrams dropped: {drops}"
