"""The client side of every measurement. Each is bounded in count and in time."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

Addr = tuple[str, int]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary_ms(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": _pct(values, 50),
        "p90_ms": _pct(values, 90),
        "p99_ms": _pct(values, 99),
        "max_ms": max(values) if values else None,
        "mean_ms": statistics.fmean(values) if values else None,
    }


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return type(exc).__name__ + (f": {exc}" if str(exc) else "")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise ConnectionError("EOF before the echo")
        got += chunk
    return got


# ---------------------------------------------------------------- 1. iperf3


def iperf3(addr: Addr, seconds: float, streams: int, tries: int = 2) -> dict[str, Any]:
    """`iperf3 -c` through the tunnel; bits/s as the receiver counted them."""
    argv = ["iperf3", "-c", addr[0], "-p", str(addr[1]), "-t", str(seconds), "-O", "1", "-J"]
    if streams > 1:
        argv += ["-P", str(streams)]
    last: dict[str, Any] = {}
    for attempt in range(tries):
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=seconds + 15, check=False
            )
            report = json.loads(done.stdout) if done.stdout.strip() else {}
        except subprocess.TimeoutExpired:
            report = {"error": f"iperf3 did not finish within {seconds + 15:.0f} s"}
        except json.JSONDecodeError:
            report = {"error": "iperf3 printed no JSON"}
        received = report.get("end", {}).get("sum_received", {}).get("bits_per_second")
        if received and not report.get("error"):
            sent = report["end"].get("sum_sent", {})
            return {
                "gbit_s": received / 1e9,
                "retransmits": sent.get("retransmits"),
                "attempts": attempt + 1,
                "cpu": report["end"].get("cpu_utilization_percent"),
            }
        last = {"gbit_s": None, "error": report.get("error", "no result"), "attempts": attempt + 1}
        time.sleep(1.0)
    return last


# ---------------------------------------------------------------- 2. connect + echo


def connect_echo_latency(addr: Addr, samples: int, budget: float) -> dict[str, Any]:
    """Sequential: a new TCP connection (TCP_NODELAY), 4 bytes out, the same 4 back,
    close. Time from connect() to the last byte back."""
    times: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + budget
    started = time.monotonic()
    for i in range(samples):
        if time.monotonic() >= deadline:
            break
        payload = (i % 10_000).to_bytes(4, "big")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(max(0.1, min(5.0, deadline - time.monotonic() + 0.5)))
        try:
            t0 = time.perf_counter()
            sock.connect(addr)
            sock.sendall(payload)
            if _recv_exactly(sock, 4) != payload:
                raise ValueError("echo differs")
            times.append((time.perf_counter() - t0) * 1000)
        except Exception as exc:  # noqa: BLE001 - counted, the loop goes on
            errors[_error_kind(exc)] += 1
        finally:
            sock.close()
    out = summary_ms(times)
    out.update(failed=sum(errors.values()), errors=dict(errors))
    out["seconds"] = time.monotonic() - started
    return out


# ---------------------------------------------------------------- 3. request/response


def request_response(addr: Addr, count: int, budget: float, size: int = 64) -> dict[str, Any]:
    """One established connection, `size`-byte request, same bytes back, repeated."""
    times: list[float] = []
    deadline = time.monotonic() + budget
    try:
        sock = socket.create_connection(addr, timeout=10)
    except OSError as exc:
        return {"n": 0, "error": _error_kind(exc)}
    error = None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(5)
        base = bytes(range(256)) * (size // 256 + 1)
        for i in range(count):
            if time.monotonic() >= deadline:
                break
            msg = (i.to_bytes(4, "big") + base)[:size]
            t0 = time.perf_counter()
            sock.sendall(msg)
            if _recv_exactly(sock, size) != msg:
                raise ValueError("echo differs")
            times.append((time.perf_counter() - t0) * 1000)
    except Exception as exc:  # noqa: BLE001 - reported
        error = _error_kind(exc)
    finally:
        sock.close()
    out = summary_ms(times)
    if error:
        out["error"] = error
    return out


# ---------------------------------------------------------------- async helpers


async def _connect_echo(
    loop: asyncio.AbstractEventLoop, addr: Addr, payload: bytes
) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await loop.sock_connect(sock, addr)
        await _echo_on(loop, sock, payload)
    except BaseException:
        sock.close()
        raise
    return sock


async def _echo_on(loop: asyncio.AbstractEventLoop, sock: socket.socket, payload: bytes) -> None:
    await loop.sock_sendall(sock, payload)
    got = b""
    while len(got) < len(payload):
        chunk = await loop.sock_recv(sock, len(payload) - len(got))
        if not chunk:
            raise ConnectionError("EOF before the echo")
        got += chunk
    if got != payload:
        raise ValueError("echo differs")


# ---------------------------------------------------------------- 4. connections per second


async def _conn_rate(addr: Addr, seconds: float, concurrency: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    ok = 0
    errors: collections.Counter[str] = collections.Counter()
    deadline = loop.time() + seconds

    async def worker(w: int) -> None:
        nonlocal ok
        i = 0
        while loop.time() < deadline:
            i += 1
            payload = w.to_bytes(2, "big") + (i % 65536).to_bytes(2, "big")
            try:
                async with asyncio.timeout(5):
                    sock = await _connect_echo(loop, addr, payload)
                sock.close()
                ok += 1
            except Exception as exc:  # noqa: BLE001 - counted
                errors[_error_kind(exc)] += 1
                await asyncio.sleep(0.01)  # a refusing system is not hammered in a tight loop

    started = loop.time()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = loop.time() - started
    return {
        "per_s": ok / seconds,
        "ok": ok,
        "failed": sum(errors.values()),
        "errors": dict(errors),
        "seconds": elapsed,
        "concurrency": concurrency,
    }


def conn_rate(addr: Addr, seconds: float, concurrency: int) -> dict[str, Any]:
    """`concurrency` loops of connect + 4-byte echo + close for `seconds`; successes/s."""
    return asyncio.run(_conn_rate(addr, seconds, concurrency))


# ---------------------------------------------------------------- 5. burst


async def _burst(addr: Addr, clients: int, timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
    loop = asyncio.get_running_loop()
    go = asyncio.Event()
    errors: collections.Counter[str] = collections.Counter()
    times: list[float] = []
    socks: list[socket.socket] = []

    async def client(i: int) -> None:
        payload = b"client%06d." % i + os.urandom(8).hex().encode()
        await go.wait()
        t0 = loop.time()
        try:
            async with asyncio.timeout(timeout):
                socks.append(await _connect_echo(loop, addr, payload))
            times.append((loop.time() - t0) * 1000)
        except Exception as exc:  # noqa: BLE001 - counted
            errors[_error_kind(exc)] += 1

    tasks = [asyncio.ensure_future(client(i)) for i in range(clients)]
    await asyncio.sleep(0.05)
    go.set()
    started = loop.time()
    await asyncio.gather(*tasks)
    elapsed = loop.time() - started
    for sock in socks:
        sock.close()
    out = {
        "clients": clients,
        "served": len(times),
        "failed": sum(errors.values()),
        "errors": dict(errors),
        "seconds": elapsed,
    }
    out.update({f"time_{k}": v for k, v in summary_ms(times).items() if k != "n"})
    return out


def burst(addr: Addr, clients: int, timeout: float) -> dict[str, Any]:
    """`clients` clients connect at once; each sends its own bytes and must get them back
    within `timeout`. All are held open until every one has finished."""
    return asyncio.run(_burst(addr, clients, timeout))


# ---------------------------------------------------------------- 6. held connections


async def _hold(
    addr: Addr,
    target: int,
    budget: float,
    concurrency: int,
    measure: Callable[[int], dict[str, Any]],
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    errors: collections.Counter[str] = collections.Counter()
    deadline = loop.time() + budget
    launched = 0
    lock = asyncio.Lock()

    async def opener() -> None:
        nonlocal launched
        while True:
            async with lock:
                if launched >= target or loop.time() >= deadline:
                    return
                if sum(errors.values()) > max(2000, target // 2):
                    return  # this system is refusing: stop early
                launched += 1
                i = launched
            try:
                async with asyncio.timeout(max(0.5, min(10.0, deadline - loop.time() + 2))):
                    socks.append(await _connect_echo(loop, addr, i.to_bytes(4, "big")))
            except Exception as exc:  # noqa: BLE001 - counted
                errors[_error_kind(exc)] += 1
                await asyncio.sleep(0.01)

    started = loop.time()
    try:
        await asyncio.gather(*(opener() for _ in range(concurrency)))
        open_seconds = loop.time() - started
        opened = len(socks)
        await asyncio.sleep(2.0)  # let both nodes settle before reading /proc
        measured = measure(opened)

        usable = 0
        verify_errors: collections.Counter[str] = collections.Counter()
        sem = asyncio.Semaphore(500)

        async def verify(i: int, sock: socket.socket) -> None:
            nonlocal usable
            async with sem:
                try:
                    async with asyncio.timeout(15):
                        await _echo_on(loop, sock, b"\xee" + i.to_bytes(3, "big"))
                    usable += 1
                except Exception as exc:  # noqa: BLE001 - counted
                    verify_errors[_error_kind(exc)] += 1

        await asyncio.gather(*(verify(i, s) for i, s in enumerate(socks)))
    finally:
        for sock in socks:
            sock.close()
    return {
        "target": target,
        "opened": opened,
        "usable": usable,
        "open_failed": sum(errors.values()),
        "open_errors": dict(errors),
        "verify_errors": dict(verify_errors),
        "open_seconds": open_seconds,
        **measured,
    }


def hold(
    addr: Addr,
    target: int,
    budget: float,
    concurrency: int,
    measure: Callable[[int], dict[str, Any]],
) -> dict[str, Any]:
    """Open up to `target` connections (each echo-verified) within `budget` seconds and
    keep them idle; `measure(opened)` reads the system's memory while they are held;
    then each is checked again with a fresh echo."""
    return asyncio.run(_hold(addr, target, budget, concurrency, measure))
