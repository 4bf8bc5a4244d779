"""Classic mode against the real socat commands of the seed, and against itself.

Every node is a real process on 127.0.0.1: `python -m tcpgc ... --classic` and `socat`
with the seed's exact option strings (only the port numbers and 127.0.0.1 substituted).
Readiness is a log line, never a sleep. That nothing happens while no client waits is
shown by polls that a CC logs as refused, which come after what must not happen; the
only sleeps left measure a rate or a cap that no log line reports. Every wait is bounded.

What socat itself limits, and what these tests therefore do not ask of a mixed pair:
- the seed's socat CC dials once per `interval=2` and sleeps 2 s after every success
  too, so through it clients are served one per 2 s at most;
- the seed's socat LL forks one child per client and that child binds the agent port;
  a second client arriving while one waits cannot bind it and is closed at once.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import ThreadedServer, free_port

REPO = Path(__file__).resolve().parents[2]
SOCAT = "socat"
TEN_MB = 10 * 1024 * 1024
#: A poll of the seed's socat CC that found the agent port closed (socat -d -d -d).
SOCAT_POLL_REFUSED = r"connect\(.*\): Connection refused"
#: The classic tcpgc CC found the agent port closed (said once per run of refusals).
TCPGC_POLL_REFUSED = r"refused, no client waiting"

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", SOCAT], capture_output=True).returncode != 0,
    reason="socat is not installed (apt-get install socat)",
)


# ---- processes -----------------------------------------------------------------------


class Proc:
    """A process in its own session (socat forks: the whole group is ours to kill), its
    stdout and stderr read line by line in a thread so tests can wait on a line."""

    #: Every Proc started and not yet stopped: the autouse fixture below stops them all,
    #: even those of a pair whose other half failed to start.
    live: list[Proc] = []

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env=env,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        Proc.live.append(self)

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if m := re.search(pattern, line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.popen.poll() is not None:
                    raise AssertionError(
                        f"{self.name}: no line matching {pattern!r} within {timeout} s "
                        f"(exit {self.popen.poll()}):\n{self.log()}"
                    )
                self._cond.wait(min(left, 0.2))

    def count(self, pattern: str) -> int:
        with self._cond:
            return sum(1 for line in self.lines if re.search(pattern, line))

    def log(self) -> str:
        with self._cond:
            return "\n".join(f"  {self.name}| {line}" for line in self.lines[-200:])

    def group(self) -> list[int]:
        """Live (or zombie) processes of this process group."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # pgrp is the 3rd field after "(comm)"; comm may contain spaces.
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == self.popen.pid:
                pids.append(int(entry))
        return pids

    def sockets(self) -> int:
        """Socket descriptors the process holds (its open connections and listeners)."""
        count = 0
        for fd in os.listdir(f"/proc/{self.popen.pid}/fd"):
            try:
                if os.readlink(f"/proc/{self.popen.pid}/fd/{fd}").startswith("socket:"):
                    count += 1
            except OSError:
                pass
        return count

    def stop(self) -> None:
        if self in Proc.live:
            Proc.live.remove(self)
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        try:  # forked children outlive their parent: kill what is left of the group
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._reader.join(5)
        assert self.popen.stdout is not None
        self.popen.stdout.close()


@pytest.fixture(autouse=True)
def _stop_every_process() -> Iterator[None]:
    yield
    for proc in reversed(Proc.live[:]):
        print(proc.log())
        proc.stop()


def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` in a short bounded loop (for counts that settle, not for readiness)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


# ---- servers -------------------------------------------------------------------------


class Server(ThreadedServer):
    """A threaded TCP server on 127.0.0.1 running `handler` per connection, counting
    the connections it accepts."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        super().__init__()
        self.handler = handler
        self.start()

    @property
    def port(self) -> int:
        return self.addr[1]

    @property
    def accepted(self) -> int:
        return self.connections

    def handle(self, conn: socket.socket) -> None:
        self.handler(conn)

    def close(self) -> None:
        self.stop()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def digest(conn: socket.socket) -> None:
    """Read to EOF, then answer with the SHA-256 and length of what came: half-close."""
    h = hashlib.sha256()
    n = 0
    while data := conn.recv(1 << 20):
        h.update(data)
        n += len(data)
    conn.sendall(f"{h.hexdigest()} {n}\n".encode())


def banner(conn: socket.socket) -> None:
    """Speaks first, like SSH or SMTP."""
    conn.sendall(b"220 classic banner\r\n")
    echo(conn)


@pytest.fixture
def servers() -> Iterator[Callable[[Callable[[socket.socket], None]], Server]]:
    made: list[Server] = []

    def make(handler: Callable[[socket.socket], None]) -> Server:
        made.append(Server(handler))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.fixture(scope="module")
def web_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("www")
    blob = os.urandom(TEN_MB)
    (root / "ten.bin").write_bytes(blob)
    (root / "hello.txt").write_text("hello through the tunnel\n")
    return root, hashlib.sha256(blob).hexdigest()


# ---- the pairs -----------------------------------------------------------------------


@dataclass
class Pair:
    """An LL and a CC; one of them may be socat."""

    kind: str
    clients: tuple[str, int]
    ll: Proc
    cc: Proc

    @property
    def socats(self) -> list[Proc]:
        return [p for p in (self.ll, self.cc) if p.name.startswith("socat")]

    @property
    def tcpgcs(self) -> list[Proc]:
        return [p for p in (self.ll, self.cc) if p.name.startswith("tcpgc")]


def tcpgc(*args: str) -> list[str]:
    return [sys.executable, "-m", "tcpgc", *args]


def start_tcpgc_ll(client_wait: float = 10.0) -> tuple[Proc, int, int]:
    ll = Proc(
        "tcpgc-ll",
        tcpgc(
            "ll",
            "--classic",
            "--clients",
            "127.0.0.1:0",
            "--cc",
            # Not port 0: classic mode closes its agent port between clients, and a port
            # the kernel picked may go, meanwhile, to the client listener's port 0.
            f"127.0.0.1:{free_port()}",
            "--client-wait",
            str(client_wait),
        ),
    )
    agent = int(ll.wait_for(r"listening for agents on 127\.0\.0\.1:(\d+)")[1])
    clients = int(ll.wait_for(r"listening for clients on 127\.0\.0\.1:(\d+)")[1])
    assert ll.count(r"WARNING .*NO authentication and NO encryption") == 1, ll.log()
    return ll, clients, agent


def start_socat_ll() -> tuple[Proc, int, int]:
    clients, agent = free_port(), free_port()
    # The seed: socat -d -d -d tcp-l:8000,reuseaddr,fork tcp-l:8001,reuseaddr
    ll = Proc(
        "socat-ll",
        [SOCAT, "-d", "-d", "-d", f"tcp-l:{clients},reuseaddr,fork", f"tcp-l:{agent},reuseaddr"],
    )
    ll.wait_for(rf"listening on .*:{clients}\b")
    return ll, clients, agent


def start_socat_cc(agent: int, server: int) -> Proc:
    # The seed: socat -d -d -d tcp:<LL>:8001,forever,interval=2,fork tcp:<server>:7200
    return Proc(
        "socat-cc",
        [
            SOCAT,
            "-d",
            "-d",
            "-d",
            f"tcp:127.0.0.1:{agent},forever,interval=2,fork",
            f"tcp:127.0.0.1:{server}",
        ],
    )


def start_tcpgc_cc(agent: int, server: int, interval: float | None = None) -> Proc:
    extra = [] if interval is None else ["--interval", str(interval)]
    cc = Proc(
        "tcpgc-cc",
        tcpgc(
            "cc",
            "--classic",
            "--ll",
            f"127.0.0.1:{agent}",
            "--server",
            f"127.0.0.1:{server}",
            *extra,
        ),
    )
    cc.wait_for(r"polling LL 127\.0\.0\.1:\d+")
    assert cc.count(r"WARNING .*NO authentication and NO encryption") == 1, cc.log()
    return cc


@pytest.fixture
def pairs() -> Iterator[Callable[..., Pair]]:
    """Starts pairs (each test checks for leaks itself, while the nodes still run);
    stops them at the end."""
    made: list[Pair] = []

    def make(
        kind: str, server: int, client_wait: float = 10.0, interval: float | None = None
    ) -> Pair:
        if kind == "tcpgc-ll+socat-cc":
            ll, clients, agent = start_tcpgc_ll(client_wait)
            pair = Pair(kind, ("127.0.0.1", clients), ll, start_socat_cc(agent, server))
        elif kind == "socat-ll+tcpgc-cc":
            ll, clients, agent = start_socat_ll()
            pair = Pair(kind, ("127.0.0.1", clients), ll, start_tcpgc_cc(agent, server, interval))
        else:
            ll, clients, agent = start_tcpgc_ll(client_wait)
            pair = Pair(kind, ("127.0.0.1", clients), ll, start_tcpgc_cc(agent, server, interval))
        made.append(pair)
        return pair

    yield make
    for pair in made:
        for proc in (pair.cc, pair.ll):
            proc.stop()
        print(pair.ll.log())
        print(pair.cc.log())


def assert_no_leaks(pair: Pair, baseline_sockets: dict[str, int]) -> None:
    """After the clients are gone: each socat is back to its one parent process (no
    forked child left behind, no zombie), each tcpgc node back to its idle sockets."""
    for proc in pair.socats:
        eventually(
            lambda p=proc: len(p.group()) == 1,  # type: ignore[misc]
            10,
            f"{proc.name} back to one process, has {proc.group()}",
        )
    for proc in pair.tcpgcs:
        eventually(
            lambda p=proc: p.sockets() <= baseline_sockets[p.name],  # type: ignore[misc]
            10,
            f"{proc.name} back to {baseline_sockets[proc.name]} sockets, has {proc.sockets()}",
        )


def idle_sockets(pair: Pair) -> dict[str, int]:
    return {p.name: p.sockets() for p in pair.tcpgcs}


# ---- clients -------------------------------------------------------------------------


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


def http_get(addr: tuple[str, int], path: str, timeout: float = 20.0) -> tuple[int, bytes]:
    with socket.create_connection(addr, timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: tunnel\r\n\r\n".encode())
        response = recv_all(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, body


def upload(addr: tuple[str, int], payload: bytes, timeout: float = 20.0) -> str:
    """Send `payload`, half-close, read the server's digest until its EOF."""
    with socket.create_connection(addr, timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock).decode()


def echo_once(addr: tuple[str, int], payload: bytes, timeout: float = 20.0) -> bool:
    try:
        with socket.create_connection(addr, timeout=timeout) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            return recv_all(sock) == payload
    except OSError:
        return False


def simultaneous(addr: tuple[str, int], n: int, timeout: float = 30.0) -> list[bool]:
    """`n` clients released together; each sends its own bytes and wants them back."""
    results = [False] * n
    gate = threading.Barrier(n)

    def one(i: int) -> None:
        gate.wait(timeout)
        results[i] = echo_once(addr, f"client {i} ".encode() * 100, timeout)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return results


MIXED = ["tcpgc-ll+socat-cc", "socat-ll+tcpgc-cc"]


# ---- both mixed pairs ----------------------------------------------------------------


@pytest.mark.parametrize("kind", MIXED)
def test_http_server_and_10mb_download(
    kind: str, pairs: Callable[..., Pair], web_root: tuple[Path, str]
) -> None:
    """The seed's own test: `python3 -m http.server` behind the tunnel, sequential
    clients, then a 10 MB file whose SHA-256 must match."""
    root, blob_sha = web_root
    port = free_port()
    web = Proc(
        "http.server",
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
        + ["--directory", str(root)],
    )
    try:
        web.wait_for(r"Serving HTTP on")
        pair = pairs(kind, port)
        baseline = idle_sockets(pair)
        for _ in range(3):  # sequential clients
            status, body = http_get(pair.clients, "/")
            assert status == 200 and b"ten.bin" in body, body[:200]
        status, body = http_get(pair.clients, "/hello.txt")
        assert (status, body) == (200, b"hello through the tunnel\n")
        status, body = http_get(pair.clients, "/ten.bin", timeout=60)
        assert status == 200
        assert len(body) == TEN_MB
        assert hashlib.sha256(body).hexdigest() == blob_sha
        assert_no_leaks(pair, baseline)
    finally:
        web.stop()


@pytest.mark.parametrize("kind", [*MIXED, "tcpgc-ll+tcpgc-cc"])
def test_10mb_upload_and_half_close(
    kind: str, pairs: Callable[..., Pair], servers: Callable[..., Server]
) -> None:
    """Client → server 10 MB, then the client half-closes and still gets the server's
    answer (its SHA-256 of what arrived) on the other direction."""
    server = servers(digest)
    pair = pairs(kind, server.port)
    baseline = idle_sockets(pair)
    payload = os.urandom(TEN_MB)
    answer = upload(pair.clients, payload, timeout=60)
    assert answer == f"{hashlib.sha256(payload).hexdigest()} {TEN_MB}\n"
    small = b"half-close keeps the other direction open"
    assert upload(pair.clients, small) == f"{hashlib.sha256(small).hexdigest()} {len(small)}\n"
    assert_no_leaks(pair, baseline)


def test_tcpgc_ll_serves_simultaneous_clients_of_socat_cc(
    pairs: Callable[..., Pair], servers: Callable[..., Server]
) -> None:
    """Ten clients at once through tcpgc LL + the seed's socat CC: the classic LL
    queues them and all ten are served (the seed's LL serves one and drops the rest).

    The socat CC takes one connection per `interval=2` at worst; its sleep is cut short
    whenever a forked child exits (SIGCHLD), so short clients like these go much faster
    (measured: 20 in 2 s, 200 in 5 s). The clients may wait 30 s, enough for the worst
    case of 10 x 2 s."""
    server = servers(echo)
    pair = pairs("tcpgc-ll+socat-cc", server.port, client_wait=30)
    baseline = idle_sockets(pair)
    started = time.monotonic()
    results = simultaneous(pair.clients, 10, timeout=40)
    elapsed = time.monotonic() - started
    print(f"tcpgc LL + socat CC: {sum(results)} of 10 simultaneous clients in {elapsed:.1f} s")
    assert sum(results) == 10, pair.ll.log()
    assert server.accepted == 10
    assert_no_leaks(pair, baseline)


def test_socat_ll_with_tcpgc_cc_clients_overlapping_and_simultaneous(
    pairs: Callable[..., Pair], servers: Callable[..., Server]
) -> None:
    """The seed's socat LL + tcpgc classic CC.

    Overlapping clients (each arrives while the others are still connected) are all
    served, within about one CC interval each. A burst of simultaneous clients is where
    the socat LL fails by design: every client that arrives while another waits forks a
    child that cannot bind the agent port and is closed. The CC cannot help that; what
    this asserts is that each client is either served intact or closed, none hangs, and
    the one the socat LL kept is served."""
    server = servers(echo)
    pair = pairs("socat-ll+tcpgc-cc", server.port, interval=0.5)
    baseline = idle_sockets(pair)

    held = []
    try:
        for i in range(5):
            sock = socket.create_connection(pair.clients, timeout=10)
            held.append(sock)
            sock.sendall(f"overlapping {i}".encode())
            assert sock.recv(100) == f"overlapping {i}".encode()
        # All five relays are open at once; each still works.
        for i, sock in enumerate(held):
            sock.sendall(f"again {i}".encode())
            assert sock.recv(100) == f"again {i}".encode()
    finally:
        for sock in held:
            sock.close()

    before = server.accepted
    results = simultaneous(pair.clients, 5, timeout=15)
    served = sum(results)
    assert 1 <= served <= 5
    assert server.accepted - before >= served
    eventually(lambda: pair.ll.count(r"Address already in use") >= 5 - served, 5, "socat drops")
    print(f"socat LL + tcpgc CC: burst of 5 at once, {served} served (socat LL drops the rest)")
    assert_no_leaks(pair, baseline)


# ---- no idle storm -------------------------------------------------------------------


def test_socat_cc_is_not_drawn_into_idle_connections(
    pairs: Callable[..., Pair], servers: Callable[..., Server]
) -> None:
    """Must show 2: the seed's socat CC polls every 2 s and forks a server connection
    for every LL connection it gets through. With tcpgc's classic LL the agent port is
    closed while no client waits, so over two polls the server sees no connection, and
    after one client exactly that one, the next poll being refused again."""
    server = servers(echo)
    pair = pairs("tcpgc-ll+socat-cc", server.port)
    eventually(lambda: pair.cc.count(SOCAT_POLL_REFUSED) >= 2, 10, "two polls of the socat CC")
    assert server.accepted == 0
    assert len(pair.cc.group()) == 1, "socat CC forked children with no client"
    assert echo_once(pair.clients, b"one client")
    assert server.accepted == 1
    polls = pair.cc.count(SOCAT_POLL_REFUSED)
    eventually(lambda: pair.cc.count(SOCAT_POLL_REFUSED) > polls, 10, "the next poll, refused")
    assert server.accepted == 1, f"{server.accepted} server connections for one client"
    eventually(lambda: len(pair.cc.group()) == 1, 5, "the socat CC's child for the client gone")


def test_control_socat_cc_storms_an_always_open_port(servers: Callable[..., Server]) -> None:
    """The control for the test above: the same socat CC against a port that accepts
    whenever it is asked does open idle server connections, one per 2 s, forever. So the
    bound above is tcpgc's doing."""
    server = servers(echo)
    always_open = servers(lambda conn: conn.recv(1))  # accepts, says nothing, holds
    cc = start_socat_cc(always_open.port, server.port)
    try:
        eventually(lambda: server.accepted >= 3, 8, "socat CC opening idle connections")
        assert len(cc.group()) >= 3
    finally:
        cc.stop()


@pytest.mark.parametrize("kind", ["socat-ll+tcpgc-cc", "tcpgc-ll+tcpgc-cc"])
def test_tcpgc_cc_is_quiet_while_no_client_waits(
    kind: str, pairs: Callable[..., Pair], servers: Callable[..., Server]
) -> None:
    server = servers(echo)
    pair = pairs(kind, server.port, interval=0.2)
    pair.cc.wait_for(TCPGC_POLL_REFUSED)  # it polls; nobody waits
    assert server.accepted == 0
    refusals = pair.cc.count(TCPGC_POLL_REFUSED)
    assert echo_once(pair.clients, b"one client")
    # The CC dials again only once the LL has spoken on the connection it got, by
    # which time the LL (socat or tcpgc) has closed its agent port: no stray connection
    # slips into the backlog just before the close. That dial, refused, is said anew
    # (a connection ended the run of refusals), after any stray one would have been.
    eventually(
        lambda: pair.cc.count(TCPGC_POLL_REFUSED) > refusals, 10, "a refused poll after the client"
    )
    assert server.accepted == 1, server.accepted


def test_tcpgc_cc_bounds_silent_connections(servers: Callable[..., Server]) -> None:
    """An "LL" that accepts every connection and never says anything (a wrong port, an
    attacker, a tcpgc LL not in classic mode): the classic CC holds at most MAX_SILENT
    (32) connections to the server, not one more per poll."""
    server = servers(echo)
    black_hole = servers(lambda conn: conn.recv(1))
    cc = start_tcpgc_cc(black_hole.port, server.port, interval=0.1)
    try:
        # One unconfirmed connection per 0.2 s (CONFIRM_GRACE): the cap is hit in ~7 s.
        eventually(lambda: server.accepted >= 32, 15, "the CC to reach its cap")
        time.sleep(1)
        assert server.accepted == 32, server.accepted
        assert black_hole.accepted == 32, black_hole.accepted
    finally:
        cc.stop()


def test_tcpgc_cc_slows_down_for_a_port_that_accepts_and_closes(
    servers: Callable[..., Server],
) -> None:
    """A port that accepts and closes at once: every such connection means the LL had
    no client, so the CC waits its interval instead of spinning."""
    server = servers(echo)
    slammer = servers(lambda conn: None)
    cc = start_tcpgc_cc(slammer.port, server.port, interval=0.5)
    try:
        time.sleep(3)
        # 3 s / 0.5 s = 6 polls. Spinning would be thousands.
        assert slammer.accepted <= 7, slammer.accepted
        assert server.accepted <= slammer.accepted
    finally:
        cc.stop()


# ---- tcpgc classic on both sides -----------------------------------------------------


def test_tcpgc_pair_serves_200_simultaneous_clients(
    pairs: Callable[..., Pair], servers: Callable[..., Server]
) -> None:
    """Must show 3: 200 clients released together, all 200 served intact (the seed's
    socat pair serves 9 of them)."""
    server = servers(echo)
    pair = pairs("tcpgc-ll+tcpgc-cc", server.port)
    baseline = idle_sockets(pair)
    started = time.monotonic()
    results = simultaneous(pair.clients, 200)
    elapsed = time.monotonic() - started
    print(f"tcpgc classic pair: {sum(results)} of 200 simultaneous clients in {elapsed:.2f} s")
    assert sum(results) == 200
    assert server.accepted == 200  # one server connection per client, none idle
    assert_no_leaks(pair, baseline)


def test_tcpgc_pair_server_speaks_first(
    pairs: Callable[..., Pair], servers: Callable[..., Server]
) -> None:
    server = servers(banner)
    pair = pairs("tcpgc-ll+tcpgc-cc", server.port)
    with socket.create_connection(pair.clients, timeout=10) as sock:
        assert sock.recv(100) == b"220 classic banner\r\n"
        sock.sendall(b"EHLO")
        assert sock.recv(100) == b"EHLO"


def test_tcpgc_pair_server_down_closes_the_client(pairs: Callable[..., Pair]) -> None:
    """The inside server is down: the client is reset at once (as socat closes it), the
    CC says why, and the next client is treated the same, not left hanging."""
    pair = pairs("tcpgc-ll+tcpgc-cc", free_port(), interval=0.2)
    for _ in range(2):
        started = time.monotonic()
        assert not echo_once(pair.clients, b"anyone there?", timeout=10)
        assert time.monotonic() - started < 5
    pair.cc.wait_for(r"cannot reach server 127\.0\.0\.1:\d+: connection refused")


def _refused(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def _dial(addr: tuple[str, int]) -> socket.socket | None:
    try:
        return socket.create_connection(addr, timeout=5)
    except ConnectionRefusedError:
        return None


def test_tcpgc_ll_agent_port_only_while_clients_wait() -> None:
    """The seed's signal, kept: the agent port refuses while nobody waits, accepts
    while a client waits (that connection is the client's stream), and a client nobody
    serves is closed after --client-wait instead of hanging."""
    ll, clients, agent = start_tcpgc_ll(client_wait=1.0)
    try:
        assert _refused(("127.0.0.1", agent))
        with socket.create_connection(("127.0.0.1", clients), timeout=10) as client:
            client.sendall(b"GET / before any CC")
            cc: list[socket.socket | None] = [None]

            def got_through() -> bool:
                cc[0] = _dial(("127.0.0.1", agent))
                return cc[0] is not None

            eventually(got_through, 5, "the agent port to open for a waiting client")
            assert cc[0] is not None
            with cc[0] as agent_side:
                agent_side.settimeout(10)
                assert agent_side.recv(100) == b"GET / before any CC"
                agent_side.sendall(b"reply")
                assert client.recv(100) == b"reply"
        assert _refused(("127.0.0.1", agent)), "agent port open with nobody waiting"

        with socket.create_connection(("127.0.0.1", clients), timeout=10) as lonely:
            started = time.monotonic()
            try:
                assert lonely.recv(100) == b""
            except ConnectionResetError:
                pass
            assert 0.5 < time.monotonic() - started < 5
        ll.wait_for(r"no CC connection within 1\.0 s: closing client")
        eventually(lambda: _refused(("127.0.0.1", agent)), 5, "agent port closed again")
    finally:
        ll.stop()
        print(ll.log())


# ---- command line --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cc", "--ll", "127.0.0.1:1", "--server", "127.0.0.1:2", "--interval", "1"], "only with"),
        (
            ["cc", "--classic", "--ll", "127.0.0.1:1", "--server", "127.0.0.1:2"]
            + ["--interval", "0"],
            "positive",
        ),
    ],
)
def test_cli_interval_errors(args: list[str], message: str) -> None:
    done = subprocess.run(tcpgc(*args), capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
