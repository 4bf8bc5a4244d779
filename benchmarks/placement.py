"""Connect + echo latency with the LL and the CC on different CPUs, then on one CPU.

    python benchmarks/placement.py              # plaintext
    python benchmarks/placement.py --tls --samples 2000

On one host the scheduler decides whether the LL and the CC share a CPU, and a new
client's latency depends on it: each node's work for the client then waits for the
other's. `run.py` leaves placement to the scheduler (as it does for every peer), so its
connect + echo p50 is one of two values from run to run. This measures the three cases
in one run, each `--rounds` times: as the scheduler places them, pinned apart (LL on the
first CPU, CC on the second: what two hosts give), and pinned together on the first CPU.
Only the two tcpgc processes are pinned; the client and the echo server are not.
Needs two CPUs or more.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _load  # noqa: E402
import run  # noqa: E402
from _procs import stop_all  # noqa: E402
from _systems import TcpgcPlain, TcpgcTLS  # noqa: E402


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus`."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tls", action="store_true", help="TLS (default: --insecure-plaintext)")
    parser.add_argument("--samples", type=int, default=1000, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per placement")
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("placement.py needs two CPUs or more", file=sys.stderr)
        return 2
    first, second = {cpus[0]}, {cpus[1]}
    placements = {
        "as scheduled": (set(cpus), set(cpus)),
        "apart (LL and CC on two CPUs)": (first, second),
        "together (LL and CC on one CPU)": (first, first),
    }
    workdir = Path(tempfile.mkdtemp(prefix="tcpgc-placement-"))
    system = (TcpgcTLS if args.tls else TcpgcPlain)(workdir)
    try:
        try:
            addr = run.start_with_echo(system, workdir)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        ll, cc = system.nodes["LL"].pid, system.nodes["CC"].pid
        print(f"tcpgc {'TLS' if args.tls else 'plaintext'}: connect + echo p50 / p99, ms")
        for name, (ll_cpus, cc_cpus) in placements.items():
            pin(ll, ll_cpus)
            pin(cc, cc_cpus)
            p50s, p99s = [], []
            for _ in range(args.rounds):
                res = _load.connect_echo_latency(addr, args.samples, 60)
                if res["n"]:
                    p50s.append(res["p50_ms"])
                    p99s.append(res["p99_ms"])
            rounds = "  ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(p50s, p99s, strict=True))
            median = statistics.median(p50s) if p50s else float("nan")
            print(f"  {name:<33} p50 median {median:5.2f}   rounds: {rounds}")
        return 0
    finally:
        system.stop()
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
