"""An attacker on the path of a plaintext (`--insecure-plaintext`) leg sees the RESUME
frames an agent sends when it takes its streams over after a break. Neither one of
them replayed, nor one forged for a stream id read off the wire, may take a stream,
whether the stream is flowing or waiting for its agent: both are refused with one log
line, counted, and the real stream goes on intact.

The path is a recording TCP relay in the test between the agent and the LL's agent
port; resetting its connections is the break. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from attack_tools import read_until_closed, split_frames
from cut_relay import CuttableRelay
from reliability_tools import Streamer, wait_streaming
from resume_tools import (
    PROOF_SIZE,
    RE_CC_RESUMED,
    RE_LL_NOT_RESUMED,
    RE_LL_RESUMED,
    RE_LL_WAITS,
    RESUME_HEAD,
    RESUME_TYPE,
)
from support import (
    RE_CC_JOINED,
    RE_LL_AGENT_JOINED,
    READY_TIMEOUT,
    Harness,
    Node,
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
CHUNK = 4096


@dataclass
class Leg:
    """A plaintext tunnel whose agent reaches the LL through `relay`, and one client
    streaming through it to an echo server."""

    ll: Node
    cc: Node
    ll_agent: tuple[str, int]
    admin: str
    relay: CuttableRelay
    streamer: Streamer


@pytest.fixture
def leg(harness: Harness, tmp_path: Path) -> Iterator[Leg]:
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
    relay = CuttableRelay(ll_agent, record=True)
    streamer = Streamer(client, chunk=CHUNK, pause=0.02, timeout=30)
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
        yield Leg(ll, cc, ll_agent, admin, relay, streamer)
    finally:
        streamer.finish()
        relay.stop()


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


def break_and_record(leg: Leg) -> list[bytes]:
    """Reset every connection of the leg; once the stream has resumed through the relay,
    the RESUME frames that crossed it (the agent may have tried before the LL had its
    new session, and tried again: the last one took the stream)."""
    ll_mark, cc_mark = leg.ll.mark(), leg.cc.mark()
    before = len(leg.relay.snapshot())
    assert leg.relay.cut() > 0
    assert leg.ll.wait_for(RE_LL_RESUMED, 15, since=ll_mark)["svc"] == "default"
    leg.cc.wait_for(RE_CC_RESUMED, 5, since=cc_mark)
    seen = resume_frames(leg.relay.snapshot()[before:])
    assert seen, "no RESUME frame crossed the relay"
    for frame in seen:
        assert frame[3:6] == b"TGC" and len(frame) >= 3 + RESUME_HEAD.size + PROOF_SIZE
    return seen


def forge(recorded: bytes, epoch: int) -> bytes:
    """A RESUME for the recorded frame's stream id with `epoch` and a made-up proof."""
    magic, version, stream_id, _, received = RESUME_HEAD.unpack_from(recorded, 3)
    head = RESUME_HEAD.pack(magic, version, stream_id, epoch, received)
    payload = head + os.urandom(len(recorded) - 3 - len(head))
    return struct.pack("!BH", RESUME_TYPE, len(payload)) + payload


def refused(leg: Leg, frame: bytes) -> str:
    """Send `frame` as the first frame of a new connection of the attacker's own to the
    LL's agent port: the LL must close it without RESUMED and log one refusal; returns
    the reason it logs."""
    mark = leg.ll.mark()
    with socket.create_connection(leg.ll_agent, timeout=10) as sock:
        local = format_addr(*sock.getsockname()[:2])
        sock.sendall(frame)
        answer, closed_after = read_until_closed(sock, 5.0)
    assert closed_after is not None, "the LL kept the connection of a bad RESUME open"
    assert all(f[0] != RESUMED_TYPE for f in split_frames(answer)), "the LL answered RESUMED"
    line = rf"resume refused from {re.escape(local)}: (?P<why>.+)"
    return leg.ll.wait_for(line, 5, since=mark)["why"]


def flows_on_intact(leg: Leg, resumes: int, since: int) -> None:
    """The real stream carries more, ends cleanly with every echo right, and was
    resumed `resumes` times since `since` (no attacker's try took it over)."""
    s = leg.streamer
    flowed = s.sent
    deadline = time.monotonic() + 10
    while s.sent < flowed + 20 * CHUNK:
        assert s.error is None, s.error
        assert time.monotonic() < deadline, "the stream stopped after the attacks"
        time.sleep(0.05)
    s.finish()
    assert s.ended.wait(10)
    assert s.ok, s.error
    assert len(leg.ll.find_all(RE_LL_RESUMED, since=since)) == resumes
    assert not leg.ll.find_all(RE_LL_NOT_RESUMED, since=since)


@pytest.mark.timeout(60)
def test_resume_frames_seen_on_the_path_cannot_be_replayed_or_forged(leg: Leg) -> None:
    start = leg.ll.mark()
    seen = break_and_record(leg)
    # Each try of the agent takes the next number, used or not (a RESUMED may be lost).
    epochs = [RESUME_HEAD.unpack_from(frame, 3)[3] for frame in seen]
    assert epochs == sorted(set(epochs)) and epochs[0] >= 1, epochs
    epoch = epochs[-1]

    # Replayed as they were, each on a connection of the attacker's own.
    counted = failures(leg.admin)
    for frame in seen:
        refused(leg, frame)
    after_replay = failures(leg.admin)
    replay_counted = grown(counted, after_replay)
    assert sum(replay_counted.values()) == len(seen), replay_counted
    assert set(replay_counted) <= FAILURE_REASONS, replay_counted

    # Forged: the stream id read off the wire, the next epoch, a made-up proof.
    refused(leg, forge(seen[-1], epoch + 1))
    assert grown(after_replay, failures(leg.admin)) == {"proof": 1.0}
    flows_on_intact(leg, 1, start)


@pytest.mark.timeout(60)
def test_resumes_forged_while_the_stream_waits_do_not_take_it(leg: Leg) -> None:
    """The attacker's best moment: the stream's data connection is gone and the agent's
    new one is held up on the path (its session is up), so the LL waits for a RESUME.
    The attacker's ones are refused and the agent's, once through, takes the stream on
    from where it was."""
    start = leg.ll.mark()
    recorded = break_and_record(leg)[-1]

    ll_mark, cc_mark = leg.ll.mark(), leg.cc.mark()
    leg.relay.hold_data()
    assert leg.relay.cut(data_only=True) > 0
    assert leg.ll.wait_for(RE_LL_WAITS, 5, since=ll_mark)["svc"] == "default"
    counted = failures(leg.admin)
    epoch = RESUME_HEAD.unpack_from(recorded, 3)[3]
    refused(leg, recorded)  # its number is used up
    refused(leg, forge(recorded, epoch + 1))  # the number the agent will use
    refused(leg, forge(recorded, epoch + 2))
    assert grown(counted, failures(leg.admin)) == {"proof": 3.0}
    assert not leg.ll.find_all(RE_LL_RESUMED, since=ll_mark), "a forged RESUME took the stream"
    assert not leg.ll.find_all(RE_LL_NOT_RESUMED, since=ll_mark), "the stream was given up"

    leg.relay.release_data()
    leg.ll.wait_for(RE_LL_RESUMED, 10, since=ll_mark)
    leg.cc.wait_for(RE_CC_RESUMED, 5, since=cc_mark)
    flows_on_intact(leg, 2, start)
