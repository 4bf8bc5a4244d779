"""The LL's view of its agents: authenticated sessions, by service, picked in turn."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from tcpgc.identity.agents import AgentCredential
from tcpgc.protocol.ll_pairing import ReadyOffers
from tcpgc.protocol.messages import Open
from tcpgc.relay.rate_limit import RateLimits
from tcpgc.relay.result import AnyRelay
from tcpgc.transport.frame_channel import FrameChannel

log = logging.getLogger("tcpgc.ll")


class ControlSender(Protocol):
    """The running control session of an agent, as the pairing of clients uses it."""

    def offer(self, open_message: Open) -> None: ...


@dataclass(eq=False)
class AgentSession:
    """One authenticated control connection and what depends on it."""

    #: The agent's id as logs show it (its first 6 bytes in hex); `raw_id` is the key.
    agent_id: str
    peer: str
    peer_host: str
    services: tuple[str, ...]
    channel: FrameChannel
    #: The agent's full id and the key its ready data connections prove (see Pool).
    raw_id: bytes = b""
    session_key: bytes = b""
    #: Which of the LL's secrets the agent proved (sessions are capped per secret).
    key_id: bytes = b""
    #: Its ready data connections, and the POOL counters already accepted.
    offers: ReadyOffers[FrameChannel] = field(init=False)
    #: Ready connections taken for a client and not answered yet.
    offered: set[FrameChannel] = field(default_factory=set)
    #: False once the session has ended: nothing more is to be asked of this agent.
    alive: bool = True
    #: What OPENs for this agent go through once its session runs (see `ll.control`).
    control: ControlSender | None = None
    #: Relays running over this agent's data connections.
    relays: set[AnyRelay] = field(default_factory=set)
    #: The rate all this agent's relays together may move, each direction (None: no
    #: limit of its own): its buckets are shared by every client it serves.
    rate: RateLimits | None = None
    since: float = field(default_factory=time.time)
    #: The agent's own credential (None: the LL's shared join token, full scope).
    credential: AgentCredential | None = None
    #: Set when its credential is revoked: its ports close at once, nothing waits.
    revoked: bool = False
    #: What the LL refused of its request, as READY told it.
    refused: tuple[str, ...] = ()

    #: Bytes of its clients that are done ('in': client to server), for the status page.
    bytes_in: int = 0
    bytes_out: int = 0
    #: How many times one of its relays was paused to keep within a rate limit.
    limited: int = 0

    @property
    def metric_label(self) -> str:
        """Its label in metrics: its credential's name, or 'shared' (the LL's join
        token): never its id, which the agent picks (metrics would grow without end)."""
        return self.credential.name if self.credential is not None else "shared"

    @property
    def name(self) -> str:
        """Who the agent is, as logs and the status page say: its credential's name, or
        its id with the LL's shared token."""
        return self.credential.name if self.credential is not None else self.agent_id

    def __post_init__(self) -> None:
        self.offers = ReadyOffers(self.raw_id, self.session_key)

    def close(self) -> None:
        self.alive = False
        self.channel.link.abort()
        for channel in self.offers.drain():
            channel.link.abort()
        for channel in list(self.offered):  # their clients are offered elsewhere
            channel.link.abort()

    def take_ready(self) -> FrameChannel | None:
        """A ready data connection that is still open, or None. One the agent closed
        (renewed after `pool_ttl` idle) is dropped here, before a client's first bytes
        go on it."""
        while self.alive and (channel := self.offers.take()) is not None:
            if not (channel.link.is_closed or channel.link.got_eof):
                return channel
            channel.link.abort()
        return None


class AgentRegistry:
    """Sessions by service. New clients go to each agent of their service in turn.

    Sessions are keyed by the agent's full id: the short form in logs (12 hex digits)
    is for people, and another agent whose id shares it is another agent."""

    def __init__(self) -> None:
        self._by_service: dict[str, list[AgentSession]] = {}
        self._by_id: dict[bytes, AgentSession] = {}
        #: Sessions per credential (the key id of the secret each agent proved).
        self._per_key: collections.Counter[bytes] = collections.Counter()
        self._turn = itertools.count()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[AgentSession]:
        return iter(list(self._by_id.values()))

    def add(self, session: AgentSession, services: Iterable[str]) -> AgentSession | None:
        """Register `session`; returns the stale session of the same agent it replaces."""
        stale = self._by_id.get(session.raw_id)
        if stale is not None:
            self.remove(stale)
        self._by_id[session.raw_id] = session
        self._per_key[session.key_id] += 1
        for service in services:
            self._by_service.setdefault(service, []).append(session)
        self._changed.set()
        self._changed = asyncio.Event()
        return stale

    def remove(self, session: AgentSession) -> None:
        if self._by_id.get(session.raw_id) is session:
            del self._by_id[session.raw_id]
            self._per_key[session.key_id] -= 1
            if not self._per_key[session.key_id]:
                del self._per_key[session.key_id]
        for sessions in self._by_service.values():
            if session in sessions:
                sessions.remove(session)

    def find(self, raw_id: bytes) -> AgentSession | None:
        return self._by_id.get(raw_id)

    def sessions_with_key(self, key_id: bytes, besides: bytes = b"") -> int:
        """How many sessions proved the secret `key_id` names, not counting one of the
        agent `besides` (which a new session of that agent would replace)."""
        count = self._per_key[key_id]
        same = self._by_id.get(besides)
        if same is not None and same.key_id == key_id:
            count -= 1
        return count

    def pick(self, service: str, exclude: set[AgentSession]) -> AgentSession | None:
        candidates = [s for s in self._by_service.get(service, ()) if s not in exclude]
        if not candidates:
            return None
        return candidates[next(self._turn) % len(candidates)]

    async def joined(self) -> None:
        """Return when an agent joins."""
        await self._changed.wait()
