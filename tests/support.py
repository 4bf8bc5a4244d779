"""Test harness for the end-to-end and firewall tests: real processes, real sockets.

Nothing here sleeps to wait for readiness. A node's stderr is read line by line in a
background thread; ``Node.wait_for`` blocks on a condition variable until a line matches
(or the process exits, or the deadline passes) and then reports everything it captured.

This module only uses the standard library, so it also runs as a script inside a network
namespace (``python support.py echo 0.0.0.0 0``), where the test process's own threads
cannot reach.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SRC_DIR = REPO_ROOT / "src"

# Patterns of the log lines in the product's contract (searched, not full-line matched).
RE_LL_AGENT_PORT = r"listening for agents on (?P<addr>\S+)"
RE_LL_SERVICE = r"service '(?P<name>[^']+)' listening for clients on (?P<addr>\S+)"
RE_LL_AGENT_JOINED = (
    r"agent (?P<id>[0-9a-f]+) connected from (?P<addr>\S+) \(services: (?P<services>[^)]*)\)"
)
RE_CC_JOINED = r"connected to LL (?P<addr>\S+) as agent (?P<id>[0-9a-f]+)"
RE_LL_HANDSHAKE_FAILED = r"handshake failed from (?P<addr>\S+): (?P<reason>.*)"
RE_CC_REFUSED = r"cannot connect to LL (?P<addr>\S+): (?P<reason>.*)"
RE_CC_SERVER_DOWN = r"cannot reach server (?P<addr>\S+) for service '(?P<name>[^']+)'"
RE_LL_NO_AGENT = r"no agent for service '(?P<name>[^']+)'"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def node_toml(top: dict[str, object], services: dict[str, dict[str, object]]) -> str:
    """A node's config file: top-level keys, then one ``[services.NAME]`` table each."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in top.items()]
    for name, body in services.items():
        lines += ["", f"[services.{name}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in body.items()]
    return "\n".join(lines) + "\n"


def service_re(name: str) -> str:
    """The LL's "service NAME listening for clients on ADDR" line for one service."""
    return rf"service '{re.escape(name)}' listening for clients on (?P<addr>\S+)"


# ---------------------------------------------------------------------------- addresses


def parse_addr(text: str) -> tuple[str, int]:
    """``"127.0.0.1:4000"`` -> ``("127.0.0.1", 4000)``; ``"[::1]:4000"`` -> ``("::1", 4000)``."""
    m = re.fullmatch(r"\[(?P<v6>[^\]]+)\]:(?P<p6>\d+)|(?P<host>[^:\[\]]+):(?P<port>\d+)", text)
    if m is None:
        raise ValueError(f"not a host:port address: {text!r}")
    if m["v6"] is not None:
        return m["v6"], int(m["p6"])
    return m["host"], int(m["port"])


def format_addr(host: str, port: int) -> str:
    """Inverse of :func:`parse_addr`: brackets around IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect(addr: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    """A connected TCP socket with ``timeout`` set on every later operation."""
    sock = socket.create_connection(addr, timeout=timeout)
    sock.settimeout(timeout)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes, or ``AssertionError`` if the peer closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise AssertionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_until_eof(sock: socket.socket, limit: int = 1 << 31) -> bytes:
    """Everything until EOF (at most ``limit`` bytes)."""
    buf = bytearray()
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise AssertionError(f"more than {limit} bytes before EOF")


def wait_closed_by_peer(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Wait until the peer closes ``sock`` (EOF or reset); return (bytes seen, seconds).

    Raises ``AssertionError`` if the connection is still open after ``timeout``.
    """
    sock.settimeout(timeout)
    start = time.monotonic()
    seen = bytearray()
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            seen += chunk
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        pass
    except TimeoutError:
        raise AssertionError(
            f"connection still open after {timeout}s (received {len(seen)} bytes)"
        ) from None
    return bytes(seen), time.monotonic() - start


def _proc_net_addr(text: str) -> tuple[str, int]:
    """``0100007F:1F90`` (a /proc/net/tcp address: 32-bit words in host order) -> host, port."""
    hex_host, hex_port = text.split(":")
    words = [int(hex_host[i : i + 8], 16) for i in range(0, len(hex_host), 8)]
    packed = struct.pack(f"={len(words)}I", *words)
    family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, packed), int(hex_port, 16)


def established_ports(remote: tuple[str, int]) -> set[int]:
    """Local ports of the established TCP connections to ``remote`` in this network
    namespace, as the kernel lists them (Linux): who holds them does not matter."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and _proc_net_addr(fields[2]) == remote:  # ESTABLISHED
                ports.add(_proc_net_addr(fields[1])[1])
    return ports


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, for programs that cannot bind port 0 themselves.

    Chosen outside the kernel's ephemeral range: a port bound to 0 and released comes
    from that range, and any outgoing connect() on the machine may take it as its source
    port before the program binds it (seen as "Address already in use" from socat's
    late-binding fork children, and as TCP self-connects).
    """
    low, high = _ephemeral_range()
    span = (10000, low - 1) if low > 12000 else (high + 1, 65535)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(500):
        port = random.randint(*span)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found in {span[0]}-{span[1]}")


def bound_unused_port(host: str = "127.0.0.1") -> socket.socket:
    """A socket bound to a free port but not listening: connects to it are refused.

    Calling ``listen()`` later turns the port into a live one without any race.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    return sock


# ---------------------------------------------------------------------------- processes


def tcpgc_env(extra: dict[str, str] | None = None, drop: Sequence[str] = ()) -> dict[str, str]:
    """Environment for a tcpgc subprocess: importable from src/ even without install."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC_DIR), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("TCPGC_TOKEN", *drop):
        env.pop(key, None)
    env.update(extra or {})
    return env


def tcpgc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tcpgc", *args]


def run_tcpgc(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run a short-lived ``tcpgc`` command to completion (fails the test on a hang)."""
    try:
        return subprocess.run(
            tcpgc_cmd(*args),
            env=env if env is not None else tcpgc_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"`tcpgc {' '.join(args)}` still running after {timeout}s\n"
            f"--- stdout ---\n{_text(exc.stdout)}\n--- stderr ---\n{_text(exc.stderr)}"
        ) from None


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def make_token(state_dir: Path) -> str:
    """``tcpgc token --state-dir DIR`` -> the join token (checked to be one line)."""
    proc = run_tcpgc("token", "--state-dir", str(state_dir))
    assert proc.returncode == 0, f"tcpgc token failed ({proc.returncode}): {proc.stderr}"
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one token line, got {proc.stdout!r}"
    return lines[0].strip()


class Process:
    """A subprocess whose stdout and stderr lines are captured by background threads."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.argv = [*prefix, *argv]
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []
        self._cond = threading.Condition()
        self._open_streams = 2
        self.proc = subprocess.Popen(
            self.argv,
            env=env if env is not None else tcpgc_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            bufsize=1,
        )
        self._readers = [
            threading.Thread(
                target=self._read, args=(self.proc.stderr, self.stderr_lines), daemon=True
            ),
            threading.Thread(
                target=self._read, args=(self.proc.stdout, self.stdout_lines), daemon=True
            ),
        ]
        for t in self._readers:
            t.start()

    def _read(self, stream, lines: list[str]) -> None:  # type: ignore[no-untyped-def]
        try:
            for line in stream:
                with self._cond:
                    lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._open_streams -= 1
                self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def mark(self) -> int:
        """Index of the next stderr line; pass as ``since`` to wait only for new lines."""
        with self._cond:
            return len(self.stderr_lines)

    def output(self) -> str:
        with self._cond:
            return (
                f"=== {self.name}: {' '.join(self.argv)} (exit {self.proc.poll()})\n"
                "--- stderr ---\n" + "\n".join(self.stderr_lines) + "\n"
                "--- stdout ---\n" + "\n".join(self.stdout_lines)
            )

    def wait_for(
        self, pattern: str, timeout: float = 15.0, *, since: int = 0, stream: str = "stderr"
    ) -> re.Match[str]:
        """First line (from index ``since``) that ``re.search``-matches ``pattern``.

        Raises ``AssertionError`` with all captured output if none does before ``timeout``,
        or as soon as the process has exited and its output is fully read without a match.
        """
        regex = re.compile(pattern)
        lines = self.stderr_lines if stream == "stderr" else self.stdout_lines
        deadline = time.monotonic() + timeout
        index = since
        with self._cond:
            while True:
                while index < len(lines):
                    m = regex.search(lines[index])
                    index += 1
                    if m is not None:
                        return m
                if self._open_streams == 0:
                    reason = "process ended"
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    reason = f"timed out after {timeout}s"
                    break
                self._cond.wait(remaining)
        raise AssertionError(
            f"{self.name}: no {stream} line matching {pattern!r} ({reason})\n{self.output()}"
        )

    def wait_count(
        self, pattern: str, count: int, timeout: float = 15.0, *, since: int = 0
    ) -> list[re.Match[str]]:
        """The first ``count`` stderr lines (from ``since``) matching ``pattern``, once
        there are that many; ``AssertionError`` as :meth:`wait_for` if not in time."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        found: list[re.Match[str]] = []
        index = since
        with self._cond:
            while True:
                while index < len(self.stderr_lines) and len(found) < count:
                    m = regex.search(self.stderr_lines[index])
                    index += 1
                    if m is not None:
                        found.append(m)
                if len(found) >= count:
                    return found
                if self._open_streams == 0:
                    reason = "process ended"
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    reason = f"timed out after {timeout}s"
                    break
                self._cond.wait(remaining)
        raise AssertionError(
            f"{self.name}: {len(found)} of {count} stderr lines matching {pattern!r} "
            f"({reason})\n{self.output()}"
        )

    def find_all(self, pattern: str, *, since: int = 0) -> list[re.Match[str]]:
        """Every stderr line so far (from ``since``) that matches ``pattern``."""
        regex = re.compile(pattern)
        with self._cond:
            lines = list(self.stderr_lines[since:])
        return [m for m in map(regex.search, lines) if m is not None]

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(grace)
            except ProcessLookupError:
                pass
        for t in self._readers:
            t.join(grace)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode


class Node(Process):
    """A running ``tcpgc`` subcommand (``python -m tcpgc ...``)."""

    def __init__(
        self,
        *args: str,
        name: str | None = None,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        super().__init__(tcpgc_cmd(*args), name=name or f"tcpgc {args[0]}", env=env, prefix=prefix)


# ---------------------------------------------------------------------------- servers


class ThreadedServer:
    """A TCP server on 127.0.0.1:0, one thread per connection, big listen backlog.

    Subclasses implement ``handle(conn)``. ``connections`` counts accepted connections.
    ``stop()`` closes the listener and every connection still open.
    """

    BACKLOG = 1024

    def __init__(self, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None):
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        self.sock = sock
        host, port = sock.getsockname()[:2]
        self.addr: tuple[str, int] = (host, port)
        self.connections = 0
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._acceptor: threading.Thread | None = None

    @property
    def addr_str(self) -> str:
        return format_addr(*self.addr)

    def start(self) -> ThreadedServer:
        self.sock.listen(self.BACKLOG)
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()
        return self

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # listener closed by stop()
            with self._lock:
                if self._stopping:
                    conn.close()
                    return
                self.connections += 1
                self._conns.add(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(120)
            self.handle(conn)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            conns = list(self._conns)
        # shutdown() wakes a thread blocked in accept(); close() alone may not.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._acceptor is not None:
            self._acceptor.join(5)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> ThreadedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EchoServer(ThreadedServer):
    """Echoes every byte back; sends ``prefix`` first (to tell servers apart)."""

    def __init__(self, prefix: bytes = b"", **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.prefix = prefix

    def handle(self, conn: socket.socket) -> None:
        if self.prefix:
            conn.sendall(self.prefix)
        while True:
            data = conn.recv(65536)
            if not data:
                conn.shutdown(socket.SHUT_WR)
                return
            conn.sendall(data)


SINK_DIGEST_LEN = 32


class SinkSourceServer(ThreadedServer):
    """Reads until EOF, then replies and closes. Reply layout::

        sha256(bytes received) [32] | N [8, big endian] | N random bytes | sha256(them) [32]

    so one client checks both directions and proves half-close works both ways.
    """

    def __init__(self, reply_size: int, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.reply_size = reply_size
        self.received: list[int] = []

    def handle(self, conn: socket.socket) -> None:
        got = hashlib.sha256()
        total = 0
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            got.update(data)
            total += len(data)
        self.received.append(total)
        conn.sendall(got.digest() + struct.pack("!Q", self.reply_size))
        sent = hashlib.sha256()
        remaining = self.reply_size
        while remaining:
            chunk = os.urandom(min(remaining, 1 << 20))
            sent.update(chunk)
            conn.sendall(chunk)
            remaining -= len(chunk)
        conn.sendall(sent.digest())
        conn.shutdown(socket.SHUT_WR)


def sink_source_exchange(addr: tuple[str, int], send_size: int, timeout: float = 60.0) -> int:
    """Send ``send_size`` random bytes, half-close, read the reply, check both hashes.

    Returns the number of payload bytes received back. Raises ``AssertionError`` on any
    mismatch.
    """
    with connect(addr, timeout=timeout) as sock:
        sent = hashlib.sha256()
        remaining = send_size
        while remaining:
            chunk = os.urandom(min(remaining, 1 << 20))
            sent.update(chunk)
            sock.sendall(chunk)
            remaining -= len(chunk)
        sock.shutdown(socket.SHUT_WR)
        their_digest = recv_exactly(sock, SINK_DIGEST_LEN)
        assert their_digest == sent.digest(), "server's sha256 of our upload does not match"
        (size,) = struct.unpack("!Q", recv_exactly(sock, 8))
        got = hashlib.sha256()
        remaining = size
        while remaining:
            chunk = sock.recv(min(remaining, 1 << 20))
            if not chunk:
                raise AssertionError(f"EOF with {remaining} of {size} reply bytes missing")
            got.update(chunk)
            remaining -= len(chunk)
        trailer = recv_exactly(sock, SINK_DIGEST_LEN)
        assert trailer == got.digest(), "sha256 of the downloaded reply does not match"
        assert sock.recv(1) == b"", "extra bytes after the reply"
        return size


def echo_roundtrip(addr: tuple[str, int], payload: bytes, timeout: float = 10.0) -> bytes:
    """Connect, send ``payload``, read the same number of bytes back and return them."""
    with connect(addr, timeout=timeout) as sock:
        sock.sendall(payload)
        return recv_exactly(sock, len(payload))


# ---------------------------------------------------------------------------- harness

READY_TIMEOUT = 20.0


@dataclass
class Tunnel:
    """A running LL + CC pair with one service named ``default``."""

    ll: Node
    cc: Node
    token: str
    state_dir: Path
    agent_addr: tuple[str, int]
    client_addr: tuple[str, int]
    server_addr: str


class Harness:
    """Starts nodes and servers for one test and stops all of them at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self._nodes: list[Node] = []
        self._servers: list[ThreadedServer] = []

    # -- processes

    def node(self, *args: str, name: str | None = None, env: dict[str, str] | None = None) -> Node:
        node = Node(*args, name=name, env=env)
        self._nodes.append(node)
        return node

    def start_ll(self, *args: str, name: str = "ll") -> tuple[Node, tuple[str, int]]:
        """``tcpgc ll ARGS``; waits until it listens for agents and returns that address."""
        ll = self.node("ll", *args, name=name)
        agent_addr = parse_addr(ll.wait_for(RE_LL_AGENT_PORT, READY_TIMEOUT)["addr"])
        return ll, agent_addr

    def start_cc(self, *args: str, token: str | None, name: str = "cc") -> Node:
        """``tcpgc cc ARGS`` with ``TCPGC_TOKEN`` set to ``token`` (unset if None)."""
        env = tcpgc_env({"TCPGC_TOKEN": token} if token is not None else {})
        return self.node("cc", *args, name=name, env=env)

    # -- servers

    def echo_server(self, prefix: bytes = b"", **kwargs) -> EchoServer:  # type: ignore[no-untyped-def]
        server = EchoServer(prefix=prefix, **kwargs).start()
        self._servers.append(server)
        return server  # type: ignore[return-value]

    def sink_source_server(self, reply_size: int) -> SinkSourceServer:
        server = SinkSourceServer(reply_size).start()
        self._servers.append(server)
        return server  # type: ignore[return-value]

    def adopt(self, server: ThreadedServer) -> ThreadedServer:
        """Stop ``server`` at teardown too (for servers started by the test itself)."""
        self._servers.append(server)
        return server

    # -- state

    def state_dir(self, name: str = "ll-state") -> Path:
        return self.tmp_path / name

    def token(self, state_dir: Path) -> str:
        return make_token(state_dir)

    def tunnel(
        self,
        server_addr: str,
        *,
        ll_args: Sequence[str] = (),
        cc_args: Sequence[str] = (),
        wait_joined: bool = True,
    ) -> Tunnel:
        """LL on 127.0.0.1:0 + CC to ``server_addr``, both joined (unless told not to wait)."""
        state = self.state_dir()
        token = self.token(state)
        ll, agent_addr = self.start_ll(
            "--clients", "127.0.0.1:0", "--cc", "127.0.0.1:0", "--state-dir", str(state), *ll_args
        )
        client_addr = parse_addr(ll.wait_for(service_re("default"), READY_TIMEOUT)["addr"])
        cc = self.start_cc(
            "--ll",
            format_addr(*agent_addr),
            "--server",
            server_addr,
            *cc_args,
            token=token,
        )
        if wait_joined:
            cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)
            ll.wait_for(RE_LL_AGENT_JOINED, READY_TIMEOUT)
        return Tunnel(ll, cc, token, state, agent_addr, client_addr, server_addr)

    def close(self) -> None:
        errors: list[BaseException] = []
        for node in reversed(self._nodes):
            try:
                node.stop()
            except BaseException as exc:  # keep cleaning up the rest
                errors.append(exc)
        for server in reversed(self._servers):
            try:
                server.stop()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def dump(self) -> str:
        return "\n".join(node.output() for node in self._nodes)


# ---------------------------------------------------------------------------- script mode
# Used by the firewall tests, where servers and clients must run inside a namespace.


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="support.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("echo", help="run an echo server until killed")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p = sub.add_parser("probe", help="exit 0 if a TCP connect succeeds, 1 if not")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=3.0)
    p = sub.add_parser("roundtrip", help="exit 0 if an echo round trip works")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--size", type=int, default=4096)
    args = parser.parse_args(argv)

    if args.cmd == "echo":
        server = EchoServer(host=args.host, port=args.port).start()
        print(f"echo listening on {server.addr_str}", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
        server.stop()
        return 0
    if args.cmd == "probe":
        try:
            with socket.create_connection((args.host, args.port), timeout=args.timeout):
                print(f"connected to {format_addr(args.host, args.port)}", flush=True)
                return 0
        except OSError as exc:
            print(f"cannot connect to {format_addr(args.host, args.port)}: {exc!r}", flush=True)
            return 1
    # roundtrip
    payload = os.urandom(args.size)
    try:
        back = echo_roundtrip((args.host, args.port), payload, timeout=args.timeout)
    except (OSError, AssertionError) as exc:
        print(f"round trip failed: {exc!r}", flush=True)
        return 1
    if back != payload:
        print("round trip returned different bytes", flush=True)
        return 1
    print(f"round trip ok ({len(payload)} bytes)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
