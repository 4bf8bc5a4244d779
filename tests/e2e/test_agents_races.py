"""Races and impersonations around agents' own credentials, against a real LL: a
revocation between an agent's HELLO and its AUTH, a revocation followed at once by a
reload, a name of an exposed port offered as a service with the shared token, and an
agent id taken by another credential."""

from __future__ import annotations

import signal
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from agent_tools import agent_revoke, free_port_range, re_exposed, start_agents_ll, wait_refused
from support import Harness, echo_roundtrip
from tcpgc.identity import JoinToken, agent_context, pin_server_name
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.handshake import AgentHandshake
from tcpgc.protocol.messages import Auth, Challenge, Error, ErrorCode, Message, Ready, encode

pytestmark = pytest.mark.timeout(120)

LOCAL = "127.0.0.1"


class RawAgent:
    """An agent speaking the handshake by hand over TLS, one step at a time."""

    def __init__(self, sock: ssl.SSLSocket, handshake: AgentHandshake) -> None:
        self.sock, self.handshake, self.decoder = sock, handshake, FrameDecoder()

    def recv(self) -> Message | None:
        while (message := self.decoder.next_message()) is None:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionError, ssl.SSLError):
                return None
            if not chunk:
                return None
            self.decoder.receive_data(chunk)
        return message

    def hello(self) -> Challenge:
        self.sock.sendall(encode(self.handshake.start()))
        challenge = self.recv()
        assert isinstance(challenge, Challenge), challenge
        return challenge

    def auth(self, challenge: Challenge) -> Message | None:
        auth = self.handshake.receive(challenge)
        assert isinstance(auth, Auth)
        self.sock.sendall(encode(auth))
        return self.recv()


@contextmanager
def raw_agent(
    addr: tuple[str, int], token: str, services: tuple[str, ...] = (), agent_id: bytes | None = None
) -> Iterator[RawAgent]:
    parsed = JoinToken.parse(token)
    raw = socket.create_connection(addr, timeout=10)
    server_name = pin_server_name(parsed.fingerprint)
    with agent_context().wrap_socket(raw, server_hostname=server_name) as sock:
        handshake = AgentHandshake(
            parsed.secret, services=services, binding=parsed.fingerprint, agent_id=agent_id
        )
        yield RawAgent(sock, handshake)


def test_a_revocation_between_hello_and_auth_does_not_leave_the_agent_in(
    harness: Harness,
) -> None:
    """The secret was found at HELLO; revoked before AUTH, the agent must neither get in
    nor be taken for a holder of the shared token (which serves every service)."""
    env = start_agents_ll(harness, ("web",))
    port = free_port_range(1)
    token = env.add("edge", "--ports", str(port))
    mark = env.ll.mark()
    with raw_agent(env.agent_addr, token, services=("web",)) as agent:
        challenge = agent.hello()
        agent_revoke(env.state_dir, "edge")
        time.sleep(2.5)  # the LL has looked at the folder since
        answers = []
        answer = agent.auth(challenge)
        while answer is not None:
            answers.append(answer)
            answer = agent.recv()
    errors = [a for a in answers if isinstance(a, Error)]
    assert errors and errors[-1].code == ErrorCode.AUTHENTICATION, answers
    for ready in (a for a in answers if isinstance(a, Ready)):
        assert "web" not in ready.services, ready  # never the shared token's scope
    assert not env.ll.find_all(r"connected from", since=mark)
    env.ll.wait_for(r"refused: its credential was just revoked", 10, since=mark)


def test_a_revocation_is_not_lost_to_a_reload_right_after(harness: Harness) -> None:
    env = start_agents_ll(harness, ("web",))
    port = free_port_range(1)
    server = harness.echo_server()
    token = env.add("a", "--ports", str(port))
    env.start_cc(token, name="cc-a", exposes=[f"{LOCAL}:{port}={server.addr_str}"])
    env.ll.wait_for(re_exposed(port), 10)
    assert echo_roundtrip((LOCAL, port), b"x") == b"x"
    mark = env.ll.mark()
    agent_revoke(env.state_dir, "a")
    env.ll.proc.send_signal(signal.SIGHUP)  # before the LL's next look at the folder
    env.ll.wait_for(r"config reloaded", 10, since=mark)
    wait_refused(port, 5)
    env.ll.wait_for(r"agent 'a' revoked", 5, since=mark)


def test_the_shared_token_cannot_take_an_exposed_ports_clients(harness: Harness) -> None:
    """Offering ':PORT' as a service would put a shared-token agent among the agents of
    an exposed port (and before it, when no one exposes it yet)."""
    env = start_agents_ll(harness, ("web",))
    port = free_port_range(1)
    legit = harness.echo_server(prefix=b"legit:")
    token = env.add("a", "--ports", str(port))
    env.start_cc(token, name="cc-a", exposes=[f"{LOCAL}:{port}={legit.addr_str}"])
    env.ll.wait_for(re_exposed(port), 10)
    shared = env.harness.token(env.state_dir)
    with raw_agent(env.agent_addr, shared, services=(f":{port}", "web")) as agent:
        ready = agent.auth(agent.hello())
        assert isinstance(ready, Ready), ready
        assert f":{port}" not in ready.services
        assert any(subject == f":{port}" for subject, _ in ready.refusals), ready.refusals
        for _ in range(10):  # none of them goes to the silent raw agent
            assert echo_roundtrip((LOCAL, port), b"pingpong", timeout=5)[:6] == b"legit:"


def test_an_agent_id_in_use_by_another_credential_is_refused(harness: Harness) -> None:
    """A session is replaced by a new one with the same agent id only if it proves the
    same credential: another's token cannot push an agent out by taking its id."""
    env = start_agents_ll(harness, ("web",))
    port = free_port_range(2)
    token_a = env.add("a", "--ports", str(port))
    token_b = env.add("b", "--ports", str(port + 1))
    agent_id = b"\x42" * 16
    with raw_agent(env.agent_addr, token_a, agent_id=agent_id) as first:
        assert isinstance(first.auth(first.hello()), Ready)
        env.ll.wait_for(r"agent 'a' connected from", 10)
        mark = env.ll.mark()
        with raw_agent(env.agent_addr, token_b, agent_id=agent_id) as second:
            answer = second.auth(second.hello())
            while isinstance(answer, Ready):
                answer = second.recv()
            assert isinstance(answer, Error) and answer.code == ErrorCode.UNAVAILABLE, answer
        env.ll.wait_for(r"its id is in use by another credential", 10, since=mark)
        assert not env.ll.find_all(r"new session replaces", since=mark)
        assert not env.ll.find_all(r"agent 'a' .*disconnected", since=mark)


def test_a_credential_file_left_out_comes_back_once_fixed(harness: Harness) -> None:
    """A file others can read is left out (its agent refused, the others unharmed);
    fixing its mode, which changes no mtime, lets the agent in without a reload."""
    env = start_agents_ll(harness, ("web",))
    port = free_port_range(2)
    server = harness.echo_server()
    token = env.add("a", "--ports", str(port))
    token_b = env.add("b", "--ports", str(port + 1))
    path = env.state_dir / "agents" / "a.json"
    path.chmod(0o644)
    mark = env.ll.mark()
    cc = env.start_cc(token, name="cc-a", exposes=[f"{LOCAL}:{port}={server.addr_str}"], wait=False)
    env.ll.wait_for(r"agent credential left out: .*a\.json", 10, since=mark)
    env.ll.wait_for(r"handshake failed", 10, since=mark)
    env.start_cc(token_b, name="cc-b", exposes=[f"{LOCAL}:{port + 1}={server.addr_str}"])
    env.ll.wait_for(re_exposed(port + 1), 10, since=mark)
    path.chmod(0o600)
    env.ll.wait_for(re_exposed(port), 15, since=mark)
    assert echo_roundtrip((LOCAL, port), b"back") == b"back"
    assert cc.proc.poll() is None
