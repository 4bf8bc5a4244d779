"""Helpers for the resumable-stream tests: the log lines of the resume contract, a
paced two-way transfer, many echo streams at once, and servers and clients that say
when (wall clock) their connection ended. Like reliability_tools.py it uses only the
standard library, so it runs as a script inside a network namespace::

    python resume_tools.py paced-server HOST PORT --size N --seconds S
    python resume_tools.py paced-client HOST PORT --size N --seconds S
    python resume_tools.py echo-many HOST PORT --streams N --until FILE
    python resume_tools.py echo-log HOST PORT
    python resume_tools.py hold HOST PORT

Each prints its progress on stdout, one event a line, for ``Process.wait_for``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from reliability_tools import Streamer
from support import EchoServer, ThreadedServer, connect, format_addr, recv_exactly

# Log lines of the resume contract (searched, not full-line matched).
RE_LL_WAITS = (
    r"client (?P<peer>\S+) of service '(?P<svc>[^']+)' waits up to (?P<w>[\d.]+) s "
    r"for its agent to resume"
)
RE_LL_RESUMED = (
    r"client (?P<peer>\S+) of service '(?P<svc>[^']+)' resumed after (?P<pause>[\d.]+) s: "
    r"(?P<replayed>\d+) bytes replayed"
)
RE_CC_RESUMED = (
    r"service '(?P<svc>[^']+)' connection (?P<id>[0-9a-f]+) resumed after "
    r"(?P<pause>[\d.]+) s: (?P<replayed>\d+) bytes replayed"
)
RE_LL_NOT_RESUMED = (
    r"client (?P<peer>\S+) of service '(?P<svc>[^']+)' not resumed within (?P<w>[\d.]+) s: "
    r"closing it"
)
RE_CC_NOT_RESUMED = (
    r"service '(?P<svc>[^']+)' connection (?P<id>[0-9a-f]+) not resumed within "
    r"(?P<w>[\d.]+) s: closing it"
)
RE_RESUME_REFUSED = r"resume refused from (?P<addr>\S+): (?P<why>.+)"

#: Frame type of RESUME: the first frame of a data connection that takes a stream over.
RESUME_TYPE = 13
#: RESUME payload: "TGC", version (1), stream id (16), epoch (u32), received (u64), proof.
RESUME_HEAD = struct.Struct("!3sB16sIQ")
PROOF_SIZE = 32

CHUNK = 64 * 1024
SIZE_HEADER = struct.Struct("!Q")
DIGEST_SIZE = 32


def open_fds(pid: int) -> int:
    """How many file descriptors process ``pid`` holds now (Linux)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------------------- paced transfer
# One connection carries `size` bytes each way at once, each direction paced to last
# `seconds`. The server speaks first: size (u64), its bytes, sha256 of them; once the
# client's upload has ended (half-close) it sends sha256 of what it received and closes.


def paced_send(
    sock: socket.socket, size: int, seconds: float, digest: hashlib._Hash, progress: list[int]
) -> None:
    """Send ``size`` random bytes on a schedule that spreads them over ``seconds``; after
    a stall, catch up as fast as the connection takes them."""
    start = time.monotonic()
    sent = 0
    while sent < size:
        delay = start + seconds * sent / size - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        data = os.urandom(min(CHUNK, size - sent))
        sock.sendall(data)
        digest.update(data)
        sent += len(data)
        progress[0] = sent


class PacedServer(ThreadedServer):
    """Sends each client ``size`` paced bytes while taking in its upload (see above)."""

    def __init__(self, size: int, seconds: float, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.size = size
        self.seconds = seconds

    def handle(self, conn: socket.socket) -> None:
        peer = format_addr(*conn.getpeername()[:2])
        upload = hashlib.sha256()
        received = [0]

        def take_upload() -> None:
            try:
                while chunk := conn.recv(1 << 20):
                    upload.update(chunk)
                    received[0] += len(chunk)
            except OSError:
                pass  # the sending side reports the connection's end

        reader = threading.Thread(target=take_upload, daemon=True)
        reader.start()
        try:
            download = hashlib.sha256()
            conn.sendall(SIZE_HEADER.pack(self.size))
            paced_send(conn, self.size, self.seconds, download, [0])
            conn.sendall(download.digest())
            reader.join()
            conn.sendall(upload.digest())
            conn.shutdown(socket.SHUT_WR)
            print(f"served {peer}: received {received[0]}, sent {self.size}", flush=True)
        except OSError as exc:
            print(f"failed {peer}: {exc!r} after receiving {received[0]}", flush=True)
            raise


def paced_client(host: str, port: int, size: int, seconds: float, timeout: float) -> int:
    """The client side of the paced transfer. Prints ``connected from ADDR``, then
    ``streaming`` once a tenth has crossed each way, then ``ok: ...`` or ``failed: ...``."""
    upload, download = hashlib.sha256(), hashlib.sha256()
    sent = [0]
    writer_error: list[BaseException] = []
    longest_stall = 0.0
    try:
        sock = connect((host, port), timeout=timeout)
    except OSError as exc:
        print(f"failed: cannot connect: {exc!r}", flush=True)
        return 1
    print(f"connected from {format_addr(*sock.getsockname()[:2])}", flush=True)

    def give_upload() -> None:
        try:
            paced_send(sock, size, seconds, upload, sent)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            writer_error.append(exc)

    writer = threading.Thread(target=give_upload, daemon=True)
    with sock:
        try:
            writer.start()
            (expected,) = SIZE_HEADER.unpack(recv_exactly(sock, SIZE_HEADER.size))
            got = 0
            streaming = False
            last = time.monotonic()
            while got < expected:
                chunk = sock.recv(min(1 << 20, expected - got))
                if not chunk:
                    raise AssertionError(f"EOF after {got} of {expected} downloaded bytes")
                now = time.monotonic()
                longest_stall = max(longest_stall, now - last)
                last = now
                download.update(chunk)
                got += len(chunk)
                if not streaming and min(got, sent[0]) >= size // 10:
                    streaming = True
                    print("streaming", flush=True)
            trailer = recv_exactly(sock, 2 * DIGEST_SIZE)
            writer.join(timeout)
            if writer_error:
                raise writer_error[0]
            if writer.is_alive():
                raise AssertionError(f"upload stuck after {sent[0]} of {size} bytes")
            if sock.recv(1) != b"":
                raise AssertionError("bytes after the server's trailer")
            if trailer[:DIGEST_SIZE] != download.digest():
                raise AssertionError(f"sha-256 of the {got} downloaded bytes differs")
            if trailer[DIGEST_SIZE:] != upload.digest():
                raise AssertionError(f"the server's sha-256 of the {size} uploaded bytes differs")
        except (OSError, AssertionError) as exc:
            print(f"failed: {type(exc).__name__}: {exc} (uploaded {sent[0]})", flush=True)
            return 1
    print(f"ok: {size} bytes each way, longest stall {longest_stall:.2f} s", flush=True)
    return 0


# ---------------------------------------------------------------------------- echo streams


def echo_many(host: str, port: int, streams: int, until: Path, timeout: float) -> int:
    """``streams`` echo streams at once, each checking the echo of its own random bytes.
    Prints ``streaming N`` once every one has made a round trip; when the file ``until``
    appears, lets each make two more round trips, half-closes them all, and prints
    ``done: K of N intact`` and the failures."""
    chunk = 1024
    all_of_them = [
        Streamer((host, port), chunk=chunk, pause=0.2, timeout=timeout) for _ in range(streams)
    ]
    for s in all_of_them:
        s.start()
    deadline = time.monotonic() + timeout
    for s in all_of_them:
        s.started_streaming.wait(max(0.0, deadline - time.monotonic()))
    failed = [s.error for s in all_of_them if s.error is not None or s.sent == 0]
    if failed:
        print(f"failed: {len(failed)} streams never streamed: {failed[:3]}", flush=True)
        return 1
    print(f"streaming {streams}", flush=True)
    while not until.exists():
        if time.monotonic() > deadline + 60:
            print("failed: the test never said to finish", flush=True)
            return 1
        time.sleep(0.05)
    marks = [s.sent for s in all_of_them]
    fresh_deadline = time.monotonic() + timeout
    while time.monotonic() < fresh_deadline and any(
        s.error is None and s.sent < mark + 2 * chunk
        for s, mark in zip(all_of_them, marks, strict=True)
    ):
        time.sleep(0.05)
    for s in all_of_them:
        s.finish()
    for s in all_of_them:
        s.join(timeout)
    stale = sum(s.sent < m + 2 * chunk for s, m in zip(all_of_them, marks, strict=True))
    intact = sum(s.ok for s in all_of_them)
    errors = [s.error for s in all_of_them if not s.ok]
    print(
        f"done: {intact} of {streams} intact, {stale} idle after resume: {errors[:3]}", flush=True
    )
    return 0 if intact == streams and stale == 0 else 1


# ---------------------------------------------------------------------------- ends with a time


class LoggingEcho(EchoServer):
    """An echo server that prints ``closed at T after N bytes`` (T: ``time.time()``) as
    each connection ends, however it ends."""

    def handle(self, conn: socket.socket) -> None:
        echoed = 0
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
                echoed += len(data)
            conn.shutdown(socket.SHUT_WR)
        finally:
            print(f"closed at {time.time():.3f} after {echoed} bytes", flush=True)


def hold(host: str, port: int, timeout: float) -> int:
    """Stream through an echo until the tunnel ends it: ``streaming``, then
    ``ended at T: WHY`` (T: ``time.time()``)."""
    streamer = Streamer((host, port), chunk=512, pause=0.05, timeout=timeout)
    streamer.start()
    streamer.started_streaming.wait(timeout)
    if streamer.error is not None:
        print(f"failed: {streamer.error}", flush=True)
        return 1
    print("streaming", flush=True)
    streamer.ended.wait()
    print(f"ended at {time.time():.3f}: {streamer.error}", flush=True)
    return 0


class Interactive:
    """A program driven line by line over its stdin (an ssh session, say), whose stdout
    and stderr lines are captured by background threads like ``support.Process``."""

    def __init__(self, argv: Sequence[str], *, name: str, env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            bufsize=1,
        )
        self._readers = [
            threading.Thread(target=self._read, args=(stream, self.lines[key]), daemon=True)
            for key, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))
        ]
        for t in self._readers:
            t.start()

    def _read(self, stream: IO[str], lines: list[str]) -> None:
        for line in stream:
            with self._cond:
                lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def send(self, line: str) -> None:
        """Write one line to the program's stdin, at once."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise AssertionError(f"{self.name} ended before {line!r}\n{self.output()}") from None

    def wait_for(self, pattern: str, timeout: float, *, since: int = 0) -> re.Match[str]:
        """First stdout line (from index ``since``) that ``re.search``-matches ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        lines = self.lines["stdout"]
        with self._cond:
            while True:
                for line in lines[since:]:
                    if (m := regex.search(line)) is not None:
                        return m
                since = len(lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    break
                self._cond.wait(min(remaining, 0.2))
        raise AssertionError(f"{self.name}: no stdout line matching {pattern!r}\n{self.output()}")

    def output(self) -> str:
        with self._cond:
            return (
                f"=== {self.name}: {' '.join(self.argv)} (exit {self.proc.poll()})\n"
                + "--- stderr ---\n"
                + "\n".join(self.lines["stderr"])
                + "\n"
                + "--- stdout ---\n"
                + "\n".join(self.lines["stdout"])
            )

    def close(self, timeout: float) -> int:
        """Close stdin (the end of the session) and wait for the program to exit; kill
        it if it does not in ``timeout`` seconds. Returns its exit code."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass  # the program is gone already
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running {timeout} s after its end") from None
        finally:
            self.stop()

    def stop(self) -> None:
        """Kill the program if it still runs, and release its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for t in self._readers:
            t.join(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass  # stdin of a program gone: its buffered line cannot be flushed


def _serve(server: ThreadedServer, what: str) -> int:
    server.start()
    print(f"{what} listening on {server.addr_str}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resume_tools.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("paced-server", "paced-client", "echo-many", "echo-log", "hold"):
        p = sub.add_parser(name)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--size", type=int, default=50_000_000)
        p.add_argument("--seconds", type=float, default=10.0)
        p.add_argument("--streams", type=int, default=200)
        p.add_argument("--until", type=Path)
        p.add_argument("--timeout", type=float, default=40.0)
    args = parser.parse_args(argv)
    if args.cmd == "paced-server":
        server = PacedServer(args.size, args.seconds, host=args.host, port=args.port)
        return _serve(server, "paced server")
    if args.cmd == "echo-log":
        return _serve(LoggingEcho(host=args.host, port=args.port), "echo")
    if args.cmd == "paced-client":
        return paced_client(args.host, args.port, args.size, args.seconds, args.timeout)
    if args.cmd == "echo-many":
        assert args.until is not None, "echo-many needs --until FILE"
        return echo_many(args.host, args.port, args.streams, args.until, args.timeout)
    return hold(args.host, args.port, args.timeout)


if __name__ == "__main__":
    sys.exit(_main())
