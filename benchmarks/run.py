"""tcpgc against its peers, on loopback, in one run, measured the same way.

    python benchmarks/run.py                  # the full run (under 10 minutes on 2 cores)
    python benchmarks/run.py --quick          # a ~2 minute smoke run
    python benchmarks/run.py --only plain,socat,direct
    python benchmarks/compare.py --before ../old-checkout --after .   # two versions
    python benchmarks/run.py --udp            # the UDP section instead (udp.py, ~2 minutes)

Systems: direct (no tunnel), socat (the seed's pair), ssh (OpenSSH ssh -R to an sshd of
our own), haproxy (two HAProxy processes chained, client -> hop 1 -> hop 2 -> server,
mode tcp with splice: the tunnel's two hops with the best C relay and no tunnel logic,
the practical limit), tls (tcpgc default), plain (tcpgc --insecure-plaintext), classic
(tcpgc --classic on both sides). Each system is started twice: once in front of an iperf3
server (throughput), once in front of an asyncio echo server (everything else).

Figures: iperf3 throughput with 1 and 4 streams; connect + 4-byte echo latency
(sequential, new connection each time); request/response latency on one connection;
new connections per second; 1,000 clients at once; connections held open at once with
the system's own RSS. Results go to benchmarks/results/bench-*.json; a full run of all
systems also writes docs/performance.png and the results block of docs/performance.md.
Needs iperf3, socat, openssh-server/-client and haproxy (installed with apt when missing
and root) and matplotlib for the chart (`pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _chart  # noqa: E402
import _load  # noqa: E402
import _report  # noqa: E402
from _procs import (  # noqa: E402
    CpuSharing,
    Proc,
    cpu_seconds,
    fd_kinds,
    memory,
    raise_nofile,
    run_script,
    stop_all,
    wait_listening,
    wait_quiet,
)
from _systems import ALL, ROOT, System, classic_available, missing_tools, tcpgc_loop  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

FULL = {
    "iperf_seconds": 5,
    "latency_samples": 500,
    "latency_budget": 20.0,
    "rr_count": 2000,
    "rr_budget": 10.0,
    "rate_seconds": 10.0,
    "rate_concurrency": 32,
    "burst_clients": 1000,
    "burst_timeout": 15.0,
    "hold_target": 8000,
    "hold_budget": 45.0,
    "hold_concurrency": 200,
}
QUICK = {
    **FULL,
    "iperf_seconds": 2,
    "latency_samples": 200,
    "latency_budget": 8.0,
    "rr_count": 500,
    "rr_budget": 4.0,
    "rate_seconds": 3.0,
    "hold_target": 2000,
    "hold_budget": 15.0,
}


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            return (done.stdout or done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "socat": _socat_version() if shutil.which("socat") else "?",
        "openssh": version(["ssh", "-V"]),
        "iperf3": version(["iperf3", "--version"]),
        "haproxy": version(["haproxy", "-v"]) if shutil.which("haproxy") else "?",
    }


def _socat_version() -> str:
    done = subprocess.run(["socat", "-V"], capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("socat version"):
            return line.strip()
    return "?"


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def ensure_tools() -> None:
    missing = missing_tools()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(f"missing: {', '.join(missing)} (install them, e.g. apt-get install ...)")
    print(f"installing {', '.join(missing)} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def fit_nofile(params: dict[str, Any]) -> dict[str, Any]:
    """Raise RLIMIT_NOFILE to the hard limit (children inherit it); `params` with the
    held-connections target lowered to what it allows."""
    nofile = raise_nofile()
    if nofile < params["hold_target"] * 2 + 500:
        params = {**params, "hold_target": max(100, (nofile - 500) // 2)}
        print(f"RLIMIT_NOFILE hard limit {nofile}: holding {params['hold_target']} at most")
    return params


def start_iperf3(workdir: Path) -> tuple[Proc, int]:
    """A fresh iperf3 server for each system: one left mid-test by a failed client
    (the socat pair drops parallel streams) must not spoil the next system's run."""
    from _procs import free_port

    port = free_port()
    proc = Proc(
        "iperf3-server",
        ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)],
        workdir / f"iperf3-server-{port}.log",
    )
    wait_listening(port, 10, proc)
    return proc, port


def start_echo(workdir: Path) -> int:
    echo = Proc(
        "echo",
        [sys.executable, str(Path(__file__).resolve().parent / "_echo.py")],
        workdir / "echo.log",
        stdout_pipe=True,
    )
    assert echo.popen.stdout is not None
    line = echo.popen.stdout.readline().decode().strip()
    if not line.isdigit():
        raise RuntimeError(f"echo server did not start: {line!r} {echo.tail()}")
    return int(line)


def start_with_echo(system: System, workdir: Path) -> tuple[str, int]:
    """An echo server, `system` in front of it, and one client through it; the address
    clients use. RuntimeError if that client is not served within 30 s."""
    addr = system.start(start_echo(workdir))
    if (failed := probe(addr, 30)) is not None:
        raise RuntimeError(failed)
    return addr


def probe(addr: tuple[str, int], timeout: float) -> str | None:
    """One connect + echo through a fresh tunnel (the socat CC may take its 2 s poll)."""
    res = _load.connect_echo_latency(addr, 1, timeout)
    return None if res["n"] == 1 else f"probe failed: {res['errors']}"


def measure_system(system: System, p: dict[str, Any], echo: int, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"label": system.label}
    wanted = system.figures

    def step(name: str, fn: Any, *args: Any) -> None:
        if wanted is not None and name not in wanted:
            return
        if not system.alive():
            out[name] = {"error": f"system died: {system.dead()}"}
            return
        t0 = time.monotonic()
        try:
            out[name] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - one figure failing keeps the others
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        out[name]["wall_s"] = round(time.monotonic() - t0, 2)
        print(f"  {name:<10} {_report.brief(name, out[name])}", flush=True)

    # ---- throughput, in front of iperf3
    if wanted is not None and not {"iperf_1", "iperf_4"} & set(wanted):
        return _echo_phase(system, p, echo, out, step)
    iperf_server, iperf = start_iperf3(workdir)
    try:
        addr = system.start(iperf)
        time.sleep(0.5)
        step("iperf_1", _load.iperf3, addr, p["iperf_seconds"], 1)
        step("iperf_4", _load.iperf3, addr, p["iperf_seconds"], 4)
    except Exception as exc:  # noqa: BLE001
        out["iperf_error"] = f"{type(exc).__name__}: {exc}"
        print(f"  iperf: {out['iperf_error']}", flush=True)
    finally:
        system.stop()
        iperf_server.stop()
    time.sleep(0.5)
    return _echo_phase(system, p, echo, out, step)


def _echo_phase(
    system: System, p: dict[str, Any], echo: int, out: dict[str, Any], step: Any
) -> dict[str, Any]:
    """Everything but throughput, in front of the echo server."""
    wait_quiet()
    try:
        addr = system.start(echo)
        problem = probe(addr, 15)
        if problem:
            out["probe"] = problem
        out["idle_memory"] = memory(system.roots())
        nodes = system.nodes
        pair = (nodes["LL"].pid, nodes["CC"].pid) if {"LL", "CC"} <= nodes.keys() else None
        with CpuSharing(*pair) if pair else contextlib.nullcontext() as sharing:
            step("connect", _load.connect_echo_latency, addr, p["latency_samples"],
                 p["latency_budget"])  # fmt: skip
        if isinstance(sharing, CpuSharing) and sharing.shared is not None and "connect" in out:
            out["connect"]["ll_cc_same_cpu"] = sharing.shared
            print(f"  {'':<10} LL and CC on one CPU in {sharing.shared:.0%} of samples",
                  flush=True)  # fmt: skip
        step("rr", _load.request_response, addr, p["rr_count"], p["rr_budget"])
        cpu0 = cpu_seconds(system.roots())
        step("rate", _load.conn_rate, addr, p["rate_seconds"], p["rate_concurrency"])
        if out.get("rate", {}).get("ok") and system.roots():
            cpu = cpu_seconds(system.roots()) - cpu0
            out["rate"]["system_cpu_s"] = cpu
            out["rate"]["cpu_ms_per_conn"] = cpu * 1000 / out["rate"]["ok"]
            print(f"  {'':<10} system CPU {out['rate']['cpu_ms_per_conn']:.3f} ms per connection",
                  flush=True)  # fmt: skip
        time.sleep(1.0)
        step("burst", _load.burst, addr, p["burst_clients"], p["burst_timeout"])
        time.sleep(1.0)
        before = memory(system.roots())

        def measure(opened: int) -> dict[str, Any]:
            mem = memory(system.roots())
            fds = {name: fd_kinds(proc.pid) for name, proc in system.nodes.items()}
            base = out["idle_memory"]["rss_kb"]
            return {
                "memory_before": before,
                "memory": mem,
                "rss_mb": mem["rss_kb"] / 1024,
                "pss_mb": mem["pss_kb"] / 1024,
                "kb_per_conn": (mem["rss_kb"] / opened) if opened and system.roots() else None,
                "kb_per_conn_over_idle": ((mem["rss_kb"] - base) / opened)
                if opened and system.roots()
                else None,
                "fds": fds,
                "pipe_fds": sum(f["pipe"] for f in fds.values()) if fds else None,
            }

        step("hold", _load.hold, addr, p["hold_target"], p["hold_budget"],
             p["hold_concurrency"], measure)  # fmt: skip
        time.sleep(1.0)
        out["after_memory"] = memory(system.roots())
    except Exception as exc:  # noqa: BLE001
        out["echo_error"] = f"{type(exc).__name__}: {exc}"
        print(f"  echo phase: {out['echo_error']}", flush=True)
        traceback.print_exc()
    finally:
        if not system.alive():
            out["died"] = system.dead()
        system.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~2 minute smoke run")
    ap.add_argument(
        "--only",
        help="comma-separated systems: " + ",".join(s.key for s in ALL),
    )
    ap.add_argument(
        "--no-docs",
        action="store_true",
        help="never write docs/performance.png and docs/performance.md (a full run of "
        "all systems does by default)",
    )
    ap.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="measure nothing: render the tables, targets and chart of an earlier run "
        "(with --docs, into docs/ too)",
    )
    ap.add_argument("--docs", action="store_true", help="with --report: write docs/ as well")
    ap.add_argument(
        "--udp",
        action="store_true",
        help="measure the UDP section instead: datagrams/s, loss and round trips through "
        "a UDP service (systems direct, tls, plain; see udp.py)",
    )
    args = ap.parse_args(argv)
    if args.udp and not args.report:
        import udp

        only = args.only.split(",") if args.only else [s.key for s in udp.UDP_SYSTEMS]
        if unknown := set(only) - {s.key for s in udp.UDP_SYSTEMS}:
            ap.error(f"--udp measures direct, tls and plain, not {', '.join(sorted(unknown))}")
        params = udp.QUICK if args.quick else udp.FULL
        figures = [f[0] for f in udp.FIGURES]
        command = (
            "python benchmarks/run.py --udp"
            + (" --quick" if args.quick else "")
            + (f" --only {args.only}" if args.only else "")
        )
        return udp.section(dict(params), only, figures, command, args.quick)
    if args.report:
        return render(json.loads(args.report.read_text()), args.report, args.docs)
    params = QUICK if args.quick else FULL
    chosen = [s for s in ALL if not args.only or s.key in args.only.split(",")]
    unknown = set(args.only.split(",")) - {s.key for s in ALL} if args.only else set()
    if unknown:
        ap.error(f"unknown systems: {', '.join(sorted(unknown))}")

    ensure_tools()
    params = fit_nofile(params)
    if any(s.key == "classic" for s in chosen) and not classic_available():
        print("tcpgc ll --help has no --classic: skipping classic")
        chosen = [s for s in chosen if s.key != "classic"]

    if tcpgc_loop() == "asyncio":
        skipped = [s.key for s in chosen if s.key.endswith("-asyncio")]
        if skipped:
            print(f"uvloop is not installed (pip install '.[fast]'): tcpgc runs on asyncio "
                  f"anyway, so {', '.join(skipped)} would repeat it: skipped")  # fmt: skip
            chosen = [s for s in chosen if s.key not in skipped]
    started = datetime.datetime.now(datetime.UTC)
    doc: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": "python benchmarks/run.py"
        + (" --quick" if args.quick else "")
        + (f" --only {args.only}" if args.only else ""),
        "quick": args.quick,
        "params": params,
        "machine": machine(),
        "tcpgc_loop": tcpgc_loop(),
        "load_before": loadavg(),
        "systems": {},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    out_json = RESULTS / f"bench-{stamp}.json"
    workdir = Path(tempfile.mkdtemp(prefix="tcpgc-bench-"))
    t0 = time.monotonic()
    print(f"machine: {doc['machine']}\nload average: {doc['load_before']}", flush=True)
    try:
        echo = start_echo(workdir)
        for cls in chosen:
            system = cls(workdir)
            quiet = wait_quiet()
            print(f"== {system.label} (after {quiet:.1f} s waiting for an idle machine)",
                  flush=True)  # fmt: skip
            s0 = time.monotonic()
            doc["systems"][system.key] = measure_system(system, params, echo, workdir)
            doc["systems"][system.key]["seconds"] = round(time.monotonic() - s0, 1)
            out_json.write_text(json.dumps(doc, indent=1))
    finally:
        stop_all()
        doc["load_after"] = loadavg()
        doc["seconds"] = round(time.monotonic() - t0, 1)
        shutil.rmtree(workdir, ignore_errors=True)

    full = not args.quick and not args.only and not args.no_docs
    return render(doc, out_json, full)


def render(doc: dict[str, Any], out_json: Path, docs: bool) -> int:
    doc["targets"] = _report.targets(doc)
    out_json.write_text(json.dumps(doc, indent=1))
    tables = _report.tables(doc)
    print()
    print(tables)
    print(f"\nwhole run: {doc['seconds']:.0f} s; load average before {doc['load_before']}, "
          f"after {doc['load_after']}")  # fmt: skip
    print(f"results: {out_json}")
    out_json.with_suffix(".md").write_text(tables + "\n")
    chart = out_json.with_suffix(".png")
    if _chart.chart(doc, chart):
        print(f"chart: {chart}")
        if docs:
            shutil.copy(chart, ROOT / "docs" / "performance.png")
            if _report.update_doc(ROOT / "docs" / "performance.md", doc, tables):
                print("updated docs/performance.png and the results in docs/performance.md")
    misses = [t for t in doc["targets"] if t["status"] == "MISS"]
    judged = [t for t in doc["targets"] if t["status"] != "n/a"]
    if not judged:
        print("no target judged (run the peers too)")
    else:
        print(f"{len(misses)} of {len(judged)} targets missed" if misses else "every target met")
    return 0


if __name__ == "__main__":
    run_script(main)
