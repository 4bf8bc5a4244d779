"""Soak test: an echo server, an LL and a CC on loopback, mixed traffic for N minutes, a
rolling restart of the agent every minute; reports connections served and failed and
each node's memory over time.

    python benchmarks/soak.py --minutes 10        # the full run
    python benchmarks/soak.py --minutes 2         # a quick check

Traffic (bounded concurrency, bounded rate of new connections, every connection checked
byte for byte):

- short:       connect, 1-5 request/response exchanges of 100 bytes, close
- interactive: 20-60 exchanges of 64 bytes with 50-200 ms of think time (seconds long)
- bulk:        1-8 MiB echoed in 64 KiB chunks, SHA-256 checked
- long bulk:   16-32 MiB the same way

Every ``--restart-every`` seconds a new agent is started, and once it has joined the old
one gets SIGTERM and drains (a rolling restart: no client should notice). RSS and open
file descriptors of every node are read from /proc every ``--sample-every`` seconds.
The table goes to stdout, everything to ``benchmarks/results/soak-*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KIND_WEIGHTS = {"short": 70, "interactive": 15, "bulk": 10, "long_bulk": 5}
MiB = 1 << 20


# ---------------------------------------------------------------------------- processes


class Proc:
    """A child process whose stderr lines are read by a thread; keeps level counts and
    the last warnings so the log cannot grow without bound."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.problems: collections.deque[str] = collections.deque(maxlen=50)
        self.levels: collections.Counter[str] = collections.Counter()
        self._cond = threading.Condition()
        self._seen: list[str] = []  # lines still to be matched by wait_for
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            m = re.search(r" (DEBUG|INFO|WARNING|ERROR|CRITICAL) ", line)
            level = m[1] if m else "OTHER"
            with self._cond:
                self.levels[level] += 1
                self.lines.append(line)
                if level in ("WARNING", "ERROR", "CRITICAL"):
                    self.problems.append(line)
                if len(self._seen) < 10_000:
                    self._seen.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """The first line not yet consumed that matches; earlier lines are consumed."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._seen:
                    m = regex.search(self._seen.pop(0))
                    if m:
                        return m
                if self.proc.poll() is not None and not self._reader.is_alive():
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
        raise RuntimeError(f"{self.name}: no line matching {pattern!r}\n" + "\n".join(self.lines))

    def stop_matching(self) -> None:
        """Stop keeping lines for wait_for (long runs log a line per connection)."""
        with self._cond:
            self._seen.clear()

    def sample(self) -> dict[str, float | int | None]:
        pid = self.proc.pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status)[1])  # type: ignore[index]
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, TypeError):
            return {"rss_mib": None, "fds": None}
        return {"rss_mib": round(rss_kb / 1024, 1), "fds": fds}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        return self.proc.returncode


def tcpgc(*args: str) -> list[str]:
    return [sys.executable, "-m", "tcpgc", *args]


def node_env(token: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TCPGC_TOKEN", None)
    if token:
        env["TCPGC_TOKEN"] = token
    return env


# ---------------------------------------------------------------------------- echo server


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def serve_echo() -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, backlog=1024)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"echo listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


# ---------------------------------------------------------------------------- traffic


@dataclass
class Stats:
    ok: collections.Counter[str] = field(default_factory=collections.Counter)
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    bytes_echoed: int = 0
    in_flight: int = 0


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> None:
    writer.write(data)
    await writer.drain()
    back = await reader.readexactly(len(data))
    if back != data:
        raise ValueError("echo differs")


async def one_connection(kind: str, addr: tuple[str, int], rng: random.Random) -> int:
    """Run one client of ``kind``; returns the bytes echoed. Raises on any failure."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), 15)
    moved = 0
    try:
        if kind in ("short", "interactive"):
            rounds = rng.randint(1, 5) if kind == "short" else rng.randint(20, 60)
            size = 100 if kind == "short" else 64
            for _ in range(rounds):
                data = rng.randbytes(size)
                await asyncio.wait_for(_exchange(reader, writer, data), 30)
                moved += size
                if kind == "interactive":
                    await asyncio.sleep(rng.uniform(0.05, 0.2))
        else:
            total = rng.randint(1, 8) * MiB if kind == "bulk" else rng.randint(16, 32) * MiB
            sent, got = hashlib.sha256(), hashlib.sha256()
            chunk = rng.randbytes(64 * 1024)
            while moved < total:
                writer.write(chunk)
                sent.update(chunk)
                await writer.drain()
                back = await asyncio.wait_for(reader.readexactly(len(chunk)), 30)
                got.update(back)
                moved += len(chunk)
            if sent.digest() != got.digest():
                raise ValueError("sha-256 of the echo differs")
        writer.write_eof()
        if await asyncio.wait_for(reader.read(1), 30) != b"":
            raise ValueError("bytes after the echo")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    return moved


async def run_traffic(
    addr: tuple[str, int], stats: Stats, until: float, concurrency: int, rate: float, seed: int
) -> None:
    rng = random.Random(seed)
    slots = asyncio.Semaphore(concurrency)
    kinds, weights = zip(*KIND_WEIGHTS.items(), strict=True)
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def client(kind: str) -> None:
        stats.in_flight += 1
        try:
            stats.bytes_echoed += await one_connection(kind, addr, random.Random(rng.random()))
            stats.ok[kind] += 1
        except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
            stats.failed[kind] += 1
            stats.reasons[f"{kind}: {type(exc).__name__}: {exc}"[:160]] += 1
        finally:
            stats.in_flight -= 1
            slots.release()

    next_start = loop.time()
    while loop.time() < until:
        await slots.acquire()
        next_start = max(next_start + 1 / rate, loop.time())
        await asyncio.sleep(max(0.0, next_start - loop.time()))
        if loop.time() >= until:
            slots.release()
            break
        kind = rng.choices(kinds, weights)[0]
        task = asyncio.create_task(client(kind))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=120)


# ---------------------------------------------------------------------------- the soak


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.stats = Stats()
        self.samples: list[dict[str, object]] = []
        self.restarts: list[dict[str, float]] = []
        self.retired: list[Proc] = []
        self.all_ccs: list[Proc] = []
        self.ll: Proc | None = None
        self.echo: Proc | None = None
        self.t0 = time.monotonic()

    def start(self) -> None:
        self.echo = Proc("echo", [sys.executable, __file__, "--echo-server"], env=node_env())
        echo_addr = self.echo.wait_for(r"echo listening on (\S+)")[1]
        state = self.workdir / "ll-state"
        self.token = subprocess.run(
            tcpgc("token", "--state-dir", str(state)),
            env=node_env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        ll_toml = self.workdir / "ll.toml"
        ll_toml.write_text(
            f'cc = "127.0.0.1:0"\nstate_dir = "{state}"\nheartbeat = {self.args.heartbeat}\n'
            f'client_wait = 15\n\n[services.soak]\nclients = "127.0.0.1:0"\n'
        )
        self.ll = Proc("ll", tcpgc("ll", "-c", str(ll_toml)), env=node_env())
        self.agent = self.ll.wait_for(r"listening for agents on (\S+)")[1]
        host, port = self.ll.wait_for(r"service 'soak' listening for clients on (\S+)")[1].rsplit(
            ":", 1
        )
        self.clients = (host, int(port))
        self.cc_toml = self.workdir / "cc.toml"
        self.cc_toml.write_text(
            f'll = "{self.agent}"\ndrain_timeout = 60\nreconnect_min = 0.2\nreconnect_max = 2\n\n'
            f'[services.soak]\nserver = "{echo_addr}"\n'
        )
        self.cc = self._start_cc(1)

    def _start_cc(self, n: int) -> Proc:
        cc = Proc(f"cc#{n}", tcpgc("cc", "-c", str(self.cc_toml)), env=node_env(self.token))
        self.all_ccs.append(cc)  # stopped at the end even if it never joins
        agent_id = cc.wait_for(r"connected to LL \S+ as agent ([0-9a-f]+)")[1]
        self.ll.wait_for(rf"agent {agent_id} connected from")
        cc.stop_matching()
        return cc

    def restart_agent(self) -> None:
        """Rolling restart: the new agent joins, then the old one drains and exits."""
        started = time.monotonic()
        new = self._start_cc(len(self.restarts) + 2)
        old, self.cc = self.cc, new
        old.proc.send_signal(signal.SIGTERM)
        self.retired.append(old)
        self.restarts.append(
            {"at_s": round(started - self.t0, 1), "join_s": round(time.monotonic() - started, 2)}
        )

    def sample(self) -> dict[str, object]:
        s = self.stats
        row: dict[str, object] = {
            "t_s": round(time.monotonic() - self.t0, 1),
            "ok": sum(s.ok.values()),
            "failed": sum(s.failed.values()),
            "in_flight": s.in_flight,
        }
        for name, proc in (("ll", self.ll), ("cc", self.cc), ("echo", self.echo)):
            assert proc is not None
            if proc.proc.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode} mid-soak")
            for key, value in proc.sample().items():
                row[f"{name}_{key}"] = value
        self.samples.append(row)
        return row

    def stop(self) -> dict[str, int | None]:
        codes = {}
        for proc in (*self.all_ccs, self.ll, self.echo):
            if proc is not None:
                codes[proc.name] = proc.stop()
        return codes


COLUMNS = [
    ("t_s", "t (s)"),
    ("ok", "served"),
    ("failed", "failed"),
    ("in_flight", "open"),
    ("ll_rss_mib", "LL RSS MiB"),
    ("ll_fds", "LL fds"),
    ("cc_rss_mib", "CC RSS MiB"),
    ("cc_fds", "CC fds"),
    ("echo_rss_mib", "echo RSS MiB"),
]


def print_row(row: dict[str, object], header: bool = False) -> None:
    if header:
        print(" | ".join(f"{title:>12}" for _, title in COLUMNS), flush=True)
    print(" | ".join(f"{row.get(key)!s:>12}" for key, _ in COLUMNS), flush=True)


async def soak(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="tcpgc-soak-") as tmp:
        run = Soak(args, Path(tmp))
        try:
            await asyncio.to_thread(run.start)
            print_row(run.sample(), header=True)
            loop = asyncio.get_running_loop()
            until = loop.time() + args.minutes * 60
            traffic = asyncio.create_task(
                run_traffic(run.clients, run.stats, until, args.concurrency, args.rate, args.seed)
            )
            next_restart = loop.time() + args.restart_every
            while not traffic.done():
                await asyncio.wait({traffic}, timeout=args.sample_every)
                if loop.time() >= next_restart and loop.time() < until:
                    await asyncio.to_thread(run.restart_agent)
                    next_restart += args.restart_every
                print_row(run.sample())
            await traffic
        finally:
            codes = await asyncio.to_thread(run.stop)
        s = run.stats
        nodes = {}
        for name, key in (("ll", "ll_rss_mib"), ("cc", "cc_rss_mib"), ("echo", "echo_rss_mib")):
            values = [r[key] for r in run.samples if isinstance(r.get(key), float)]
            nodes[name] = {
                "rss_mib_first": values[0] if values else None,
                "rss_mib_last": values[-1] if values else None,
                "rss_mib_max": max(values) if values else None,
            }
        logs = {
            proc.name: {"levels": dict(proc.levels), "last_problems": list(proc.problems)[-10:]}
            for proc in (run.ll, *run.all_ccs)
            if proc is not None
        }
        return {
            "minutes": args.minutes,
            "settings": {k: v for k, v in vars(args).items() if k not in ("echo_server", "out")},
            "served": dict(s.ok),
            "failed": dict(s.failed),
            "failure_reasons": dict(s.reasons.most_common(20)),
            "served_total": sum(s.ok.values()),
            "failed_total": sum(s.failed.values()),
            "bytes_echoed": s.bytes_echoed,
            "agent_restarts": run.restarts,
            "exit_codes": codes,
            "nodes": nodes,
            "logs": logs,
            "samples": run.samples,
            "python": sys.version.split()[0],
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long traffic runs")
    p.add_argument("--concurrency", type=int, default=24, help="clients open at once, at most")
    p.add_argument("--rate", type=float, default=40.0, help="new connections per second, at most")
    p.add_argument("--restart-every", type=float, default=60.0, help="seconds between restarts")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--heartbeat", type=float, default=2.0, help="LL heartbeat interval")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, help="JSON report (default benchmarks/results/soak-*.json)")
    p.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.echo_server:
        asyncio.run(serve_echo())
        return 0

    report = asyncio.run(soak(args))
    out = args.out or RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print()
    print(f"served {report['served_total']} connections, failed {report['failed_total']}")
    print(f"  served by kind: {report['served']}")
    if report["failed_total"]:
        print(f"  failed by kind: {report['failed']}")
        for reason, n in report["failure_reasons"].items():  # type: ignore[union-attr]
            print(f"    {n} x {reason}")
    print(f"  bytes echoed: {report['bytes_echoed'] / MiB:.0f} MiB")
    print(f"  agent restarts: {len(report['agent_restarts'])}")  # type: ignore[arg-type]
    for name, figures in report["nodes"].items():  # type: ignore[union-attr]
        print(
            f"  {name} RSS MiB: first {figures['rss_mib_first']}, last {figures['rss_mib_last']},"
            f" max {figures['rss_mib_max']}"
        )
    for name, log in report["logs"].items():  # type: ignore[union-attr]
        print(f"  {name} log lines by level: {log['levels']}")
    print(f"  exit codes: {report['exit_codes']}")
    print(f"report: {out}")
    return 1 if report["failed_total"] else 0


if __name__ == "__main__":
    sys.exit(main())
