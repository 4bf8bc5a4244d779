"""Processes the benchmark starts, and what /proc says about them.

Every child is started in its own session (so in its own process group) and is
remembered with all of its descendants; `stop_all` ends exactly those, never anything
found by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

_STARTED: list[Proc] = []


def free_port() -> int:
    """A port the kernel picked by binding port 0 (released again at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile() -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return int(target)


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat from field 3 on (index 0 is field 3); None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command may contain spaces and parentheses: fields follow the last ')'
    return stat[stat.rfind(")") + 2 :].split()


def _stat(pid: int | str) -> tuple[int, int] | None:
    """(ppid, start time) of a live process."""
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[1]), int(fields[19]))


def last_cpu(pid: int) -> int | None:
    """The CPU a process last ran on (field 39 of /proc/PID/stat)."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[36])


class CpuSharing:
    """While in its `with` block, samples every `interval` seconds which CPU each of
    two processes last ran on; `shared` is the fraction of samples where it was the same
    one. On one host the scheduler decides it, and a new client's latency through a
    tunnel depends on it (see placement.py)."""

    def __init__(self, a: int, b: int, interval: float = 0.005) -> None:
        self.pids = (a, b)
        self.interval = interval
        self.samples = 0
        self.same = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def shared(self) -> float | None:
        return self.same / self.samples if self.samples else None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            a, b = (last_cpu(pid) for pid in self.pids)
            if a is None or b is None:
                continue
            self.samples += 1
            self.same += a == b

    def __enter__(self) -> CpuSharing:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _ppid_map() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(entry)
        if st is not None:
            out[int(entry)] = st[0]
    return out


def descendants(pids: list[int]) -> list[int]:
    """`pids` and every live process below them."""
    parents = _ppid_map()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = [p for p in pids if p in parents]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _status_kb(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m[1]) if m else 0


def _pss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m[1]) if m else 0


def memory(pids: list[int]) -> dict[str, int]:
    """RSS and PSS (kB) summed over `pids` and all their descendants."""
    every = descendants(pids)
    return {
        "processes": len(every),
        "rss_kb": sum(_status_kb(p, "VmRSS") for p in every),
        "pss_kb": sum(_pss_kb(p) for p in every),
    }


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of `pids` and their descendants, with the reaped children
    they waited for (socat's forked children)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in descendants(pids):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / tick


def fd_kinds(pid: int) -> dict[str, int]:
    """Open fds of one process by kind (socket, pipe, other)."""
    kinds = {"socket": 0, "pipe": 0, "other": 0}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return kinds
    for name in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:"):
            kinds["socket"] += 1
        elif link.startswith("pipe:"):
            kinds["pipe"] += 1
        else:
            kinds["other"] += 1
    return kinds


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (read from /proc, no connection made:
    a probe connection would itself be a client of the tunnel)."""
    want = (f"0100007F:{port:04X}", f"00000000:{port:04X}")
    for table in ("/proc/net/tcp",):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[1] in want and parts[3] == "0A":
                return True
    return False


def wait_listening(port: int, timeout: float, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(port):
            return
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}): {proc.tail()}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class Proc:
    """A child in its own process group, its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        stdout_pipe: bool = False,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self._logf = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._logf,
            stderr=self._logf,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        _STARTED.append(self)

    def tree(self) -> list[int]:
        return descendants([self.pid]) if self.popen.poll() is None else []

    def tail(self, n: int = 15) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_log(self, pattern: str, timeout: float) -> None:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if regex.search(self.log.read_text(errors="replace")):
                    return
            except OSError:
                pass
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no log line matching {pattern!r}:\n{self.tail()}")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to its process group and every descendant seen, then SIGKILL."""
        # (pid, start time) of the whole tree, so a pid reused later is never signalled
        tree = {pid: st[1] for pid in self.tree() if (st := _stat(pid)) is not None}
        alive = self.popen.poll() is None
        if alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)
        self._signal(tree, signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        # whatever is left of this tree (forked children in other sessions too)
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        self._signal(tree, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._logf.close()
        if self in _STARTED:
            _STARTED.remove(self)

    @staticmethod
    def _signal(tree: dict[int, int], sig: int) -> None:
        for pid, started in tree.items():
            st = _stat(pid)
            if st is not None and st[1] == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)


def stop_all() -> None:
    for proc in list(reversed(_STARTED)):
        try:
            proc.stop(grace=2.0)
        except Exception as exc:  # noqa: BLE001 - cleanup goes on for the others
            print(f"cleanup of {proc.name} failed: {exc}")


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


#: how long `wait_quiet` waits at most unless told (compare.py --quiet-limit sets it)
QUIET_LIMIT = 30.0


def wait_quiet(busy_below: float = 0.15, window: float = 0.5, limit: float | None = None) -> float:
    """Wait until the machine is idle (what the previous system left behind, such as
    sshd closing thousands of channels, must not be measured against the next one).
    Returns the seconds waited; gives up after `limit` (default QUIET_LIMIT)."""
    limit = QUIET_LIMIT if limit is None else limit
    started = time.monotonic()
    while time.monotonic() - started < limit:
        busy0, total0 = _cpu_times()
        time.sleep(window)
        busy1, total1 = _cpu_times()
        if total1 > total0 and (busy1 - busy0) / (total1 - total0) < busy_below:
            break
    return time.monotonic() - started


def run_script(main: Callable[[], int]) -> NoReturn:
    """Run a benchmark script's `main`: SIGTERM stops it as Ctrl-C does, and either way
    every process it started is stopped before it exits (130)."""

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
