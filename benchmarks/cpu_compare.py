"""CPU time the LL and the CC spend per connection and per request/response, for two
versions of tcpgc alternated in one run. CPU seconds (utime + stime of the two node
processes, from /proc) move far less with a busy machine than rates and latencies do,
so this shows differences of a few per cent that compare.py's figures cannot.

    python benchmarks/cpu_compare.py --before ../old-checkout --after .   # ~5 min

Each measurement starts an LL and a CC of one tree (plaintext, then TLS) in front of
an echo server on 127.0.0.1, warms them with 300 connections, then counts the nodes'
CPU over 3,000 connections (connect, 100 bytes each way, close; 8 at a time) and over
10,000 request/response exchanges of 64 bytes on one connection. Rounds alternate
which tree goes first. Prints each measurement and the medians."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs  # noqa: E402
from _systems import TcpgcPlain, TcpgcTLS  # noqa: E402

CONNECTIONS = 3000
EXCHANGES = 10000


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _connections(port: int, count: int, at_once: int = 8) -> None:
    gate = asyncio.Semaphore(at_once)

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x" * 100)
            await asyncio.wait_for(reader.readexactly(100), 10)
            writer.close()
            await writer.wait_closed()

    await asyncio.gather(*(one() for _ in range(count)))


async def _exchanges(port: int, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(count):
        writer.write(b"y" * 64)
        await asyncio.wait_for(reader.readexactly(64), 10)
    writer.close()
    await writer.wait_closed()


def _measure(
    system: type[TcpgcPlain] | type[TcpgcTLS], src: Path, echo_port: int
) -> tuple[float, float]:
    """(CPU ms per connection, CPU µs per request/response) of one LL + CC pair."""
    with tempfile.TemporaryDirectory() as workdir:
        nodes = system(Path(workdir), src=src)
        _, port = nodes.start(echo_port)
        try:
            pids = [proc.pid for proc in nodes.nodes.values()]
            asyncio.run(_connections(port, 300))
            start = sum(_cpu_seconds(pid) for pid in pids)
            asyncio.run(_connections(port, CONNECTIONS))
            middle = sum(_cpu_seconds(pid) for pid in pids)
            asyncio.run(_exchanges(port, EXCHANGES))
            end = sum(_cpu_seconds(pid) for pid in pids)
        finally:
            nodes.stop()
    return (middle - start) / CONNECTIONS * 1e3, (end - middle) / EXCHANGES * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the older tree (has src/)")
    parser.add_argument("--after", type=Path, default=Path("."), help="the newer tree")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = {"before": args.before.resolve() / "src", "after": args.after.resolve() / "src"}
    echo = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_echo.py"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert echo.stdout is not None
    port = int(echo.stdout.readline())
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for round_ in range(args.rounds):
            order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
            for side in order:
                for system in (TcpgcPlain, TcpgcTLS):
                    figures = _measure(system, trees[side], port)
                    results.setdefault((system.key, side), []).append(figures)
                    print(
                        f"round {round_ + 1} {side:6} {system.key:5} "
                        f"{figures[0]:.3f} ms/conn, {figures[1]:.0f} us/exchange",
                        flush=True,
                    )
    finally:
        echo.terminate()
        echo.wait(10)
    print("\n| system | figure | before | after | after ÷ before |\n|---|---|---|---|---|")
    for key in ("plain", "tls"):
        for index, label in ((0, "LL+CC CPU ms per connection"), (1, "LL+CC CPU µs per exchange")):
            before = statistics.median(f[index] for f in results[(key, "before")])
            after = statistics.median(f[index] for f in results[(key, "after")])
            print(f"| {key} | {label} | {before:.3f} | {after:.3f} | {after / before:.3f} |")
    return 0


if __name__ == "__main__":
    _procs.run_script(main)
