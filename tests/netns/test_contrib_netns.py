"""contrib/ll.toml and contrib/cc.toml, as shipped, started by hand on two hosts:
network namespaces where the addresses the files name exist (gw.example.com outside;
the servers 10.0.0.5:443 and 10.0.0.7:22 inside; clients from the networks of the ssh
service's allow list, 192.0.2.0/24 and 2001:db8::/32, outside).

Checks: `tcpgc check` passes both; web relays bytes exactly (no PROXY header reaches a
plain server); ssh takes IPv4 and IPv6 clients of its allow list and refuses others.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from docs_shell import Host
from netns import SUPPORT, NamespacePair, check, namespace_pair, skip_unless_possible
from support import RE_CC_JOINED, RE_LL_AGENT_JOINED, RE_LL_AGENT_PORT, REPO_ROOT

pytestmark = pytest.mark.netns

SUBNET = "10.201.93"
OUTSIDE_IP = f"{SUBNET}.1"
HOSTS = f"127.0.0.1 localhost\n::1 localhost\n{OUTSIDE_IP} gw.example.com\n"
LL_TOML = REPO_ROOT / "contrib" / "ll.toml"
CC_TOML = REPO_ROOT / "contrib" / "cc.toml"
READY = 20.0


@pytest.fixture
def pair() -> Iterator[NamespacePair]:
    skip_unless_possible("the contrib configs on two hosts")
    with namespace_pair("k", SUBNET) as ns:
        yield ns


def _roundtrip(ns: NamespacePair, host: str, port: int) -> bool:
    result = ns.python(ns.outside, "roundtrip", host, str(port), "--timeout", "5")
    return result.returncode == 0


def test_contrib_configs_run_by_hand_as_shipped(pair: NamespacePair, tmp_path: Path) -> None:
    ns = pair
    for address in ("192.0.2.1/32", "2001:db8::1/128"):
        check("ip", "-n", ns.outside, "addr", "add", address, "dev", "lo", "nodad")
    for address in ("10.0.0.5/32", "10.0.0.7/32"):
        check("ip", "-n", ns.inside, "addr", "add", address, "dev", "lo")
    for host, port in (("10.0.0.5", "443"), ("10.0.0.7", "22")):
        echo = ns.spawn(ns.inside, [sys.executable, SUPPORT, "echo", host, port], name="echo")
        echo.wait_for(r"echo listening on", 10, stream="stdout")

    outside = Host(ns, ns.outside, "outside", tmp_path, HOSTS)
    inside = Host(ns, ns.inside, "inside", tmp_path, HOSTS)
    for host, path in ((outside, LL_TOML), (inside, CC_TOML)):
        checked = host.run(f"tcpgc check -c {path}")
        assert checked.returncode == 0, checked.stderr

    token = outside.run(f"tcpgc token -c {LL_TOML}")
    assert token.returncode == 0, token.stderr
    assert (outside.var_lib / "tcpgc").is_dir(), "state_dir is not the file's /var/lib/tcpgc"
    ll = outside.spawn(f"tcpgc ll -c {LL_TOML}")
    ll.wait_for(RE_LL_AGENT_PORT, READY)
    inside.prelude.append(f"export TCPGC_TOKEN={token.stdout.strip()}")
    cc = inside.spawn(f"tcpgc cc -c {CC_TOML}")
    cc.wait_for(RE_CC_JOINED, READY)
    joined = ll.wait_for(RE_LL_AGENT_JOINED, READY)
    assert joined["services"] == "web, ssh", joined.string

    # web: bytes arrive exactly as sent (a PROXY header would come back first).
    assert _roundtrip(ns, "192.0.2.1", 443)
    # ssh: IPv4 and IPv6 clients of the allow list, on one ':2222' service.
    assert _roundtrip(ns, "192.0.2.1", 2222), ll.output()
    assert _roundtrip(ns, "2001:db8::1", 2222), ll.output()
    # ...and nobody else (the veth address is in neither allowed network).
    assert not _roundtrip(ns, OUTSIDE_IP, 2222)
    ll.wait_for(r"refused client \S+ of service 'ssh': address not in the allow list", 5)
    assert not ll.find_all(r"does not have"), ll.output()
    # The token stays out of the logs.
    assert token.stdout.strip() not in "\n".join(ll.stderr_lines + cc.stderr_lines)
