"""PROXY protocol headers (HAProxy's proxy-protocol.txt, versions 1 and 2): the bytes of
`tcpgc.transport.proxy_protocol` against the spec, then end to end with nginx as the inside server
logging the address it was told."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import (
    RE_CC_JOINED,
    RE_LL_AGENT_JOINED,
    READY_TIMEOUT,
    Harness,
    format_addr,
    free_port,
    parse_addr,
    recv_until_eof,
    service_re,
)
from tcpgc.transport import proxy_protocol
from tcpgc.transport.proxy_protocol import V2_SIGNATURE, header, v1, v2

# ---------------------------------------------------------------------------- version 1


def test_v1_tcp4() -> None:
    # The spec's own example (section 2.1).
    assert (
        v1(("192.168.0.1", 56324), ("192.168.0.11", 443))
        == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    )


def test_v1_tcp6() -> None:
    assert (
        v1(("2001:db8::1", 65535), ("2001:db8:0:0:0:0:0:2", 80))
        == b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 80\r\n"
    )


def test_v1_mixed_families_are_sent_as_tcp6() -> None:
    # The spec carries one family per line: an IPv4 end is written IPv4-mapped.
    line = v1(("192.0.2.1", 1000), ("2001:db8::2", 443))
    assert line == b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 1000 443\r\n"
    line = v1(("2001:db8::1", 1000), ("192.0.2.2", 443))
    assert line == b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.2 1000 443\r\n"


def test_v1_unknown() -> None:
    # "PROXY UNKNOWN": the receiver must ignore the rest and use the real endpoints.
    assert v1(("not-an-ip", 1), ("192.0.2.2", 80)) == b"PROXY UNKNOWN\r\n"
    assert v1(("", 0), ("", 0)) == b"PROXY UNKNOWN\r\n"


def test_v1_fits_the_107_byte_limit() -> None:
    longest = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = v1((longest, 65535), (longest, 65535))
    assert len(line) <= 107  # section 2.1: the receiver's buffer is 107 bytes
    assert line.endswith(b"\r\n") and line.count(b"\r\n") == 1


def test_v1_drops_ipv6_zone() -> None:
    line = v1(("fe80::1%eth0", 1000), ("fe80::2", 443))
    assert line == b"PROXY TCP6 fe80::1 fe80::2 1000 443\r\n"


def _parse_v1(line: bytes) -> tuple[str, str, str, int, int]:
    m = re.fullmatch(rb"PROXY (TCP4|TCP6) (\S+) (\S+) (\d{1,5}) (\d{1,5})\r\n", line)
    assert m is not None, line
    family, src, dst, sport, dport = (g.decode() for g in m.groups())
    for address in (src, dst):
        parsed = ipaddress.ip_address(address)  # valid literal of the announced family
        assert (family == "TCP4") == (parsed.version == 4)
    return family, src, dst, int(sport), int(dport)


def test_v1_parses_back() -> None:
    assert _parse_v1(v1(("10.1.2.3", 1), ("10.1.2.4", 65535))) == (
        "TCP4",
        "10.1.2.3",
        "10.1.2.4",
        1,
        65535,
    )


# ---------------------------------------------------------------------------- version 2


def _parse_v2(data: bytes) -> tuple[int, int, bytes]:
    """(version/command byte, family/protocol byte, address block), checking the framing."""
    assert data[:12] == b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # section 2.2
    ver_cmd, fam = data[12], data[13]
    (length,) = struct.unpack("!H", data[14:16])
    assert len(data) == 16 + length, "length field must cover exactly the rest"
    assert ver_cmd >> 4 == 2
    return ver_cmd, fam, data[16:]


def test_v2_signature_constant() -> None:
    assert V2_SIGNATURE == b"\r\n\r\n\x00\r\nQUIT\n" and len(V2_SIGNATURE) == 12


def test_v2_tcp4() -> None:
    data = v2(("192.0.2.1", 56324), ("198.51.100.2", 443))
    ver_cmd, fam, block = _parse_v2(data)
    assert ver_cmd == 0x21  # version 2, PROXY
    assert fam == 0x11  # AF_INET, STREAM
    assert len(block) == 12
    src, dst, sport, dport = struct.unpack("!4s4sHH", block)
    assert socket.inet_ntop(socket.AF_INET, src) == "192.0.2.1"
    assert socket.inet_ntop(socket.AF_INET, dst) == "198.51.100.2"
    assert (sport, dport) == (56324, 443)


def test_v2_tcp6() -> None:
    data = v2(("2001:db8::1", 1), ("2001:db8::2", 65535))
    ver_cmd, fam, block = _parse_v2(data)
    assert (ver_cmd, fam) == (0x21, 0x21)  # PROXY; AF_INET6, STREAM
    assert len(block) == 36
    src, dst, sport, dport = struct.unpack("!16s16sHH", block)
    assert socket.inet_ntop(socket.AF_INET6, src) == "2001:db8::1"
    assert socket.inet_ntop(socket.AF_INET6, dst) == "2001:db8::2"
    assert (sport, dport) == (1, 65535)


def test_v2_mixed_families_are_sent_as_tcp6() -> None:
    ver_cmd, fam, block = _parse_v2(v2(("192.0.2.1", 5000), ("2001:db8::2", 443)))
    assert (ver_cmd, fam) == (0x21, 0x21)
    src, dst, sport, dport = struct.unpack("!16s16sHH", block)
    assert ipaddress.IPv6Address(src).ipv4_mapped == ipaddress.IPv4Address("192.0.2.1")
    assert ipaddress.IPv6Address(dst) == ipaddress.IPv6Address("2001:db8::2")
    assert (sport, dport) == (5000, 443)


def test_v2_unknown_is_local_unspec() -> None:
    # No usable addresses: LOCAL command, AF_UNSPEC, empty block (the receiver then
    # uses the connection's own endpoints), as HAProxy itself sends.
    data = v2(("not-an-ip", 1), ("192.0.2.2", 80))
    ver_cmd, fam, block = _parse_v2(data)
    assert (ver_cmd, fam, block) == (0x20, 0x00, b"")


def test_v2_zone_is_dropped() -> None:
    _, fam, block = _parse_v2(v2(("fe80::1%eth0", 1000), ("fe80::2", 443)))
    assert fam == 0x21
    assert socket.inet_ntop(socket.AF_INET6, block[:16]) == "fe80::1"


def test_header_dispatch() -> None:
    args = (("192.0.2.1", 1), ("192.0.2.2", 2))
    assert header(1, *args) == v1(*args)
    assert header(2, *args) == v2(*args)
    with pytest.raises(ValueError, match="version 3"):
        header(3, *args)
    assert proxy_protocol.header is header


# ---------------------------------------------------------------------------- nginx


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    log_format pp 'client=$proxy_protocol_addr:$proxy_protocol_port '
                  'dst=$proxy_protocol_server_addr:$proxy_protocol_server_port '
                  'peer=$remote_addr "$request" $status';
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        access_log {tmp}/access.log pp;
        location / {{ return 200 "hello through tcpgc\\n"; }}
    }}
}}
"""


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited {proc.returncode}: {log.read_text()}")
        # A probe without a PROXY header; nginx logs a broken header and closes it.
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nginx is not listening on {port}: {log.read_text()}")


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """nginx with `listen ... proxy_protocol` on 127.0.0.1; yields (port, access log)."""
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if binary is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    tmp = tmp_path / "nginx"
    tmp.mkdir()
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port))
    error_log = tmp / "error.log"
    error_log.touch()
    proc = subprocess.Popen(
        [binary, "-p", str(tmp), "-e", str(error_log), "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port, proc, error_log)
        yield port, tmp / "access.log"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_log_line(log: Path, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text() if log.exists() else ""
        for line in text.splitlines():
            if needle in line:
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no access log line with {needle!r}:\n{text}")
        time.sleep(0.05)


@pytest.mark.parametrize("version", [1, 2])
def test_nginx_sees_the_real_client(
    harness: Harness, nginx: tuple[int, Path], tmp_path: Path, version: int
) -> None:
    port, access_log = nginx
    state = harness.state_dir()
    token = harness.token(state)
    ll_conf = tmp_path / "ll.toml"
    ll_conf.write_text(
        f'cc = "127.0.0.1:0"\nstate_dir = "{state}"\n[services.web]\nclients = "127.0.0.1:0"\n'
    )
    ll, agent = harness.start_ll("-c", str(ll_conf))
    web = parse_addr(ll.wait_for(service_re("web"), READY_TIMEOUT)["addr"])
    cc_conf = tmp_path / "cc.toml"
    cc_conf.write_text(
        f'll = "{format_addr(*agent)}"\n'
        f'[services.web]\nserver = "127.0.0.1:{port}"\nproxy_protocol = {version}\n'
    )
    cc = harness.start_cc("-c", str(cc_conf), token=token)
    cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)
    ll.wait_for(RE_LL_AGENT_JOINED, READY_TIMEOUT)

    # From 127.0.0.2, so the client's address differs from the agent's (127.0.0.1).
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind(("127.0.0.2", 0))
        sock.connect(web)
        client_port = sock.getsockname()[1]
        sock.sendall(f"GET /v{version} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
        reply = recv_until_eof(sock)
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"hello through tcpgc\n"), reply

    line = _wait_log_line(access_log, f'"GET /v{version} HTTP/1.0"')
    assert f"client=127.0.0.2:{client_port} " in line, line
    assert f"dst=127.0.0.1:{web[1]} " in line, line  # the LL's service address
    # The TCP peer nginx sees is the agent; only the header carries the client.
    assert "peer=127.0.0.1 " in line and line.endswith(" 200"), line
