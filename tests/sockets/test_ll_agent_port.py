"""The LL's agent port in process (`tcpgc.ll.agent_port`), on 127.0.0.1: every kind of bad
first exchange is one "handshake failed" log line and one count under its fixed label,
taken from the typed error, whatever the peer's bytes say."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path

import pytest

from tcpgc.config import Address, LLConfig, ServiceListener
from tcpgc.ll.node import ListenNode
from tcpgc.protocol.messages import HEADER, MAX_VERSION, Data, Hello, Ping, encode

HANDSHAKE_TIMEOUT = 0.5

#: The start of a TLS 1.3 ClientHello record, as an agent speaking TLS sends it.
CLIENT_HELLO = bytes([0x16, 0x03, 0x01, 0x00, 0x40, 0x01]) + bytes(0x3F)

PLAINTEXT_CASES = [
    ("tls-client-hello", CLIENT_HELLO, "tls", "peer speaks TLS but this LL runs with"),
    ("unknown-data-id", encode(Data(MAX_VERSION, bytes(16), bytes(32))), "bad_data_id",
     "unknown, expired or already used data connection id"),
    ("data-of-version-1", encode(Data(1, bytes(16), bytes(32))), "version",
     "data connection speaks version 1"),
    ("ping-first", encode(Ping(1)), "protocol", "unexpected PING as first message"),
    ("unknown-key", encode(Hello(MAX_VERSION, MAX_VERSION, bytes(8), bytes(32))),
     "authentication", "agent presented a token this LL does not accept"),
    ("half-a-frame", HEADER.pack(1, 40) + b"TGC", "closed", "closed in the middle of a frame"),
    ("nothing", b"", "certificate", "closed before its first message"),
]  # fmt: skip


def _failures(node: ListenNode, label: str) -> float:
    value = node.metrics.registry.get_sample_value(
        "tcpgc_handshake_failures_total", {"reason": label}
    )
    return value or 0.0


async def _wait_count(node: ListenNode, label: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while _failures(node, label) < 1:
        assert time.monotonic() < deadline, f"no failure counted as {label!r}"
        await asyncio.sleep(0.01)


def _node(tmp_path: Path, *, plaintext: bool) -> ListenNode:
    return ListenNode(
        LLConfig(
            cc=Address("127.0.0.1", 0),
            services={"web": ServiceListener(Address("127.0.0.1", 0))},
            state_dir=tmp_path,
            handshake_timeout=HANDSHAKE_TIMEOUT,
            insecure_plaintext=plaintext,
            admin=Address("127.0.0.1", 0),  # counts; the endpoint itself is not started
        )
    )


async def _send_and_close(address: Address, payload: bytes) -> None:
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(payload)
    writer.write_eof()
    await reader.read()  # until the LL closes
    writer.close()


@pytest.mark.parametrize(
    ("payload", "label", "logged"),
    [pytest.param(*case[1:], id=case[0]) for case in PLAINTEXT_CASES],
)
def test_bad_first_exchange_on_a_plaintext_ll(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, payload: bytes, label: str, logged: str
) -> None:
    async def scenario() -> None:
        async with _node(tmp_path, plaintext=True) as node:
            assert node.agent_address is not None
            await _send_and_close(node.agent_address, payload)
            await _wait_count(node, label)

    with caplog.at_level(logging.WARNING, logger="tcpgc.ll"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if "handshake failed from" in r.getMessage()]
    assert len(lines) == 1 and logged in lines[0], lines


def test_silent_peer_is_cut_at_the_deadline(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _node(tmp_path, plaintext=True) as node:
            assert node.agent_address is not None
            started = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", node.agent_address.port)
            assert await reader.read() == b""  # closed by the LL, having said nothing
            assert time.monotonic() - started >= HANDSHAKE_TIMEOUT * 0.9
            writer.close()
            await _wait_count(node, "timeout")

    asyncio.run(scenario())


def test_plaintext_agent_to_a_tls_ll(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hello = encode(Hello(MAX_VERSION, MAX_VERSION, bytes(8), os.urandom(32)))

    async def scenario() -> None:
        async with _node(tmp_path, plaintext=False) as node:
            assert node.agent_address is not None
            await _send_and_close(node.agent_address, hello)
            await _wait_count(node, "tls")

    with caplog.at_level(logging.WARNING, logger="tcpgc.ll"):
        asyncio.run(scenario())
    assert any("peer does not speak TLS" in r.getMessage() for r in caplog.records)


def test_a_reset_during_tls_is_a_closed_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with _node(tmp_path, plaintext=False) as node:
            assert node.agent_address is not None
            sock = socket.create_connection(("127.0.0.1", node.agent_address.port))
            sock.sendall(CLIENT_HELLO[:3])
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            sock.close()  # with a TCP RST
            await _wait_count(node, "closed")

    with caplog.at_level(logging.WARNING, logger="tcpgc.ll"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if "handshake failed from" in r.getMessage()]
    assert len(lines) == 1 and ": TLS failed: " in lines[0], lines
