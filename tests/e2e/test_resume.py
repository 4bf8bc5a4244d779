"""Resumable streams on loopback: the agent reaches its LL through a relay the test cuts
(every connection of the leg reset at once), and the clients' connections go on.

The network-level versions (silent partitions, a changed address, resets from a
firewall) are in tests/netns/test_resume_netns.py.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cut_relay import CuttableRelay
from reliability_tools import cc_config, ll_config
from support import (
    RE_CC_JOINED,
    RE_LL_AGENT_JOINED,
    RE_LL_AGENT_PORT,
    READY_TIMEOUT,
    EchoServer,
    Harness,
    Node,
    ThreadedServer,
    format_addr,
    parse_addr,
    service_re,
)

RE_LL_RESUMED = (
    r"client (?P<peer>\S+) of service '(?P<svc>[^']+)' resumed after (?P<pause>[\d.]+) s: "
    r"(?P<replayed>\d+) bytes replayed"
)
RE_CC_RESUMED = (
    r"service '(?P<svc>[^']+)' connection (?P<id>[0-9a-f]+) resumed after (?P<pause>[\d.]+) s: "
    r"(?P<replayed>\d+) bytes replayed"
)


class Leg:
    """LL and CC joined through a `CuttableRelay`, an echo server behind the CC."""

    def __init__(self, harness: Harness, tmp: Path, plaintext: bool, **ll_extra: object) -> None:
        self.echo = harness.echo_server()
        state = harness.state_dir()
        token = harness.token(state)
        mode = {"insecure_plaintext": True} if plaintext else {}
        ll_toml = ll_config(
            tmp / "ll.toml", cc="127.0.0.1:0", services={"default": "127.0.0.1:0"},
            state_dir=state, heartbeat=1.0, **mode, **ll_extra,
        )  # fmt: skip
        self.ll = harness.node("ll", "-c", str(ll_toml), name="ll")
        agent = parse_addr(self.ll.wait_for(RE_LL_AGENT_PORT, READY_TIMEOUT)["addr"])
        self.client = parse_addr(self.ll.wait_for(service_re("default"), READY_TIMEOUT)["addr"])
        self.relay = CuttableRelay(agent)
        cc_toml = cc_config(
            tmp / "cc.toml", ll=[self.relay.addr_str],
            services={"default": format_addr(*self.echo.addr)},
            reconnect_min=0.1, reconnect_max=0.5, connect_timeout=2.0, **mode,
        )  # fmt: skip
        self.cc: Node = harness.start_cc("-c", str(cc_toml), token=token)
        self.cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)
        self.ll.wait_for(RE_LL_AGENT_JOINED, READY_TIMEOUT)


@pytest.fixture
def relays() -> Iterator[list[CuttableRelay]]:
    made: list[CuttableRelay] = []
    yield made
    for relay in made:
        relay.stop()


def make_leg(
    harness: Harness, tmp: Path, relays: list[CuttableRelay], plaintext: bool, **extra: object
) -> Leg:
    leg = Leg(harness, tmp, plaintext, **extra)
    relays.append(leg.relay)
    return leg


class EchoStream:
    """One client sending `total` bytes in pieces and reading the echo as it goes, in
    two threads; `error` holds what went wrong, if anything."""

    def __init__(
        self, addr: tuple[str, int], total: int, piece: int = 64 * 1024, pause: float = 0.002
    ) -> None:
        self.payload = os.urandom(total)
        self.sock = socket.create_connection(addr, timeout=30)
        self.received = bytearray()
        self.sent = 0
        self.error: BaseException | None = None
        self.piece = piece
        self.pause = pause
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader.start()
        self._writer.start()

    def _write(self) -> None:
        try:
            for start in range(0, len(self.payload), self.piece):
                self.sock.sendall(self.payload[start : start + self.piece])
                self.sent = start + self.piece
                time.sleep(self.pause)  # paced: the cut lands mid-transfer
            self.sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:
            self.error = exc

    def _read(self) -> None:
        try:
            while data := self.sock.recv(1 << 16):
                self.received += data
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float) -> None:
        self._writer.join(timeout)
        self._reader.join(timeout)
        self.sock.close()


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("plaintext", [False, True], ids=["tls", "plaintext"])
def test_a_transfer_survives_a_reset_of_every_leg_connection(
    harness: Harness, tmp_path: Path, relays: list[CuttableRelay], plaintext: bool
) -> None:
    leg = make_leg(harness, tmp_path, relays, plaintext)
    ll_mark, cc_mark = leg.ll.mark(), leg.cc.mark()
    stream = EchoStream(leg.client, 24 * 1024 * 1024)
    wait_until(lambda: len(stream.received) > 4 * 1024 * 1024, 30, "4 MB echoed")
    assert leg.relay.cut() >= 2  # the control connection and the stream's data connection
    ll_resumed = leg.ll.wait_for(RE_LL_RESUMED, 20, since=ll_mark)
    cc_resumed = leg.cc.wait_for(RE_CC_RESUMED, 20, since=cc_mark)
    stream.finish(60)
    assert stream.error is None
    assert len(stream.received) == len(stream.payload)
    assert hashlib.sha256(stream.received).digest() == hashlib.sha256(stream.payload).digest()
    assert float(ll_resumed["pause"]) < 10 and float(cc_resumed["pause"]) < 10
    leg.ll.wait_for(r"done after .* closed$", 10, since=ll_mark)


def test_several_cuts_in_a_row_and_many_streams(
    harness: Harness, tmp_path: Path, relays: list[CuttableRelay]
) -> None:
    leg = make_leg(harness, tmp_path, relays, plaintext=False)
    ll_mark = leg.ll.mark()
    # 1 MiB each in 8 KiB pieces every 20 ms: about 3 s, cut three times on the way.
    streams = [EchoStream(leg.client, 1024 * 1024, piece=8 * 1024, pause=0.02) for _ in range(20)]
    for cut in range(3):
        wait_until(
            lambda c=cut: all(len(s.received) > (c + 1) * 200 * 1024 for s in streams),
            30,
            f"every stream past {(cut + 1) * 200} KiB",
        )
        leg.relay.cut()
        leg.ll.wait_count(RE_LL_RESUMED, 20 * (cut + 1), 30, since=ll_mark)
    for stream in streams:
        stream.finish(60)
        assert stream.error is None
        assert stream.received == stream.payload


def test_with_resume_window_0_a_cut_closes_the_streams(
    harness: Harness, tmp_path: Path, relays: list[CuttableRelay]
) -> None:
    leg = make_leg(harness, tmp_path, relays, plaintext=False, resume_window=0)
    stream = EchoStream(leg.client, 64 * 1024 * 1024)
    wait_until(lambda: len(stream.received) > 1024 * 1024, 30, "1 MB echoed")
    leg.relay.cut()
    stream.finish(20)
    assert len(stream.received) < len(stream.payload)
    assert isinstance(stream.error, ConnectionResetError | BrokenPipeError), stream.error
    assert not leg.ll.find_all(RE_LL_RESUMED)


def test_a_stream_not_resumed_within_its_window_is_reset_on_both_sides(
    harness: Harness, tmp_path: Path, relays: list[CuttableRelay]
) -> None:
    leg = make_leg(harness, tmp_path, relays, plaintext=False, resume_window=2)
    ll_mark, cc_mark = leg.ll.mark(), leg.cc.mark()
    stream = EchoStream(leg.client, 64 * 1024 * 1024)
    wait_until(lambda: len(stream.received) > 1024 * 1024, 30, "1 MB echoed")
    leg.relay.refuse = True  # the leg stays down
    cut = time.monotonic()
    leg.relay.cut()
    leg.ll.wait_for(r"waits up to 2 s for its agent to resume", 10, since=ll_mark)
    leg.ll.wait_for(r"of service 'default' not resumed within 2 s: closing it", 10, since=ll_mark)
    leg.cc.wait_for(r"connection [0-9a-f]+ not resumed within 2 s: closing it", 10, since=cc_mark)
    stream.finish(10)
    assert time.monotonic() - cut < 8
    assert isinstance(stream.error, ConnectionResetError | BrokenPipeError), stream.error
    # The echo server's side was reset too: it holds no connection any more.
    wait_until(lambda: open_connections(leg.echo) == 0, 10, "the server's connection closed")


def open_connections(server: EchoServer) -> int:
    with server._lock:
        return len(server._conns)


class TwoPartServer(ThreadedServer):
    """Sends `first` bytes, waits for `go`, sends `second` bytes and closes."""

    def __init__(self, first: bytes, second: bytes) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.go = threading.Event()

    def handle(self, conn: socket.socket) -> None:
        conn.sendall(self.first)
        if self.go.wait(30):
            conn.sendall(self.second)


def test_the_end_of_a_download_sent_while_the_leg_is_down_arrives_after_it(
    harness: Harness, tmp_path: Path, relays: list[CuttableRelay]
) -> None:
    leg = make_leg(harness, tmp_path, relays, plaintext=False)
    first, second = os.urandom(2 * 1024 * 1024), os.urandom(1024 * 1024)
    server = TwoPartServer(first, second).start()
    harness.adopt(server)
    # The same LL and agent, a second agent config pointing at the two-part server.
    leg.cc.stop()
    cc_toml = cc_config(
        tmp_path / "cc2.toml", ll=[leg.relay.addr_str], services={"default": server.addr_str},
        reconnect_min=0.1, reconnect_max=0.5, connect_timeout=2.0,
    )  # fmt: skip
    mark = leg.ll.mark()
    cc = harness.start_cc("-c", str(cc_toml), token=harness.token(harness.state_dir()))
    cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)
    leg.ll.wait_for(RE_LL_AGENT_JOINED, READY_TIMEOUT, since=mark)
    with socket.create_connection(leg.client, timeout=30) as sock:
        got = bytearray()
        while len(got) < len(first):
            got += sock.recv(1 << 16)
        leg.relay.refuse = True
        leg.relay.cut()
        server.go.set()  # the rest, and the server's close, while the leg is down
        time.sleep(1.0)  # the leg stays down for a while: nothing to wait for but time
        leg.relay.refuse = False
        while data := sock.recv(1 << 16):
            got += data
    assert bytes(got) == first + second
    leg.ll.wait_for(RE_LL_RESUMED, 10, since=mark)
