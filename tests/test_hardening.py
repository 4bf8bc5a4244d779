"""Hardening tests: what a peer holding valid credentials (an agent with the token, or an
LL an agent trusts) or a careless host setup could do to a node. Real ``tcpgc``
processes on 127.0.0.1; the hostile peers use tcpgc's own handshake.

Each test checks that the harm is bounded (memory, descriptors, sessions, log lines)
and that everything else keeps working.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from attack_tools import (
    Env,
    round_trip,
    rss_kib,
    start_env,
)
from support import (
    Harness,
    format_addr,
)
from tcpgc.identity import agent_context, pin_server_name
from tcpgc.protocol.handshake import AgentHandshake, State
from tcpgc.protocol.messages import (
    FrameDecoder,
    Message,
    Ping,
    encode,
)

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
