"""What resumable streams cost and how fast they come back, on loopback.

    python benchmarks/resume.py                      # everything (~8 minutes on 2 cores)
    python benchmarks/resume.py --quick              # a ~3 minute smoke run
    python benchmarks/resume.py --only throughput    # or memory, resume (comma-separated)

Resumption on is the LL's default (`resume_window = 60`); off is `tcpgc ll
--resume-window 0`. Resumable streams relay through a copy engine (bytes through
Python) in both modes; off, plaintext relays with splice(2).

1. throughput: one iperf3 stream (and 4 with `-P 4`) through LL + CC, plaintext and
   TLS. Both systems of a mode run side by side; rounds alternate which goes first;
   each figure is the median of the rounds, and on ÷ off is given for the medians and
   as the median (min-max) of each round's own ratio, with the LL's and the CC's CPU.
   The node logs also tell how the streams ended: iperf3's server resets its data
   connections at the end of each test, and each reset should reach the client.
2. memory: 8,000 idle connections held open through the tunnel (each verified with an
   echo), then left idle 6 s (so that every acknowledgement has drained the retention);
   the LL's and the CC's RSS, on and off.
3. resume: the agent reaches the LL through a relay on loopback that the benchmark
   cuts (every connection reset, new ones reset for 1 s (`outage`), then accepted
   again) while a client streams through the tunnel to an echo server. Time from the
   relay accepting again to the first byte the client receives after the pause (and
   from the relay's first accepted connection, which leaves out the agent's reconnect
   back-off), the client-visible stall, and the LL's own "resumed after X s" figure.
   Each repetition on freshly started nodes; then `flaps` outages 1 s apart on one pair
   of nodes, where the agent's reconnect back-off (reset only by a session that lasted
   30 s) grows.

JSON goes to benchmarks/results/resume-*.json, the markdown summary to stdout and next
to it (.md). The load average and whether tests were running are recorded: the
figures of a busy machine are not comparable with those of an idle one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The relay the resume tests cut: one relay for both.
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))

import _load  # noqa: E402
import run  # noqa: E402
from _procs import cpu_seconds, fd_kinds, memory, run_script, stop_all, wait_quiet  # noqa: E402
from _systems import LOCAL, ROOT, Tcpgc, TcpgcPlain, TcpgcTLS, tcpgc_loop  # noqa: E402

from cut_relay import CuttableRelay  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
OFF = ("--resume-window", "0")
#: How long a resume may take: past the agent's longest reconnect wait (reconnect_max,
#: 30 s by default), which flapping leads to (see "back to back").
RESUME_WAIT = 45.0

FULL = {
    "rounds": 5,
    "iperf_seconds": 5,
    "parallel": True,
    "hold_target": 8000,
    "hold_budget": 60.0,
    "hold_concurrency": 200,
    "settle": 4.0,
    "repetitions": 10,
    "outage": 1.0,
    "flaps": 3,
}
QUICK = {
    **FULL,
    "rounds": 2,
    "iperf_seconds": 2,
    "parallel": False,
    "hold_target": 2000,
    "hold_budget": 20.0,
    "repetitions": 3,
}


def system_class(base: type[Tcpgc], on: bool) -> type[Tcpgc]:
    """`base` (TcpgcPlain or TcpgcTLS) with resumption on (the default) or off; its own
    key, so the two may run side by side with their own logs."""
    setting = "on" if on else "off"
    return type(
        f"{base.__name__}Resume{setting.title()}",
        (base,),
        {
            "key": f"{base.key}-resume-{setting}",
            "label": f"{base.label}, resumption {setting}",
            "ll_args": () if on else OFF,
        },
    )


def _spread(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "median": statistics.median(values) if values else None,
        "min": min(values) if values else None,
        "max": max(values) if values else None,
        "values": values,
    }


def load_state() -> dict[str, Any]:
    tests = subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, text=True, check=False)
    return {"loadavg": run.loadavg(), "pytest_processes": len(tests.stdout.split())}


def wait_for_tests(minutes: float) -> float:
    """Poll every 60 s, at most `minutes`, until no pytest runs; seconds waited."""
    started = time.monotonic()
    while load_state()["pytest_processes"] and time.monotonic() - started < minutes * 60:
        print(f"tests are running (load {run.loadavg()}): waiting", flush=True)
        time.sleep(60)
    return time.monotonic() - started


# ---------------------------------------------------------------- 1. throughput


def throughput(p: dict[str, Any], workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    figures = ["iperf_1", "iperf_4"] if p["parallel"] else ["iperf_1"]
    for base in (TcpgcPlain, TcpgcTLS):
        runs: dict[str, dict[str, list[float]]] = {"on": {}, "off": {}}
        errors: list[str] = []
        systems = {
            "on": system_class(base, True)(workdir),
            "off": system_class(base, False)(workdir),
        }
        servers = []
        try:
            addrs = {}
            for setting, system in systems.items():
                server, port = run.start_iperf3(workdir)
                servers.append(server)
                addrs[setting] = system.start(port)
            time.sleep(0.5)
            for round_ in range(p["rounds"]):
                order = ("on", "off") if round_ % 2 == 0 else ("off", "on")
                for setting in order:
                    for figure in figures:
                        streams = 4 if figure == "iperf_4" else 1
                        nodes = systems[setting].nodes
                        cpu0, t0 = {n: cpu_seconds([q.pid]) for n, q in nodes.items()}, time.time()
                        res = _load.iperf3(addrs[setting], p["iperf_seconds"], streams)
                        wall = time.time() - t0
                        # the nodes' CPU over the whole iperf3 run (100 % = one core)
                        cpu = {n: (cpu_seconds([q.pid]) - cpu0[n]) / wall * 100
                               for n, q in nodes.items()}  # fmt: skip
                        gbit = res.get("gbit_s")
                        print(f"  {base.key:5} round {round_ + 1} {setting:3} {figure}: "
                              + (f"{gbit:.2f} Gbit/s" if gbit else f"error {res.get('error')}")
                              + f", LL {cpu['LL']:.0f} % CC {cpu['CC']:.0f} % CPU",
                              flush=True)  # fmt: skip
                        if gbit:
                            runs[setting].setdefault(figure, []).append(gbit)
                            for n, pct in cpu.items():
                                runs[setting].setdefault(f"{figure}_{n}_cpu", []).append(pct)
                        else:
                            errors.append(f"round {round_ + 1} {setting} {figure}: {res}")
                        if not systems[setting].alive():
                            raise RuntimeError(f"system died: {systems[setting].dead()}")
        except Exception as exc:  # noqa: BLE001 - the other mode is still measured
            errors.append(f"{type(exc).__name__}: {exc}")
            print(f"  {base.key}: {errors[-1]}", flush=True)
        finally:
            logs = {k: {n: q.log for n, q in system.nodes.items()} for k, system in systems.items()}
            for system in systems.values():
                system.stop()
            for server in servers:
                server.stop()
        mode: dict[str, Any] = {"errors": errors, "endings": endings(logs)}
        for figure in figures:
            on, off = runs["on"].get(figure, []), runs["off"].get(figure, [])
            paired = [a / b for a, b in zip(on, off, strict=False)]
            mode[figure] = {
                "on_gbit_s": _spread(on),
                "off_gbit_s": _spread(off),
                **{
                    f"{setting}_{n}_cpu_pct": _spread(runs[setting].get(f"{figure}_{n}_cpu", []))
                    for setting in ("on", "off")
                    for n in ("LL", "CC")
                },
                "ratio_of_medians": statistics.median(on) / statistics.median(off)
                if on and off
                else None,
                "ratio_per_round": _spread(paired),
            }
        out[base.key] = mode
    return out


def _count(log: Path, pattern: str) -> int:
    try:
        return len(re.findall(pattern, log.read_text(errors="replace")))
    except OSError:
        return 0


def endings(logs: dict[str, dict[str, Path]]) -> dict[str, dict[str, int]]:
    """How the iperf3 streams ended, from the node logs. iperf3's server resets its data
    connections at the end of a test: each reset should reach the client as one, not
    leave the stream waiting out the resume window."""
    return {
        setting: {
            "cc_server_resets": _count(nodes["CC"], r"bytes from it, reset"),
            "ll_client_resets": _count(nodes["LL"], r"bytes out, reset"),
            "ll_streams_waiting": _count(nodes["LL"], r"waits up to [\d.]+ s for its agent"),
            "ll_not_resumed": _count(nodes["LL"], r"done after .*not resumed within"),
        }
        for setting, nodes in logs.items()
        if {"LL", "CC"} <= nodes.keys()
    }


# ---------------------------------------------------------------- 2. memory


def held_memory(p: dict[str, Any], workdir: Path, echo: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for base in (TcpgcPlain, TcpgcTLS):
        for on in (True, False) if base is TcpgcPlain else (False, True):
            system = system_class(base, on)(workdir)
            wait_quiet(limit=10.0)
            try:
                addr = system.start(echo)
                if (problem := run.probe(addr, 30)) is not None:
                    raise RuntimeError(problem)
                time.sleep(1.0)
                idle = {name: memory([proc.pid]) for name, proc in system.nodes.items()}

                def measure(
                    opened: int, system: Tcpgc = system, idle: dict[str, Any] = idle
                ) -> dict[str, Any]:
                    time.sleep(p["settle"])  # `hold` waited 2 s already
                    nodes = {name: memory([proc.pid]) for name, proc in system.nodes.items()}
                    return {
                        "nodes": nodes,
                        "fds": {name: fd_kinds(proc.pid) for name, proc in system.nodes.items()},
                        "kb_per_conn_over_idle": {
                            name: (nodes[name]["rss_kb"] - idle[name]["rss_kb"]) / opened
                            for name in nodes
                        }
                        if opened
                        else None,
                    }

                res = _load.hold(addr, p["hold_target"], p["hold_budget"],
                                 p["hold_concurrency"], measure)  # fmt: skip
                res["idle_nodes"] = idle
                if not system.alive():
                    res["died"] = system.dead()
            except Exception as exc:  # noqa: BLE001 - reported, the others go on
                res = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                system.stop()
            key = f"{base.key}-{'on' if on else 'off'}"
            out[key] = res
            if "nodes" in res:
                print(f"  {key:9} held {res['opened']}/{res['target']} usable {res['usable']}: "
                      f"LL {res['nodes']['LL']['rss_kb'] / 1024:.1f} MiB, "
                      f"CC {res['nodes']['CC']['rss_kb'] / 1024:.1f} MiB", flush=True)  # fmt: skip
            else:
                print(f"  {key:9} {res}", flush=True)
    for mode in ("plain", "tls"):
        on, off = out.get(f"{mode}-on", {}), out.get(f"{mode}-off", {})
        if "nodes" in on and "nodes" in off:
            out[f"{mode}-ratio"] = {
                name: on["nodes"][name]["rss_kb"] / off["nodes"][name]["rss_kb"]
                for name in ("LL", "CC")
            }
    return out


# ---------------------------------------------------------------- 3. time to resume


class Stream:
    """A client sending paced pieces to the echo server through the tunnel and reading
    the echo in another thread; every read is timed."""

    def __init__(self, addr: tuple[str, int], piece: int = 16 * 1024, pause: float = 0.002):
        self.sock = socket.create_connection(addr, timeout=RESUME_WAIT + 15)
        self.piece = os.urandom(piece)
        self.pause = pause
        self.sent = 0
        self.received = 0
        self.reads: list[tuple[float, int]] = []  # (monotonic time, bytes so far)
        self.intact = True
        self.error: str | None = None
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer.start()
        self._reader.start()

    def _write(self) -> None:
        try:
            while not self._stop.is_set():
                self.sock.sendall(self.piece)
                self.sent += len(self.piece)
                time.sleep(self.pause)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = f"write: {exc!r}"

    def _read(self) -> None:
        size = len(self.piece)
        try:
            while data := self.sock.recv(1 << 16):
                # the echo is the piece over and over: check it where it falls
                at = self.received % size
                expected = (self.piece[at:] + self.piece * (len(data) // size + 2))[: len(data)]
                self.intact &= data == expected
                self.received += len(data)
                self.reads.append((time.monotonic(), self.received))
        except OSError as exc:
            self.error = f"read: {exc!r}"

    def wait(self, condition: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.error:
                return False
            time.sleep(0.005)
        return False

    def finish(self, timeout: float) -> bool:
        """Half-close after the last piece; whether every byte came back before EOF."""
        self._stop.set()
        self._writer.join(timeout)
        self._reader.join(timeout)
        self.sock.close()
        return not self._reader.is_alive() and self.received == self.sent and self.intact


RE_RESUMED = re.compile(r"resumed after (?P<pause>[\d.]+) s: (?P<replayed>\d+) bytes replayed")


def _resumed_lines(log: Path) -> list[re.Match[str]]:
    try:
        return list(RE_RESUMED.finditer(log.read_text(errors="replace")))
    except OSError:
        return []


def one_resume(
    system: Tcpgc, relay: CuttableRelay, addr: tuple[str, int], outage: float
) -> dict[str, Any]:
    ll_log, cc_log = system.nodes["LL"].log, system.nodes["CC"].log
    ll_before, cc_before = len(_resumed_lines(ll_log)), len(_resumed_lines(cc_log))
    stream = Stream(addr)
    try:
        if not stream.wait(lambda: stream.received > 1 << 20, 20):
            return {"error": f"no flow before the cut: {stream.error}"}
        cut_at = time.monotonic()
        relay.refuse = True  # the leg stays down for the outage
        cut = relay.cut()
        time.sleep(outage)  # the outage itself: what is measured comes after it
        reopen = time.monotonic()
        relay.refuse = False
        if not stream.wait(lambda: stream.reads[-1][0] > reopen, RESUME_WAIT):
            return {"error": f"no byte within {RESUME_WAIT:g} s of the relay accepting again: "
                    f"{stream.error}"}  # fmt: skip
        first = next(t for t, _ in stream.reads if t > reopen)
        before = [t for t, _ in stream.reads if t <= reopen]
        accept = next((t for t in relay.accepts if t > reopen), None)
        at_first = stream.received
        flowing = stream.wait(lambda: stream.received > at_first + (1 << 20), 10)
    finally:
        whole = stream.finish(20)
    ll_lines = _resumed_lines(ll_log)[ll_before:]
    cc_lines = _resumed_lines(cc_log)[cc_before:]
    return {
        "leg_connections_cut": cut,
        "reopen_to_first_byte_s": first - reopen,
        "first_accept_to_first_byte_s": first - accept if accept else None,
        "reopen_to_first_accept_s": accept - reopen if accept else None,
        "client_stall_s": first - max(before) if before else None,
        "bytes_after_cut_before_reopen": sum(1 for t in before if t > cut_at),
        "ll_resumed_after_s": [float(m["pause"]) for m in ll_lines],
        "ll_replayed_bytes": [int(m["replayed"]) for m in ll_lines],
        "cc_resumed_after_s": [float(m["pause"]) for m in cc_lines],
        "flowing_after": flowing,
        "every_byte_back": whole,
        "stream_error": stream.error,
    }


def through_relay(base: type[Tcpgc], relays: list[CuttableRelay]) -> type[Tcpgc]:
    """`base` whose agent dials its LL through a `CuttableRelay` (appended to `relays`)."""

    class Cut(base):  # type: ignore[valid-type,misc]
        key = f"{base.key}-resume-cut"

        def cc_ll_address(self, agents: int) -> str:
            relays.append(CuttableRelay((LOCAL, agents)))
            return relays[-1].addr_str

    return Cut


def _percentiles(values: list[float | None]) -> dict[str, Any]:
    got = [v for v in values if v is not None]
    return {"p50_s": _load._pct(got, 50), "p90_s": _load._pct(got, 90),
            "max_s": max(got) if got else None, "n": len(got)}  # fmt: skip


def _cuts(
    system: Tcpgc, relays: list[CuttableRelay], echo: int, count: int, p: dict[str, Any], tag: str
) -> list[dict[str, Any]]:
    """`count` outages on the nodes of one start of `system`; each one's figures."""
    reps: list[dict[str, Any]] = []
    try:
        addr = system.start(echo)
        if (problem := run.probe(addr, 30)) is not None:
            raise RuntimeError(problem)
        for i in range(count):
            if i:
                time.sleep(1.0)  # the ready pool refills after the previous resume
            rep = one_resume(system, relays[-1], addr, p["outage"])
            reps.append(rep)
            print(f"  {tag} #{i + 1}: " + (
                f"first byte {rep['reopen_to_first_byte_s']:.3f} s after the relay "
                f"reopened ({rep['first_accept_to_first_byte_s'] or 0:.3f} s after its "
                f"first accept), LL resumed after {rep['ll_resumed_after_s']} s, "
                f"every byte back: {rep['every_byte_back']}"
                if "error" not in rep else rep["error"]), flush=True)  # fmt: skip
            if not system.alive():
                reps.append({"error": f"system died: {system.dead()}"})
                break
    except Exception as exc:  # noqa: BLE001 - reported
        reps.append({"error": f"{type(exc).__name__}: {exc}"})
        print(f"  {tag}: {reps[-1]['error']}", flush=True)
    finally:
        if any("error" in r for r in reps):
            reps[-1]["log_tails"] = {n: proc.tail(30) for n, proc in system.nodes.items()}
        system.stop()
        for relay in relays:
            relay.stop()
        relays.clear()
    return reps


def _figures(reps: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in reps if "error" not in r]
    return {
        "repetitions": reps,
        **{
            name: _percentiles([r[f"{name}_s"] for r in good])
            for name in (
                "reopen_to_first_byte",
                "first_accept_to_first_byte",
                "reopen_to_first_accept",
                "client_stall",
            )
        },  # fmt: skip
        "ll_resumed_after": _percentiles([x for r in good for x in r["ll_resumed_after_s"]]),
        "failed": len(reps) - len(good),
        "lost_bytes": sum(not r["every_byte_back"] for r in good),
    }


def resume_time(p: dict[str, Any], workdir: Path, echo: int) -> dict[str, Any]:
    """Each repetition on freshly started nodes: the agent's first outage, as one whose
    session has been up for a while (over 30 s resets its reconnect back-off) sees it.
    Then `flaps` outages back to back on one pair of nodes, where the back-off grows."""
    out: dict[str, Any] = {}
    for base in (TcpgcPlain, TcpgcTLS):
        relays: list[CuttableRelay] = []
        system = through_relay(base, relays)(workdir)
        reps: list[dict[str, Any]] = []
        for i in range(p["repetitions"]):
            reps += _cuts(system, relays, echo, 1, p, f"{base.key:5} fresh {i + 1}")
        out[base.key] = _figures(reps)
        if p["flaps"]:
            flaps = _cuts(system, relays, echo, p["flaps"], p, f"{base.key:5} back to back")
            out[f"{base.key}-back-to-back"] = _figures(flaps)
    return out


# ---------------------------------------------------------------- report


def _f(value: float | None, fmt: str = ".2f") -> str:
    return "n/a" if value is None else format(value, fmt)


def summary(doc: dict[str, Any]) -> str:
    load = doc["load_before"]
    lines = [f"Resumable streams, {doc['started']} ({doc['command']}); load before "
             f"{load['loadavg']}, pytest processes {load['pytest_processes']}; "
             f"tcpgc on {doc['tcpgc_loop']}", ""]  # fmt: skip
    if tp := doc.get("throughput"):
        lines += ["| mode | streams | off Gbit/s (min-max) | on Gbit/s (min-max) | on ÷ off "
                  "(medians) | on ÷ off per round, median (min-max) | LL / CC CPU % off | "
                  "LL / CC CPU % on |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for mode, figures in tp.items():
            for figure in ("iperf_1", "iperf_4"):
                f = figures.get(figure)
                if not f:
                    continue
                on, off, pr = f["on_gbit_s"], f["off_gbit_s"], f["ratio_per_round"]
                lines.append(
                    f"| {mode} | {figure[-1]} | {_f(off['median'])} ({_f(off['min'])}-"
                    f"{_f(off['max'])}) | {_f(on['median'])} ({_f(on['min'])}-{_f(on['max'])}) "
                    f"| {_f(f['ratio_of_medians'], '.0%')} | {_f(pr['median'], '.0%')} "
                    f"({_f(pr['min'], '.0%')}-{_f(pr['max'], '.0%')}) | "
                    + " | ".join(
                        f"{_f(f[f'{s}_LL_cpu_pct']['median'], '.0f')} / "
                        f"{_f(f[f'{s}_CC_cpu_pct']['median'], '.0f')}"
                        for s in ("off", "on")
                    )
                    + " |"
                )
        for mode, figures in tp.items():
            for setting, seen in figures.get("endings", {}).items():
                if seen["ll_streams_waiting"]:
                    lines.append(
                        f"\n{mode}, resumption {setting}: of {seen['cc_server_resets']} iperf3 "
                        f"server resets, {seen['ll_client_resets']} reached the client as a "
                        f"reset; {seen['ll_streams_waiting']} left the LL waiting for a resume "
                        f"({seen['ll_not_resumed']} waited out the window)"
                    )
        lines.append("")
    if mem := doc.get("memory"):
        lines += ["| mode | resumption | held (usable) | LL RSS MiB | CC RSS MiB | "
                  "LL KiB/conn over idle | CC KiB/conn over idle |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for key, res in mem.items():
            if key.endswith("-ratio") or "nodes" not in res:
                continue
            mode, setting = key.rsplit("-", 1)
            per = res["kb_per_conn_over_idle"] or {}
            lines.append(
                f"| {mode} | {setting} | {res['opened']} ({res['usable']}) | "
                f"{res['nodes']['LL']['rss_kb'] / 1024:.1f} | "
                f"{res['nodes']['CC']['rss_kb'] / 1024:.1f} | {_f(per.get('LL'), '.1f')} | "
                f"{_f(per.get('CC'), '.1f')} |"
            )
        for key, ratio in mem.items():
            if key.endswith("-ratio"):
                lines.append(f"\n{key[:-6]}: RSS on ÷ off: LL {ratio['LL']:.0%}, "
                             f"CC {ratio['CC']:.0%}")  # fmt: skip
        lines.append("")
    if rs := doc.get("resume"):
        lines += ["| mode | relay reopens → first byte p50 / p90 | relay's first accept → "
                  "first byte p50 / p90 | client stall p50 / p90 | LL 'resumed after' p50 / p90 "
                  "| failed | lost bytes |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for mode, res in rs.items():
            cols = [res[k] for k in ("reopen_to_first_byte", "first_accept_to_first_byte",
                                     "client_stall", "ll_resumed_after")]  # fmt: skip
            lines.append(f"| {mode} | " + " | ".join(
                f"{_f(c['p50_s'], '.3f')} / {_f(c['p90_s'], '.3f')} s" for c in cols
            ) + f" | {res['failed']} | {res['lost_bytes']} |")  # fmt: skip
        lines.append(f"\n(outage {doc['params']['outage']:g} s; each mode: "
                     f"{doc['params']['repetitions']} repetitions on freshly started nodes, "
                     f"then '-back-to-back': {doc['params']['flaps']} outages 1 s apart on "
                     "the same nodes; the agent's default reconnect back-off)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~3 minute smoke run")
    ap.add_argument("--only", default="throughput,memory,resume",
                    help="comma-separated: throughput, memory, resume")  # fmt: skip
    ap.add_argument("--rounds", type=int, help="throughput rounds (default 5)")
    ap.add_argument("--repetitions", type=int, help="resumes per mode (default 10)")
    ap.add_argument("--wait-tests", type=float, default=0, metavar="MINUTES",
                    help="first wait (polling every 60 s) up to this long for pytest "
                    "to end")  # fmt: skip
    args = ap.parse_args(argv)
    parts = args.only.split(",")
    if unknown := set(parts) - {"throughput", "memory", "resume"}:
        ap.error(f"unknown parts: {', '.join(sorted(unknown))}")
    p = dict(QUICK if args.quick else FULL)
    if args.rounds:
        p["rounds"] = args.rounds
    if args.repetitions:
        p["repetitions"] = args.repetitions
    run.ensure_tools()
    p = run.fit_nofile(p)
    waited = wait_for_tests(args.wait_tests) if args.wait_tests else 0.0
    started = datetime.datetime.now(datetime.UTC)
    doc: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": "python benchmarks/resume.py " + " ".join(argv or sys.argv[1:]),
        "params": p,
        "machine": run.machine(),
        "tcpgc_loop": tcpgc_loop(),
        "waited_for_tests_s": round(waited),
        "load_before": load_state(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / f"resume-{started.strftime('%Y%m%d-%H%M%S')}.json"
    workdir = Path(tempfile.mkdtemp(prefix="tcpgc-resume-"))
    t0 = time.monotonic()
    try:
        echo = run.start_echo(workdir) if {"memory", "resume"} & set(parts) else 0
        for part, fn, extra in (("throughput", throughput, ()), ("memory", held_memory, (echo,)),
                                ("resume", resume_time, (echo,))):  # fmt: skip
            if part not in parts:
                continue
            print(f"== {part} (load {run.loadavg()})", flush=True)
            doc[f"load_{part}"] = load_state()
            doc[part] = fn(p, workdir, *extra)
            out_json.write_text(json.dumps(doc, indent=1))
    finally:
        stop_all()
        doc["load_after"] = load_state()
        doc["seconds"] = round(time.monotonic() - t0, 1)
        out_json.write_text(json.dumps(doc, indent=1))
    text = summary(doc)
    out_json.with_suffix(".md").write_text(text + "\n")
    print(f"\n{text}\n\nwhole run {doc['seconds']:.0f} s, load after {doc['load_after']}")
    print(f"results: {out_json}\nnode logs: {workdir}")
    return 0


if __name__ == "__main__":
    run_script(main)
