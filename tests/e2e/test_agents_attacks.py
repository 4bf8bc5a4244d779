"""Attacks on agents' own credentials, against a real LL: a request changed after the
proof, an agent reaching for the LL's own ports or another agent's, a revoked agent
that is away when it is revoked, and secrets that must never reach a log."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from agent_tools import (
    RE_CC_AUTH_FAILED,
    AgentsLL,
    agent_add,
    agent_revoke,
    connect_refused,
    free_port_range,
    re_expose_refused,
    re_exposed,
    re_ll_named_joined,
    start_agents_ll,
    token_secret,
    wait_refused,
)
from support import (
    RE_LL_HANDSHAKE_FAILED,
    Harness,
    echo_roundtrip,
    node_toml,
    parse_addr,
    run_tcpgc,
    service_re,
)
from tcpgc.identity import JoinToken, agent_context, pin_server_name
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.handshake import AgentHandshake
from tcpgc.protocol.messages import Auth, Error, ErrorCode, Message, encode

pytestmark = pytest.mark.timeout(120)

LOCAL = "127.0.0.1"


def _recv(sock: socket.socket, decoder: FrameDecoder) -> Message | None:
    while (message := decoder.next_message()) is None:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        decoder.receive_data(chunk)
    return message


def test_an_auth_whose_exposes_were_changed_after_the_proof_is_refused(
    harness: Harness,
) -> None:
    base = free_port_range(2)
    # added before the LL starts, so that it knows the agent from its first connection
    token = JoinToken.parse(agent_add(harness.state_dir(), "a", "--ports", f"{base}-{base + 1}"))
    env = start_agents_ll(harness)
    mark = env.ll.mark()
    raw = socket.create_connection(env.agent_addr, timeout=10)
    ctx = agent_context()
    with ctx.wrap_socket(raw, server_hostname=pin_server_name(token.fingerprint)) as sock:
        decoder = FrameDecoder()
        handshake = AgentHandshake(
            token.secret, services=(), exposes=(("", base),), binding=token.fingerprint
        )
        sock.sendall(encode(handshake.start()))
        challenge = _recv(sock, decoder)
        assert challenge is not None
        auth = handshake.receive(challenge)
        assert isinstance(auth, Auth)
        # a port the credential does allow: only the proof can tell the change
        sock.sendall(encode(dataclasses.replace(auth, exposes=(("", base + 1),))))
        answer = _recv(sock, decoder)
        assert isinstance(answer, Error) and answer.code == ErrorCode.AUTHENTICATION, answer
        assert _recv(sock, decoder) is None, "the LL kept the connection open"
    reason = env.ll.wait_for(RE_LL_HANDSHAKE_FAILED, 10, since=mark)["reason"]
    assert "proof" in reason
    assert connect_refused(base) and connect_refused(base + 1)
    assert not env.ll.find_all(r"exposed by agent", since=mark)


def test_an_agent_cannot_expose_the_lls_own_ports(harness: Harness) -> None:
    base = free_port_range(4)
    state = harness.state_dir()
    config = harness.tmp_path / "ll.toml"
    config.write_text(
        node_toml(
            {"cc": f"{LOCAL}:{base}", "state_dir": str(state), "admin": f"{LOCAL}:{base + 2}"},
            {"web": {"clients": f"{LOCAL}:{base + 1}"}},
        )
    )
    token = run_tcpgc("agent", "add", "a", "--ports", f"{base}-{base + 3}", "-c", str(config))
    assert token.returncode == 0, token.stderr
    ll, agent_addr = harness.start_ll("-c", str(config))
    web = parse_addr(ll.wait_for(service_re("web"), 10)["addr"])
    server = harness.echo_server()
    env = AgentsLL(harness, ll, state, agent_addr, {"web": web})
    cc = env.start_cc(
        token.stdout.strip(), name="cc-a",
        exposes=[f"{p}={server.addr_str}" for p in (base, base + 1, base + 2)],
    )  # fmt: skip
    said = {p: cc.wait_for(re_expose_refused(p), 10)["why"] for p in (base, base + 1, base + 2)}
    assert said[base] == f"port {base} is this LL's cc port"
    assert said[base + 1] == f"port {base + 1} is service 'web' of this LL"
    assert said[base + 2] == f"port {base + 2} is this LL's admin port"
    assert not ll.find_all(r"exposed by agent")
    # and the LL's own ports still do their jobs
    with socket.create_connection((LOCAL, base + 2), timeout=5):
        pass
    assert ll.proc.poll() is None


def test_a_second_agent_cannot_take_a_port_another_exposes_elsewhere(harness: Harness) -> None:
    base = free_port_range(1)
    env = start_agents_ll(harness)
    token_a = env.add("a", "--ports", str(base))
    token_b = env.add("b", "--ports", str(base))
    server_a, server_b = harness.echo_server(prefix=b"A"), harness.echo_server(prefix=b"B")
    mark = env.ll.mark()
    env.start_cc(token_a, name="cc-a", exposes=[f"{base}={server_a.addr_str}"])
    env.ll.wait_for(re_exposed(base), 10, since=mark)
    cc_b = env.start_cc(token_b, name="cc-b", exposes=[f"{LOCAL}:{base}={server_b.addr_str}"])
    why = cc_b.wait_for(re_expose_refused(base), 10)["why"]
    assert why == f"port {base} is exposed on all addresses by agent 'a'"
    for _ in range(5):  # every client still reaches a's server only
        with socket.create_connection((LOCAL, base), timeout=10) as sock:
            assert sock.recv(1) == b"A"
    assert server_b.connections == 0


def test_a_revoked_agent_that_is_away_loses_its_port_at_once(harness: Harness) -> None:
    """Revoked during a network blip (its session gone, its port kept for the resume
    window): the port closes at once all the same, as for a connected agent."""
    base = free_port_range(1)
    env = start_agents_ll(harness, options={"resume_window": 60})
    token = env.add("a", "--ports", str(base))
    server = harness.echo_server()
    mark = env.ll.mark()
    cc = env.start_cc(token, name="cc-a", exposes=[f"{base}={server.addr_str}"])
    env.ll.wait_for(re_exposed(base), 10, since=mark)
    assert echo_roundtrip((LOCAL, base), b"x") == b"x"
    cc.proc.kill()
    cc.proc.wait(10)
    env.ll.wait_for(r"disconnected", 10, since=mark)
    assert not connect_refused(base)  # kept for its return
    agent_revoke(env.state_dir, "a")
    wait_refused(base, 5)


def test_no_secret_reaches_a_log(harness: Harness) -> None:
    base = free_port_range(2)
    env = start_agents_ll(harness, options={"client_wait": 2.0})
    add = run_tcpgc("agent", "add", "a", "--ports", str(base), "--services", "web",
                    "--state-dir", str(env.state_dir))  # fmt: skip
    token = add.stdout.strip()
    shared = harness.token(env.state_dir)
    server = harness.echo_server()
    mark = env.ll.mark()
    cc = harness.start_cc(
        "--ll", env.agent_str, "--server", server.addr_str, "--expose",
        f"{base}={server.addr_str}", "--expose", f"{base + 1}={server.addr_str}",
        "--log-level", "debug", token=token, name="cc-a",
    )  # fmt: skip
    env.ll.wait_for(re_ll_named_joined("a"), 10, since=mark)
    assert echo_roundtrip((LOCAL, base), b"payload") == b"payload"
    # the shared token, refused a port, and a wrong token
    shared_cc = env.start_cc(shared, name="cc-shared", exposes=[f"{base + 1}={server.addr_str}"])
    shared_cc.wait_for(re_expose_refused(base + 1), 10)
    wrong = token.split(".")
    wrong[1] = wrong[1][::-1]
    bad = harness.start_cc("--ll", env.agent_str, "--server", server.addr_str,
                           token=".".join(wrong), name="cc-bad")  # fmt: skip
    bad.wait_for(RE_CC_AUTH_FAILED, 10)
    listing = run_tcpgc("agent", "list", "--json", "--state-dir", str(env.state_dir))
    agent_revoke(env.state_dir, "a")
    cc.wait_for(RE_CC_AUTH_FAILED, 15)
    for node in (env.ll, cc, shared_cc, bad):
        node.stop()
    texts = {n.name: n.output() for n in (env.ll, cc, shared_cc, bad)}
    texts["agent add (stderr)"] = add.stderr
    texts["agent list"] = listing.stdout + listing.stderr
    for name, text in texts.items():
        for secret in (token, token_secret(token), shared, token_secret(shared),
                       ".".join(wrong), wrong[1]):  # fmt: skip
            assert secret not in text, f"a secret is in the output of {name}"
    assert all(texts.values()), "an output to search is empty"
