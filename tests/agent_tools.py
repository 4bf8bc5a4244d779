"""Helpers for the tests of agents with credentials of their own (`tcpgc agent`, `tcpgc
cc --expose`): an LL with a config file, agents added through the CLI, CCs that expose
ports, free port ranges, and a paced echo stream that checks every byte it gets back.

Everything runs on 127.0.0.1 with real `tcpgc` processes; each process is the
harness's, so it is stopped at teardown whatever the test did.
"""

from __future__ import annotations

import os
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import (
    READY_TIMEOUT,
    EchoServer,
    Harness,
    Node,
    format_addr,
    node_toml,
    parse_addr,
    run_tcpgc,
    service_re,
)

RE_CC_JOINED_LL = r"connected to LL (?P<addr>\S+) as agent (?P<id>[0-9a-f]+)"
RE_CC_AUTH_FAILED = r"authentication failed"


def re_ll_named_joined(name: str) -> str:
    """The LL's line for an agent with a credential of its own joining."""
    return rf"agent '{re.escape(name)}' connected from (?P<addr>\S+) \(services: (?P<svc>[^)]*)\)"


def re_exposed(port: int) -> str:
    return rf"port {port} exposed by agent '(?P<owner>[^']*)': listening for clients on"


def re_expose_refused(port: int) -> str:
    return rf"expose of port {port} refused: (?P<why>.*)"


def re_unexposed(port: int) -> str:
    return rf"port {port} no longer exposed: (?P<why>.*)"


# ---------------------------------------------------------------------------- ports


def _bindable(port: int) -> bool:
    """Whether the LL could listen on `port` on all addresses (both families)."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                probe.bind((host, port))
            return True
        except OSError:
            if family == socket.AF_INET:
                return False
            continue  # no IPv6 here: the IPv4 probe decides
    return False


def free_port_range(span: int) -> int:
    """The lowest of `span` consecutive ports that are free now, outside the kernel's
    ephemeral range (an outgoing connect could take one of those meanwhile)."""
    low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    lo, hi = (10000, low - span - 1) if low > 12000 else (high + 1, 65535 - span)
    for _ in range(300):
        base = random.randint(lo, hi)
        if all(_bindable(p) for p in range(base, base + span)):
            return base
    raise RuntimeError(f"no {span} free consecutive ports in {lo}-{hi}")


def connect_refused(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on host:port (the connect is refused). A connect reset
    (the listener closed as it was being accepted) is False: look again."""
    try:
        with socket.create_connection((host, port), timeout=3):
            return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False


def wait_refused(port: int, timeout: float) -> float:
    """Seconds until connects to `port` are refused; AssertionError after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if connect_refused(port):
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"port {port} still accepts connections after {timeout} s")


# ---------------------------------------------------------------------------- CLI


def agent_add(state_dir: Path, name: str, *options: str) -> str:
    """`tcpgc agent add NAME OPTIONS --state-dir DIR`; returns the token (one line)."""
    proc = run_tcpgc("agent", "add", name, *options, "--state-dir", str(state_dir))
    assert proc.returncode == 0, f"agent add failed ({proc.returncode}): {proc.stderr}"
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcpgc1."), proc.stdout
    return lines[0]


def agent_revoke(state_dir: Path, name: str) -> None:
    proc = run_tcpgc("agent", "revoke", name, "--state-dir", str(state_dir))
    assert proc.returncode == 0, f"agent revoke failed ({proc.returncode}): {proc.stderr}"


def token_secret(token: str) -> str:
    """The secret field of a join token (``tcpgc1.<secret>.<fingerprint>``)."""
    parts = token.split(".")
    assert len(parts) == 3, token
    return parts[1]


# ---------------------------------------------------------------------------- nodes


@dataclass
class AgentsLL:
    """A running LL whose config file names its services; its agents' CCs are started
    through `start_cc`."""

    harness: Harness
    ll: Node
    state_dir: Path
    agent_addr: tuple[str, int]
    client_addrs: dict[str, tuple[str, int]]
    ccs: list[Node] = field(default_factory=list)

    @property
    def agent_str(self) -> str:
        return format_addr(*self.agent_addr)

    def add(self, name: str, *options: str) -> str:
        return agent_add(self.state_dir, name, *options)

    def start_cc(
        self,
        token: str,
        *,
        name: str,
        exposes: list[str] = (),  # type: ignore[assignment]
        services: dict[str, str] | None = None,
        wait: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> Node:
        """A CC with `token`, exposing `exposes` ("PORT=HOST:PORT") and serving
        `services` (name -> server), from a config file; waits until it joined."""
        top: dict[str, Any] = {
            "ll": self.agent_str,
            "connect_timeout": 5.0,
            "reconnect_min": 0.2,
            "reconnect_max": 1.0,
            **(extra or {}),
        }
        if exposes:
            top["expose"] = list(exposes)
        path = self.harness.tmp_path / f"{name}.toml"
        path.write_text(node_toml(top, {n: {"server": a} for n, a in (services or {}).items()}))
        cc = self.harness.start_cc("-c", str(path), token=token, name=name)
        self.ccs.append(cc)
        if wait:
            cc.wait_for(RE_CC_JOINED_LL, READY_TIMEOUT)
        return cc


def start_agents_ll(
    harness: Harness,
    services: tuple[str, ...] = ("web",),
    *,
    options: dict[str, Any] | None = None,
    name: str = "ll",
) -> AgentsLL:
    """`tcpgc ll -c FILE`: agent port and one client port per service on 127.0.0.1:0."""
    state = harness.state_dir()
    top: dict[str, Any] = {"cc": "127.0.0.1:0", "state_dir": str(state), **(options or {})}
    tables = {n: {"clients": "127.0.0.1:0"} for n in services}
    config = harness.tmp_path / f"{name}.toml"
    config.write_text(node_toml(top, tables))
    ll, agent_addr = harness.start_ll("-c", str(config), name=name)
    clients = {n: parse_addr(ll.wait_for(service_re(n), READY_TIMEOUT)["addr"]) for n in services}
    return AgentsLL(harness, ll, state, agent_addr, clients)


def echo(harness: Harness) -> EchoServer:
    return harness.echo_server()


# ---------------------------------------------------------------------------- streams


class EchoStream:
    """One client connection through the tunnel to an echo server, kept busy: a thread
    sends random blocks at a steady pace and another checks each byte that comes back.
    `error` says what went wrong (a wrong byte is always an error); `closed_at` when the
    connection ended (EOF or reset)."""

    BLOCK = 4096

    def __init__(self, addr: tuple[str, int], pace: float = 0.01) -> None:
        self.sock = socket.create_connection(addr, timeout=10)
        self.sock.settimeout(None)
        self.pace = pace
        self.sent = bytearray()
        self.echoed = 0
        self.error: str | None = None
        self.closed_at: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer.start()
        self._reader.start()

    def _write(self) -> None:
        while not self._stop.is_set():
            block = os.urandom(self.BLOCK)
            with self._lock:
                self.sent += block
            try:
                self.sock.sendall(block)
            except OSError:
                return
            time.sleep(self.pace)

    def _read(self) -> None:
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                with self._lock:
                    expected = bytes(self.sent[self.echoed : self.echoed + len(chunk)])
                if chunk != expected:
                    self.error = f"wrong bytes echoed at offset {self.echoed}"
                    break
                self.echoed += len(chunk)
        except OSError as exc:
            self.error = self.error or f"{type(exc).__name__}"
        self.closed_at = time.monotonic()

    def wait_echoed(self, count: int, timeout: float) -> None:
        """Until at least `count` more bytes came back correctly."""
        target = self.echoed + count
        deadline = time.monotonic() + timeout
        while self.echoed < target:
            assert self.closed_at is None, f"stream ended ({self.error}) at {self.echoed}"
            assert time.monotonic() < deadline, f"only {self.echoed} of {target} echoed"
            time.sleep(0.02)
        assert self.error is None, self.error

    def wait_closed(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while self.closed_at is None:
            assert time.monotonic() < deadline, f"stream still open after {timeout} s"
            time.sleep(0.02)
        return self.closed_at

    def finish(self, timeout: float = 20.0) -> None:
        """Stop sending, half-close, and check that everything sent came back."""
        self._stop.set()
        self._writer.join(5)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._reader.join(timeout)
        assert self.error is None, self.error
        assert self.echoed == len(self.sent), f"{self.echoed} of {len(self.sent)} echoed"

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._writer.join(5)
        self._reader.join(5)
