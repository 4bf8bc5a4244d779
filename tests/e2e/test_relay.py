"""Relay properties through real tunnels, on both byte paths.

TLS (the default) relays through Python with the buffered relay; --insecure-plaintext
relays with splice(2). Each property is checked on both: exact bytes both ways,
half-close, reset propagation, back-pressure (a reader that stops does not grow the
nodes' memory), and for splice, that idle connections hold no pipes.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from support import (
    Harness,
    ThreadedServer,
    Tunnel,
    connect,
    recv_exactly,
    sink_source_exchange,
)

MODES = {"tls": (), "plaintext": ("--insecure-plaintext",)}


def _tunnel(harness: Harness, server: str, mode: str) -> Tunnel:
    flags = MODES[mode]
    return harness.tunnel(server, ll_args=flags, cc_args=flags)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _pipes(pid: int) -> int:
    fd_dir = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd).startswith("pipe:"):
                count += 1
        except OSError:
            pass  # closed while we looked
    return count


@pytest.mark.parametrize("mode", MODES)
def test_exact_bytes_and_half_close(harness: Harness, mode: str) -> None:
    """20 MB up, half-close, 20 MB down: both SHA-256 match (SinkSourceServer)."""
    server = harness.sink_source_server(reply_size=20 << 20)
    tunnel = _tunnel(harness, server.addr_str, mode)
    assert sink_source_exchange(tunnel.client_addr, 20 << 20) == 20 << 20


class _ResettingServer(ThreadedServer):
    """Reads a little, then closes with SO_LINGER 0: the client side must see a reset."""

    def handle(self, conn: socket.socket) -> None:
        conn.recv(16)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


@pytest.mark.parametrize("mode", MODES)
def test_server_reset_reaches_client(harness: Harness, mode: str) -> None:
    server = harness.adopt(_ResettingServer().start())
    tunnel = _tunnel(harness, server.addr_str, mode)
    with connect(tunnel.client_addr) as sock:
        sock.sendall(b"hello")
        with pytest.raises(ConnectionResetError):
            # A reset arrives as ECONNRESET, on recv or on a following send.
            for _ in range(50):
                if sock.recv(1024) == b"":
                    raise AssertionError("clean EOF where a reset was expected")
                sock.sendall(b"more")


class _StallingServer(ThreadedServer):
    """Accepts and does not read until told to; then reads and counts everything."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()
        self.total = 0
        self.done = threading.Event()

    def handle(self, conn: socket.socket) -> None:
        self.go.wait(60)
        while data := conn.recv(1 << 20):
            self.total += len(data)
        self.done.set()


@pytest.mark.parametrize("mode", MODES)
def test_slow_reader_slows_writer(harness: Harness, mode: str) -> None:
    """While the server does not read, the client soon cannot send more, and neither
    node's memory grows by more than a few MB: nothing buffers without bound."""
    server = _StallingServer()
    harness.adopt(server.start())
    tunnel = _tunnel(harness, server.addr_str, mode)
    before = {node.pid: _rss_kib(node.pid) for node in (tunnel.ll, tunnel.cc)}
    chunk = os.urandom(1 << 20)
    sent = 0
    with connect(tunnel.client_addr) as sock:
        sock.settimeout(2.0)
        try:
            while sent < 512 << 20:  # far more than all buffers on the way together
                sent += sock.send(chunk)
        except TimeoutError:
            pass  # the path is full: back-pressure reached the client
        assert sent < 512 << 20, "512 MB went in without the server reading: no back-pressure"
        grown = {pid: _rss_kib(pid) - kib for pid, kib in before.items()}
        # Kernel socket buffers hold most of what was sent; what the nodes themselves
        # may hold is their write-buffer bound per direction, a few MB at most.
        assert all(kib < 24 * 1024 for kib in grown.values()), (sent, grown)
        server.go.set()
        sock.settimeout(30)
        sock.sendall(b"end")
        sent += 3
        sock.shutdown(socket.SHUT_WR)
        assert server.done.wait(30)
    assert server.total == sent


def test_idle_connections_hold_no_pipes(harness: Harness) -> None:
    """With splice, a pipe is taken only while bytes are in flight."""
    server = harness.echo_server()
    tunnel = _tunnel(harness, server.addr_str, "plaintext")
    held = []
    try:
        for i in range(200):
            sock = connect(tunnel.client_addr)
            held.append(sock)
            payload = i.to_bytes(4, "big") * 64
            sock.sendall(payload)
            assert recv_exactly(sock, len(payload)) == payload
        for node in (tunnel.ll, tunnel.cc):
            # The pool keeps at most 64 idle pipes (two fds each) for reuse.
            assert _pipes(node.pid) <= 2 * 64, (node.name, _pipes(node.pid))
    finally:
        for sock in held:
            sock.close()


def test_the_relay_factory_imports_without_fcntl() -> None:
    """Where fcntl (and so splice) is missing, the factory imports and uses the copy
    engine: only the splice engine imports Linux-only modules."""
    code = (
        "import sys\n"
        "sys.modules['fcntl'] = None\n"  # `import fcntl` now fails, as on Windows
        "import tcpgc.relay.factory as factory\n"
        "assert not factory.splice_available()\n"
        "assert 'tcpgc.relay.splice' not in sys.modules\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
