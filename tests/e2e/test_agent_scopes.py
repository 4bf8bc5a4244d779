"""Agents with credentials of their own, end to end: `tcpgc agent add` on the LL's host,
`tcpgc cc --expose` on the agent's, a real LL between them. What an agent's scope grants
works, what it does not is refused (and both sides say why), a revoked agent is cut off
in seconds while the others go on, and an exposed port outlives a brief disconnect."""

from __future__ import annotations

import os
import socket
import time

import pytest

from agent_tools import (
    RE_CC_AUTH_FAILED,
    RE_CC_JOINED_LL,
    EchoStream,
    agent_add,
    agent_revoke,
    connect_refused,
    free_port_range,
    re_expose_refused,
    re_exposed,
    re_ll_named_joined,
    re_unexposed,
    start_agents_ll,
    wait_refused,
)
from support import RE_LL_NO_AGENT, Harness, connect, echo_roundtrip, recv_exactly

pytestmark = pytest.mark.timeout(120)

LOCAL = "127.0.0.1"


def test_an_agent_exposes_a_port_of_its_range_and_is_told_why_not_another(
    harness: Harness,
) -> None:
    base = free_port_range(11)
    env = start_agents_ll(harness)
    token = env.add("a", "--ports", f"{base}-{base + 5}")
    server = harness.echo_server()
    mark = env.ll.mark()
    cc = env.start_cc(
        token,
        name="cc-a",
        exposes=[f"{base}={server.addr_str}", f"{base + 10}={server.addr_str}"],
    )
    env.ll.wait_for(re_exposed(base), 10, since=mark)
    payload = os.urandom(200_000)
    assert echo_roundtrip((LOCAL, base), payload) == payload
    assert server.connections == 1
    why = cc.wait_for(re_expose_refused(base + 10), 10)["why"]
    assert f"agent 'a' may expose only ports {base}-{base + 5}" in why
    assert env.ll.find_all(re_expose_refused(base + 10), since=mark), "the LL did not log it"
    assert connect_refused(base + 10), "the LL listens on a port it refused"


def test_an_agent_serves_only_its_services_and_exposes_no_port(harness: Harness) -> None:
    base = free_port_range(6)
    env = start_agents_ll(harness, ("web", "db"), options={"client_wait": 2.0})
    env.add("a", "--ports", f"{base}-{base + 5}")
    token_b = env.add("b", "--services", "web")
    web, db = harness.echo_server(prefix=b"WEB!"), harness.echo_server(prefix=b"DB!")
    mark = env.ll.mark()
    cc = env.start_cc(
        token_b,
        name="cc-b",
        services={"web": web.addr_str, "db": db.addr_str},
        exposes=[f"{base}={web.addr_str}"],  # a port of agent a's range
    )
    joined = env.ll.wait_for(re_ll_named_joined("b"), 10, since=mark)
    assert joined["svc"] == "web"
    assert (
        "service 'db' refused: agent 'b' may serve only web"
        in cc.wait_for(r"service 'db' refused", 10).string
    )
    assert "agent 'b' may expose no port" in cc.wait_for(re_expose_refused(base), 10)["why"]
    # web works
    with connect(env.client_addrs["web"]) as sock:
        assert recv_exactly(sock, 4) == b"WEB!"
        sock.sendall(b"hello web")
        assert recv_exactly(sock, 9) == b"hello web"
    # db: no agent may serve it, so its client is never given to b
    mark = env.ll.mark()
    with connect(env.client_addrs["db"]) as sock:
        sock.sendall(b"hello db")
        env.ll.wait_for(RE_LL_NO_AGENT, 10, since=mark)
        got = b""
        try:
            while chunk := sock.recv(4096):
                got += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert b"DB!" not in got and db.connections == 0, "agent b served db"
    # b's token cannot act as a: a's port was never opened
    assert connect_refused(base), "agent b opened a port of agent a's range"


def test_revoking_an_agent_cuts_it_off_mid_transfer_and_spares_the_others(
    harness: Harness,
) -> None:
    base = free_port_range(1)
    env = start_agents_ll(harness, ("web",))
    token_a = env.add("a", "--ports", f"{base}-{base}")
    token_b = env.add("b", "--services", "web")
    server_a, server_b = harness.echo_server(), harness.echo_server()
    mark = env.ll.mark()
    cc_a = env.start_cc(token_a, name="cc-a", exposes=[f"{base}={server_a.addr_str}"])
    env.start_cc(token_b, name="cc-b", services={"web": server_b.addr_str})
    env.ll.wait_for(re_exposed(base), 10, since=mark)
    env.ll.wait_for(re_ll_named_joined("b"), 10, since=mark)
    stream_a = EchoStream((LOCAL, base))
    stream_b = EchoStream(env.client_addrs["web"])
    try:
        stream_a.wait_echoed(200_000, 20)
        stream_b.wait_echoed(200_000, 20)
        cc_mark = cc_a.mark()
        revoked = time.monotonic()
        env_revoke = env.ll.mark()
        agent_revoke(env.state_dir, "a")
        closed = stream_a.wait_closed(5.0 + 1.0) - revoked
        assert closed < 5.0, f"a's client still connected {closed:.1f} s after the revoke"
        wait_refused(base, max(0.5, 5.0 - (time.monotonic() - revoked)))
        env.ll.wait_for(r"agent 'a' revoked", 5, since=env_revoke)
        # b goes on: bytes keep flowing after the revoke, and every one comes back
        stream_b.wait_echoed(400_000, 20)
        cc_a.wait_for(RE_CC_AUTH_FAILED, 15, since=cc_mark)
        assert not cc_a.find_all(RE_CC_JOINED_LL, since=cc_mark), "a's CC joined again"
        assert connect_refused(base), "a's port opened again after the revoke"
        stream_b.finish()
    finally:
        stream_a.close()
        stream_b.close()


def test_the_shared_token_exposes_nothing_and_agents_are_added_while_the_ll_runs(
    harness: Harness,
) -> None:
    base = free_port_range(2)
    env = start_agents_ll(harness, ("web",))
    shared = harness.token(env.state_dir)
    server = harness.echo_server()
    cc = env.start_cc(
        shared, name="cc-shared", services={"web": server.addr_str},
        exposes=[f"{base}={server.addr_str}"],
    )  # fmt: skip
    why = cc.wait_for(re_expose_refused(base), 10)["why"]
    assert "the LL's shared join token may expose no port" in why
    assert connect_refused(base)
    # the shared token still serves the LL's services
    assert echo_roundtrip(env.client_addrs["web"], b"shared") == b"shared"
    # a new agent, added now: the running LL takes it with no restart
    token = env.add("late", "--ports", f"{base + 1}")
    started = time.monotonic()
    mark = env.ll.mark()
    late = env.start_cc(
        token, name="cc-late", exposes=[f"{base + 1}={server.addr_str}"], wait=False
    )
    late.wait_for(RE_CC_JOINED_LL, 10)
    assert time.monotonic() - started < 10
    env.ll.wait_for(re_exposed(base + 1), 10, since=mark)
    assert echo_roundtrip((LOCAL, base + 1), b"late agent") == b"late agent"
    assert env.ll.proc.poll() is None


def test_an_exposed_port_outlives_a_brief_disconnect(harness: Harness) -> None:
    base = free_port_range(1)
    env = start_agents_ll(harness, ("web",), options={"resume_window": 30})
    token = env.add("a", "--ports", str(base))
    server = harness.echo_server()
    expose = [f"{base}={server.addr_str}"]
    mark = env.ll.mark()
    cc = env.start_cc(token, name="cc-1", exposes=expose)
    env.ll.wait_for(re_exposed(base), 10, since=mark)
    assert echo_roundtrip((LOCAL, base), b"before") == b"before"
    cc.proc.kill()
    cc.proc.wait(10)
    env.ll.wait_for(r"disconnected", 10, since=mark)
    # the agent is gone; its port still takes clients (they wait for it)
    with socket.create_connection((LOCAL, base), timeout=5):
        pass
    assert not env.ll.find_all(re_unexposed(base)), "the port closed at once"
    env.start_cc(token, name="cc-2", exposes=expose)
    payload = os.urandom(100_000)
    assert echo_roundtrip((LOCAL, base), payload) == payload
    assert not env.ll.find_all(re_unexposed(base))


def test_without_a_resume_window_an_exposed_port_closes_with_its_agent(
    harness: Harness,
) -> None:
    base = free_port_range(1)
    env = start_agents_ll(harness, ("web",), options={"resume_window": 0})
    token = env.add("a", "--ports", str(base))
    server = harness.echo_server()
    mark = env.ll.mark()
    cc = env.start_cc(token, name="cc", exposes=[f"{base}={server.addr_str}"])
    env.ll.wait_for(re_exposed(base), 10, since=mark)
    assert echo_roundtrip((LOCAL, base), b"up") == b"up"
    cc.stop()
    env.ll.wait_for(re_unexposed(base), 10, since=mark)
    wait_refused(base, 5)


def test_an_ll_with_only_an_agent_port_serves_the_ports_agents_added_later_expose(
    harness: Harness,
) -> None:
    """`tcpgc ll --cc` alone, the way an `ssh -R` user starts: it warns that it serves
    nothing yet; an agent added afterwards (no restart) exposes a port through it."""
    state = harness.state_dir()
    ll, agent_addr = harness.start_ll("--cc", "127.0.0.1:0", "--state-dir", str(state))
    ll.wait_for(r"serves nothing until one is added", 10)
    port = free_port_range(1)
    server = harness.echo_server()
    token = agent_add(state, "laptop", "--ports", str(port))
    cc = harness.start_cc(
        "--ll", f"127.0.0.1:{agent_addr[1]}", "--expose", f"127.0.0.1:{port}={server.addr_str}",
        token=token,
    )  # fmt: skip
    ll.wait_for(re_exposed(port), 10)
    assert echo_roundtrip(("127.0.0.1", port), b"reached") == b"reached"
    assert cc.proc.poll() is None
