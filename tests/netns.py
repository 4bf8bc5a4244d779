"""Two network namespaces joined by a veth pair, for tests that need a real network
between an "inside" and an "outside" host (a firewall, a partition).

Only the namespaces' own veth addresses (a private /30 chosen by each test file) and
their loopbacks are ever used; the host's own network is never touched. Everything a
test starts inside them is stopped, and the namespaces deleted, even on failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from reliability_tools import cc_config, ll_config
from support import (
    RE_CC_JOINED,
    RE_LL_AGENT_JOINED,
    RE_LL_AGENT_PORT,
    Node,
    Process,
    format_addr,
    make_token,
    parse_addr,
    service_re,
    tcpgc_env,
)

CMD_TIMEOUT = 10.0
SUPPORT = str(Path(__file__).with_name("support.py"))
PREFIX_LEN = 30


def run(*argv: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, input=input, capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False
    )


def check(*argv: str, input: str | None = None) -> str:
    proc = run(*argv, input=input)
    assert proc.returncode == 0, f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr}"
    return proc.stdout


@dataclass
class NamespacePair:
    inside: str
    outside: str
    veth_in: str
    veth_out: str
    inside_ip: str
    outside_ip: str
    procs: list[Process] = field(default_factory=list)

    def prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def python(self, ns: str, *args: str) -> subprocess.CompletedProcess[str]:
        """A short-lived ``python support.py ...`` (echo, probe, roundtrip) inside ``ns``."""
        return subprocess.run(
            [*self.prefix(ns), sys.executable, SUPPORT, *args],
            capture_output=True,
            text=True,
            timeout=CMD_TIMEOUT,
            env=tcpgc_env(),
            check=False,
        )

    def spawn(
        self, ns: str, argv: list[str], name: str, env: dict[str, str] | None = None
    ) -> Process:
        proc = Process(argv, name=name, env=env or tcpgc_env(), prefix=self.prefix(ns))
        self.procs.append(proc)
        return proc

    def tcpgc(self, ns: str, *args: str, name: str, token: str | None = None) -> Node:
        env = tcpgc_env({"TCPGC_TOKEN": token} if token else {})
        node = Node(*args, name=name, env=env, prefix=self.prefix(ns))
        self.procs.append(node)
        return node

    def nft(self, ns: str, ruleset: str) -> subprocess.CompletedProcess[str]:
        return run(*self.prefix(ns), "nft", "-f", "-", input=ruleset)


@dataclass
class Joined:
    """An LL outside and an agent inside, joined: what the tests need of them."""

    ll: Node
    cc: Node
    agent: tuple[str, int]  # the LL's agent port
    client: tuple[str, int]  # service 'default', on the LL's loopback
    cc_id: str
    cc_peer: tuple[str, int]  # the agent's control connection, as the LL sees it


def join_tunnel(
    pair: NamespacePair,
    tmp: Path,
    server: str,
    *,
    heartbeat: float,
    connect_timeout: float = 2.0,
    ready_timeout: float = 20.0,
    **ll_extra: object,
) -> Joined:
    """LL outside (agents on its veth address, clients on its loopback), agent inside
    serving ``server`` as service 'default'; returns once both logged the session."""
    state = tmp / "ll-state"
    token = make_token(state)
    ll_toml = ll_config(
        tmp / "ll.toml",
        cc=f"{pair.outside_ip}:0",
        services={"default": "127.0.0.1:0"},
        state_dir=state,
        heartbeat=heartbeat,
        client_wait=5,
        **ll_extra,
    )
    ll = pair.tcpgc(pair.outside, "ll", "-c", str(ll_toml), name="ll (outside)")
    agent = parse_addr(ll.wait_for(RE_LL_AGENT_PORT, ready_timeout)["addr"])
    client = parse_addr(ll.wait_for(service_re("default"), ready_timeout)["addr"])
    cc_toml = cc_config(
        tmp / "cc.toml",
        ll=[format_addr(*agent)],
        services={"default": server},
        reconnect_min=0.1,
        reconnect_max=1.0,
        connect_timeout=connect_timeout,
    )
    cc = pair.tcpgc(pair.inside, "cc", "-c", str(cc_toml), name="cc (inside)", token=token)
    cc_id = cc.wait_for(RE_CC_JOINED, ready_timeout)["id"]
    joined = ll.wait_for(RE_LL_AGENT_JOINED, ready_timeout)
    assert joined["id"] == cc_id
    return Joined(ll, cc, agent, client, cc_id, parse_addr(joined["addr"]))


def skip_unless_possible(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} need root (network namespaces and nftables)")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            pytest.skip(f"{what} need the `{tool}` command, which is not installed")


P = TypeVar("P", bound=NamespacePair)


@contextmanager
def namespace_pair(
    tag: str,
    subnet: str,
    cls: type[P] = NamespacePair,
    **extra: Any,  # type: ignore[assignment]
) -> Iterator[P]:
    """Namespaces ``tcpgc-{tag}in-*`` and ``tcpgc-{tag}out-*`` joined by a veth pair on
    ``{subnet}.1`` (outside) and ``{subnet}.2`` (inside), loopback up in both."""
    suffix = secrets.token_hex(3)
    pair = cls(
        inside=f"tcpgc-{tag}in-{suffix}",
        outside=f"tcpgc-{tag}out-{suffix}",
        veth_in=f"t{tag[:1]}i{suffix}",  # interface names are limited to 15 characters
        veth_out=f"t{tag[:1]}o{suffix}",
        inside_ip=f"{subnet}.2",
        outside_ip=f"{subnet}.1",
        **extra,
    )
    created: list[str] = []
    try:
        for name in (pair.inside, pair.outside):
            proc = run("ip", "netns", "add", name)
            if proc.returncode != 0:
                pytest.skip(f"cannot create network namespace {name}: {proc.stderr.strip()}")
            created.append(name)
        # The veth pair is created directly inside the namespaces.
        check(
            "ip", "-n", pair.outside, "link", "add", pair.veth_out,
            "type", "veth", "peer", "name", pair.veth_in, "netns", pair.inside,
        )  # fmt: skip
        for name, veth, ip in (
            (pair.outside, pair.veth_out, pair.outside_ip),
            (pair.inside, pair.veth_in, pair.inside_ip),
        ):
            check("ip", "-n", name, "addr", "add", f"{ip}/{PREFIX_LEN}", "dev", veth)
            check("ip", "-n", name, "link", "set", veth, "up")
            check("ip", "-n", name, "link", "set", "lo", "up")
        probe = run(*pair.prefix(pair.outside), "nft", "list", "ruleset")
        if probe.returncode != 0:
            pytest.skip(f"nftables does not work in a namespace here: {probe.stderr.strip()}")
        yield pair
    finally:
        for proc in reversed(pair.procs):
            proc.stop(grace=3)
        print("\n".join(proc.output() for proc in pair.procs))  # shown when a test fails
        for name in created:
            for pid in run("ip", "netns", "pids", name).stdout.split():
                try:  # only processes in our own namespaces: started by this test
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            run("ip", "netns", "del", name)
