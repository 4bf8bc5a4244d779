"""The systems under test. Each starts on loopback in front of one inside server and
returns the address clients use; `roots()` are its own processes (memory is summed
over them and all their descendants)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _procs import Proc, free_port, wait_listening

ROOT = Path(__file__).resolve().parents[1]
Addr = tuple[str, int]
LOCAL = "127.0.0.1"


def tcpgc_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tcpgc", *args]


def tcpgc_env(
    token: str | None = None, loop: str | None = None, src: Path | None = None
) -> dict[str, str]:
    """The environment of a tcpgc process run from the source tree `src` (default: this
    working tree's)."""
    env = dict(os.environ)
    # the event loop a plain install picks (uvloop when the `fast` extra is there),
    # unless a system asks for one
    env.pop("TCPGC_LOOP", None)
    if loop:
        env["TCPGC_LOOP"] = loop
    # the working tree (or the one given) is what is measured, whatever is installed
    tree = str(src or ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tree, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TCPGC_TOKEN", None)
    env.pop("TCPGC_NO_SPLICE", None)
    if token:
        env["TCPGC_TOKEN"] = token
    return env


class System:
    key = ""
    label = ""
    #: the figures measured; None: all of them
    figures: tuple[str, ...] | None = None
    #: which processes are "LL" and "CC" for the fd census
    nodes: dict[str, Proc]

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir / self.key
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.nodes = {}
        self.runs = 0

    def start(self, target: int) -> Addr:
        raise NotImplementedError

    def roots(self) -> list[int]:
        return [p.pid for p in self.procs if p.popen.poll() is None]

    def alive(self) -> bool:
        return all(p.popen.poll() is None for p in self.procs)

    def dead(self) -> str:
        return "; ".join(
            f"{p.name} exited {p.popen.returncode}: {p.tail(5)}"
            for p in self.procs
            if p.popen.poll() is not None
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs = []
        self.nodes = {}

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.{self.runs}.log"
        proc = Proc(f"{self.key}/{name}", argv, log, env=env)
        self.procs.append(proc)
        return proc


class Direct(System):
    key = "direct"
    label = "direct (no tunnel)"

    def start(self, target: int) -> Addr:
        return (LOCAL, target)


class SocatPair(System):
    """The seed's two commands, verbatim but for the ports and `bind=127.0.0.1` on the
    two listeners (the seed listens on every interface; this benchmark stays on
    loopback). socat's own -d -d -d logging is kept and goes to a file."""

    key = "socat"
    label = "socat pair (seed)"

    def start(self, target: int) -> Addr:
        self.runs += 1
        clients, agents = free_port(), free_port()
        ll = self._spawn(
            "ll",
            [
                "socat",
                "-d",
                "-d",
                "-d",
                f"tcp-l:{clients},reuseaddr,fork,bind={LOCAL}",
                f"tcp-l:{agents},reuseaddr,bind={LOCAL}",
            ],  # fmt: skip
        )
        wait_listening(clients, 10, ll)
        self._spawn(
            "cc",
            [
                "socat",
                "-d",
                "-d",
                "-d",
                f"tcp:{LOCAL}:{agents},forever,interval=2,fork",
                f"tcp:{LOCAL}:{target}",
            ],  # fmt: skip
        )
        self.nodes = {"LL": self.procs[0], "CC": self.procs[1]}
        time.sleep(0.3)
        return (LOCAL, clients)


class SshR(System):
    """`ssh -R` against an sshd of our own on loopback (own keys, own config)."""

    key = "ssh"
    label = "OpenSSH ssh -R"

    def _keys(self) -> None:
        if (self.workdir / "client_key").exists():
            return
        for name in ("host_key", "client_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.workdir / name)],
                check=True,
            )
        (self.workdir / "authorized_keys").write_text((self.workdir / "client_key.pub").read_text())
        for name in ("host_key", "client_key", "authorized_keys"):
            os.chmod(self.workdir / name, 0o600)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privsep directory

    def start(self, target: int) -> Addr:
        self.runs += 1
        self._keys()
        sshd_port, forwarded = free_port(), free_port()
        config = self.workdir / f"sshd_config.{self.runs}"
        config.write_text(
            f"Port {sshd_port}\n"
            f"ListenAddress {LOCAL}\n"
            f"HostKey {self.workdir / 'host_key'}\n"
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}\n"
            f"PidFile {self.workdir / f'sshd.{self.runs}.pid'}\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\n"
            "AllowTcpForwarding yes\n"
            "X11Forwarding no\n"
            "PrintMotd no\n"
            "LogLevel ERROR\n"
        )
        sshd = self._spawn("sshd", ["/usr/sbin/sshd", "-f", str(config), "-D", "-e"])
        wait_listening(sshd_port, 10, sshd)
        ssh = self._spawn(
            "ssh",
            [
                "ssh",
                "-N",
                "-F",
                "/dev/null",
                "-R",
                f"{LOCAL}:{forwarded}:{LOCAL}:{target}",
                "-i",
                str(self.workdir / "client_key"),
                "-p",
                str(sshd_port),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "LogLevel=ERROR",
                f"root@{LOCAL}",
            ],  # fmt: skip
        )
        wait_listening(forwarded, 15, ssh)
        self.nodes = {"sshd": sshd, "ssh": ssh}
        return (LOCAL, forwarded)

    def stop(self) -> None:
        # the client first: its session child of sshd then ends by itself
        for proc in reversed(self.procs):
            proc.stop()
        self.procs = []
        self.nodes = {}


class HAProxyChain(System):
    """Two `haproxy` processes in the tunnel's own topology, client → hop 1 → hop 2 →
    server, with no tunnel logic: the best C relay over the same two hops, the practical
    limit for tcpgc. `mode tcp`, `option splice-auto`, no log; each in the foreground
    (`-db`, no master process) so it is stopped like any other child."""

    key = "haproxy"
    label = "HAProxy 2-hop splice chain"
    #: fits a 20,000 fd limit: two sockets per connection, plus the splice pipes
    #: (haproxy's default maxpipes is maxconn / 4, two fds each)
    maxconn = 7900

    def _config(self, name: str, listen: int, to: int) -> Path:
        config = self.workdir / f"{name}.{self.runs}.cfg"
        config.write_text(
            "global\n"
            f"    maxconn {self.maxconn}\n"
            "defaults\n"
            "    mode tcp\n"
            "    option splice-auto\n"
            f"    maxconn {self.maxconn}\n"
            "    timeout connect 5s\n"
            # idle held connections must outlive the hold measurement (45 s + checks)
            "    timeout client 300s\n"
            "    timeout server 300s\n"
            f"frontend {name}\n"
            f"    bind {LOCAL}:{listen}\n"
            "    default_backend next\n"
            "backend next\n"
            f"    server next {LOCAL}:{to}\n"
        )
        return config

    def start(self, target: int) -> Addr:
        self.runs += 1
        first, second = free_port(), free_port()
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        hop2 = self._spawn("hop2", [binary, "-db", "-f", str(self._config("hop2", second, target))])
        wait_listening(second, 10, hop2)
        hop1 = self._spawn("hop1", [binary, "-db", "-f", str(self._config("hop1", first, second))])
        wait_listening(first, 10, hop1)
        # not "LL"/"CC": each hop is multithreaded, so the CPU its main thread last ran
        # on says little about where its connections are served
        self.nodes = {"hop1": hop1, "hop2": hop2}
        return (LOCAL, first)


class Tcpgc(System):
    plaintext = False
    classic = False
    loop: str | None = None
    #: more `tcpgc ll` options (resume.py: `--resume-window 0`)
    ll_args: tuple[str, ...] = ()

    def __init__(self, workdir: Path, src: Path | None = None) -> None:
        """`src`: the source tree whose tcpgc runs (default: this working tree's src/)."""
        super().__init__(workdir)
        self.src = src

    def start(self, target: int) -> Addr:
        self.runs += 1
        clients, agents = free_port(), free_port()
        state = self.workdir / f"state.{self.runs}"
        mode = ["--insecure-plaintext"] if self.plaintext else []
        token = None
        ll_extra: list[str] = []
        if self.classic:
            mode = ["--classic"]
        else:
            done = subprocess.run(
                tcpgc_argv("token", "--state-dir", str(state)),
                env=tcpgc_env(src=self.src),
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            )
            token = done.stdout.strip().splitlines()[-1]
            ll_extra = ["--state-dir", str(state)]
        ll = self._spawn(
            "ll",
            tcpgc_argv(
                "ll",
                "--clients",
                f"{LOCAL}:{clients}",
                "--cc",
                f"{LOCAL}:{agents}",
                *mode,
                *ll_extra,
                *self.ll_args,
            ),  # fmt: skip
            env=tcpgc_env(loop=self.loop, src=self.src),
        )
        wait_listening(clients, 20, ll)
        cc = self._spawn(
            "cc",
            tcpgc_argv(
                "cc", "--ll", self.cc_ll_address(agents), "--server", f"{LOCAL}:{target}", *mode
            ),  # fmt: skip
            env=tcpgc_env(token, self.loop, self.src),
        )
        self.nodes = {"LL": ll, "CC": cc}
        if not self.classic:
            cc.wait_log(r"connected to LL", 20)
            time.sleep(0.5)  # the ready pool fills
        else:
            time.sleep(0.3)
        return (LOCAL, clients)

    def cc_ll_address(self, agents: int) -> str:
        """Where the CC dials the LL's agent port (`wan.py` puts a slow leg between)."""
        return f"{LOCAL}:{agents}"


class TcpgcTLS(Tcpgc):
    key = "tls"
    label = "tcpgc TLS (default)"


class TcpgcPlain(Tcpgc):
    key = "plain"
    label = "tcpgc --insecure-plaintext"
    plaintext = True


class TcpgcClassic(Tcpgc):
    key = "classic"
    label = "tcpgc --classic (LL+CC)"
    classic = True


class TcpgcTLSAsyncio(TcpgcTLS):
    """The same nodes on the standard asyncio loop: shows what uvloop brings."""

    key = "tls-asyncio"
    label = "tcpgc TLS, asyncio loop"
    loop = "asyncio"
    figures = ("connect", "rr", "rate")


class TcpgcPlainAsyncio(TcpgcPlain):
    key = "plain-asyncio"
    label = "tcpgc --insecure-plaintext, asyncio loop"
    loop = "asyncio"
    figures = ("connect", "rr", "rate")


ALL = [
    Direct,
    SocatPair,
    SshR,
    HAProxyChain,
    TcpgcTLS,
    TcpgcPlain,
    TcpgcClassic,
    TcpgcTLSAsyncio,
    TcpgcPlainAsyncio,
]


def tcpgc_loop() -> str:
    """The event loop `tcpgc` runs on here by default."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    return f"uvloop {uvloop.__version__}"


def classic_available(src: Path | None = None) -> bool:
    done = subprocess.run(
        tcpgc_argv("ll", "--help"), env=tcpgc_env(src=src), capture_output=True, text=True,
        check=False, timeout=60,
    )  # fmt: skip
    return "--classic" in done.stdout


def missing_tools() -> list[str]:
    wanted = {"iperf3": "iperf3", "socat": "socat", "ssh": "openssh-client",
              "ssh-keygen": "openssh-client"}  # fmt: skip
    missing = sorted({pkg for tool, pkg in wanted.items() if shutil.which(tool) is None})
    if not Path("/usr/sbin/sshd").exists():
        missing.append("openssh-server")
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        missing.append("haproxy")
    return missing
