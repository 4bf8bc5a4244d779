"""UDP peers for the tests of UDP services: an echo server that remembers who sent what,
clients on connected sockets, an LL + CC pair started from TOML files with UDP (and TCP)
services, the nodes' metrics and flow-end log lines, and dnsmasq as a real DNS server.

Standard library only, besides prometheus-client's parser for /metrics."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import (
    RE_CC_JOINED,
    RE_LL_AGENT_JOINED,
    READY_TIMEOUT,
    Harness,
    Node,
    Process,
    format_addr,
    free_port,
    node_toml,
    parse_addr,
    service_re,
)

#: The largest UDP payload over IPv4 and over IPv6 (65,535 less the headers).
MAX_V4 = 65_507
MAX_V6 = 65_527
#: What the test's own sockets ask of the kernel: bursts of big datagrams must not be
#: dropped by a test socket (the nodes' sockets are what is under test).
TEST_SOCKET_BUFFER = 4 << 20

RE_ADMIN = r"admin endpoint on http://(?P<addr>\S+)/"
_COUNTS = (
    r"(?P<din>\d+) datagrams? in \((?P<bin>\d+) bytes?\), "
    r"(?P<dout>\d+) out \((?P<bout>\d+) bytes?\), (?P<dropped>\d+) dropped"
)


def re_ll_flow_end(service: str) -> str:
    """The LL's line at the end of a flow: client address, seconds, why, counts."""
    return (
        rf"udp flow (?P<client>\S+) of service '{re.escape(service)}' ended after "
        rf"(?P<secs>[\d.]+) s \((?P<why>[^)]*)\): {_COUNTS}"
    )


def re_cc_flow_end(service: str) -> str:
    """The agent's line at the end of a flow."""
    return (
        rf"udp flow of service '{re.escape(service)}' \(client (?P<client>\S+)\) ended after "
        rf"(?P<secs>[\d.]+) s \((?P<why>[^)]*)\): {_COUNTS}"
    )


# ---------------------------------------------------------------------------- sockets


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def udp_socket(host: str) -> socket.socket:
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, TEST_SOCKET_BUFFER)
    return sock


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP now, outside the kernel's ephemeral range (as
    `support.free_port`), for configs and programs that cannot bind port 0."""
    for _ in range(200):
        port = free_port(host)
        with socket.socket(family_of(host), socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no port free for TCP and UDP on {host}")


def ipv6_loopback_or_skip() -> None:
    """Skip (saying why) when ::1 cannot carry UDP here."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support in this Python")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"::1 is not usable here: {exc}")


class UdpClient:
    """A UDP socket connected to `target` (so only its replies come in), bound to
    `bind_host` (default: the target's loopback) on a port the kernel picks."""

    def __init__(self, target: tuple[str, int], bind_host: str | None = None) -> None:
        self.target = target
        self.sock = udp_socket(target[0])
        self.sock.bind((bind_host or target[0], 0))
        self.sock.connect(target)
        self.local: tuple[str, int] = self.sock.getsockname()[:2]

    def send(self, payload: bytes) -> None:
        self.sock.send(payload)

    def recv(self, timeout: float = 5.0) -> bytes:
        """The next datagram; `AssertionError` if none comes within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(MAX_V6 + 1)
        except TimeoutError:
            raise AssertionError(
                f"no datagram for {format_addr(*self.local)} within {timeout} s"
            ) from None

    def pending(self) -> list[bytes]:
        """Every datagram already waiting, without blocking."""
        got: list[bytes] = []
        self.sock.setblocking(False)
        try:
            while True:
                got.append(self.sock.recv(MAX_V6 + 1))
        except BlockingIOError:
            return got
        finally:
            self.sock.setblocking(True)

    def roundtrip(self, payload: bytes, timeout: float = 5.0) -> bytes:
        self.send(payload)
        return self.recv(timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> UdpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UdpEchoServer:
    """Answers each datagram with `tag` + the datagram, to its sender, from one socket;
    keeps (source, payload) of every datagram. With a tag, the test keeps payloads small
    enough that the reply still fits in one datagram."""

    def __init__(self, host: str = "127.0.0.1", tag: bytes = b"") -> None:
        self.tag = tag
        self.sock = udp_socket(host)
        self.sock.bind((host, 0))
        self.addr: tuple[str, int] = self.sock.getsockname()[:2]
        self.seen: list[tuple[tuple[str, int], bytes]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def addr_str(self) -> str:
        return format_addr(*self.addr)

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if not ready:
                continue
            try:
                data, source = self.sock.recvfrom(MAX_V6 + 1)
            except OSError:
                continue  # an ICMP error of an earlier reply, reported on this socket
            source = source[:2]
            with self._lock:
                self.seen.append((source, data))
            try:
                self.sock.sendto(self.tag + data, source)
            except OSError as exc:
                with self._lock:
                    self.errors.append(f"reply of {len(data)} bytes to {source}: {exc!r}")

    def sources(self) -> list[tuple[str, int]]:
        """Distinct source addresses, in the order they first sent."""
        with self._lock:
            return list(dict.fromkeys(source for source, _ in self.seen))

    def from_source(self, source: tuple[str, int]) -> list[bytes]:
        with self._lock:
            return [data for src, data in self.seen if src == source]

    def source_of(self, payload: bytes) -> tuple[str, int]:
        """Where the (first) datagram equal to `payload` came from."""
        with self._lock:
            for source, data in self.seen:
                if data == payload:
                    return source
        raise AssertionError(f"the server never got {payload[:40]!r}")

    def count(self) -> int:
        with self._lock:
            return len(self.seen)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


# ---------------------------------------------------------------------------- admin


def admin_url(node: Node) -> str:
    return "http://" + node.wait_for(RE_ADMIN, READY_TIMEOUT)["addr"]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base: str) -> Samples:
    """Every sample of /metrics, keyed by (name, labels)."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        body = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def status_json(base: str) -> Any:
    with urllib.request.urlopen(base + "/status.json", timeout=10) as response:
        return json.loads(response.read())


def metric(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def open_flows(samples: Samples, service: str) -> float:
    """The gauge of flows open now. The contract names it `tcpgc_udp_flows`; a gauge of
    that name cannot live beside the counter `tcpgc_udp_flows_total` in one
    prometheus-client registry, so `tcpgc_udp_flows_active` is read where it exists."""
    for name in ("tcpgc_udp_flows_active", "tcpgc_udp_flows"):
        if any(n == name for n, _ in samples):
            return metric(samples, name, service=service)
    raise AssertionError(f"no gauge of open UDP flows in {sorted({n for n, _ in samples})}")


def wait_metrics(
    base: str, condition: Callable[[Samples], bool], timeout: float, what: str
) -> Samples:
    """Scrape every 0.1 s until `condition` holds; `AssertionError` naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(base)
        if condition(samples):
            return samples
        if time.monotonic() > deadline:
            udp = {k: v for k, v in samples.items() if k[0].startswith("tcpgc_udp")}
            raise AssertionError(f"{what}: not within {timeout} s; UDP samples: {udp}")
        time.sleep(0.1)


# ---------------------------------------------------------------------------- nodes


@dataclass
class UdpTunnel:
    """An LL and a CC, joined, started from TOML files, both with an admin endpoint."""

    ll: Node
    cc: Node
    ll_admin: str
    cc_admin: str
    clients: dict[str, tuple[str, int]] = field(default_factory=dict)


def udp_service(clients: str, **keys: Any) -> dict[str, Any]:
    return {"clients": clients, "protocol": "udp", **keys}


def echo_server(harness: Harness, host: str = "127.0.0.1", tag: bytes = b"") -> UdpEchoServer:
    """A `UdpEchoServer` stopped at the harness's teardown."""
    server = UdpEchoServer(host, tag)
    harness.adopt(server)  # type: ignore[arg-type]  # anything with stop() is stopped
    return server


def start_tunnel(
    harness: Harness,
    ll_services: dict[str, dict[str, Any]],
    cc_services: dict[str, dict[str, Any]],
    ll_options: dict[str, Any] | None = None,
) -> UdpTunnel:
    """`tcpgc ll -c ll.toml` and `tcpgc cc -c cc.toml`, joined with the LL's token.

    A UDP service's `clients` must name a fixed port (see `free_udp_port`); a TCP one
    may say port 0, read back from the LL's log."""
    state = harness.state_dir()
    token = harness.token(state)
    ll_file = harness.tmp_path / "ll.toml"
    ll_top = {"cc": "127.0.0.1:0", "state_dir": str(state), "admin": "127.0.0.1:0"}
    ll_top.update(ll_options or {})
    ll_file.write_text(node_toml(ll_top, ll_services))
    ll, agent = harness.start_ll("-c", str(ll_file))
    clients: dict[str, tuple[str, int]] = {}
    for name, body in ll_services.items():
        if body.get("protocol") == "udp":
            clients[name] = parse_addr(str(body["clients"]))
        else:
            clients[name] = parse_addr(ll.wait_for(service_re(name), READY_TIMEOUT)["addr"])
    cc_file = harness.tmp_path / "cc.toml"
    cc_top = {"ll": format_addr(*agent), "admin": "127.0.0.1:0"}
    cc_file.write_text(node_toml(cc_top, cc_services))
    cc = harness.start_cc("-c", str(cc_file), token=token)
    cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)
    ll.wait_for(RE_LL_AGENT_JOINED, READY_TIMEOUT)
    return UdpTunnel(ll, cc, admin_url(ll), admin_url(cc), clients)


# ---------------------------------------------------------------------------- streams


def tagged(index: int, seq: int, size: int = 64) -> bytes:
    """A payload that names its client and sequence number, padded to `size`."""
    head = b"c%04d s%04d " % (index, seq)
    return head + os.urandom(max(0, size - len(head)))


def numbered(seq: int, size: int) -> bytes:
    """`size` random bytes led by `seq` (as much of it as fits)."""
    head = struct.pack("!I", seq)
    if size <= len(head):
        return head[-size:]
    return head + os.urandom(size - len(head))


def send_windowed(
    client: UdpClient, payloads: Iterable[bytes], window_bytes: int, timeout: float = 5.0
) -> list[bytes]:
    """Send `payloads` in order with at most `window_bytes` unanswered at once (so no
    socket buffer on the way overflows); return the replies in the order they came."""
    pending: list[int] = []
    replies: list[bytes] = []
    for payload in payloads:
        while pending and sum(pending) + len(payload) > window_bytes:
            replies.append(client.recv(timeout))
            pending.pop(0)
        client.send(payload)
        pending.append(len(payload))
    for _ in pending:
        replies.append(client.recv(timeout))
    return replies


# ---------------------------------------------------------------------------- dnsmasq


def dns_tools_or_skip() -> tuple[str, str]:
    """Paths of dnsmasq and dig. Missing: skipped if we are not root; as root,
    scripts/test.sh installs them, so their absence fails the test."""
    dnsmasq = shutil.which("dnsmasq") or (
        "/usr/sbin/dnsmasq" if os.access("/usr/sbin/dnsmasq", os.X_OK) else None
    )
    dig = shutil.which("dig")
    missing = [name for name, path in (("dnsmasq", dnsmasq), ("dig", dig)) if path is None]
    if missing:
        why = f"{' and '.join(missing)} not installed (Debian: dnsmasq, bind9-dnsutils)"
        if os.geteuid() != 0:
            pytest.skip(why)
        raise AssertionError(why + "; scripts/test.sh installs them as root")
    assert dnsmasq is not None and dig is not None
    return dnsmasq, dig


def start_dnsmasq(harness: Harness, binary: str, port: int, extra: Iterable[str]) -> Process:
    """dnsmasq in the foreground on 127.0.0.1:`port`, no upstream, logging to stderr;
    stopped at teardown with the nodes."""
    proc = Process(
        [
            binary, "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
            "--pid-file", "--log-facility=-", *extra,
        ],
        name="dnsmasq",
    )  # fmt: skip
    harness.adopt(proc)  # type: ignore[arg-type]  # anything with stop() is stopped
    proc.wait_for(r"started, version", READY_TIMEOUT)
    return proc
