"""Tools for the attack tests: hostile peers, in-test proxies and a tunnel with knobs.

Everything here runs on 127.0.0.0/8 only. The hostile peers are deliberately dumb: they
send what an attacker could send and report what came back and when the LL hung up.
The one clever peer, `InsiderAgent`, holds the real join token and uses tcpgc's own
handshake: it stands in for an authenticated agent that sits on its clients, so that
clients are really waiting (with their bytes buffered in the LL) while others guess ids.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import os
import queue
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import (
    RE_CC_JOINED,
    RE_LL_AGENT_JOINED,
    READY_TIMEOUT,
    EchoServer,
    Harness,
    Node,
    format_addr,
    node_toml,
    parse_addr,
    recv_exactly,
    service_re,
)
from tcpgc.identity import JoinToken, agent_context, pin_server_name
from tcpgc.protocol.frame_auth import CONTROL, frame_auth
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.handshake import AgentHandshake, State, data_proof
from tcpgc.protocol.messages import MAX_VERSION, Data, Message, Open, Ping, Pong, encode

#: What legitimate clients send. If any attacker ever receives it, a client's stream
#: leaked to someone who is not its agent.
MARKER = b"CLIENT-SECRET-BYTES-0123456789:"

#: The agent-port handshake deadline the attack tests configure (the default is 10 s).
HANDSHAKE_TIMEOUT = 2.0

#: Slack on top of HANDSHAKE_TIMEOUT for "the LL closed it in time": the LL's loop is
#: Python on a small shared CI machine, busy with hundreds of connections at that moment.
CLOSE_MARGIN = 1.5

#: "Closed at once": a refused client or an unparseable first message.
PROMPT = 1.0


# ---------------------------------------------------------------------------- config


def write_toml(path: Path, top: dict[str, Any], services: dict[str, dict[str, Any]]) -> Path:
    """A node's config file: top-level keys, then one [services.NAME] table each."""
    path.write_text(node_toml(top, services))
    return path


# ---------------------------------------------------------------------------- tunnel


@dataclass
class Env:
    """A running LL (with a config file), its echo servers, and maybe a joined CC."""

    harness: Harness
    ll: Node
    token: str
    state_dir: Path
    agent_addr: tuple[str, int]
    plaintext: bool
    client_addrs: dict[str, tuple[str, int]]
    servers: dict[str, EchoServer]
    cc: Node | None = None

    @property
    def agent_str(self) -> str:
        return format_addr(*self.agent_addr)

    @property
    def join_token(self) -> JoinToken:
        return JoinToken.parse(self.token)

    def served(self) -> int:
        """Connections the inside servers accepted, all services together."""
        return sum(s.connections for s in self.servers.values())

    def start_cc(
        self,
        *,
        token: str | None = None,
        ll: str | None = None,
        services: dict[str, str] | None = None,
        name: str = "cc",
        wait: bool = True,
    ) -> Node:
        """A CC serving every service of this env (or `services`: name -> server)."""
        if services is None:
            services = {n: s.addr_str for n, s in self.servers.items()}
        top: dict[str, Any] = {"ll": ll or self.agent_str, "connect_timeout": 5.0}
        if self.plaintext:
            top["insecure_plaintext"] = True
        path = self.harness.tmp_path / f"{name}.toml"
        write_toml(path, top, {n: {"server": addr} for n, addr in services.items()})
        mark = self.ll.mark()
        cc = self.harness.start_cc("-c", str(path), token=token or self.token, name=name)
        if wait:
            cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)
            self.ll.wait_for(RE_LL_AGENT_JOINED, READY_TIMEOUT, since=mark)
        return cc


def start_env(
    harness: Harness,
    *,
    plaintext: bool = False,
    services: dict[str, dict[str, Any]] | None = None,
    ll_options: dict[str, Any] | None = None,
    with_cc: bool = True,
    state_name: str = "ll-state",
    name: str = "ll",
) -> Env:
    """LL on 127.0.0.1:0 with `handshake_timeout` = HANDSHAKE_TIMEOUT, one echo server per
    service (`services`: name -> extra [services.NAME] keys), and a joined CC."""
    services = services if services is not None else {"default": {}}
    state = harness.state_dir(state_name)
    token = harness.token(state)
    top: dict[str, Any] = {
        "cc": "127.0.0.1:0",
        "state_dir": str(state),
        "handshake_timeout": HANDSHAKE_TIMEOUT,
        "client_wait": 5.0,
        "insecure_plaintext": plaintext,
        **(ll_options or {}),
    }
    tables = {n: {"clients": "127.0.0.1:0", **body} for n, body in services.items()}
    config = write_toml(harness.tmp_path / f"{name}.toml", top, tables)
    ll, agent_addr = harness.start_ll("-c", str(config), name=name)
    client_addrs = {
        n: parse_addr(ll.wait_for(service_re(n), READY_TIMEOUT)["addr"]) for n in services
    }
    servers = {n: harness.echo_server() for n in services}
    env = Env(harness, ll, token, state, agent_addr, plaintext, client_addrs, servers)
    if with_cc:
        env.cc = env.start_cc()
    return env


def ll_refusal(ll: Node, local: str, *, since: int = 0, timeout: float = 10.0) -> str:
    """The reason in the LL's one "handshake failed from LOCAL: REASON" line."""
    m = ll.wait_for(
        rf"handshake failed from {re.escape(local)}: (?P<reason>.*)", timeout, since=since
    )
    return m["reason"]


def refusal_count(ll: Node, local: str, *, since: int = 0) -> int:
    return len(ll.find_all(rf"handshake failed from {re.escape(local)}:", since=since))


# ---------------------------------------------------------------------------- legit clients


def round_trip(addr: tuple[str, int], *, source: str = "127.0.0.1", size: int = 2048) -> None:
    """One client: connect (from `source`), send MARKER + random bytes, expect them back."""
    payload = MARKER + os.urandom(size)
    with socket.create_connection(addr, timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload, "echo returned other bytes"


class LegitTraffic:
    """Clients served one after another in a thread while an attack runs."""

    def __init__(self, addr: tuple[str, int]) -> None:
        self.addr = addr
        self.served = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                round_trip(self.addr)
                self.served += 1
            except (OSError, AssertionError) as exc:
                self.failures.append(repr(exc))
            self._stop.wait(0.02)

    def __enter__(self) -> LegitTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def check(self, minimum: int = 1) -> None:
        assert not self.failures, f"legit clients failed during the attack: {self.failures[:5]}"
        assert self.served >= minimum, f"only {self.served} legit clients served"


# ---------------------------------------------------------------------------- hostile peers


def attacker_tls_context() -> ssl.SSLContext:
    """What an attacker speaks TLS with: anything goes, certificates ignored."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_client_hello() -> bytes:
    """The bytes of a real TLS ClientHello (to send where TLS is not expected)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = attacker_tls_context().wrap_bio(incoming, outgoing, server_hostname="tcpgc.invalid")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


@dataclass
class Outcome:
    """What one hostile connection saw."""

    local: str  # our address as the LL logs it
    received: bytes = b""
    #: Seconds from our connect to the LL closing the connection; None: still open.
    closed_after: float | None = None
    tls_version: str | None = None
    peer_cert: bytes | None = None

    def messages(self) -> list[Message]:
        """The frames the LL sent us (plaintext only)."""
        decoder = FrameDecoder()
        decoder.receive_data(self.received)
        out = []
        while (message := decoder.next_message()) is not None:
            out.append(message)
        return out


def hostile(
    addr: tuple[str, int],
    payload: bytes = b"",
    *,
    tls: bool = False,
    source: str = "127.0.0.1",
    wait: float = HANDSHAKE_TIMEOUT + CLOSE_MARGIN + 2,
    server_hostname: str = "attacker.invalid",
) -> Outcome:
    """Connect, (TLS if asked,) send `payload`, then read until the LL hangs up."""
    raw = socket.create_connection(addr, timeout=wait, source_address=(source, 0))
    start = time.monotonic()
    sock: socket.socket = raw
    outcome = Outcome(format_addr(*raw.getsockname()[:2]))
    try:
        if tls:
            sock = attacker_tls_context().wrap_socket(raw, server_hostname=server_hostname)
            outcome.tls_version = sock.version()  # type: ignore[attr-defined]
            outcome.peer_cert = sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        if payload:
            sock.sendall(payload)
        outcome.received, closed = read_until_closed(sock, wait)
        outcome.closed_after = None if closed is None else time.monotonic() - start
    finally:
        sock.close()
    return outcome


def read_until_closed(sock: socket.socket, wait: float) -> tuple[bytes, float | None]:
    """(bytes read, seconds until EOF or reset); None if still open after `wait`."""
    start = time.monotonic()
    sock.settimeout(wait)
    seen = bytearray()
    try:
        while chunk := sock.recv(65536):
            seen += chunk
    except TimeoutError:
        return bytes(seen), None
    except (ssl.SSLError, OSError):
        pass  # a reset, or a TLS connection cut without close_notify: closed either way
    return bytes(seen), time.monotonic() - start


# ---------------------------------------------------------------------------- proxies


def shut_both(*socks: socket.socket) -> None:
    """Shut both directions of each socket down, whatever state it is in."""
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Pumps:
    """Shared plumbing of the in-test proxies: a listener, one thread per direction."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.addr: tuple[str, int] = self.listener.getsockname()[:2]
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._spawn(self._accept_loop)

    @property
    def addr_str(self) -> str:
        return format_addr(*self.addr)

    def _spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _keep(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._stopping:
                sock.close()
                return False
            self._socks.append(sock)
            return True

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self._keep(conn):
                self._spawn(self.handle, conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    @staticmethod
    def pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while chunk := src.recv(65536):
                if record is not None:
                    record += chunk
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):
            pass
        finally:
            shut_both(src, dst)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            socks = list(self._socks)
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(5)
        for sock in socks:
            sock.close()


class RecordingProxy(_Pumps):
    """A plain TCP relay to `upstream` that keeps, per connection in accept order, the
    bytes the downstream side (the CC) sent: what a passive eavesdropper would capture."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.captured: list[bytearray] = []
        self.replies: list[bytearray] = []  # what the LL sent back, same order
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        record, reply = bytearray(), bytearray()
        with self._lock:
            self.captured.append(record)
            self.replies.append(reply)
        try:
            up = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            conn.close()
            return
        up.settimeout(None)
        if not self._keep(up):
            return
        self._spawn(self.pump, up, conn, reply)
        self.pump(conn, up, record)

    def snapshot(self) -> list[tuple[bytes, bytes]]:
        """(sent by the CC, sent by the LL) for every connection so far."""
        with self._lock:
            return [(bytes(a), bytes(b)) for a, b in zip(self.captured, self.replies, strict=True)]


def split_frames(stream: bytes) -> list[bytes]:
    """The whole frames at the start of `stream`, each with its header, undecoded."""
    frames = []
    while len(stream) >= 3:
        end = 3 + int.from_bytes(stream[1:3], "big")
        if len(stream) < end:
            break
        frames.append(stream[:end])
        stream = stream[end:]
    return frames


class ReplayingLL(_Pumps):
    """A fake LL that plays a recorded LL's bytes to whoever connects, then listens.
    `heard` is what the agents sent it."""

    def __init__(self, recorded: bytes) -> None:
        self.recorded = recorded
        self.heard: list[bytes] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        seen = bytearray()
        try:
            conn.sendall(self.recorded)
            while chunk := conn.recv(65536):
                seen += chunk
        except OSError:
            pass
        with self._lock:
            self.heard.append(bytes(seen))


def self_signed_certificate(directory: Path, name: str = "mitm") -> tuple[Path, Path, bytes]:
    """A fresh self-signed certificate: (cert path, key path, SHA-256 of its DER)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tcpgc LL")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    der = cert.public_bytes(serialization.Encoding.DER)
    return cert_path, key_path, hashlib.sha256(der).digest()


class MitmTlsProxy(_Pumps):
    """An active man in the middle: terminates the agent's TLS with its own certificate,
    opens its own TLS connection to the real LL, and relays (and records) the cleartext.
    `handshakes` counts agents that completed TLS with it; `from_agent` is what they
    sent through it."""

    def __init__(self, upstream: tuple[str, int], cert: Path, key: Path) -> None:
        self.upstream = upstream
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.load_cert_chain(cert, key)
        self.handshakes = 0
        self.from_agent = bytearray()
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            down = self.server_ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            return  # the closing socket is in _socks and closed by stop()
        down.settimeout(None)
        with self._lock:
            self.handshakes += 1
        if not self._keep(down):
            return
        try:
            raw = socket.create_connection(self.upstream, timeout=10)
            up = attacker_tls_context().wrap_socket(raw, server_hostname="mitm.invalid")
        except (ssl.SSLError, OSError):
            return
        up.settimeout(None)
        if not self._keep(up):
            return
        self._spawn(self.pump, up, down, None)
        self.pump(down, up, self.from_agent)


# ---------------------------------------------------------------------------- insider


class InsiderAgent:
    """An agent that holds the real token, authenticates with tcpgc's own handshake and
    then sits on the OPENs it is sent: its clients stay waiting in the LL (their first
    bytes buffered there) until it claims them with `claim`, or they time out."""

    def __init__(self, env: Env, services: tuple[str, ...]) -> None:
        self.env = env
        self.token = env.join_token
        self.opens: queue.Queue[Open] = queue.Queue()
        self.sock = self._dial()
        decoder = FrameDecoder()
        handshake = AgentHandshake(
            self.token.secret,
            services=services,
            binding=self.token.fingerprint,
            tls=not env.plaintext,
        )
        self.sock.sendall(encode(handshake.start()))
        while handshake.state is not State.DONE:
            message = self._recv(decoder)
            reply = handshake.receive(message)
            if reply is not None:
                self.sock.sendall(encode(reply))
        self.session_key = handshake.session_key
        self._send_lock = threading.Lock()
        if env.plaintext:  # later frames carry MACs, as a real agent's do
            decoder.auth = frame_auth(handshake.session_key, CONTROL, agent=True)
        self.sock.settimeout(None)
        self._decoder = decoder
        self._thread = threading.Thread(target=self._read_loop, daemon=True)
        self._thread.start()

    def _dial(self) -> socket.socket:
        raw = socket.create_connection(self.env.agent_addr, timeout=10)
        if self.env.plaintext:
            return raw
        ctx = agent_context()
        return ctx.wrap_socket(raw, server_hostname=pin_server_name(self.token.fingerprint))

    def _recv(self, decoder: FrameDecoder) -> Message:
        while (message := decoder.next_message()) is None:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("the LL closed the insider's control connection")
            decoder.receive_data(chunk)
        return message

    def _read_loop(self) -> None:
        try:
            while True:
                message = self._recv(self._decoder)
                if isinstance(message, Open):
                    self.opens.put(message)
                elif isinstance(message, Ping):
                    self.send(Pong(message.token))
        except (OSError, AssertionError, ValueError):
            return

    def send(self, message: Message) -> None:
        """Send on the control connection (with its MAC in plaintext mode). Frames are
        numbered as they are sealed: sealing and sending go together, one thread at once."""
        with self._send_lock:
            self.sock.sendall(encode(message, self._decoder.auth))

    def next_open(self, timeout: float = 10.0) -> Open:
        return self.opens.get(timeout=timeout)

    def claim(self, conn_id: bytes, then: bytes = b"") -> socket.socket:
        """A data connection presenting `conn_id`: the client's stream follows on it
        (`then`: bytes sent in the same write as DATA)."""
        sock = self._dial()
        proof = data_proof(self.session_key, conn_id, self.token.fingerprint)
        sock.sendall(encode(Data(MAX_VERSION, conn_id, proof)) + then)
        return sock

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        self.sock.close()


@contextmanager
def insider(env: Env, services: tuple[str, ...]) -> Iterator[InsiderAgent]:
    mark = env.ll.mark()
    agent = InsiderAgent(env, services)
    try:
        env.ll.wait_for(RE_LL_AGENT_JOINED, READY_TIMEOUT, since=mark)
        yield agent
    finally:
        agent.close()


# ---------------------------------------------------------------------------- memory


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------------------- async attack


@dataclass
class AsyncOutcome:
    kind: str
    local: str = "?"
    received: bytes = b""
    #: Seconds from connect (TCP, and TLS if any) to the LL closing it; None: it did not.
    closed_after: float | None = None
    error: str | None = None


@dataclass
class Flood:
    """Many hostile connections at once, from several loopback sources, with asyncio."""

    addr: tuple[str, int]
    sources: list[str]
    wait: float = HANDSHAKE_TIMEOUT + CLOSE_MARGIN + 3
    outcomes: list[AsyncOutcome] = field(default_factory=list)

    async def one(
        self, i: int, kind: str, payload: bytes, *, tls: bool = False, dribble: bool = False
    ) -> AsyncOutcome:
        """Connect from sources[i % n]; send `payload` (one byte every 0.25 s if
        `dribble`); then read until the LL closes, timing it from the connect."""
        outcome = AsyncOutcome(kind)
        self.outcomes.append(outcome)
        source = self.sources[i % len(self.sources)]
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.wait + 10):
                reader, writer = await asyncio.open_connection(
                    *self.addr,
                    local_addr=(source, 0),
                    ssl=attacker_tls_context() if tls else None,
                    server_hostname="attacker.invalid" if tls else None,
                    ssl_handshake_timeout=self.wait if tls else None,
                )
                start = time.monotonic()
                outcome.local = format_addr(*writer.get_extra_info("sockname")[:2])
                if dribble:
                    for byte in payload:
                        writer.write(bytes([byte]))
                        await asyncio.sleep(0.25)
                        if reader.at_eof() or writer.transport.is_closing():
                            break  # the LL hung up (EOF or reset)
                elif payload:
                    writer.write(payload)
                outcome.received = await self._read_to_end(reader)
                outcome.closed_after = time.monotonic() - start
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError) as exc:
            outcome.error = repr(exc)
        finally:
            if writer is not None:
                writer.close()
                try:
                    await writer.wait_closed()
                except (OSError, ssl.SSLError):
                    pass
        return outcome

    async def _read_to_end(self, reader: asyncio.StreamReader) -> bytes:
        seen = bytearray()
        try:
            async with asyncio.timeout(self.wait):
                while chunk := await reader.read(65536):
                    seen += chunk
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            pass
        return bytes(seen)


# ---------------------------------------------------------------------------- fake LL


class FakeLL:
    """An LL the agent trusts (its token pins this LL's own certificate and holds a
    secret it knows) that is hostile: it completes tcpgc's handshake on the first
    connection, then sends whatever OPENs the test asks for and counts the answers.

    Every later connection (the agent's data connections) is never accepted: it waits
    in the listen backlog, its TLS handshake unanswered, so each OPEN the agent acts on
    keeps its sockets open until the agent's connect timeout.
    """

    def __init__(self, directory: Path) -> None:
        cert, key, fingerprint = self_signed_certificate(directory, "fake-ll")
        self.secret = os.urandom(32)
        self.token = str(JoinToken(self.secret, fingerprint))
        self._fingerprint = fingerprint
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self._ctx.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.addr: tuple[str, int] = self.listener.getsockname()[:2]
        self.joined = threading.Event()
        self.open_failed = 0
        self.reasons: list[str] = []
        self._control: ssl.SSLSocket | None = None
        self._outgoing: queue.Queue[bytes] = queue.Queue()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def addr_str(self) -> str:
        return format_addr(*self.addr)

    def _serve(self) -> None:
        from tcpgc.protocol.handshake import LLHandshake, key_id
        from tcpgc.protocol.messages import OpenFailed

        try:
            conn, _ = self.listener.accept()
            conn.settimeout(10)
            control = self._ctx.wrap_socket(conn, server_side=True)
            decoder = FrameDecoder()
            handshake = LLHandshake(
                {key_id(self.secret): self.secret}, heartbeat_ms=10_000, binding=self._fingerprint
            )
            while handshake.state is not State.DONE:
                message = self._recv(control, decoder)
                control.sendall(encode(handshake.receive(message)))
            self._control = control
            self.joined.set()
            # One thread does all the TLS of the control connection (an SSL object must
            # not be used by two threads at once): what the test sends waits in a queue.
            while not self._stopping:
                while not self._outgoing.empty():
                    control.settimeout(30)
                    control.sendall(self._outgoing.get())
                control.settimeout(0.05)
                try:
                    message = self._recv(control, decoder)
                except TimeoutError:
                    continue
                if isinstance(message, OpenFailed):
                    self.open_failed += 1
                    self.reasons.append(message.reason)
                elif isinstance(message, Ping):
                    self._outgoing.put(encode(Pong(message.token)))
        except (OSError, AssertionError, ValueError):
            return

    @staticmethod
    def _recv(sock: socket.socket, decoder: FrameDecoder) -> Message:
        while (message := decoder.next_message()) is None:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError("the agent closed its control connection")
            decoder.receive_data(chunk)
        return message

    def send_opens(self, service: str, count: int) -> None:
        """`count` OPENs for `service`, each with a fresh id, in one write."""
        frames = b"".join(
            encode(Open(os.urandom(16), service, "127.0.0.1", 40000 + i % 20000, "127.0.0.1", 1))
            for i in range(count)
        )
        self._outgoing.put(frames)

    def stop(self) -> None:
        self._stopping = True  # the serving thread sees it within one recv timeout
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes an accept() still waiting
        except OSError:
            pass
        self.listener.close()
        self._thread.join(5)
        if self._control is not None:
            self._control.close()
