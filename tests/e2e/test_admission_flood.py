"""Admission control against a flood from many addresses of one network.

Bare TCP connects, held open and never sent a byte, come from 39 addresses of
127.0.0.0/24 (as an attacker with a /24, or an IPv6 /64, would send them), hundreds a
second against caps of a few connections. Meanwhile a new agent joins from 127.0.1.1,
another network, and the agent already connected (127.0.0.1, inside the flood's own
/24) keeps serving clients. Neither may be crowded out: the flood's network is one source for the
per-source cap and the first to be shed past the total cap, and the pending connections
of an address that authenticated an agent are not counted with its network.

The flood runs in its own process (so that it does not share the GIL with the clients
measured here) and is bounded in time and count.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time

from attack_tools import Env, InsiderAgent, round_trip, start_env
from support import RE_LL_AGENT_JOINED, READY_TIMEOUT, Harness
from tcpgc.identity import agent_context, pin_server_name

#: The flood's addresses: 39 of one /24 (the connected agent's, 127.0.0.1, included).
FLOOD_SOURCES = [f"127.0.0.{i}" for i in range(2, 41)]
#: Where the new agent comes from: a /24 of its own.
NEW_AGENT_SOURCE = "127.0.1.1"
#: The flood stops after this long or this many connects, whichever comes first (the
#: test stops it sooner, once it has measured the agents: usually within a few seconds).
FLOOD_SECONDS = 15.0
FLOOD_MAX_CONNECTS = 100_000
#: Connects per second: enough to cycle the caps below many times during one agent
#: handshake, not so many that the LL's accept queue overflows and every connection,
#: the agents' too, waits for SYN retransmits (a limit of the machine, not of tcpgc).
FLOOD_RATE = 500
#: Connects the flood holds open at once (the oldest is closed to open a new one).
FLOOD_WINDOW = 300
#: Small caps, so that a 2-core machine fills them many times over within a second.
LL_OPTIONS = {"max_pending": 8, "max_pending_per_source": 4}
#: The new agent must be in within this long of the flood reaching full strength. A
#: real CC retries with backoff; the one here every JOIN_RETRY seconds.
JOIN_BOUND = 5.0
JOIN_RETRY = 0.5
#: Clients the connected agent serves during the flood: bursts of concurrent ones, more
#: than its ready connections, so that it also dials data connections during the flood.
BURSTS = 4
BURST_SIZE = 10
CLIENTS = BURSTS * BURST_SIZE
#: Connections the LL must have shed before the agents are measured.
FULL_STRENGTH = 100
RE_SHED = r"handshake failed from \S+: shed, too many"

# Connect, hold, close the oldest with a reset (no TIME_WAIT to run out of ports).
FLOOD_SCRIPT = r"""
import collections, socket, struct, sys, time
host, port, sources, seconds, limit, window, rate = sys.argv[1:]
port, sources = int(port), sources.split(",")
seconds, limit, window, rate = float(seconds), int(limit), int(window), float(rate)
held = collections.deque()
reset = struct.pack("ii", 1, 0)
connects = failures = 0
start = time.monotonic()
print("flooding", flush=True)
try:
    while connects + failures < limit and (now := time.monotonic() - start) < seconds:
        ahead = (connects + failures) / rate - now
        if ahead > 0:
            time.sleep(ahead)  # pacing
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
        sock.settimeout(1.0)
        try:
            sock.bind((sources[(connects + failures) % len(sources)], 0))
            sock.connect((host, port))
        except OSError:
            failures += 1
            sock.close()
            continue
        connects += 1
        held.append(sock)
        if len(held) > window:
            held.popleft().close()
except KeyboardInterrupt:  # SIGINT: the test has measured what it needed
    pass
for sock in held:
    sock.close()
elapsed = time.monotonic() - start
print(f"connects={connects} failures={failures} seconds={elapsed:.1f}", flush=True)
"""


class Flood:
    """The flood's process: started, waited for, stopped at the latest at teardown."""

    def __init__(self, addr: tuple[str, int], sources: list[str]) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                FLOOD_SCRIPT,
                addr[0],
                str(addr[1]),
                ",".join(sources),
                str(FLOOD_SECONDS),
                str(FLOOD_MAX_CONNECTS),
                str(FLOOD_WINDOW),
                str(FLOOD_RATE),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "flooding"
        self.started = time.monotonic()

    def stop(self) -> int:
        """Ends the flood (if its bounds did not already); its number of connects."""
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=30)
        m = re.search(r"connects=(\d+) failures=(\d+) seconds=(\S+)", out)
        assert m is not None, f"the flood did not report: {out!r}"
        print(f"flood: {m[0]}")
        return int(m[1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class SourcedAgent(InsiderAgent):
    """An agent holding the real token that dials from a chosen loopback address."""

    def __init__(self, env: Env, source: str) -> None:
        self.source = source
        self._dialed: list[socket.socket] = []
        try:
            # A service this LL does not have: no client is ever offered to it.
            super().__init__(env, ("unrelated",))
        except BaseException:
            for sock in self._dialed:
                sock.close()
            raise

    def _dial(self) -> socket.socket:
        raw = socket.create_connection(
            self.env.agent_addr, timeout=10, source_address=(self.source, 0)
        )
        self._dialed.append(raw)
        server_name = pin_server_name(self.token.fingerprint)
        tls = agent_context().wrap_socket(raw, server_hostname=server_name)
        self._dialed.append(tls)
        return tls


def join_during_flood(env: Env, result: dict[str, float]) -> None:
    """Try to join as a new agent from NEW_AGENT_SOURCE until in or JOIN_BOUND passed."""
    start = time.monotonic()
    tries = 0
    while time.monotonic() - start < JOIN_BOUND:
        tries += 1
        try:
            agent = SourcedAgent(env, NEW_AGENT_SOURCE)
        except (OSError, AssertionError, ValueError):
            time.sleep(JOIN_RETRY)  # a client's retry interval, not synchronization
            continue
        result["joined_after"] = time.monotonic() - start
        agent.close()
        break
    result["tries"] = tries


def serve_burst(addr: tuple[str, int]) -> list[str]:
    """BURST_SIZE clients at once; the failures."""
    failures: list[str] = []

    def client() -> None:
        try:
            round_trip(addr)
        except (OSError, AssertionError) as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(BURST_SIZE)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return failures


def test_flood_from_one_network_crowds_out_no_agent(harness: Harness) -> None:
    env = start_env(harness, ll_options=LL_OPTIONS)
    round_trip(env.client_addrs["default"])  # the connected agent serves
    mark, served = env.ll.mark(), env.served()

    flood = Flood(env.agent_addr, FLOOD_SOURCES)
    try:
        # Full strength: the LL has shed the flood's connections many times over.
        deadline = time.monotonic() + READY_TIMEOUT
        while len(env.ll.find_all(RE_SHED, since=mark)) < FULL_STRENGTH:
            assert time.monotonic() < deadline, "the flood did not fill the table"
            time.sleep(0.05)
        joined: dict[str, float] = {}
        joiner = threading.Thread(target=join_during_flood, args=(env, joined), daemon=True)
        joiner.start()
        failures: list[str] = []
        for _ in range(BURSTS):
            failures += serve_burst(env.client_addrs["default"])
        joiner.join(JOIN_BOUND + 30)
        legit_done = time.monotonic() - flood.started
        connects = flood.stop()
    finally:
        flood.kill()

    shed = len(env.ll.find_all(RE_SHED, since=mark))
    print(
        f"during the flood: new agent joined after {joined.get('joined_after')} s "
        f"({joined.get('tries')} tries); {CLIENTS - len(failures)}/{CLIENTS} clients served; "
        f"{shed} connections shed; legit work done {legit_done:.1f} s into the flood"
    )
    assert "joined_after" in joined, (
        f"a new agent could not join within {JOIN_BOUND} s during the flood "
        f"({joined.get('tries')} tries)"
    )
    assert env.ll.find_all(
        rf"agent [0-9a-f]+ connected from {re.escape(NEW_AGENT_SOURCE)}:", since=mark
    )
    # Not one of the agents' connections was shed: the new agent's (its own network)
    # nor the connected agent's ready and data connections (an address that
    # authenticated), though it shares its /24 with the flood.
    for agent in (NEW_AGENT_SOURCE, "127.0.0.1"):
        lost = env.ll.find_all(rf"handshake failed from {re.escape(agent)}:\d+: .*", since=mark)
        assert not lost, f"{len(lost)} connections of {agent} failed: {lost[0][0]}"
    assert not failures, f"{len(failures)} of {CLIENTS} clients failed: {failures[:3]}"
    assert env.served() - served == CLIENTS
    # And all that while the flood ran, cycling the table of pending connections.
    assert legit_done < FLOOD_SECONDS, "the flood ended before the agents were measured"
    assert connects >= shed
    # The connected agent kept its session throughout.
    assert not env.ll.find_all(
        r"agent [0-9a-f]+ at 127\.0\.0\.1:\d+ (disconnected|silent)", since=mark
    )
    assert len(env.ll.find_all(RE_LL_AGENT_JOINED, since=mark)) == 1
