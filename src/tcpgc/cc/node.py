"""The Connect-Connect node (the agent): dials out to each LL, proves the join token,
and for every OPEN it is sent, connects to that service's server and gives the LL a
data connection carrying the client.

The agent verifies the LL first (pinned certificate, then the LL's proof of the
secret) and only then acts on requests; it dials only the servers of its own config.

The node holds its parts and wires them together; each is an object of its own:
`LLDialer` (cc/ll_dial.py) makes verified links to LLs, `SessionKeeper`
(cc/session.py) drives each LL session's core, `ReadyPools` (cc/ready_pool.py) keeps
ready data connections, `Opener` (cc/opening.py) serves each OPEN.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from tcpgc.cc.ll_dial import LLDialer
from tcpgc.cc.open_limits import RefusalLog
from tcpgc.cc.opening import Opener
from tcpgc.cc.ready_pool import ReadyPools
from tcpgc.cc.resumer import CCResumes
from tcpgc.cc.session import SessionKeeper
from tcpgc.cc.status import cc_status
from tcpgc.config import Address, CCConfig
from tcpgc.errors import UsageError
from tcpgc.identity import JoinToken, agent_context
from tcpgc.memory_trim import trim_periodically
from tcpgc.metrics import Metrics
from tcpgc.protocol.messages import AGENT_ID_SIZE
from tcpgc.task_set import TaskSet

log = logging.getLogger("tcpgc.cc")


class ConnectNode:
    """The CC node. Use as ``async with ConnectNode(config, token) as node:``; it keeps
    one session per LL address, reconnecting with backoff, until closed."""

    def __init__(self, config: CCConfig, token: JoinToken) -> None:
        config.require_complete()
        self.config = config
        self.token = token
        tls = None
        if not config.insecure_plaintext:
            tls = agent_context(config.tls_ca, config.tls_cert, config.tls_key)
        #: One id for the life of this process, so an LL can tell our new session from
        #: a stale one it still holds after a network failure, and replace it.
        self.agent_id = secrets.token_bytes(AGENT_ID_SIZE)
        # Only a node with an admin endpoint counts: nothing else could read the figures.
        self.metrics = Metrics("cc", enabled=config.admin is not None)
        self._tasks = TaskSet()
        self._sessions: dict[Address, asyncio.Task[Any]] = {}
        self._refusals = RefusalLog(log)
        #: Set while the session to each LL (by address) is up.
        self.connected: dict[str, asyncio.Event] = {str(a): asyncio.Event() for a in config.ll}
        self._dialer = LLDialer(token, tls, ca_verified=config.tls_ca is not None)
        self.resumes = CCResumes(config, self._dialer, self.metrics, self._tasks, self.connected)
        self._opener = Opener(config, self.metrics, self._refusals, self.resumes)
        self._pools = ReadyPools(
            config, self.metrics, self._tasks, self._dialer.dial, self._opener.serve
        )
        self._keeper = SessionKeeper(
            config,
            token,
            self.agent_id,
            dialer=self._dialer,
            opener=self._opener,
            pools=self._pools,
            resumes=self.resumes,
            metrics=self.metrics,
            tasks=self._tasks,
            connected=self.connected,
        )

    async def start(self) -> None:
        for address in self.config.ll:
            self._start_session(address)
        self._tasks.spawn(trim_periodically(), "memory trim")

    def _start_session(self, address: Address) -> None:
        self.connected.setdefault(str(address), asyncio.Event())
        self._opener.relays.setdefault(address, {})
        self._sessions[address] = self._tasks.spawn(
            self._keeper.keep(address), f"session to {address}"
        )

    async def _stop_session(self, address: Address) -> None:
        task = self._sessions.pop(address)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self.connected[str(address)].clear()

    async def reload(self, config: CCConfig, token: JoinToken) -> None:
        """Apply a new config. Sessions are renewed only where needed (the services we
        announce changed, or an LL was added or removed); connections in flight are
        untouched either way."""
        if config.insecure_plaintext != self.config.insecure_plaintext:
            raise UsageError("'insecure_plaintext' cannot change on reload: restart instead")
        tls = None
        if not config.insecure_plaintext:
            tls = agent_context(config.tls_ca, config.tls_cert, config.tls_key)
        old = self.config
        renew = (
            set(config.services) != set(old.services)
            or config.exposes != old.exposes
            or token != self.token
            or (config.tls_ca, config.tls_cert, config.tls_key)
            != (old.tls_ca, old.tls_cert, old.tls_key)
        )
        self.config, self.token = config, token
        self._dialer.token, self._dialer.tls = token, tls
        self._dialer.ca_verified = config.tls_ca is not None
        self._opener.reconfigure(config)
        self.resumes.reconfigure(config)
        self._pools.config = config
        self._keeper.config, self._keeper.token = config, token
        for address in list(self._sessions):
            if address not in config.ll or renew:
                await self._stop_session(address)
        for address in config.ll:
            if address not in self._sessions:
                self._start_session(address)
        log.info(
            "config reloaded: %d LLs, services %s (was %s)",
            len(config.ll),
            ", ".join(config.services),
            ", ".join(old.services),
        )

    async def drain(self, deadline: float) -> None:
        """Leave the LLs (they send new clients to other agents), let connections in
        flight finish for up to `deadline` seconds, then close. UDP flows end at once:
        a datagram has no end to wait for."""
        self._opener.end_flows("the agent is stopping")
        for address in list(self._sessions):
            await self._stop_session(address)
        active = self._opener.active()
        if active:
            log.info("draining: waiting up to %.0f s for %d connections", deadline, active)
            try:
                await asyncio.wait_for(self._opener.idle.wait(), deadline)
            except TimeoutError:
                log.warning("drain deadline reached: closing %d connections", self._opener.active())
        await self.close()

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for the status page: LLs, services, connections."""
        return cc_status(
            agent_id=self.agent_id,
            tls=self._dialer.tls is not None,
            connected=self.connected,
            services=self.config.services,
            udp_services=self.config.udp_services,
            relays=self._opener.relays,
            now=time.monotonic(),
        )

    async def close(self) -> None:
        # Sessions first, each in order (ready connections finish their first frame,
        # then the control connection closes), then everything else.
        for address in list(self._sessions):
            await self._stop_session(address)
        self.resumes.table.give_up_all("not resumed: the agent is stopping")
        self._opener.close_all()
        await self._tasks.close()
        self._refusals.close()

    async def __aenter__(self) -> ConnectNode:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
