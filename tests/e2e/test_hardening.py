"""Hardening tests: what a peer holding valid credentials (an agent with the token, or an
LL an agent trusts) or a careless host setup could do to a node. Real ``tcpgc``
processes on 127.0.0.1; the hostile peers use tcpgc's own handshake.

Each test checks that the harm is bounded (memory, descriptors, sessions, log lines)
and that everything else keeps working.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from attack_tools import (
    Env,
    FakeLL,
    insider,
    ll_refusal,
    round_trip,
    rss_kib,
    start_env,
    write_toml,
)
from support import (
    RE_CC_JOINED,
    READY_TIMEOUT,
    Harness,
    connect,
    format_addr,
    make_token,
    run_tcpgc,
)
from tcpgc.identity import agent_context, pin_server_name
from tcpgc.protocol.frame_decoder import FrameDecoder
from tcpgc.protocol.handshake import AgentHandshake, State
from tcpgc.protocol.messages import Error, ErrorCode, Message, OpenFailed, Ping, encode

MIB = 1024 * 1024


class RawAgent:
    """An authenticated control connection driven by the test: tcpgc's own handshake
    with the real token, over TLS as a real agent speaks it, then nothing on its own
    (it neither reads nor answers unless the test does)."""

    def __init__(
        self, env: Env, *, agent_id: bytes | None = None, services: tuple[str, ...] = ("default",)
    ) -> None:
        token = env.join_token
        raw = socket.create_connection(env.agent_addr, timeout=10)
        self.local = format_addr(*raw.getsockname()[:2])
        if env.plaintext:
            self.sock: socket.socket = raw
        else:
            server_name = pin_server_name(token.fingerprint)
            self.sock = agent_context().wrap_socket(raw, server_hostname=server_name)
        self.decoder = FrameDecoder()
        handshake = AgentHandshake(
            token.secret, services=services, agent_id=agent_id, binding=token.fingerprint
        )
        self.agent_id = handshake.agent_id
        self.send(handshake.start())
        while handshake.state is not State.DONE:
            reply = handshake.receive(self.recv())
            if reply is not None:
                self.send(reply)

    def send(self, message: Message) -> None:
        self.sock.sendall(encode(message))

    def recv(self) -> Message:
        while (message := self.decoder.next_message()) is None:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("the LL closed the connection")
            self.decoder.receive_data(chunk)
        return message

    def close(self) -> None:
        self.sock.close()


@contextmanager
def raw_agent(env: Env, **kwargs: object) -> Iterator[RawAgent]:
    agent = RawAgent(env, **kwargs)  # type: ignore[arg-type]
    try:
        yield agent
    finally:
        agent.close()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ------------------------------------------------------------ an agent that never reads


#: What the flooding agent sends at most, and how much the LL may grow meanwhile.
FLOOD_BYTES = 30 * MIB
GROWTH_LIMIT_KIB = 30 * 1024
#: The LL's heartbeat in this test: an agent that reads nothing is dropped after three.
HEARTBEAT = 1.0


def test_ping_flood_from_agent_that_never_reads_is_bounded(harness: Harness) -> None:
    """An agent sends PINGs without reading a PONG: the LL stops reading from it once
    its answers pile up, instead of buffering them without limit, and drops it when it
    still reads nothing three heartbeats later. Other agents and clients are served."""
    env = start_env(harness, ll_options={"heartbeat": HEARTBEAT})
    round_trip(env.client_addrs["default"])
    before = rss_kib(env.ll.pid)
    pings = memoryview(b"".join(encode(Ping(i)) for i in range(MIB // 11)))
    mark = env.ll.mark()
    sent, pos = 0, 0
    deadline = time.monotonic() + 90
    with raw_agent(env, services=("elsewhere",)) as flooder:
        dropped = rf"agent \S+ at {re.escape(flooder.local)} reads nothing"
        flooder.sock.settimeout(0.5)
        while sent < FLOOD_BYTES and time.monotonic() < deadline:
            if env.ll.find_all(dropped, since=mark):
                break
            try:
                # One TLS record at a time, the same one again after a timeout.
                n = flooder.sock.send(pings[pos : pos + 16384])
            except TimeoutError:
                continue
            except OSError:
                break  # the LL closed it
            sent += n
            pos = (pos + n) % len(pings)
            grown = rss_kib(env.ll.pid) - before
            assert grown < GROWTH_LIMIT_KIB, f"LL grew by {grown // 1024} MiB during the flood"
        env.ll.wait_for(dropped, 10 * HEARTBEAT, since=mark)
        grown = rss_kib(env.ll.pid) - before
        assert grown < GROWTH_LIMIT_KIB, (
            f"LL grew by {grown // 1024} MiB while an agent sent {sent // MIB} MiB of PINGs "
            "and read no PONG"
        )
    for _ in range(5):
        round_trip(env.client_addrs["default"])


# ------------------------------------------------------------ session ids


def test_agent_id_sharing_a_prefix_does_not_replace_a_session(harness: Harness) -> None:
    """A second authenticated agent whose id shares the first 6 bytes (the 12 hex digits
    shown in logs) with a real agent's is a different agent: both sessions stay."""
    env = start_env(harness)
    assert env.cc is not None
    prefix = env.cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)["id"]
    assert len(prefix) == 12
    ll_mark, cc_mark = env.ll.mark(), env.cc.mark()
    twin_id = bytes.fromhex(prefix) + os.urandom(10)
    with raw_agent(env, agent_id=twin_id, services=("elsewhere",)) as twin:
        joined = rf"agent {prefix} connected from {re.escape(twin.local)}"
        env.ll.wait_for(joined, READY_TIMEOUT, since=ll_mark)
        replaced = env.ll.find_all(r"new session replaces", since=ll_mark)
        assert not replaced, f"the real agent's session was replaced: {replaced[0].string}"
        for _ in range(5):
            round_trip(env.client_addrs["default"])
        lost = env.cc.find_all(r"cannot connect to LL|reconnecting", since=cc_mark)
        assert not lost, f"the real agent lost its session: {lost[0].string}"


# ------------------------------------------------------------ sessions per credential


def test_sessions_per_token_capped(harness: Harness) -> None:
    """Past `max_sessions_per_token` sessions proving one secret, a new one is refused
    with ERROR and one log line; a returning agent may still replace its own session,
    and the agents already in keep serving."""
    env = start_env(harness, ll_options={"max_sessions_per_token": 2})  # the CC is one
    with raw_agent(env, services=("elsewhere",)) as second:
        mark = env.ll.mark()
        with raw_agent(env, services=("elsewhere",)) as third:
            refused = third.recv()
            assert isinstance(refused, Error), f"third session got {refused!r}"
            assert refused.code == ErrorCode.UNAVAILABLE
            assert "sessions" in refused.message
            reason = ll_refusal(env.ll, third.local, since=mark)
            assert "max_sessions_per_token" in reason
        assert len(env.ll.find_all(rf"{re.escape(third.local)}", since=mark)) == 1
        # The same agent coming back (a new connection after a network failure) is not
        # a new session: it replaces its own.
        mark = env.ll.mark()
        with raw_agent(env, agent_id=second.agent_id, services=("elsewhere",)):
            env.ll.wait_for(r"new session replaces", READY_TIMEOUT, since=mark)
        for _ in range(3):
            round_trip(env.client_addrs["default"])


# ------------------------------------------------------------ a compromised LL


OPENS = 2000
#: Descriptors the agent may hold besides two per admitted open (logs, loop, the
#: control connection, its listener-less sockets).
FD_MARGIN = 40


@pytest.mark.parametrize(
    ("per_ll", "per_service"), [(60, 1000), (1000, 40)], ids=["per-ll", "per-service"]
)
def test_opens_from_a_compromised_ll_are_capped(
    harness: Harness, tmp_path: Path, per_ll: int, per_service: int
) -> None:
    """An LL holding the agent's trust sends 2,000 OPENs for a server that accepts
    nothing: the agent dials at most the cap, answers the rest OPEN_FAILED, and logs the
    refusals in a few lines, not one each."""
    cap = min(per_ll, per_service)
    # A server that never accepts: every dial to it is held (in its backlog).
    server = socket.create_server(("127.0.0.1", 0), backlog=4096)
    fake = FakeLL(tmp_path)
    try:
        config = write_toml(
            tmp_path / "cc.toml",
            {
                "ll": fake.addr_str,
                "connect_timeout": 60.0,
                "pool_size": 0,
                "max_connections_per_ll": per_ll,
                "max_connections_per_service": per_service,
            },
            {"default": {"server": format_addr(*server.getsockname()[:2])}},
        )
        cc = harness.start_cc("-c", str(config), token=fake.token, name="cc")
        cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)
        fake.joined.wait(READY_TIMEOUT)
        base = fd_count(cc.pid)
        fake.send_opens("default", OPENS)
        bound = base + 2 * cap + FD_MARGIN
        deadline = time.monotonic() + 60
        most = base
        while fake.open_failed < OPENS - cap and time.monotonic() < deadline:
            most = max(most, fd_count(cc.pid))
            assert most <= bound, f"agent holds {most} fds (cap {cap}: at most {bound})"
            time.sleep(0.1)
        assert fake.open_failed >= OPENS - cap, (
            f"{fake.open_failed} OPEN_FAILED answers to {OPENS} OPENs (cap {cap})"
        )
        most = max(most, fd_count(cc.pid))
        assert most <= bound, f"agent holds {most} fds (cap {cap}: at most {bound})"
        lines = cc.find_all(r"refus")
        assert 1 <= len(lines) <= 10, f"{len(lines)} log lines about refused OPENs"
    finally:
        fake.stop()
        server.close()


# ------------------------------------------------------------ state directory


def test_world_writable_state_dir_refused(harness: Harness) -> None:
    state = harness.state_dir()
    state.mkdir(mode=0o700)
    os.chmod(state, 0o777)  # past the umask
    for argv in (
        ("token", "--state-dir", str(state)),
        ("ll", "--cc", "127.0.0.1:0", "--clients", "127.0.0.1:0", "--state-dir", str(state)),
    ):
        proc = run_tcpgc(*argv, timeout=20)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "writable" in lines[0] and str(state) in lines[0], lines
        assert "Traceback" not in proc.stderr
    assert not (state / "secret").exists(), "a secret was written into an unsafe directory"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_secret_owned_by_another_user_refused(harness: Harness) -> None:
    state = harness.state_dir()
    make_token(state)
    os.chown(state / "secret", 65534, 65534)  # nobody
    proc = run_tcpgc(
        "ll", "--cc", "127.0.0.1:0", "--clients", "127.0.0.1:0", "--state-dir", str(state),
        timeout=20,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "owned by" in lines[0] and "secret" in lines[0], lines


# ------------------------------------------------------------ log injection


def test_open_failed_reason_cannot_forge_log_lines(harness: Harness) -> None:
    """An agent's OPEN_FAILED reason reaches the LL's log as one line, its control
    characters escaped."""
    env = start_env(harness, with_cc=False, plaintext=True)
    forged = "2026-01-01 00:00:00,000 INFO tcpgc.ll: agent 000000000000 connected from 6.6.6.6:1"
    with insider(env, ("default",)) as agent:
        client = connect(env.client_addrs["default"])
        try:
            opened = agent.next_open()
            mark = env.ll.mark()
            agent.send(OpenFailed(opened.conn_id, f"down\r\n{forged}\x1b[2J"))
            line = env.ll.wait_for(r"could not serve it", READY_TIMEOUT, since=mark).string
        finally:
            client.close()
    assert "down\\r\\n" in line and "\\x1b[2J" in line, line
    assert not env.ll.find_all(r"^2026-01-01 00:00:00", since=mark), "a forged line was logged"


# ------------------------------------------------------------ token in the environment


def test_token_removed_from_agent_environment(harness: Harness) -> None:
    """An agent given $TCPGC_TOKEN does not keep it where other processes of the same
    user (or `ps e`) can read it, and still reloads with it."""
    env = start_env(harness)
    assert env.cc is not None
    secret_part = env.token.split(".")[1]
    environ = Path(f"/proc/{env.cc.pid}/environ").read_bytes()
    assert secret_part.encode() not in environ, "the join token is in the agent's environ"
    mark = env.cc.mark()
    env.cc.proc.send_signal(signal.SIGHUP)
    env.cc.wait_for(r"config reloaded", READY_TIMEOUT, since=mark)
    assert not env.cc.find_all(r"no join token", since=mark)
    round_trip(env.client_addrs["default"])
