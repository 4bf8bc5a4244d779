"""The LL's registry of agent sessions: keyed by full agent id, counted per credential."""

from __future__ import annotations

import asyncio
from unittest.mock import MagicMock

from tcpgc.ll.agents import AgentRegistry, AgentSession

KEY_A, KEY_B = b"A" * 8, b"B" * 8


def _session(raw_id: bytes, key_id: bytes = KEY_A) -> AgentSession:
    return AgentSession(
        raw_id.hex()[:12], "127.0.0.1:1", "127.0.0.1", ("web",), MagicMock(),
        raw_id=raw_id, key_id=key_id,
    )  # fmt: skip


def _registry() -> AgentRegistry:
    async def make() -> AgentRegistry:
        return AgentRegistry()  # its event belongs to a loop

    return asyncio.run(make())


def test_ids_sharing_the_shown_prefix_are_different_agents() -> None:
    registry = _registry()
    first = _session(bytes(6) + b"\x01" * 10)
    twin = _session(bytes(6) + b"\x02" * 10)
    assert first.agent_id == twin.agent_id  # what logs show is the same
    assert registry.add(first, ["web"]) is None
    assert registry.add(twin, ["web"]) is None, "a twin replaced the real agent"
    assert len(registry) == 2
    assert registry.find(first.raw_id) is first and registry.find(twin.raw_id) is twin
    assert registry.find(bytes(6) + b"\x03" * 10) is None


def test_the_same_agent_replaces_its_session() -> None:
    registry = _registry()
    old, new = _session(b"\x07" * 16), _session(b"\x07" * 16)
    registry.add(old, ["web"])
    assert registry.add(new, ["web"]) is old
    assert len(registry) == 1 and registry.find(new.raw_id) is new
    assert registry.pick("web", set()) is new


def test_sessions_counted_per_credential() -> None:
    registry = _registry()
    a1, a2, b1 = _session(b"\x01" * 16), _session(b"\x02" * 16), _session(b"\x03" * 16, KEY_B)
    for session in (a1, a2, b1):
        registry.add(session, ["web"])
    assert registry.sessions_with_key(KEY_A) == 2
    assert registry.sessions_with_key(KEY_B) == 1
    # A new session of a1's agent would replace a1: it does not count against itself.
    assert registry.sessions_with_key(KEY_A, besides=a1.raw_id) == 1
    assert registry.sessions_with_key(KEY_B, besides=a1.raw_id) == 1
    registry.add(_session(a1.raw_id), ["web"])  # replaces a1: still two
    assert registry.sessions_with_key(KEY_A) == 2
    registry.remove(a2)
    registry.remove(a2)  # twice is harmless
    assert registry.sessions_with_key(KEY_A) == 1
