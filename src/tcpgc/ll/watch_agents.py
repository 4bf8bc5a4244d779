"""The LL's watch over its agents' credentials: `tcpgc agent add` and `revoke` write the
state dir, and a running LL notices within a second, with no restart and no reload:
a new agent may join, a revoked one is dropped (`revoke_sessions`). It also records
when each agent was last seen, for `tcpgc agent list`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from tcpgc.errors import UsageError
from tcpgc.identity.agents import AgentCredential, record_seen
from tcpgc.ll.agents import AgentRegistry
from tcpgc.ll.credentials import Credentials
from tcpgc.ll.exposes import ExposedPorts
from tcpgc.ll.resumes import LLResumes

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


def revoke_sessions(
    agents: AgentRegistry,
    resumes: LLResumes,
    exposes: ExposedPorts,
    gone: list[AgentCredential],
) -> None:
    """These credentials were revoked: end their sessions, their clients (running or
    waiting for a resume) and their ports (held, or waiting for them to come back),
    now. Other agents are not touched."""
    key_ids = {credential.key_id for credential in gone}
    for session in agents:
        if session.key_id not in key_ids:
            continue
        session.revoked = True
        relays = list(session.relays)
        for relay in relays:
            relay.result.ended = "agent revoked"
            relay.close()
        log.warning(
            "agent '%s' revoked: session from %s ended, %d connections closed",
            session.name,
            session.peer,
            len(relays),
        )
        session.close()
    exposes.revoked(key_ids)
    waited = resumes.give_up_agents(key_ids, "agent revoked")
    if waited:
        log.warning("%d connections waiting for revoked agents closed", waited)
