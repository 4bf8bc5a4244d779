"""SIGHUP moves a service to another address on the same port (0.0.0.0:P to ADDR:P,
[::]:P to :P) without refusing clients in between, and a reload with one change that
cannot be applied is refused as a whole, naming it.

The moves need wildcard addresses, so the nodes run in a network namespace the test
creates (its own veth address and loopback only)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns import SUPPORT, NamespacePair, namespace_pair, skip_unless_possible
from support import RE_CC_JOINED, RE_LL_AGENT_PORT, Node, make_token, node_toml

pytestmark = pytest.mark.netns

SUBNET = "10.201.91"
OUTSIDE_IP = f"{SUBNET}.1"
WEB, SSH, API = 18002, 12222, 18003
READY = 20.0

#: Connects over and over (each connection one echo round trip) until the stop file
#: appears or 20 s pass; prints how many worked and every failure.
HAMMER = r"""
import os, socket, sys, time
host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ok, failed = 0, []
print("hammering", flush=True)
deadline = time.monotonic() + 20
while not os.path.exists(stop) and time.monotonic() < deadline:
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.settimeout(5)
            s.sendall(b"ping")
            got = b""
            while len(got) < 4:
                chunk = s.recv(4)
                if not chunk:
                    raise ConnectionError("closed after %d bytes" % len(got))
                got += chunk
        ok += 1
    except OSError as exc:
        failed.append(repr(exc))
print("ok", ok, "failed", len(failed), failed[:5], flush=True)
"""

ROUNDTRIP = "roundtrip"


@pytest.fixture
def ns() -> Iterator[NamespacePair]:
    skip_unless_possible("reload tests in a namespace")
    with namespace_pair("r", SUBNET) as pair:
        yield pair


def _start(ns: NamespacePair, tmp_path: Path, services: dict[str, str]) -> tuple[Node, Path, Path]:
    """An LL with `services` from a file, and an agent serving web, ssh and api."""
    state = tmp_path / "state"
    token = make_token(state)
    echo = ns.spawn(ns.outside, [sys.executable, SUPPORT, "echo", "127.0.0.1", "0"], name="echo")
    echo_addr = echo.wait_for(r"echo listening on (?P<addr>\S+)", 10, stream="stdout")["addr"]
    ll_path = tmp_path / "ll.toml"
    write_ll(ll_path, state, services)
    ll = ns.tcpgc(ns.outside, "ll", "-c", str(ll_path), name="ll")
    agent = ll.wait_for(RE_LL_AGENT_PORT, READY)["addr"]
    cc_path = tmp_path / "cc.toml"
    cc_path.write_text(
        node_toml({"ll": agent}, {name: {"server": echo_addr} for name in ("web", "ssh", "api")})
    )
    cc = ns.tcpgc(ns.outside, "cc", "-c", str(cc_path), name="cc", token=token)
    cc.wait_for(RE_CC_JOINED, READY)
    return ll, ll_path, state


def write_ll(path: Path, state: Path, services: dict[str, str]) -> None:
    path.write_text(
        node_toml(
            {"cc": "127.0.0.1:0", "state_dir": str(state), "client_wait": 5},
            {name: {"clients": clients} for name, clients in services.items()},
        )
    )


def _roundtrip(ns: NamespacePair, host: str, port: int) -> bool:
    return ns.python(ns.outside, ROUNDTRIP, host, str(port), "--timeout", "5").returncode == 0


def test_reload_moves_services_on_the_same_port_without_refusing_clients(
    ns: NamespacePair, tmp_path: Path
) -> None:
    ll, ll_path, state = _start(ns, tmp_path, {"web": f"0.0.0.0:{WEB}", "ssh": f"[::]:{SSH}"})
    ll.wait_for(r"tcpgc LL is up", READY)
    assert _roundtrip(ns, OUTSIDE_IP, WEB)
    assert _roundtrip(ns, "::1", SSH)
    assert not _roundtrip(ns, "127.0.0.1", SSH), "[::]:PORT should be IPv6 only"

    stop = tmp_path / "stop"
    hammers = [
        ns.spawn(ns.outside, [sys.executable, "-c", HAMMER, host, str(port), str(stop)],
                 name=f"hammer {host}")
        for host, port in ((OUTSIDE_IP, WEB), ("::1", SSH))
    ]  # fmt: skip
    for hammer in hammers:
        hammer.wait_for("hammering", 10, stream="stdout")
    mark = ll.mark()
    write_ll(
        ll_path,
        state,
        {"web": f"{OUTSIDE_IP}:{WEB}", "ssh": f":{SSH}", "api": f"127.0.0.1:{API}"},
    )
    ll.proc.send_signal(signal.SIGHUP)
    ll.wait_for(r"config reloaded: services", 10, since=mark)
    assert not ll.find_all(r"reload refused", since=mark), ll.output()
    # The hammers go on through the new listeners while these round trips run.
    assert _roundtrip(ns, OUTSIDE_IP, WEB)
    assert _roundtrip(ns, "::1", SSH)
    assert all(hammer.proc.poll() is None for hammer in hammers), "a hammer gave up early"
    stop.touch()
    for hammer in hammers:
        result = hammer.wait_for(r"^ok (?P<ok>\d+) failed (?P<failed>\d+)", 30, stream="stdout")
        assert int(result["ok"]) > 0, result.string
        assert result["failed"] == "0", result.string

    assert _roundtrip(ns, OUTSIDE_IP, WEB)
    assert not _roundtrip(ns, "127.0.0.1", WEB), "the old 0.0.0.0 listener is still open"
    assert _roundtrip(ns, "127.0.0.1", SSH), "':PORT' should now take IPv4 clients too"
    assert _roundtrip(ns, "::1", SSH)
    assert _roundtrip(ns, "127.0.0.1", API), "the service added in the same edit is missing"


def test_reload_with_one_bad_change_is_refused_whole_and_names_it(
    ns: NamespacePair, tmp_path: Path
) -> None:
    ll, ll_path, state = _start(ns, tmp_path, {"web": f"0.0.0.0:{WEB}"})
    ll.wait_for(r"tcpgc LL is up", READY)
    mark = ll.mark()
    # 192.0.2.1 is not an address of this namespace: 'web' cannot listen there.
    write_ll(ll_path, state, {"web": f"192.0.2.1:{WEB}", "api": f"127.0.0.1:{API}"})
    ll.proc.send_signal(signal.SIGHUP)
    refused = ll.wait_for(r"reload refused, the running config stays: (?P<why>.*)", 10, since=mark)
    assert "service 'web'" in refused["why"] and "192.0.2.1" in refused["why"], refused.string
    assert _roundtrip(ns, OUTSIDE_IP, WEB), "the running service stopped"
    assert not _roundtrip(ns, "127.0.0.1", API), "part of a refused reload was applied"
    # Fixed, the same edit applies, and the port moves.
    write_ll(ll_path, state, {"web": f"{OUTSIDE_IP}:{WEB}", "api": f"127.0.0.1:{API}"})
    ll.proc.send_signal(signal.SIGHUP)
    ll.wait_for(r"config reloaded: services web, api", 10, since=mark)
    assert _roundtrip(ns, "127.0.0.1", API)
    assert _roundtrip(ns, OUTSIDE_IP, WEB)
