"""Attacks on the binding of data connections to their session, against real processes.

- An active man in the middle with a certificate of the LL's own CA (agents using
  `tls_ca` instead of a pin) passes the control connection through untouched and
  terminates TLS on every later connection: the agent must refuse those connections,
  so it reads no client's bytes.
- A passive eavesdropper on a plaintext LL–CC leg who can reach the agent port races
  the agent with the client ids it reads in OPEN: it must get no client, at any pool
  size, and the clients must still be served by their agent.
- An active attacker on a plaintext leg injects an OPEN into the control connection:
  the agent must act on nothing it cannot authenticate.
- An AUTH naming more services than allowed is closed within the handshake deadline.

Everything runs on 127.0.0.1. The in-test proxies are threads of this process.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from attack_tools import (
    CLOSE_MARGIN,
    HANDSHAKE_TIMEOUT,
    MARKER,
    MitmTlsProxy,
    _Pumps,
    attacker_tls_context,
    hostile,
    ll_refusal,
    read_until_closed,
    shut_both,
    start_env,
)
from pki_tools import certificate, key_pem, new_key, pem, write_private
from support import (
    RE_CC_JOINED,
    RE_LL_AGENT_JOINED,
    READY_TIMEOUT,
    Harness,
    format_addr,
    node_toml,
    parse_addr,
    recv_exactly,
    service_re,
)
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.handshake import key_id
from tcpgc.protocol.messages import (
    HEADER,
    MAX_PAYLOAD,
    MAX_SERVICES,
    MAX_VERSION,
    PROOF_SIZE,
    Data,
    Error,
    Hello,
    MessageType,
    Open,
    encode,
)


def echo_client(addr: tuple[str, int], payload: bytes, timeout: float = 15.0) -> bytes | str:
    """Send `payload`, return what came back (the echo), or the error as text."""
    try:
        with socket.create_connection(addr, timeout=timeout) as sock:
            sock.sendall(payload)
            return recv_exactly(sock, len(payload))
    except (OSError, AssertionError) as exc:
        return f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------- tls_ca MITM


class ControlPassingMitm(MitmTlsProxy):
    """Lets the first connection (the agent's control connection) through untouched,
    and terminates TLS on every later one with its own certificate, recording the
    cleartext both ways (`from_agent`, `to_agent`)."""

    def __init__(self, upstream: tuple[str, int], cert: Path, key: Path) -> None:
        self.to_agent = bytearray()
        self.passed = 0
        super().__init__(upstream, cert, key)

    def handle(self, conn: socket.socket) -> None:
        with self._lock:
            first, self.passed = self.passed == 0, self.passed + 1
        if not first:
            self._terminate(conn)
            return
        up = socket.create_connection(self.upstream, timeout=10)
        up.settimeout(None)
        if self._keep(up):
            self._spawn(self.pump, up, conn, None)
            self.pump(conn, up, None)

    def _terminate(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            down = self.server_ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            return  # the agent refused our certificate
        with self._lock:
            self.handshakes += 1
        try:
            raw = socket.create_connection(self.upstream, timeout=10)
            up = attacker_tls_context().wrap_socket(raw, server_hostname="127.0.0.1")
        except (ssl.SSLError, OSError):
            return  # the LL is gone
        down.settimeout(None)
        up.settimeout(None)
        if self._keep(down) and self._keep(up):
            self._spawn(self.pump, up, down, self.to_agent)
            self.pump(down, up, self.from_agent)


def test_tls_ca_mitm_on_data_connections_reads_nothing(harness: Harness, tmp_path: Path) -> None:
    ca_key = new_key()
    ca = certificate("tcpgc test CA", ca_key, None, ca_key, ca=True)
    ll_key, mitm_key = new_key(), new_key()
    files = {
        "ca": write_private(tmp_path / "ca.pem", pem(ca)),
        "ll_cert": write_private(
            tmp_path / "ll.pem", pem(certificate("ll", ll_key, ca, ca_key, server=True))
        ),
        "ll_key": write_private(tmp_path / "ll.key", key_pem(ll_key)),
        "mitm_cert": write_private(
            tmp_path / "mitm.pem", pem(certificate("ll", mitm_key, ca, ca_key, server=True))
        ),
        "mitm_key": write_private(tmp_path / "mitm.key", key_pem(mitm_key)),
    }
    state = harness.state_dir()
    ll_toml = tmp_path / "ll.toml"
    ll_toml.write_text(
        node_toml(
            {
                "cc": "127.0.0.1:0",
                "state_dir": str(state),
                "tls_cert": str(files["ll_cert"]),
                "tls_key": str(files["ll_key"]),
                "client_wait": 3.0,
            },
            {"default": {"clients": "127.0.0.1:0"}},
        )
    )
    token = harness.token(state)
    ll, agent_addr = harness.start_ll("-c", str(ll_toml))
    client_addr = parse_addr(ll.wait_for(service_re("default"), READY_TIMEOUT)["addr"])
    echo = harness.echo_server()
    mitm = ControlPassingMitm(agent_addr, files["mitm_cert"], files["mitm_key"])
    try:
        cc_toml = tmp_path / "cc.toml"
        cc_toml.write_text(
            node_toml(
                {"ll": mitm.addr_str, "tls_ca": str(files["ca"]), "reconnect_min": 0.2},
                {"default": {"server": echo.addr_str}},
            )
        )
        cc = harness.start_cc("-c", str(cc_toml), token=token)
        cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)  # the control connection went through
        ll.wait_for(RE_LL_AGENT_JOINED, READY_TIMEOUT)
        # Its ready connections go to the attacker, who has a certificate of the CA for
        # the LL's name: the agent refuses each, since the control connection's differs.
        cc.wait_for(r"cannot open a ready connection .*control connection", READY_TIMEOUT)
        payload = MARKER + b"GET /account HTTP/1.1\r\n\r\n"
        answer = echo_client(client_addr, payload, timeout=10)
        # The data connection dialed for the client is refused the same way.
        cc.wait_for(r"cannot open a data connection .*control connection", READY_TIMEOUT)
        refusals = cc.find_all(r"certificate on this connection is .* control connection")
    finally:
        mitm.stop()
    assert answer != payload, "the client was served through the man in the middle"
    assert MARKER not in bytes(mitm.to_agent), "the man in the middle read the client's bytes"
    assert MARKER not in bytes(mitm.from_agent)
    # One line per refused connection, and never one the agent did not see.
    assert 1 <= len(refusals) <= mitm.handshakes


# ---------------------------------------------------------------------------- plaintext taps


class FrameTap(_Pumps):
    """A plain TCP relay between agents and the LL that reads the frames the LL sends on
    the first connection (the control connection) as they pass. `on_open` is called
    with each OPEN's client id *before* the OPEN is passed on, as an eavesdropper next
    to the LL would see it first; `inject` adds bytes between two frames."""

    def __init__(self, upstream: tuple[str, int], on_open: Any = None) -> None:
        self.upstream = upstream
        self.on_open = on_open
        self.opens = 0
        self._to_agent: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._connections = 0
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        with self._lock:
            control, self._connections = self._connections == 0, self._connections + 1
        up = socket.create_connection(self.upstream, timeout=10)
        up.settimeout(None)
        if not self._keep(up):
            return
        if not control:
            self._spawn(self.pump, up, conn, None)
            self.pump(conn, up, None)
            return
        self._to_agent = conn
        self._spawn(self.pump, conn, up, None)
        self._read_frames(up, conn)

    def _read_frames(self, src: socket.socket, dst: socket.socket) -> None:
        buffer = bytearray()
        try:
            while chunk := src.recv(65536):
                buffer += chunk
                while len(buffer) >= HEADER.size:
                    kind, length = HEADER.unpack_from(buffer)
                    end = HEADER.size + length
                    if len(buffer) < end:
                        break
                    frame, buffer = bytes(buffer[:end]), buffer[end:]
                    if kind == MessageType.OPEN:
                        self.opens += 1
                        if self.on_open is not None:
                            self.on_open(frame[HEADER.size : HEADER.size + 16])
                    with self._send_lock:
                        dst.sendall(frame)
        except OSError:
            pass
        finally:
            shut_both(src, dst)

    def inject(self, frame: bytes) -> None:
        assert self._to_agent is not None, "no control connection yet"
        with self._send_lock:
            self._to_agent.sendall(frame)


class Hijacker:
    """For every client id it sees, claims the client on a connection of its own (a DATA
    with the id and a made-up proof) and keeps what the LL sends back."""

    def __init__(self, agent_addr: tuple[str, int]) -> None:
        self.agent_addr = agent_addr
        self.received: list[bytes] = []
        self.locals: list[str] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def claim(self, conn_id: bytes) -> None:
        sock = socket.create_connection(self.agent_addr, timeout=10)
        # Sent before the agent can see the OPEN: the race is the attacker's to win.
        sock.sendall(encode(Data(MAX_VERSION, conn_id, os.urandom(PROOF_SIZE))))
        with self._lock:
            self.locals.append(format_addr(*sock.getsockname()[:2]))
        thread = threading.Thread(target=self._read, args=(sock,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _read(self, sock: socket.socket) -> None:
        with sock:
            seen, _ = read_until_closed(sock, 3.0)
        with self._lock:
            self.received.append(seen)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(10)


@pytest.mark.parametrize("pool_size", [0, 4])
def test_passive_eavesdropper_hijacks_no_client(harness: Harness, pool_size: int) -> None:
    env = start_env(harness, plaintext=True, with_cc=False)
    hijacker = Hijacker(env.agent_addr)
    tap = FrameTap(env.agent_addr, on_open=hijacker.claim)
    holders: list[socket.socket] = []
    try:
        cc_toml = harness.tmp_path / "cc.toml"
        cc_toml.write_text(
            node_toml(
                {"ll": tap.addr_str, "insecure_plaintext": True, "pool_size": pool_size},
                {"default": {"server": env.servers["default"].addr_str}},
            )
        )
        mark = env.ll.mark()
        cc = harness.start_cc("-c", str(cc_toml), token=env.token)
        cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)
        env.ll.wait_for(RE_LL_AGENT_JOINED, READY_TIMEOUT, since=mark)
        client_addr = env.client_addrs["default"]
        # Clients that stay connected drain the agent's ready connections, so that the
        # next ones are offered over the control connection, where the tap sees them.
        for i in range(2 * pool_size):
            sock = socket.create_connection(client_addr, timeout=10)
            sock.sendall(b"hold %d" % i)
            assert recv_exactly(sock, len(b"hold %d" % i)) == b"hold %d" % i
            holders.append(sock)
        victims = 8
        payloads = [MARKER + b"cookie=%d" % i for i in range(victims)]
        with ThreadPoolExecutor(victims) as pool:
            answers = list(pool.map(lambda p: echo_client(client_addr, p), payloads))
        hijacker.join()
    finally:
        for sock in holders:
            sock.close()
        tap.stop()
    assert tap.opens >= 1, "no client was offered over the control connection: no race run"
    assert len(hijacker.received) == tap.opens
    for seen in hijacker.received:
        assert MARKER not in seen, "the eavesdropper read a client's bytes"
    # Every client was served, by its own agent: a forged claim costs a client nothing.
    assert answers == payloads
    for local in hijacker.locals:
        assert "bad proof" in ll_refusal(env.ll, local, since=mark)


def test_injected_open_on_plaintext_control_connection_is_refused(harness: Harness) -> None:
    env = start_env(harness, plaintext=True, with_cc=False)
    tap = FrameTap(env.agent_addr)
    try:
        cc_toml = harness.tmp_path / "cc.toml"
        cc_toml.write_text(
            node_toml(
                {"ll": tap.addr_str, "insecure_plaintext": True, "reconnect_min": 0.2},
                {"default": {"server": env.servers["default"].addr_str}},
            )
        )
        cc = harness.start_cc("-c", str(cc_toml), token=env.token)
        cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)
        served = env.served()
        mark = cc.mark()
        # An active attacker on the path: an OPEN of its own, between two real frames.
        tap.inject(encode(Open(os.urandom(16), "default", "203.0.113.9", 4444, "", 0)))
        reason = cc.wait_for(r"cannot connect to LL \S+: (?P<reason>.*MAC.*)", READY_TIMEOUT)
        assert "forged" in reason["reason"]
        # The agent dialed nothing for it, and serves clients again on a new session
        # (the tap passes later connections through untouched).
        cc.wait_for(RE_CC_JOINED, READY_TIMEOUT, since=mark)
        payload = MARKER + b"after"
        assert echo_client(env.client_addrs["default"], payload) == payload
    finally:
        tap.stop()
    assert env.served() - served == 1


# ---------------------------------------------------------------------------- oversized AUTH


def test_auth_naming_too_many_services_is_closed_within_the_deadline(harness: Harness) -> None:
    env = start_env(harness, plaintext=True)
    mark = env.ll.mark()
    names = b"".join(bytes([3]) + b"%03d" % i for i in range(MAX_SERVICES + 1))
    auth_payload = os.urandom(32) + os.urandom(16) + bytes([MAX_SERVICES + 1]) + names
    assert len(auth_payload) <= MAX_PAYLOAD
    auth = HEADER.pack(MessageType.AUTH, len(auth_payload)) + auth_payload
    hello = Hello(MAX_VERSION, MAX_VERSION, key_id(env.join_token.secret), os.urandom(32))
    with socket.create_connection(env.agent_addr, timeout=10) as sock:
        local = format_addr(*sock.getsockname()[:2])
        started = time.monotonic()
        sock.sendall(encode(hello))
        decoder = FrameDecoder()
        while (challenge := decoder.next_message()) is None:
            decoder.receive_data(sock.recv(4096))
        assert challenge.TYPE is MessageType.CHALLENGE
        sock.sendall(auth)
        received, closed = read_until_closed(sock, HANDSHAKE_TIMEOUT + CLOSE_MARGIN + 2)
    assert closed is not None, "the LL left the connection open"
    assert time.monotonic() - started < HANDSHAKE_TIMEOUT + CLOSE_MARGIN
    decoder.receive_data(received)
    error = decoder.next_message()
    assert isinstance(error, Error) and "more than 200" in error.message
    assert "more than 200" in ll_refusal(env.ll, local, since=mark)
    # Everyone else is served as before.
    payload = MARKER + b"still"
    assert echo_client(env.client_addrs["default"], payload) == payload


def test_agent_of_another_protocol_version_is_refused_naming_both(harness: Harness) -> None:
    env = start_env(harness, plaintext=True, with_cc=False)
    old = Hello(1, 1, key_id(env.join_token.secret), os.urandom(32))
    outcome = hostile(env.agent_addr, encode(old))
    messages = outcome.messages()
    assert len(messages) == 1 and isinstance(messages[0], Error)
    assert "1-1" in messages[0].message and f"{MAX_VERSION}-{MAX_VERSION}" in messages[0].message
