"""Reused data connections, through real nodes, over TLS and in plaintext (where the
relay splices the chunked stream): after a client is done, its ready data connection
carries the next client (chunked stream, end markers both ways). Every client still
gets exactly its own bytes, half-close and resets still cross, and a connection that
ended badly is never reused."""

from __future__ import annotations

import hashlib
import socket
import struct
import time
from pathlib import Path

import pytest

from support import (
    Harness,
    ThreadedServer,
    Tunnel,
    connect,
    echo_roundtrip,
    established_ports,
    recv_exactly,
    recv_until_eof,
    sink_source_exchange,
)
from test_admin import admin_url, scrape, total

ADMIN = ("--admin", "127.0.0.1:0")


@pytest.fixture(params=["tls", "plaintext"])
def mode(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """The flags of both nodes: the default TLS, or plaintext (splice relay)."""
    return ("--insecure-plaintext",) if request.param == "plaintext" else ()


def _reused(tunnel: Tunnel) -> float:
    return total(scrape(admin_url(tunnel.cc)), "tcpgc_data_connections_reused_total")


def _wait_reused(tunnel: Tunnel, expected: int, timeout: float = 10.0) -> float:
    """The reuse count once it reaches `expected` (each clean client gives its data
    connection back, a moment after it is done), or whatever it is at the timeout."""
    deadline = time.monotonic() + timeout
    while (count := _reused(tunnel)) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def _tunnel(harness: Harness, server: str, flags: tuple[str, ...]) -> Tunnel:
    """A tunnel whose agent holds its full pool of ready connections (4), so that every
    client of these tests rides on one (clients offered over the control connection
    when none is ready get a single-use data connection)."""
    tunnel = harness.tunnel(server, ll_args=[*flags, *ADMIN], cc_args=[*flags, *ADMIN])
    wait_pool_full(tunnel)
    return tunnel


def wait_pool_full(tunnel: Tunnel, size: int = 4) -> None:
    """Until the agent (started with ADMIN) holds its `size` ready connections."""
    deadline = time.monotonic() + 10
    while total(scrape(admin_url(tunnel.cc)), "tcpgc_pool_size") < size:
        assert time.monotonic() < deadline, "the ready pool did not fill"
        time.sleep(0.05)


def wait_pool_renewed(tunnel: Tunnel, size: int, timeout: float = 10.0) -> None:
    """Until every connection the agent holds to the LL now, but its control connection,
    has been closed, and `size` new ones (its ready pool) are up besides the control."""
    before = established_ports(tunnel.agent_addr)
    deadline = time.monotonic() + timeout
    while True:
        now = established_ports(tunnel.agent_addr)
        if len(now & before) <= 1 and len(now - before) >= size:
            return
        assert time.monotonic() < deadline, f"pool not renewed: {before} then {now}"
        time.sleep(0.05)


def test_sequential_clients_reuse_data_connections(harness: Harness, mode: tuple[str, ...]) -> None:
    """60 clients one after another, each with its own bytes and a half-close: each gets
    exactly its bytes back, then EOF, and every data connection is given back."""
    tunnel = _tunnel(harness, harness.echo_server().addr_str, mode)
    for i in range(60):
        payload = hashlib.sha256(str(i).encode()).digest() * (1 + i % 7)
        with connect(tunnel.client_addr) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == payload, f"client {i}"
    assert _wait_reused(tunnel, 60) == 60
    assert "dropped" not in tunnel.ll.output()


def test_connections_dialed_beyond_the_pool_join_it(
    harness: Harness, mode: tuple[str, ...]
) -> None:
    """20 clients at once outnumber the 4 ready connections: the others are carried on
    connections dialed for them, and every one of the 20 is offered again afterwards."""
    tunnel = _tunnel(harness, harness.echo_server().addr_str, mode)
    socks = [connect(tunnel.client_addr) for _ in range(20)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(b"client %02d" % i)
        for i, sock in enumerate(socks):
            assert recv_exactly(sock, 9) == b"client %02d" % i
    finally:
        for sock in socks:
            sock.close()
    assert _wait_reused(tunnel, 20) == 20
    assert total(scrape(admin_url(tunnel.cc)), "tcpgc_pool_size") >= 20


def test_bulk_transfers_back_to_back_on_reused_connections(
    harness: Harness, mode: tuple[str, ...]
) -> None:
    """5 MB up and 5 MB down, three times in a row: the SHA-256 of each matches."""
    server = harness.sink_source_server(reply_size=5 << 20)
    tunnel = _tunnel(harness, server.addr_str, mode)
    for _ in range(3):
        assert sink_source_exchange(tunnel.client_addr, 5 << 20) == 5 << 20
    for i in range(10):
        assert sink_source_exchange(tunnel.client_addr, 1000 + i) == 5 << 20
    assert _wait_reused(tunnel, 13) == 13


class _GreetAndClose(ThreadedServer):
    """Speaks first and closes without reading: the server's end comes first."""

    def handle(self, conn: socket.socket) -> None:
        conn.sendall(b"hello from the server\n")
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(1024):  # until the client's EOF
            pass


def test_server_that_closes_first(harness: Harness, mode: tuple[str, ...]) -> None:
    server = harness.adopt(_GreetAndClose().start())
    tunnel = _tunnel(harness, server.addr_str, mode)
    for i in range(20):
        with connect(tunnel.client_addr) as sock:
            assert recv_until_eof(sock) == b"hello from the server\n", f"client {i}"
            sock.sendall(b"late words")  # still allowed: only the server's side ended
            sock.shutdown(socket.SHUT_WR)
    assert _wait_reused(tunnel, 20) == 20


class _RecordingEcho(ThreadedServer):
    """Echoes, and counts the connections that ended with a reset."""

    def __init__(self) -> None:
        super().__init__()
        self.resets = 0

    def handle(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except ConnectionResetError:
            self.resets += 1


def test_reset_client_is_not_reused_and_does_not_disturb_the_next(
    harness: Harness, mode: tuple[str, ...]
) -> None:
    """A client that resets mid-stream resets the server side; its data connection is
    dropped rather than reused, and the clients after it get exactly their bytes."""
    server = harness.adopt(_RecordingEcho().start())
    assert isinstance(server, _RecordingEcho)
    tunnel = _tunnel(harness, server.addr_str, mode)
    assert echo_roundtrip(tunnel.client_addr, b"warm-up") == b"warm-up"
    for i in range(5):
        sock = connect(tunnel.client_addr)
        sock.sendall(b"x" * 1000)
        recv_exactly(sock, 1000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        payload = f"after reset {i}".encode() * 50
        assert echo_roundtrip(tunnel.client_addr, payload) == payload
    deadline = time.monotonic() + 10
    while server.resets < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.resets == 5
    # The six clean clients gave their connection back, the five reset ones did not.
    assert _wait_reused(tunnel, 6) == 6
    # The agent logs each connection done after deciding whether to reuse it: once all
    # eleven are logged, no reuse can still be counted.
    tunnel.cc.wait_count(r"service '\S+' connection done after", 11, 10)
    assert _reused(tunnel) == 6


def test_clients_that_speak_first_after_the_pool_was_renewed(
    harness: Harness, mode: tuple[str, ...], tmp_path: Path
) -> None:
    """The agent renews ready connections idle for `pool_ttl` (closing them after a
    RETIRE frame). A client that arrives after a lull must not be sent, first bytes and
    all, on a connection the agent closed: every one is served."""
    config = tmp_path / "cc.toml"
    config.write_text("pool_ttl = 0.5\npool_size = 2\n")
    tunnel = harness.tunnel(
        harness.echo_server().addr_str, ll_args=list(mode), cc_args=[*mode, "-c", str(config)]
    )
    for i in range(4):
        wait_pool_renewed(tunnel, size=2)  # every ready connection is renewed meanwhile
        with connect(tunnel.client_addr, timeout=10) as sock:
            sock.sendall(b"first %d" % i)  # right away: rides with the OPEN
            assert recv_exactly(sock, 7) == b"first %d" % i
    assert "not offered to another agent" not in tunnel.ll.output()
