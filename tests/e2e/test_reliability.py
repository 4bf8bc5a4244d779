"""Reliability on loopback: dead and frozen agents, LL restarts, several agents per
service, several LLs behind HAProxy, SIGTERM drain and SIGHUP reload.

Real ``tcpgc`` processes and real sockets. Heartbeats are short (0.5 s) so a silent peer
is declared dead within 1.5 s; every wait is on a log line, a port or a socket.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reliability_tools import (
    RE_CC_RECONNECTING,
    RE_LL_CLOSING,
    RE_LL_SILENT,
    RE_RELOAD_REFUSED,
    RE_STOPPING,
    Streamer,
    cc_config,
    haproxy_config,
    ll_config,
    log_time,
    start_haproxy,
    wait_streaming,
)
from support import (
    RE_CC_JOINED,
    RE_LL_AGENT_JOINED,
    RE_LL_AGENT_PORT,
    READY_TIMEOUT,
    Harness,
    Node,
    connect,
    format_addr,
    free_port,
    parse_addr,
    recv_exactly,
    recv_until_eof,
    service_re,
)
from test_reuse import ADMIN, wait_pool_full

HEARTBEAT = 0.5
#: A silent peer is dropped after three intervals; allow scheduling slack on top.
DETECTION = 3 * HEARTBEAT + 1.0
CC_RECONNECT_MAX = 1.0


# ---------------------------------------------------------------------------- helpers


def start_ll(
    harness: Harness, config: Path, services: tuple[str, ...] = ("default",), name: str = "ll"
) -> tuple[Node, tuple[str, int], dict[str, tuple[str, int]]]:
    """``tcpgc ll -c CONFIG``: the node, its agent address and each service's address."""
    ll = harness.node("ll", "-c", str(config), name=name)
    agent = parse_addr(ll.wait_for(RE_LL_AGENT_PORT, READY_TIMEOUT)["addr"])
    clients = {s: parse_addr(ll.wait_for(service_re(s), READY_TIMEOUT)["addr"]) for s in services}
    return ll, agent, clients


def line_after(node: Node, match: re.Match[str], since: int) -> int:
    """The log mark just after the line ``match`` was found in (searching from ``since``)."""
    return node.stderr_lines.index(match.string, since) + 1


def start_cc(
    harness: Harness,
    token: str,
    lls: list[tuple[str, int]],
    server: str,
    name: str = "cc",
    since: dict[Node, int] | None = None,
    flags: tuple[str, ...] = (),
) -> tuple[Node, str]:
    """``tcpgc cc --ll ... --server SERVER``, joined to every LL; returns it and its id.

    ``since`` maps each LL node to the log mark to look for the join from."""
    args = [*flags, *(a for ll in lls for a in ("--ll", format_addr(*ll)))]
    cc = harness.start_cc(*args, "--server", server, token=token, name=name)
    agent_id, mark = "", 0
    for _ in lls:
        joined = cc.wait_for(RE_CC_JOINED, READY_TIMEOUT, since=mark)
        agent_id, mark = joined["id"], line_after(cc, joined, mark)
    for ll, mark in (since or {}).items():
        ll.wait_for(rf"agent {agent_id} connected from", READY_TIMEOUT, since=mark)
    return cc, agent_id


def ll_with_token(
    harness: Harness, tmp_path: Path, name: str = "ll", services: tuple[str, ...] = ("default",),
    **extra: object,
) -> tuple[Node, tuple[str, int], dict[str, tuple[str, int]], str]:  # fmt: skip
    state = harness.state_dir(f"{name}-state")
    token = harness.token(state)
    config = ll_config(
        tmp_path / f"{name}.toml",
        cc="127.0.0.1:0",
        services=dict.fromkeys(services, "127.0.0.1:0"),
        state_dir=state,
        heartbeat=HEARTBEAT,
        **extra,
    )
    ll, agent, clients = start_ll(harness, config, services, name)
    return ll, agent, clients, token


def roundtrip(addr: tuple[str, int], prefix: bytes = b"", size: int = 1000) -> bytes:
    """One client: read the server's prefix (if any), echo ``size`` bytes; returns the prefix."""
    payload = os.urandom(size)
    with connect(addr, timeout=10) as sock:
        got = recv_exactly(sock, len(prefix)) if prefix else b""
        sock.sendall(payload)
        assert recv_exactly(sock, size) == payload
    return got


@pytest.fixture
def streamers() -> Iterator[list[Streamer]]:
    """Streamers to stop at teardown, whatever happened."""
    started: list[Streamer] = []
    yield started
    for s in started:
        s.finish()
    for s in started:
        s.join(10)


def stream(streamers: list[Streamer], addr: tuple[str, int], **kwargs: object) -> Streamer:
    s = Streamer(addr, **kwargs)  # type: ignore[arg-type]
    streamers.append(s)
    s.start()
    return s


# ---------------------------------------------------------------------------- dead agents


def test_kill9_cc_ends_its_connections_and_a_second_cc_serves_new_clients(
    harness: Harness, tmp_path: Path, streamers: list[Streamer]
) -> None:
    echo = harness.echo_server()
    ll, agent, clients, token = ll_with_token(harness, tmp_path, client_wait=10)
    cc1, id1 = start_cc(harness, token, [agent], echo.addr_str, "cc1")

    transfers = [stream(streamers, clients["default"], chunk=1024, pause=0.05) for _ in range(20)]
    wait_streaming(transfers)

    killed = time.monotonic()
    cc1.proc.kill()
    for t in transfers:
        assert t.ended.wait(DETECTION + 5), "a client of the killed agent is still connected"
    for t in transfers:
        assert t.error is not None and t.ended_at is not None
        assert t.ended_at - killed <= DETECTION, (
            f"a client's connection ended {t.ended_at - killed:.2f} s after the agent died"
        )
    ll.wait_for(rf"agent {id1} at \S+ (?:disconnected|silent)", DETECTION)

    mark = ll.mark()
    start_cc(harness, token, [agent], echo.addr_str, "cc2", since={ll: mark})
    for _ in range(20):
        roundtrip(clients["default"])


def test_two_agents_spread_clients_and_200_are_served_after_one_is_killed(
    harness: Harness, tmp_path: Path
) -> None:
    server_a = harness.echo_server(prefix=b"A")
    server_b = harness.echo_server(prefix=b"B")
    ll, agent, clients, token = ll_with_token(harness, tmp_path)
    addr = clients["default"]
    mark = ll.mark()
    cc_a, id_a = start_cc(harness, token, [agent], server_a.addr_str, "cc-a", since={ll: mark})
    mark = ll.mark()
    start_cc(harness, token, [agent], server_b.addr_str, "cc-b", since={ll: mark})

    # Agents of one service are sent new clients in turn.
    seen = [roundtrip(addr, prefix=b"?") for _ in range(10)]
    assert seen.count(b"A") >= 3 and seen.count(b"B") >= 3, seen

    cc_a.proc.kill()
    ll.wait_for(rf"agent {id_a} at \S+ (?:disconnected|silent)", DETECTION)
    served = [roundtrip(addr, prefix=b"?") for _ in range(200)]
    assert served == [b"B"] * 200


@pytest.mark.parametrize("mode", ["tls", "plaintext"])
def test_first_bytes_behind_open_reach_the_next_agent_once_after_a_refusal(
    harness: Harness, tmp_path: Path, mode: str
) -> None:
    """A client's first bytes ride right behind OPEN on a ready connection, before the
    agent has answered. An agent whose server is down refuses such a client after it has
    them; the LL then offers the client, with the same bytes, to the other agent, and the
    server sees each client's bytes exactly once."""
    plaintext = mode == "plaintext"
    server = harness.echo_server(prefix=b"B")
    extra = {"insecure_plaintext": True} if plaintext else {}
    ll, agent, clients, token = ll_with_token(harness, tmp_path, **extra)
    flags = ("--insecure-plaintext",) if plaintext else ()
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: that agent refuses
    mark = ll.mark()
    cc_dead, _ = start_cc(harness, token, [agent], dead, "cc-dead", {ll: mark}, flags)
    mark = ll.mark()
    start_cc(harness, token, [agent], server.addr_str, "cc-live", {ll: mark}, flags)

    for i in range(20):
        payload = os.urandom(100 + i)
        with connect(clients["default"], timeout=10) as sock:
            sock.sendall(payload)  # at once: in the LL's buffer when it sends OPEN
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b"B" + payload
    # Agents take clients in turn, so about half went to the dead one first.
    assert len(cc_dead.find_all(r"cannot reach server")) >= 5
    assert server.connections == 20


def test_frozen_agent_is_dropped_by_heartbeat_and_its_connections_closed(
    harness: Harness, tmp_path: Path, streamers: list[Streamer]
) -> None:
    """SIGSTOP keeps the agent's sockets open but silent: only heartbeats can tell.
    With streams that cannot resume (`resume_window = 0`), they end then."""
    server_a = harness.echo_server(prefix=b"A")
    server_b = harness.echo_server(prefix=b"B")
    ll, agent, clients, token = ll_with_token(harness, tmp_path, client_wait=10, resume_window=0)
    addr = clients["default"]
    mark = ll.mark()
    cc_a, id_a = start_cc(harness, token, [agent], server_a.addr_str, "cc-a", since={ll: mark})

    transfers = [stream(streamers, addr, chunk=512, pause=0.05, prefix=1) for _ in range(5)]
    wait_streaming(transfers)
    mark = ll.mark()
    cc_b, id_b = start_cc(harness, token, [agent], server_b.addr_str, "cc-b", since={ll: mark})

    mark = ll.mark()
    os.kill(cc_a.pid, signal.SIGSTOP)
    try:
        frozen_at = time.time()
        silent = ll.wait_for(RE_LL_SILENT, DETECTION + 5, since=mark)
        assert silent["id"] == id_a
        assert log_time(silent) - frozen_at <= DETECTION
        closing = ll.wait_for(RE_LL_CLOSING, 5, since=mark)
        assert (closing["id"], closing["n"]) == (id_a, "5")
        for t in transfers:
            assert t.ended.wait(5), "a connection of the dropped agent is still open"
            assert t.error is not None
        assert [roundtrip(addr, prefix=b"?") for _ in range(4)] == [b"B"] * 4

        cc_mark = cc_a.mark()
    finally:
        os.kill(cc_a.pid, signal.SIGCONT)
    # Thawed, the agent finds its session gone and comes back with a new one.
    cc_a.wait_for(RE_CC_JOINED, READY_TIMEOUT, since=cc_mark)
    ll.wait_for(rf"agent {id_a} connected from", READY_TIMEOUT, since=mark)
    assert id_b != id_a
    seen = {roundtrip(addr, prefix=b"?") for _ in range(8)}
    assert seen == {b"A", b"B"}


def test_client_offered_to_a_frozen_agent_goes_to_another_once_it_is_dropped(
    harness: Harness, tmp_path: Path
) -> None:
    server_a = harness.echo_server(prefix=b"A")
    server_b = harness.echo_server(prefix=b"B")
    ll, agent, clients, token = ll_with_token(harness, tmp_path, client_wait=4)
    addr = clients["default"]
    mark = ll.mark()
    cc_a, id_a = start_cc(harness, token, [agent], server_a.addr_str, "cc-a", since={ll: mark})
    mark = ll.mark()
    start_cc(harness, token, [agent], server_b.addr_str, "cc-b", since={ll: mark})

    os.kill(cc_a.pid, signal.SIGSTOP)
    try:
        # Agents are offered clients in turn, so some of these go to the frozen agent
        # first: each must be moved to the other agent once the heartbeat drops it
        # (1.5 s), well within client_wait (4 s).
        during = [roundtrip(addr, prefix=b"?") for _ in range(4)]
    finally:
        os.kill(cc_a.pid, signal.SIGCONT)
    assert during == [b"B"] * 4


# ---------------------------------------------------------------------------- LL restart


def test_cc_reconnects_to_a_restarted_ll_within_its_backoff_cap(
    harness: Harness, tmp_path: Path
) -> None:
    echo = harness.echo_server()
    ll1, agent, clients, token = ll_with_token(harness, tmp_path, name="ll")
    config = cc_config(
        tmp_path / "cc.toml",
        ll=[format_addr(*agent)],
        services={"default": echo.addr_str},
        reconnect_min=0.1,
        reconnect_max=CC_RECONNECT_MAX,
    )
    cc = harness.start_cc("-c", str(config), token=token)
    cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)
    roundtrip(clients["default"])

    mark = cc.mark()
    assert ll1.stop() == 0
    # While the LL is down the agent retries with growing, jittered delays up to the cap.
    delays = []
    for _ in range(6):
        m = cc.wait_for(RE_CC_RECONNECTING, 10, since=mark)
        delays.append(float(m["s"]))
        mark = line_after(cc, m, mark)
    # The first try after a session that was up is at once (its streams wait to resume).
    assert delays[0] == 0.0, delays
    assert all(0.1 <= d <= CC_RECONNECT_MAX for d in delays[1:]), delays

    # A new LL on the same ports and state dir (so the same join token).
    restarted = ll_config(
        tmp_path / "ll-restarted.toml",
        cc=format_addr(*agent),
        services={"default": format_addr(*clients["default"])},
        state_dir=harness.state_dir("ll-state"),
        heartbeat=HEARTBEAT,
    )
    mark = cc.mark()
    ll2, _, clients2 = start_ll(harness, restarted, name="ll (restarted)")
    assert clients2 == clients
    up = log_time(ll2.wait_for(RE_LL_AGENT_PORT, 1))
    joined = log_time(cc.wait_for(RE_CC_JOINED, READY_TIMEOUT, since=mark))
    assert joined - up <= CC_RECONNECT_MAX + 1.5, f"rejoined {joined - up:.2f} s after restart"
    ll2.wait_for(RE_LL_AGENT_JOINED, 5)
    roundtrip(clients2["default"])


# ---------------------------------------------------------------------------- HAProxy


def test_haproxy_in_front_of_two_lls_fails_over_when_one_dies(
    harness: Harness, tmp_path: Path
) -> None:
    """Clients reach two LLs through HAProxy; the agent dials both LLs directly."""
    if shutil.which("haproxy") is None:
        pytest.skip("needs haproxy (Debian: apt-get install haproxy), which is not installed")
    echo = harness.echo_server()
    state = harness.state_dir("shared-state")  # one identity: one token for both LLs
    token = harness.token(state)
    lls = []
    for name in ("ll1", "ll2"):
        config = ll_config(
            tmp_path / f"{name}.toml",
            cc="127.0.0.1:0",
            services={"default": "127.0.0.1:0"},
            state_dir=state,
            heartbeat=HEARTBEAT,
        )
        lls.append(start_ll(harness, config, name=name))
    (ll1, agent1, clients1), (ll2, agent2, clients2) = lls
    start_cc(harness, token, [agent1, agent2], echo.addr_str, since={ll1: 0, ll2: 0})

    front, monitor = free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        haproxy_config(
            clients_port=front,
            monitor_port=monitor,
            lls=[("ll1", clients1["default"]), ("ll2", clients2["default"])],
        )
    )
    haproxy = start_haproxy(cfg, monitor)
    try:
        frontend = ("127.0.0.1", front)
        marks = ll1.mark(), ll2.mark()
        for _ in range(20):
            roundtrip(frontend)
        served = [
            len(ll.find_all(r"client \S+ of service 'default' done .* bytes in", since=m))
            for ll, m in zip((ll1, ll2), marks, strict=True)
        ]
        assert min(served) >= 5, f"HAProxy did not spread clients over both LLs: {served}"

        ll1.proc.kill()
        haproxy.wait_for(r"Server lls/ll1 is DOWN", 10)
        failures = []
        for i in range(100):
            try:
                roundtrip(frontend)
            except (OSError, AssertionError) as exc:
                failures.append(f"client {i}: {exc!r}")
        assert not failures, failures
    finally:
        haproxy.stop()
        print(haproxy.output())


# ---------------------------------------------------------------------------- SIGTERM


def test_sigterm_drains_a_transfer_in_flight_and_refuses_new_clients(
    harness: Harness, tmp_path: Path, streamers: list[Streamer]
) -> None:
    echo = harness.echo_server()
    ll, agent, clients, token = ll_with_token(harness, tmp_path, drain_timeout=20)
    start_cc(harness, token, [agent], echo.addr_str)
    addr = clients["default"]

    transfer = stream(streamers, addr, chunk=4096, pause=0.02, total=512 * 1024)
    wait_streaming([transfer])
    ll.proc.send_signal(signal.SIGTERM)
    ll.wait_for(RE_STOPPING, 5)
    ll.wait_for(r"draining: waiting up to 20 s for 1 connections", 5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(addr, timeout=2).close()
    assert transfer.ended.wait(30)
    assert transfer.ok, transfer.error
    assert ll.proc.wait(10) == 0  # as soon as the transfer ended, not at the deadline
    assert not ll.find_all(r"drain deadline reached")


def test_sigterm_cuts_a_longer_transfer_at_the_drain_deadline(
    harness: Harness, tmp_path: Path, streamers: list[Streamer]
) -> None:
    echo = harness.echo_server()
    ll, agent, clients, token = ll_with_token(harness, tmp_path, drain_timeout=1)
    start_cc(harness, token, [agent], echo.addr_str)

    transfer = stream(streamers, clients["default"], chunk=1024, pause=0.02)
    wait_streaming([transfer])
    signalled = time.monotonic()
    ll.proc.send_signal(signal.SIGTERM)
    assert transfer.ended.wait(10), "transfer not cut"
    assert transfer.ended_at is not None and transfer.error is not None
    took = transfer.ended_at - signalled
    assert 0.8 <= took <= 3.0, f"cut {took:.2f} s after SIGTERM, drain_timeout is 1 s"
    ll.wait_for(r"drain deadline reached: closing 1 connections", 5)
    assert ll.proc.wait(10) == 0


def test_second_sigterm_closes_at_once(
    harness: Harness, tmp_path: Path, streamers: list[Streamer]
) -> None:
    echo = harness.echo_server()
    ll, agent, clients, token = ll_with_token(harness, tmp_path, drain_timeout=60)
    start_cc(harness, token, [agent], echo.addr_str)

    transfer = stream(streamers, clients["default"], chunk=1024, pause=0.02)
    wait_streaming([transfer])
    ll.proc.send_signal(signal.SIGTERM)
    ll.wait_for(r"draining: waiting up to 60 s for 1 connections", 5)
    signalled = time.monotonic()
    ll.proc.send_signal(signal.SIGTERM)
    ll.wait_for(r"second signal: closing now", 5)
    assert transfer.ended.wait(5), "transfer still running after the second signal"
    assert transfer.ended_at is not None and transfer.ended_at - signalled < 3
    assert ll.proc.wait(10) == 0


def test_cc_sigterm_leaves_the_ll_and_finishes_its_transfer(
    harness: Harness, tmp_path: Path, streamers: list[Streamer]
) -> None:
    echo = harness.echo_server()
    ll, agent, clients, token = ll_with_token(harness, tmp_path)
    cc, cc_id = start_cc(harness, token, [agent], echo.addr_str)

    transfer = stream(streamers, clients["default"], chunk=4096, pause=0.02, total=384 * 1024)
    wait_streaming([transfer])
    cc.proc.send_signal(signal.SIGTERM)
    cc.wait_for(RE_STOPPING, 5)
    # The agent leaves the LL at once, while its connection keeps flowing.
    ll.wait_for(rf"agent {cc_id} at \S+ disconnected", 5)
    assert not transfer.ended.is_set()
    assert transfer.ended.wait(30)
    assert transfer.ok, transfer.error
    assert cc.proc.wait(10) == 0


# ---------------------------------------------------------------------------- SIGHUP


def test_sighup_adds_and_removes_services_and_refuses_bad_configs(
    harness: Harness, tmp_path: Path, streamers: list[Streamer]
) -> None:
    echo = harness.echo_server()
    echo_b = harness.echo_server(prefix=b"b")
    state = harness.state_dir()
    token = harness.token(state)
    ll_path = tmp_path / "ll.toml"

    def write_ll(services: dict[str, str], cc: str = "127.0.0.1:0") -> None:
        ll_config(ll_path, cc=cc, services=services, state_dir=state, heartbeat=HEARTBEAT)

    write_ll({"a": "127.0.0.1:0"})
    ll, agent, clients = start_ll(harness, ll_path, ("a",))
    cc_path = tmp_path / "cc.toml"
    cc_config(cc_path, ll=[format_addr(*agent)], services={"a": echo.addr_str})
    cc = harness.start_cc("-c", str(cc_path), token=token)
    cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)

    # A transfer on service a runs through every reload below.
    transfer = stream(streamers, clients["a"], chunk=4096, pause=0.02, total=768 * 1024)
    wait_streaming([transfer])

    # Add service b: on the LL (a new listener), then on the agent (a new session).
    mark = ll.mark()
    write_ll({"a": "127.0.0.1:0", "b": "127.0.0.1:0"})
    ll.proc.send_signal(signal.SIGHUP)
    b_addr = parse_addr(ll.wait_for(service_re("b"), 5, since=mark)["addr"])
    cc_config(
        cc_path, ll=[format_addr(*agent)], services={"a": echo.addr_str, "b": echo_b.addr_str}
    )
    cc.proc.send_signal(signal.SIGHUP)
    cc.wait_for(r"config reloaded: 1 LLs, services a, b", 5)
    ll.wait_for(r"agent \S+ connected from \S+ \(services: a, b\)", READY_TIMEOUT, since=mark)
    assert roundtrip(b_addr, prefix=b"b") == b"b"

    # A broken config and a forbidden change are refused; the running config stays.
    for bad, why in (
        ("client_wait = -1\n", r"client_wait: expected a number of seconds"),
        ("[services.a\n", r"not valid TOML"),
        (None, r"'cc' and 'insecure_plaintext' cannot change on reload"),
    ):
        mark = ll.mark()
        if bad is None:
            write_ll({"a": "127.0.0.1:0", "b": "127.0.0.1:0"}, cc="127.0.0.1:1")
        else:
            ll_path.write_text(bad + ll_path.read_text())
        ll.proc.send_signal(signal.SIGHUP)
        ll.wait_for(RE_RELOAD_REFUSED + ".*" + why, 5, since=mark)
        roundtrip(clients["a"])
        assert roundtrip(b_addr, prefix=b"b") == b"b"
        write_ll({"a": "127.0.0.1:0", "b": "127.0.0.1:0"})

    # Remove service b: its listener closes.
    mark = ll.mark()
    write_ll({"a": "127.0.0.1:0"})
    ll.proc.send_signal(signal.SIGHUP)
    ll.wait_for(r"service 'b' removed", 5, since=mark)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(b_addr, timeout=2).close()
    roundtrip(clients["a"])

    assert transfer.ended.wait(30)
    assert transfer.ok, transfer.error
    assert not ll.find_all(r"agent \S+ at \S+ (?:silent|sent a bad)")


def test_service_added_by_reload_goes_to_agents_that_already_offer_it(
    harness: Harness, tmp_path: Path
) -> None:
    echo = harness.echo_server()
    state = harness.state_dir()
    token = harness.token(state)
    ll_path = tmp_path / "ll.toml"
    ll_config(ll_path, cc="127.0.0.1:0", services={"a": "127.0.0.1:0"}, state_dir=state)
    ll, agent, _ = start_ll(harness, ll_path, ("a",))
    cc_path = cc_config(
        tmp_path / "cc.toml",
        ll=[format_addr(*agent)],
        services={"a": echo.addr_str, "b": echo.addr_str},
    )
    cc = harness.start_cc("-c", str(cc_path), token=token)
    cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)
    ll.wait_for(r"offers services this LL does not have: b", READY_TIMEOUT)

    mark = ll.mark()
    ll_config(
        ll_path,
        cc="127.0.0.1:0",
        services={"a": "127.0.0.1:0", "b": "127.0.0.1:0"},
        state_dir=state,
        client_wait=2,
    )
    ll.proc.send_signal(signal.SIGHUP)
    b_addr = parse_addr(ll.wait_for(service_re("b"), 5, since=mark)["addr"])
    roundtrip(b_addr)


def test_first_bytes_of_an_unanswered_offer_are_not_sent_twice(harness: Harness) -> None:
    """The agent cannot reach the server in time (its accept queue is full, so the SYNs
    wait for retransmission), and the LL stops waiting for its answer. The client's
    first bytes already went to that agent behind OPEN, so the LL must not offer them
    again (over the control connection, or to another agent): the client is reset. The
    agent, whose server answers a moment later, finds the data connection closed and
    drops the server connection unused: the server never gets them."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())  # the queue is now full
    received: list[bytes] = []
    release, stop = threading.Event(), threading.Event()

    def serve() -> None:
        release.wait(20)
        listener.settimeout(0.2)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                got = b""
                try:
                    while chunk := conn.recv(4096):
                        got += chunk
                except OSError:
                    pass
                received.append(got)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        server_addr = format_addr(*listener.getsockname())
        tunnel = harness.tunnel(
            server_addr, ll_args=["--client-wait", "2.5", *ADMIN], cc_args=list(ADMIN)
        )
        wait_pool_full(tunnel)  # the client goes on a ready connection, OPEN and bytes
        mark, cc_mark = tunnel.ll.mark(), tunnel.cc.mark()
        # The LL is stopped while the client connects and sends, so that its bytes are
        # there when the LL takes the client: they go behind OPEN whatever the load.
        os.kill(tunnel.ll.pid, signal.SIGSTOP)
        try:
            client = connect(tunnel.client_addr, timeout=10)
            client.sendall(b"REQ")  # say, a request that must not run twice
        finally:
            os.kill(tunnel.ll.pid, signal.SIGCONT)
        with client:
            tunnel.ll.wait_for(r"not offered to another agent", 10, since=mark)
            release.set()  # the server accepts again: the agent's SYN gets through
            with pytest.raises(ConnectionResetError):
                recv_until_eof(client)
        # The agent's server connection came after the LL gave up: dropped unused.
        tunnel.cc.wait_for(r"closed the connection of a client being opened", 10, since=cc_mark)
        assert not any(b"REQ" in got for got in received), received
    finally:
        stop.set()
        release.set()
        server.join(10)
        filler.close()
        listener.close()
