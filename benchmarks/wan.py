"""Latency through tcpgc when the LL-CC leg is a long one, on loopback.

    python benchmarks/wan.py                    # 10 ms each way (a 20 ms round trip)
    python benchmarks/wan.py --delay-ms 25 --plaintext

The LL and the CC sit on the two ends of a relay that holds every byte for `--delay-ms`
in each direction (no `tc netem` needed), the way an LL on the internet and a CC
inside a far network see each other. Two figures, each the median of `--samples`:

- connect + echo: a new client connects, sends 4 bytes and waits for them back;
- request/response: 4 bytes back and forth on a connection already open.

The request/response time is the leg's round trip (plus a few tenths of a millisecond).
A new client whose first bytes must wait for the agent's answer to OPEN needs two of
those round trips; tcpgc sends them right behind OPEN, so it needs one.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _load  # noqa: E402
import run  # noqa: E402
from _procs import free_port, stop_all  # noqa: E402
from _systems import LOCAL, TcpgcPlain, TcpgcTLS  # noqa: E402


class DelayRelay:
    """TCP relay on loopback that delivers every byte `delay` seconds after it read it,
    in order, both ways (EOF included). Runs its own event loop in a thread."""

    def __init__(self, target: int, delay: float) -> None:
        self.target = target
        self.delay = delay
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the delay relay did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, LOCAL, self.port, backlog=1024)
        )
        self._ready.set()
        try:
            self.loop.run_forever()
        finally:
            server.close()
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(LOCAL, self.target)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        except asyncio.CancelledError:
            pass  # stopping: a handler that re-raises here is logged as an error (3.11)
        for w in (writer, up_writer):
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        arrived = asyncio.Event()

        async def deliver() -> None:
            while True:
                while not queue:
                    arrived.clear()
                    await arrived.wait()
                due, data = queue.popleft()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(65536)
                queue.append((time.monotonic() + self.delay, data))
                arrived.set()
                if not data:
                    break
            await sender
        finally:
            sender.cancel()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=10.0, help="each way (default 10)")
    parser.add_argument("--samples", type=int, default=40, help="per figure (default 40)")
    parser.add_argument("--plaintext", action="store_true", help="--insecure-plaintext")
    args = parser.parse_args(argv)
    delay = args.delay_ms / 1000
    budget = 30 + args.samples * 8 * delay  # each figure stops by itself within this

    relays: list[DelayRelay] = []

    class Far(TcpgcPlain if args.plaintext else TcpgcTLS):  # type: ignore[misc]
        def cc_ll_address(self, agents: int) -> str:
            relays.append(DelayRelay(agents, delay))
            return f"{LOCAL}:{relays[-1].port}"

    workdir = Path(tempfile.mkdtemp(prefix="tcpgc-wan-"))
    system = Far(workdir)
    try:
        try:
            addr = run.start_with_echo(system, workdir)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        time.sleep(1 + 4 * delay)  # the ready pool refills over the long leg
        rr = _load.request_response(addr, args.samples, budget, size=4)
        rtt = rr["p50_ms"]
        ce = []
        for _ in range(args.samples):
            one = _load.connect_echo_latency(addr, 1, budget)
            if one["n"]:
                ce.append(one["p50_ms"])
            time.sleep(4 * delay)  # let the agent put a ready connection back
        p50 = statistics.median(ce)
        mode = "plaintext" if args.plaintext else "TLS"
        print(f"tcpgc {mode}, LL-CC leg delayed {args.delay_ms:g} ms each way")
        print(f"  request/response on an open connection, p50: {rtt:7.2f} ms")
        print(f"  connect + echo, new connection, p50:         {p50:7.2f} ms")
        print(f"  connect + echo in LL-CC round trips:         {p50 / rtt:7.2f}")
        return 0
    finally:
        system.stop()
        for relay in relays:
            relay.stop()
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
