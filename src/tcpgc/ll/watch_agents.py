"""The LL's watch over its agents' credentials: `tcpgc agent add` and `revoke` write the
state dir, and a running LL notices within a second, with no restart and no reload:
a new agent may join, a revoked one is dropped. It also records when each agent was last
seen, for `tcpgc agent list`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from tcpgc.errors import UsageError
from tcpgc.identity.agents import AgentCredential, record_seen
from tcpgc.ll.agents import AgentRegistry
from tcpgc.ll.credentials import Credentials

log = logging.getLogger("tcpgc.ll")

#: How often the state dir is looked at: a revoked agent is dropped within this (plus
#: the time to close its connections), far inside the 5 s an operator is promised.
INTERVAL = 1.0
#: How often "last seen" is written for agents that stay connected (at once for one
#: that was not seen before): often enough for `tcpgc agent list`, rarely for the disk.
SEEN_EVERY = 30.0


async def watch_agents(
    credentials: Credentials,
    agents: AgentRegistry,
    revoke: Callable[[list[AgentCredential]], None],
) -> None:
    seen: dict[str, float] = {}
    written = 0.0
    complaint = ""
    while True:
        await asyncio.sleep(INTERVAL)
        try:
            gone = credentials.refresh_agents()
            complaint = ""
        except (UsageError, OSError) as exc:
            # Keep what was loaded (a half-written dir must not drop every agent); say
            # so once per distinct problem, not every second.
            if str(exc) != complaint:
                complaint = str(exc)
                log.warning("agent credentials not re-read (the previous ones stay): %s", exc)
            gone = []
        if gone:
            revoke(gone)
        now = time.time()
        new = False
        for session in agents:
            if session.credential is not None and session.alive:
                new = new or session.credential.name not in seen
                seen[session.credential.name] = now
        if seen and (new or now - written >= SEEN_EVERY) and credentials.identity is not None:
            written = now
            try:
                record_seen(credentials.identity.state_dir, seen)
            except (UsageError, OSError) as exc:
                log.warning("cannot record when agents were last seen: %s", exc)
