"""The systems of the UDP section and what /proc and the admin endpoint say about them.

Each system starts in front of a UDP echo server and returns the address clients send
to: `direct` is the echo server itself; `tls` and `plain` are a `tcpgc ll` and a
`tcpgc cc` on loopback with one UDP service (configuration files, since the flags only
make TCP services), TLS by default or `--insecure-plaintext`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from _procs import Proc, free_port
from _systems import LOCAL, System, tcpgc_argv, tcpgc_env

Addr = tuple[str, int]
HERE = Path(__file__).resolve().parent
SERVICE = "bench"


def free_udp_port() -> int:
    """A UDP port the kernel picked (released again at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def _udp_table() -> list[list[str]]:
    rows: list[list[str]] = []
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            rows += [line.split() for line in Path(table).read_text().splitlines()[1:]]
        except OSError:
            continue
    return rows


def udp_bound(port: int) -> bool:
    return any(len(r) > 1 and r[1].endswith(f":{port:04X}") for r in _udp_table())


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        names = Path(f"/proc/{pid}/fd").iterdir()
        for fd in names:
            try:
                link = fd.readlink().name
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        pass
    return inodes


def udp_drops(pid: int) -> int:
    """Datagrams the kernel dropped at the UDP sockets `pid` holds now (full receive
    buffer): the `drops` column of /proc/net/udp, summed."""
    inodes = _socket_inodes(pid)
    return sum(int(r[12]) for r in _udp_table() if len(r) > 12 and r[9] in inodes)


def host_busy() -> tuple[float, float]:
    """CPU seconds of the whole machine (all CPUs; /proc/stat): what processes ran
    (user, nice, system: comparable with their own utime + stime), and everything
    busy (also interrupts and softirqs, where the kernel moves loopback packets)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return sum(fields[:3]) / tick, (sum(fields[:3]) + fields[5] + fields[6]) / tick


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process, all its threads."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return (0.0, 0.0)
    fields = stat[stat.rfind(")") + 2 :].split()
    tick = float(os.sysconf("SC_CLK_TCK"))
    return (int(fields[11]) / tick, int(fields[12]) / tick)


def scrape(port: int | None) -> dict[str, float]:
    """The `tcpgc_udp_*` samples of a node's /metrics; {} when it has none."""
    if port is None:
        return {}
    try:
        with urllib.request.urlopen(f"http://{LOCAL}:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("tcpgc_udp_"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def start_echo(workdir: Path, workers: int = 1) -> tuple[int, list[Proc]]:
    """`workers` echo processes sharing one port (SO_REUSEPORT); the port."""
    procs: list[Proc] = []
    port = 0
    for i in range(workers):
        proc = Proc(
            f"udpecho{i}",
            [sys.executable, str(HERE / "_udpecho.py"), "--port", str(port)],
            workdir / f"udpecho{i}.log",
            stdout_pipe=True,
        )
        procs.append(proc)
        assert proc.popen.stdout is not None
        line = proc.popen.stdout.readline().decode().strip()
        if not line.isdigit():
            raise RuntimeError(f"UDP echo server did not start: {line!r} {proc.tail()}")
        port = int(line)
    return port, procs


def probe(addr: Addr, timeout: float) -> float:
    """Send datagrams until one comes back (a new tunnel may drop the first ones);
    the seconds it took. RuntimeError after `timeout`."""
    t0 = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(addr)
        sock.settimeout(0.25)
        while time.monotonic() - t0 < timeout:
            try:
                sock.send(b"probe")
                if sock.recv(100) == b"probe":
                    return time.monotonic() - t0
            except (TimeoutError, ConnectionRefusedError):
                time.sleep(0.05)
    raise RuntimeError(f"no echo through {addr[0]}:{addr[1]} within {timeout:.0f} s")


class UdpDirect(System):
    key = "direct"
    label = "direct (no tunnel)"
    admin: dict[str, int] = {}

    def start(self, target: int) -> Addr:
        return (LOCAL, target)


class UdpTcpgc(System):
    """A `tcpgc ll` and a `tcpgc cc` with one UDP service, each with an admin endpoint
    on loopback (for the tcpgc_udp_* metrics). With `profile`, each node runs under
    cProfile and writes `<profile>/<key>-ll.prof` and `-cc.prof` when it stops;
    without `metrics`, neither has an admin endpoint, so neither keeps metrics."""

    plaintext = False

    def __init__(
        self,
        workdir: Path,
        profile: Path | None = None,
        metrics: bool = True,
        src: Path | None = None,
    ) -> None:
        """`src`: the source tree whose tcpgc runs (default: this working tree's src/)."""
        super().__init__(workdir)
        self.src = src
        self.profile = profile
        self.with_metrics = metrics
        self.admin: dict[str, int] = {}

    def _argv(self, node: str, config: Path) -> list[str]:
        if self.profile is None:
            return tcpgc_argv(node, "-c", str(config))
        out = self.profile / f"{self.key}-{node}.prof"
        return [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "tcpgc", node,
                "-c", str(config)]  # fmt: skip

    def start(self, target: int) -> Addr:
        self.runs += 1
        clients, agents = free_udp_port(), free_port()
        # without an admin endpoint a node keeps no metrics (what they cost, measured)
        self.admin = {"LL": free_port(), "CC": free_port()} if self.with_metrics else {}
        admin = {node: f'admin = "{LOCAL}:{port}"\n' for node, port in self.admin.items()}
        state = self.workdir / f"state.{self.runs}"
        token = subprocess.run(
            tcpgc_argv("token", "--state-dir", str(state)), env=tcpgc_env(src=self.src),
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        common = (
            f"insecure_plaintext = {json.dumps(self.plaintext)}\n"
            "drain_timeout = 1.0\n"  # stopped at once (and a profile written)
        )
        ll_conf = self.workdir / f"ll.{self.runs}.toml"
        ll_conf.write_text(
            f'cc = "{LOCAL}:{agents}"\nstate_dir = "{state}"\n'
            f"{admin.get('LL', '')}{common}"
            f'[services.{SERVICE}]\nclients = "{LOCAL}:{clients}"\nprotocol = "udp"\n'
        )
        cc_conf = self.workdir / f"cc.{self.runs}.toml"
        cc_conf.write_text(
            f'll = ["{LOCAL}:{agents}"]\n{admin.get("CC", "")}{common}'
            f'[services.{SERVICE}]\nserver = "{LOCAL}:{target}"\nprotocol = "udp"\n'
        )
        ll = self._spawn("ll", self._argv("ll", ll_conf), env=tcpgc_env(src=self.src))
        deadline = time.monotonic() + 20
        while not udp_bound(clients):
            if ll.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the LL does not serve UDP port {clients}: {ll.tail()}")
            time.sleep(0.05)
        cc = self._spawn("cc", self._argv("cc", cc_conf), env=tcpgc_env(token, src=self.src))
        self.nodes = {"LL": ll, "CC": cc}
        cc.wait_log(r"connected to LL", 20)
        return (LOCAL, clients)

    def metrics(self) -> dict[str, dict[str, float]]:
        return {node: scrape(port) for node, port in self.admin.items()}

    def stop(self) -> None:
        super().stop()
        self.admin = {}


class UdpTLS(UdpTcpgc):
    key = "tls"
    label = "tcpgc TLS (default)"


class UdpPlain(UdpTcpgc):
    key = "plain"
    label = "tcpgc --insecure-plaintext"
    plaintext = True


UDP_SYSTEMS: list[type[System]] = [UdpDirect, UdpTLS, UdpPlain]


def metric_delta(
    after: dict[str, float], before: dict[str, float], prefix: str
) -> dict[str, float]:
    """Counters starting with `prefix` that moved, with their labels, as increments."""
    return {
        re.sub(r"^tcpgc_udp_", "", name): value - before.get(name, 0.0)
        for name, value in after.items()
        if name.startswith(prefix) and value - before.get(name, 0.0)
    }
