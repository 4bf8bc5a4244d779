"""Helpers for the reliability tests: config files, paced transfers, log timestamps,
HAProxy. Builds on support.py (read-only) and, like it, uses only the standard library,
so it also runs as a script inside a network namespace::

    python reliability_tools.py hold HOST PORT   # stream through an echo until cut

prints ``streaming`` once the first round trip is done, then ``ended after S s: WHY``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from support import Process, connect, format_addr, node_toml, recv_exactly

# Log lines of the reliability contract (searched, not full-line matched).
RE_LL_SILENT = r"agent (?P<id>[0-9a-f]+) at (?P<addr>\S+) silent for (?P<s>[\d.]+) s: dropping it"
RE_LL_AGENT_GONE = r"agent (?P<id>[0-9a-f]+) at (?P<addr>\S+) (?:disconnected|silent for)"
RE_LL_CLOSING = r"closing (?P<n>\d+) connections carried by agent (?P<id>[0-9a-f]+)"
RE_CC_NO_HEARTBEAT = (
    r"cannot connect to LL (?P<addr>\S+): no heartbeat from the LL for (?P<s>\d+) s"
)
RE_CC_CLOSING = r"closing (?P<n>\d+) connections through LL (?P<addr>\S+)"
RE_CC_RECONNECTING = r"reconnecting to (?P<addr>\S+) in (?P<s>[\d.]+) s"
RE_STOPPING = r"stopping: draining connections for up to (?P<s>\d+) s"
RE_REPLACES = r"agent (?P<id>[0-9a-f]+): new session replaces the one from (?P<addr>\S+)"
RE_RELOAD_REFUSED = r"reload refused, the running config stays: (?P<why>.*)"


# ---------------------------------------------------------------------------- configs


def toml(top: dict[str, object], services: dict[str, dict[str, object]]) -> str:
    """A node config: top-level keys, then one ``[services.NAME]`` table per service."""
    return node_toml(top, services)


def ll_config(
    path: Path,
    *,
    cc: str,
    services: dict[str, str],
    state_dir: Path,
    heartbeat: float = 0.5,
    **extra: object,
) -> Path:
    """Write an LL config file: ``services`` maps a name to its client address."""
    top: dict[str, object] = {"cc": cc, "state_dir": state_dir, "heartbeat": heartbeat, **extra}
    path.write_text(toml(top, {name: {"clients": a} for name, a in services.items()}))
    return path


def cc_config(
    path: Path,
    *,
    ll: Sequence[str],
    services: dict[str, str],
    reconnect_min: float = 0.1,
    reconnect_max: float = 1.0,
    **extra: object,
) -> Path:
    """Write a CC config file: ``services`` maps a name to its server address."""
    top: dict[str, object] = {
        "ll": list(ll),
        "reconnect_min": reconnect_min,
        "reconnect_max": reconnect_max,
        **extra,
    }
    path.write_text(toml(top, {name: {"server": a} for name, a in services.items()}))
    return path


# ---------------------------------------------------------------------------- logs

_ASCTIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_time(match: re.Match[str]) -> float:
    """Wall-clock time (``time.time()`` scale) of the log line ``match`` was found in."""
    m = _ASCTIME.match(match.string)
    assert m is not None, f"log line without a timestamp: {match.string!r}"
    return datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


# ---------------------------------------------------------------------------- transfers


class Streamer(threading.Thread):
    """One client streaming through an echo tunnel, chunk by chunk, checking every echo.

    ``prefix`` bytes the server sends first are skipped.
    With ``total`` it sends that many bytes, half-closes, expects EOF, and sets ``ok``.
    Without it, it streams until ``finish()`` (then half-closes the same way) or until the
    tunnel cuts it, which sets ``error`` and ``ended_at`` (``time.monotonic()``).
    """

    def __init__(
        self,
        addr: tuple[str, int],
        *,
        chunk: int = 4096,
        pause: float = 0.02,
        total: int | None = None,
        timeout: float = 30.0,
        prefix: int = 0,
    ) -> None:
        super().__init__(daemon=True)
        self.prefix = prefix
        self.addr = addr
        self.chunk = chunk
        self.pause = pause
        self.total = total
        self.timeout = timeout
        self.sent = 0
        self.sent_digest = hashlib.sha256()
        self.got_digest = hashlib.sha256()
        self.started_streaming = threading.Event()
        self.ended = threading.Event()
        self.ended_at: float | None = None
        self.error: str | None = None
        self.ok = False
        self._finish = threading.Event()

    def finish(self) -> None:
        self._finish.set()

    def run(self) -> None:
        try:
            with connect(self.addr, timeout=self.timeout) as sock:
                recv_exactly(sock, self.prefix)  # the server's greeting, if any
                while not self._finish.is_set() and (self.total is None or self.sent < self.total):
                    size = (
                        self.chunk
                        if self.total is None
                        else min(self.chunk, self.total - self.sent)
                    )
                    data = os.urandom(size)
                    sock.sendall(data)
                    self.sent_digest.update(data)
                    back = recv_exactly(sock, size)
                    self.got_digest.update(back)
                    if back != data:
                        raise AssertionError(f"echo differs after {self.sent} bytes")
                    self.sent += size
                    self.started_streaming.set()
                    self._finish.wait(self.pause)
                sock.shutdown(socket.SHUT_WR)
                if sock.recv(1) != b"":
                    raise AssertionError("bytes after the echo of everything sent")
                self.ok = self.sent_digest.digest() == self.got_digest.digest()
                if not self.ok:
                    self.error = "sha-256 of the echo differs from what was sent"
        except (OSError, AssertionError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended_at = time.monotonic()
            self.started_streaming.set()
            self.ended.set()


def wait_streaming(streamers: Iterable[Streamer], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    for s in streamers:
        assert s.started_streaming.wait(max(0.0, deadline - time.monotonic())), "never streamed"
        assert s.error is None, f"stream failed before the test acted: {s.error}"


def wait_port(addr: tuple[str, int], timeout: float = 10.0) -> None:
    """Return once a TCP connect to ``addr`` succeeds (for programs that log nothing)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            with socket.create_connection(addr, timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on {format_addr(*addr)}") from None
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


# ---------------------------------------------------------------------------- haproxy


def haproxy_config(
    *,
    clients_port: int,
    monitor_port: int,
    lls: Sequence[tuple[str, tuple[str, int]]],
    check: str = "check inter 200ms fall 2 rise 1",
) -> str:
    """HAProxy in TCP mode: one frontend for clients balanced over the LLs' client ports."""
    servers = "\n".join(f"    server {name} {format_addr(*addr)} {check}" for name, addr in lls)
    return f"""\
global
    log stderr format raw local0 info

defaults
    mode tcp
    log global
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 2
    option redispatch 1

frontend monitor
    mode http
    bind 127.0.0.1:{monitor_port}
    monitor-uri /up

frontend clients
    bind 127.0.0.1:{clients_port}
    default_backend lls

backend lls
    balance roundrobin
{servers}
"""


def start_haproxy(config: Path, monitor_port: int) -> Process:
    haproxy = shutil.which("haproxy")
    assert haproxy is not None
    proc = Process([haproxy, "-db", "-f", str(config)], name="haproxy", env=dict(os.environ))
    wait_port(("127.0.0.1", monitor_port))
    return proc


# ---------------------------------------------------------------------------- script mode


def _hold(host: str, port: int, timeout: float) -> int:
    streamer = Streamer((host, port), chunk=512, pause=0.05, timeout=timeout)
    streamer.start()
    streamer.started_streaming.wait(timeout)
    if streamer.error is not None:
        print(f"failed: {streamer.error}", flush=True)
        return 1
    print("streaming", flush=True)
    start = time.monotonic()
    streamer.ended.wait()
    assert streamer.ended_at is not None
    print(f"ended after {streamer.ended_at - start:.2f} s: {streamer.error}", flush=True)
    return 0


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reliability_tools.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("hold", help="stream through an echo tunnel until it is cut")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    return _hold(args.host, args.port, args.timeout)


if __name__ == "__main__":
    sys.exit(_main())
