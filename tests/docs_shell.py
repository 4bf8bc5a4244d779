"""Run documented shell commands as written, on a "host" that is a network namespace.

Each command runs with bash inside the namespace and in a mount namespace of its own
where `/etc/hosts` names `gw.example.com` and `/var/lib` is a directory of the test (so
root's default state dir, `/var/lib/tcpgc`, is the test's). `tcpgc` on PATH is this
checkout. `/etc/tcpgc/` in a command or a file name becomes a directory of the test for
that host: nothing outside the test's own directories and namespaces is touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from netns import NamespacePair
from support import Process, tcpgc_env

#: Bind the host's files over the real ones, then run the rest of the arguments.
_MOUNTS = 'mount --bind "$0" /etc/hosts && mount --bind "$1" /var/lib && shift && exec "$@"'


class Host:
    """One host of the docs: a namespace, its files, and its shell's exported lines."""

    def __init__(self, pair: NamespacePair, ns: str, name: str, tmp: Path, hosts: str) -> None:
        self.pair, self.ns, self.name = pair, ns, name
        self.root = tmp / name
        self.etc = self.root / "etc-tcpgc"
        self.var_lib = self.root / "var-lib"
        for directory in (self.etc, self.var_lib):
            directory.mkdir(parents=True, exist_ok=True)
        self.hosts = self.root / "hosts"
        self.hosts.write_text(hosts)
        self.stdin = self.root / "stdin"  # what the user would type or paste
        self.stdin.write_text("")
        self.prelude: list[str] = []  # `read ...` and `export ...` lines run so far
        bin_dir = tmp / "bin"
        bin_dir.mkdir(exist_ok=True)
        shim = bin_dir / "tcpgc"
        if not shim.exists():
            shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tcpgc "$@"\n')
            shim.chmod(0o755)
        self.env = tcpgc_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"})

    def path(self, documented: str) -> Path:
        """Where a documented /etc/tcpgc/... file lives for this host."""
        return Path(self.translate(documented))

    def translate(self, text: str) -> str:
        return text.replace("/etc/tcpgc/", f"{self.etc}/")

    def argv(self, line: str) -> list[str]:
        script = "\n".join([f"exec <{self.stdin}", *self.prelude, f"exec {self.translate(line)}"])
        return [
            *self.pair.prefix(self.ns),
            "unshare", "--mount", "sh", "-c", _MOUNTS, str(self.hosts), str(self.var_lib),
            "bash", "-c", script,
        ]  # fmt: skip

    def run(self, line: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(line), env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def spawn(self, line: str) -> Process:
        proc = Process(self.argv(line), name=f"{self.name}: {line}", env=self.env)
        self.pair.procs.append(proc)
        return proc
