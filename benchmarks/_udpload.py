"""The UDP load generator: one process, one JSON object on stdout. Run by udp.py.

    python benchmarks/_udpload.py flood --port P --size 64 --flows 1 --window 512
    python benchmarks/_udpload.py paced --port P --rate 10000 --seconds 3
    python benchmarks/_udpload.py rtt --port P --samples 2000
    python benchmarks/_udpload.py newflow --port P --samples 200

Each flow is a connected, non-blocking UDP socket of its own (its own source port, so
one flow of the tunnel). Every datagram carries its sequence number (8 bytes) and its
send time (8 bytes, ns) in front of filler up to --size, so echoes are matched, counted
once and timed. Receiving drains each readable socket until EAGAIN, the way a
`recvmmsg` loop would, and sending fills the window in one go.

- flood: each flow keeps at most --window datagrams in flight (sent beyond the highest
  sequence number echoed); `--window 0` sends flat out and counts what comes back.
  Datagrams in flight 50 ms without an echo are written off, so a loss cannot stall a
  flow. Echoes are counted over --seconds after --warmup seconds.
- paced: one flow at --rate datagrams/s for --seconds (sent in 1 ms steps), then waits
  --drain seconds for late echoes; loss = 1 - echoed / sent, and the round trip of each.
- rtt: one datagram at a time, the next when its echo is back (or after --timeout).
- newflow: as rtt, each on a new socket: the first datagram of a new flow.

Everything is bounded: by time (flood, paced) or count and --timeout (rtt, newflow).
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import struct
import sys
import time
from typing import Any

from _load import summary_ms  # this script's folder is on the path

HEAD = struct.Struct("!QQ")  # sequence number, send time in ns
BUFFER = 4 << 20  # as the echo server's: capped by net.core.rmem_max / wmem_max
#: datagrams in flight this long with no echo are written off (a loss must not stall)
STALL = 0.05
SO_MEMINFO = 55  # Linux; not in the socket module


def _socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
    sock.connect((host, port))
    return sock


def rx_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped at this socket (its receive buffer was full):
    SO_MEMINFO's SK_MEMINFO_DROPS (Linux)."""
    try:
        return struct.unpack("9I", sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 36))[8]
    except OSError:
        return None


def _latency(values_ms: list[float]) -> dict[str, Any]:
    return summary_ms(values_ms)


def _wait_until(at: float) -> None:
    while (left := at - time.time()) > 0:
        time.sleep(min(left, 0.1))


def flood(a: argparse.Namespace) -> dict[str, Any]:
    socks = [_socket(a.host, a.port) for _ in range(a.flows)]
    for sock in socks:
        sock.setblocking(False)
    poller = select.epoll()
    by_fd = {sock.fileno(): i for i, sock in enumerate(socks)}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    pad = b"\x5a" * max(0, a.size - HEAD.size)
    window = a.window or 1 << 62
    nxt = [0] * a.flows  # next sequence number to send
    top = [-1] * a.flows  # highest sequence number echoed
    heard = [0.0] * a.flows  # when the flow last had an echo (or was written off)
    sent = echoed = sent_in = echoed_in = send_full = 0
    _wait_until(a.start_at)
    now = time.monotonic()
    begin, end = now + a.warmup, now + a.warmup + a.seconds
    heard = [now] * a.flows
    pack = HEAD.pack
    measuring = False
    while now < end:
        for i, sock in enumerate(socks):
            n, limit = nxt[i], top[i] + window
            if n > limit and now - heard[i] > STALL:
                top[i], heard[i] = n - 1, now  # written off: the flow may send again
                limit = n - 1 + window
            send = sock.send
            try:
                # flat out (no window): a bounded burst per turn, so receiving keeps up
                for seq in range(n, min(limit + 1, n + 256)):
                    send(pack(seq, 0) + pad)
                    n += 1
            except BlockingIOError:
                send_full += 1
            if measuring:
                sent_in += n - nxt[i]
            sent += n - nxt[i]
            nxt[i] = n
        for fd, _ in poller.poll(0.002 if a.window else 0):
            i = by_fd[fd]
            recv = socks[i].recv
            got = 0
            seq = top[i]
            try:
                while True:
                    seq = HEAD.unpack_from(recv(65535))[0]
                    got += 1
            except BlockingIOError:
                pass
            if seq > top[i]:
                top[i] = seq
            heard[i] = now
            echoed += got
            if measuring:
                echoed_in += got
        now = time.monotonic()
        measuring = begin <= now
    elapsed = now - begin
    poller.close()
    drops = [rx_drops(sock) for sock in socks]
    for sock in socks:
        sock.close()
    return {
        "flows": a.flows,
        "size": a.size,
        "window": a.window,
        "seconds": elapsed,
        "echoed": echoed_in,
        "sent": sent_in,
        "per_s": echoed_in / elapsed if elapsed > 0 else None,
        "sent_per_s": sent_in / elapsed if elapsed > 0 else None,
        "echoed_total": echoed,
        "sent_total": sent,
        "send_full": send_full,
        "rx_drops": None if None in drops else sum(d or 0 for d in drops),
    }


def paced(a: argparse.Namespace) -> dict[str, Any]:
    sock = _socket(a.host, a.port)
    sock.setblocking(False)
    pad = b"\x5a" * max(0, a.size - HEAD.size)
    seen = bytearray(int(a.rate * a.seconds) + 1)
    rtts: list[float] = []
    sent = echoed = dupes = reordered = send_full = 0
    last = -1

    def drain() -> None:
        nonlocal echoed, dupes, reordered, last
        now_ns = time.perf_counter_ns()
        try:
            while True:
                seq, t_ns = HEAD.unpack_from(sock.recv(65535))
                if seq >= len(seen) or seen[seq]:
                    dupes += 1
                    continue
                seen[seq] = 1
                echoed += 1
                reordered += seq < last
                last = max(last, seq)
                rtts.append((now_ns - t_ns) / 1e6)
        except BlockingIOError:
            pass

    _wait_until(a.start_at)
    total = len(seen) - 1
    t0 = time.monotonic()
    while sent < total:
        now = time.monotonic()
        due = min(total, int((now - t0) * a.rate) + 1)
        try:
            while sent < due:
                sock.send(HEAD.pack(sent, time.perf_counter_ns()) + pad)
                sent += 1
        except BlockingIOError:
            send_full += 1
        drain()
        # wait for the next send or an echo, whichever comes first (echoes are timed
        # when they arrive, not at the next step)
        select.select([sock], [], [], max(0.0, t0 + sent / a.rate - time.monotonic()))
    send_seconds = time.monotonic() - t0
    until = time.monotonic() + a.drain
    while echoed < sent and time.monotonic() < until:
        select.select([sock], [], [], 0.01)
        drain()
    drops = rx_drops(sock)
    sock.close()
    return {
        "rate": a.rate,
        "size": a.size,
        "seconds": send_seconds,
        "sent": sent,
        "echoed": echoed,
        "loss": 1 - echoed / sent if sent else None,
        "duplicates": dupes,
        "reordered": reordered,
        "send_full": send_full,
        "rx_drops": drops,
        "rtt": _latency(rtts),
    }


def _one(sock: socket.socket, seq: int, pad: bytes, timeout: float) -> float | None:
    """Send one datagram and wait for its echo; the round trip in ms, None if lost."""
    t0 = time.perf_counter_ns()
    sock.send(HEAD.pack(seq, t0) + pad)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got = HEAD.unpack_from(sock.recv(65535))[0]
        except TimeoutError:
            return None
        if got == seq:
            return (time.perf_counter_ns() - t0) / 1e6
    return None


def rtt(a: argparse.Namespace) -> dict[str, Any]:
    pad = b"\x5a" * max(0, a.size - HEAD.size)
    times: list[float] = []
    lost = 0
    with _socket(a.host, a.port) as sock:
        for seq in range(-a.warmup_samples, a.samples):
            took = _one(sock, seq + a.warmup_samples, pad, a.timeout)
            if seq < 0:
                continue
            if took is None:
                lost += 1
            else:
                times.append(took)
    return {**_latency(times), "lost": lost, "size": a.size}


def newflow(a: argparse.Namespace) -> dict[str, Any]:
    pad = b"\x5a" * max(0, a.size - HEAD.size)
    times: list[float] = []
    lost = 0
    for seq in range(a.samples):
        with _socket(a.host, a.port) as sock:
            took = _one(sock, seq, pad, a.timeout)
        if took is None:
            lost += 1
        else:
            times.append(took)
    return {**_latency(times), "lost": lost, "size": a.size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["flood", "paced", "rtt", "newflow"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--flows", type=int, default=1)
    ap.add_argument("--window", type=int, default=512, help="flood: in flight per flow (0: none)")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rate", type=float, default=10_000)
    ap.add_argument("--drain", type=float, default=1.0)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--warmup-samples", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--start-at", type=float, default=0.0, help="wall-clock time to begin")
    a = ap.parse_args(argv)
    if a.size < HEAD.size:
        ap.error(f"--size must be at least {HEAD.size}")
    out = {"flood": flood, "paced": paced, "rtt": rtt, "newflow": newflow}[a.mode](a)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
