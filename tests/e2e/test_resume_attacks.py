"""An attacker on the path of a plaintext (`--insecure-plaintext`) leg sees the RESUME
frames an agent sends when it takes its streams over after a break. Neither one of
them replayed, nor one forged for a stream id read off the wire, may take a stream:
both are refused with one log line, counted, and the real stream flows on intact.

The path is a recording TCP relay in the test between the agent and the LL's agent
port; closing its connections is the break. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from attack_tools import RecordingProxy, read_until_closed, shut_both, split_frames
from reliability_tools import Streamer, wait_streaming
from resume_tools import (
    PROOF_SIZE,
    RE_CC_RESUMED,
    RE_LL_NOT_RESUMED,
    RE_LL_RESUMED,
    RESUME_HEAD,
    RESUME_TYPE,
)
from support import (
    RE_CC_JOINED,
    RE_LL_AGENT_JOINED,
    READY_TIMEOUT,
    Harness,
    format_addr,
    node_toml,
    parse_addr,
    service_re,
)

RE_ADMIN = r"admin endpoint on http://(?P<addr>\S+)/"
POOL_TYPE = 11
RESUMED_TYPE = 14
#: The reasons the LL may give a refused resume (the metric's label).
FAILURE_REASONS = {"window", "memory", "proof", "unknown", "closed"}


class CuttableRelay(RecordingProxy):
    """The recording relay, plus `cut()`: end every connection relayed so far (both
    sides see it closed), while still taking new ones."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._cut: list[socket.socket] = []
        super().__init__(upstream)

    def cut(self) -> int:
        with self._lock:
            socks, self._socks = self._socks, []
            self._cut += socks
        shut_both(*socks)
        return len(socks)

    def stop(self) -> None:
        super().stop()
        for sock in self._cut:
            sock.close()


def failures(admin: str) -> dict[str, float]:
    """``tcpgc_resumes_failed_total`` of the node's /metrics, by reason."""
    with urllib.request.urlopen(admin + "/metrics", timeout=10) as response:
        body = response.read().decode()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == "tcpgc_resumes_failed_total"
    }


def grown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {
        reason: after.get(reason, 0.0) - before.get(reason, 0.0)
        for reason in set(before) | set(after)
        if after.get(reason, 0.0) != before.get(reason, 0.0)
    }


def resume_frames(captured: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The RESUME frames (header included) that open the captured connections (after
    a POOL frame, should an agent take a stream over on a ready connection)."""
    found = []
    for sent, _ in captured:
        frames = split_frames(sent)[:2]
        if frames and frames[0][0] == POOL_TYPE:
            frames = frames[1:]
        if frames and frames[0][0] == RESUME_TYPE:
            found.append(frames[0])
    return found


def try_resume(ll_agent: tuple[str, int], frame: bytes) -> tuple[str, bytes, float | None]:
    """Send ``frame`` as the first frame of a new connection to the LL's agent port;
    (our address as the LL logs it, what came back, seconds until the LL closed it)."""
    with socket.create_connection(ll_agent, timeout=10) as sock:
        local = format_addr(*sock.getsockname()[:2])
        sock.sendall(frame)
        seen, closed_after = read_until_closed(sock, 5.0)
    return local, seen, closed_after


@pytest.mark.timeout(60)
def test_resume_frames_seen_on_the_path_cannot_be_replayed_or_forged(
    harness: Harness, tmp_path: Path
) -> None:
    echo = harness.echo_server()
    state = harness.state_dir()
    token = harness.token(state)
    ll_toml = tmp_path / "ll.toml"
    ll_toml.write_text(
        node_toml(
            {
                "cc": "127.0.0.1:0",
                "state_dir": str(state),
                "heartbeat": 0.5,
                "resume_window": 30,
                "insecure_plaintext": True,
                "admin": "127.0.0.1:0",
                "client_wait": 5,
            },
            {"default": {"clients": "127.0.0.1:0"}},
        )
    )
    ll, ll_agent = harness.start_ll("-c", str(ll_toml))
    client = parse_addr(ll.wait_for(service_re("default"), READY_TIMEOUT)["addr"])
    admin = "http://" + ll.wait_for(RE_ADMIN, READY_TIMEOUT)["addr"]

    relay = CuttableRelay(ll_agent)
    streamer = Streamer(client, chunk=4096, pause=0.02, timeout=30)
    try:
        cc_toml = tmp_path / "cc.toml"
        cc_toml.write_text(
            node_toml(
                {
                    "ll": relay.addr_str,
                    "insecure_plaintext": True,
                    "reconnect_min": 0.1,
                    "reconnect_max": 0.5,
                    "connect_timeout": 5.0,
                },
                {"default": {"server": echo.addr_str}},
            )
        )
        cc = harness.start_cc("-c", str(cc_toml), token=token)
        cc.wait_for(RE_CC_JOINED, READY_TIMEOUT)
        ll.wait_for(RE_LL_AGENT_JOINED, READY_TIMEOUT)
        streamer.start()
        wait_streaming([streamer])

        # The break: every connection of the leg closed under both nodes.
        ll_mark, cc_mark = ll.mark(), cc.mark()
        before_cut = len(relay.snapshot())
        assert relay.cut() > 0
        resumed = ll.wait_for(RE_LL_RESUMED, 15, since=ll_mark)
        assert resumed["svc"] == "default"
        cc.wait_for(RE_CC_RESUMED, 5, since=cc_mark)
        seen = resume_frames(relay.snapshot()[before_cut:])
        assert seen, "no RESUME frame crossed the relay"
        # The agent may have tried before the LL had its new session, and tried again.
        recorded = seen[-1]
        magic, version, stream_id, epoch, received = RESUME_HEAD.unpack_from(recorded, 3)
        assert magic == b"TGC" and epoch >= 1, recorded.hex()

        # Replayed as they were, each on a connection of the attacker's own.
        counted = failures(admin)
        for frame in seen:
            mark = ll.mark()
            local, answer, closed_after = try_resume(ll_agent, frame)
            assert closed_after is not None, "the LL kept a replayed RESUME's connection open"
            assert all(f[0] != RESUMED_TYPE for f in split_frames(answer)), "replay answered"
            ll.wait_for(rf"resume refused from {re.escape(local)}: (?P<why>.+)", 5, since=mark)
        after_replay = failures(admin)
        replay_counted = grown(counted, after_replay)
        assert sum(replay_counted.values()) == len(seen), replay_counted
        assert set(replay_counted) <= FAILURE_REASONS, replay_counted

        # Forged: the stream id read off the wire, the next epoch, a made-up proof.
        head = RESUME_HEAD.pack(magic, version, stream_id, epoch + 1, received)
        payload = head + os.urandom(len(recorded) - 3 - len(head))
        forged = struct.pack("!BH", RESUME_TYPE, len(payload)) + payload
        assert len(forged) == len(recorded) and len(payload) >= RESUME_HEAD.size + PROOF_SIZE
        mark = ll.mark()
        local, answer, closed_after = try_resume(ll_agent, forged)
        assert closed_after is not None, "the LL kept a forged RESUME's connection open"
        assert all(f[0] != RESUMED_TYPE for f in split_frames(answer)), "forgery answered"
        ll.wait_for(rf"resume refused from {re.escape(local)}: (?P<why>.+)", 5, since=mark)
        assert grown(after_replay, failures(admin)) == {"proof": 1.0}

        # The real stream went on through all of it, and ends intact.
        flowed = streamer.sent
        deadline = time.monotonic() + 10
        while streamer.sent < flowed + 20 * 4096:
            assert streamer.error is None, streamer.error
            assert time.monotonic() < deadline, "the stream stopped after the attacks"
            time.sleep(0.05)
        streamer.finish()
        assert streamer.ended.wait(10)
        assert streamer.ok, streamer.error
        assert len(ll.find_all(RE_LL_RESUMED, since=ll_mark)) == 1
        assert not ll.find_all(RE_LL_NOT_RESUMED, since=ll_mark)
    finally:
        streamer.finish()
        relay.stop()
