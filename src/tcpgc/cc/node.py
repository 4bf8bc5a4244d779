"""The Connect-Connect node (the agent): dials out to each LL, proves the join token,
and for every OPEN it is sent, connects to that service's server and gives the LL a
data connection carrying the client.

The agent verifies the LL first (pinned certificate, then the LL's proof of the
secret) and only then acts on requests; it dials only the servers of its own config.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import secrets
import ssl
import time
from functools import partial
from typing import Any

from tcpgc.cc.open_limits import OpenLimits, RefusalLog
from tcpgc.cc.ready_pool import ReadyPool, ReadyPools, describe
from tcpgc.config import Address, CCConfig
from tcpgc.errors import (
    CertificateChanged,
    HeartbeatLost,
    PeerRefused,
    PinMismatch,
    ProtocolError,
    TcpgcError,
    UsageError,
)
from tcpgc.identity import JoinToken, agent_context, format_fingerprint, pin_server_name
from tcpgc.ops.memory_trim import trim_periodically
from tcpgc.ops.metrics import Metrics, failure_reason
from tcpgc.protocol.chunks import HEADER_SIZE, MAX_CHUNK
from tcpgc.protocol.frame_auth import CONTROL, frame_auth
from tcpgc.protocol.handshake import AgentHandshake, State, data_proof
from tcpgc.protocol.messages import (
    AGENT_ID_SIZE,
    MAX_VERSION,
    Data,
    Error,
    Open,
    OpenFailed,
    Ping,
    Pong,
    encode,
)
from tcpgc.relay.factory import start_chunked_relay
from tcpgc.relay.result import AnyRelay, RelayResult
from tcpgc.safe_text import printable
from tcpgc.task_set import TaskSet
from tcpgc.transport.dial import dial
from tcpgc.transport.frame_channel import FrameChannel
from tcpgc.transport.link import Link
from tcpgc.transport.proxy_protocol import header

log = logging.getLogger("tcpgc.cc")

#: A session that lasted this long resets the reconnect backoff.
STABLE_SESSION = 30.0


class ConnectNode(ReadyPools):
    """The CC node. Use as ``async with ConnectNode(config, token) as node:``; it keeps
    one session per LL address, reconnecting with backoff, until closed."""

    def __init__(self, config: CCConfig, token: JoinToken) -> None:
        if not config.ll:
            raise UsageError("no LL address: give --ll HOST:PORT or 'll' in the config file")
        if not config.services:
            raise UsageError(
                "no service: give --server HOST:PORT or [services.NAME] in the config file"
            )
        self.config = config
        self.token = token
        self._tls = (
            None
            if config.insecure_plaintext
            else agent_context(config.tls_ca, config.tls_cert, config.tls_key)
        )
        #: One id for the life of this process, so an LL can tell our new session from
        #: a stale one it still holds after a network failure, and replace it.
        self.agent_id = secrets.token_bytes(AGENT_ID_SIZE)
        # Only a node with an admin endpoint counts: nothing else could read the figures.
        self.metrics = Metrics("cc", enabled=config.admin is not None)
        self._tasks = TaskSet()
        self._sessions: dict[Address, asyncio.Task[Any]] = {}
        #: The clients being relayed through each LL, with the OPEN that brought each.
        self._relays: dict[Address, dict[AnyRelay, Open]] = {}
        self._opening = 0
        self._limits = OpenLimits(config.max_connections_per_ll, config.max_connections_per_service)
        self._refusals = RefusalLog(log)
        self._pools: dict[Address, ReadyPool] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.connected: dict[str, asyncio.Event] = {str(a): asyncio.Event() for a in config.ll}

    async def start(self) -> None:
        for address in self.config.ll:
            self._start_session(address)
        self._tasks.spawn(trim_periodically(), "memory trim")

    def _start_session(self, address: Address) -> None:
        self.connected.setdefault(str(address), asyncio.Event())
        self._relays.setdefault(address, {})
        self._sessions[address] = self._tasks.spawn(
            self._keep_session(address), f"session to {address}"
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
            or token != self.token
            or (config.tls_ca, config.tls_cert, config.tls_key)
            != (old.tls_ca, old.tls_cert, old.tls_key)
        )
        self.config, self._tls, self.token = config, tls, token
        self._limits.per_ll = config.max_connections_per_ll
        self._limits.per_service = config.max_connections_per_service
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
        flight finish for up to `deadline` seconds, then close."""
        for address in list(self._sessions):
            await self._stop_session(address)
        active = self._active()
        if active:
            log.info("draining: waiting up to %.0f s for %d connections", deadline, active)
            try:
                await asyncio.wait_for(self._idle.wait(), deadline)
            except TimeoutError:
                log.warning("drain deadline reached: closing %d connections", self._active())
        await self.close()

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for the status page: LLs, services, connections."""
        now = time.monotonic()
        return {
            "role": "cc",
            "agent_id": self.agent_id.hex()[:12],
            "tls": self._tls is not None,
            "lls": [
                {"address": address, "connected": event.is_set()}
                for address, event in self.connected.items()
            ],
            "services": [
                {"name": name, "server": str(server)}
                for name, server in self.config.services.items()
            ],
            "connections": [
                {
                    "ll": str(ll),
                    "service": request.service,
                    "client": _format_endpoint(request.client_host, request.client_port),
                    "server": relay.a.peer,
                    "bytes_in": relay.result.bytes_b_to_a,
                    "bytes_out": relay.result.bytes_a_to_b,
                    "seconds": round(now - relay.result.started, 1),
                }
                for ll, relays in self._relays.items()
                for relay, request in relays.items()
            ],
        }

    def _active(self) -> int:
        return self._opening + sum(len(relays) for relays in self._relays.values())

    async def close(self) -> None:
        # Sessions first, each in order (ready connections finish their first frame,
        # then the control connection closes), then everything else.
        for address in list(self._sessions):
            await self._stop_session(address)
        for relays in self._relays.values():
            for relay in list(relays):
                relay.close()
        await self._tasks.close()
        self._refusals.close()

    async def __aenter__(self) -> ConnectNode:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _join(self, address: Address) -> tuple[Link, FrameChannel, AgentHandshake]:
        """Dial the LL, verify it, and authenticate: a session ready to serve."""
        async with asyncio.timeout(self.config.connect_timeout):
            link, binding = await self._dial_ll(address)
            try:
                channel, handshake = await self._authenticate(link, binding)
                return link, channel, handshake
            except BaseException:
                link.abort()
                raise

    async def _authenticate(
        self, link: Link, binding: bytes
    ) -> tuple[FrameChannel, AgentHandshake]:
        channel = FrameChannel(link)
        handshake = AgentHandshake(
            self.token.secret,
            services=tuple(self.config.services),
            agent_id=self.agent_id,
            binding=binding,
            tls=self._tls is not None,
        )
        channel.send(handshake.start())
        while handshake.state is not State.DONE:
            message = await channel.recv()
            if message is None:
                raise ProtocolError("the LL closed the connection during the handshake")
            reply = handshake.receive(message)
            if reply is not None:
                channel.send(reply)
        if self._tls is None:  # every later frame carries its MAC
            channel.auth = frame_auth(handshake.session_key, CONTROL, agent=True)
        return channel, handshake

    async def _keep_session(self, address: Address) -> None:
        delay = self.config.reconnect_min
        while True:
            started = time.monotonic()
            try:
                await self._session(address)
            except (TcpgcError, OSError, ssl.SSLError, TimeoutError) as exc:
                log.error("cannot connect to LL %s: %s", address, describe(exc))
            finally:
                self.connected[str(address)].clear()
            if time.monotonic() - started > STABLE_SESSION:
                delay = self.config.reconnect_min
            # Full jitter: agents restarted together do not come back together.
            wait = random.uniform(self.config.reconnect_min, delay)
            log.info("reconnecting to %s in %.1f s", address, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.config.reconnect_max)

    async def _dial_ll(
        self, address: Address, session: AgentHandshake | None = None
    ) -> tuple[Link, bytes]:
        """A verified link to the LL: TCP, TLS, and its certificate checked, either
        against the fingerprint pinned by the token or, with `tls_ca`, the CA bundle;
        for a data or ready connection of `session`, also that it is the certificate of
        the session's control connection. Also returns the fingerprint proofs on the
        link are bound to."""
        loop = asyncio.get_running_loop()
        pinning = self._tls is not None and self.config.tls_ca is None
        # Pinning agents name the certificate they expect, so an LL in the middle of a
        # certificate rotation can present the old one to holders of the old token.
        name = pin_server_name(self.token.fingerprint) if pinning else address.connect_host
        _, link = await loop.create_connection(
            lambda: Link(self._tls, server_hostname=name if self._tls else None),
            address.connect_host,
            address.port,
        )
        try:
            await link.ready
            if self._tls is None:
                return link, self.token.fingerprint
            presented = hashlib.sha256(link.peer_certificate or b"").digest()
            if pinning and not hmac.compare_digest(presented, self.token.fingerprint):
                raise PinMismatch(
                    f"the LL's certificate is {format_fingerprint(presented)} but the join "
                    f"token pins {format_fingerprint(self.token.fingerprint)}: refusing to "
                    "talk to it (wrong address, a token from another LL, or someone in the middle)"
                )
            if session is not None and not hmac.compare_digest(presented, session.binding):
                raise CertificateChanged(
                    f"the LL's certificate on this connection is {format_fingerprint(presented)}"
                    f" but its control connection's is {format_fingerprint(session.binding)}: "
                    "refusing it (someone in the middle, or the LL changed certificates; "
                    "the next session takes a new one)"
                )
        except BaseException:
            link.abort()
            raise
        return link, presented

    async def _session(self, address: Address) -> None:
        try:
            link, channel, handshake = await self._join(address)
        except (TcpgcError, OSError, ssl.SSLError, TimeoutError) as exc:
            self.metrics.child(self.metrics.handshake_failures, failure_reason(describe(exc))).inc()
            raise
        agent_id = handshake.agent_id.hex()[:12]
        log.info(
            "connected to LL %s as agent %s (services: %s)",
            address,
            agent_id,
            ", ".join(self.config.services),
        )
        missing = [s for s in self.config.services if s not in handshake.ll_services]
        if missing and handshake.ll_services:
            log.warning(
                "LL %s does not have services: %s (it has: %s); no client of theirs "
                "comes through it until it is configured with them",
                address,
                ", ".join(missing),
                ", ".join(handshake.ll_services),
            )
        self.connected[str(address)].set()
        self.metrics.agents.set(sum(e.is_set() for e in self.connected.values()))
        heartbeat = max(handshake.heartbeat_ms, 100) / 1000
        pinger = self._tasks.spawn(self._ping(channel, heartbeat), f"heartbeat to {address}")
        pool = None
        if self.config.pool_size > 0:
            pool = self._tasks.spawn(self._keep_ready(address, handshake), f"pool {address}")
        try:
            await self._serve(address, channel, handshake, heartbeat)
        except HeartbeatLost:
            relays = self._relays.get(address, {})
            if relays:
                # The data connections most likely died with the link: end them now
                # rather than when TCP gives up, many minutes later.
                log.warning("closing %d connections through LL %s", len(relays), address)
                for relay in list(relays):
                    relay.result.ended = "LL lost"
                    relay.close()
            raise
        finally:
            pinger.cancel()
            if pool is not None:
                pool.cancel()
                await asyncio.gather(pool, return_exceptions=True)
            link.abort()
            self.connected[str(address)].clear()
            self.metrics.agents.set(sum(e.is_set() for e in self.connected.values()))

    async def _serve(
        self, address: Address, channel: FrameChannel, session: AgentHandshake, heartbeat: float
    ) -> None:
        while True:
            try:
                message = await channel.recv(within=3 * heartbeat)
            except TimeoutError:
                raise HeartbeatLost(f"no heartbeat from the LL for {3 * heartbeat:.0f} s") from None
            if message is None:
                raise ProtocolError("the LL closed the control connection")
            if isinstance(message, Open):
                self._tasks.spawn(
                    self._open(address, channel, session, message), f"open {message.service}"
                )
            elif isinstance(message, Ping):
                channel.send(Pong(message.token))
            elif isinstance(message, Pong):
                pass
            elif isinstance(message, Error):
                raise PeerRefused(f"the LL closed the session: {printable(message.message)}")
            else:
                raise ProtocolError(f"unexpected {message.TYPE.name} from the LL")

    async def _ping(self, channel: FrameChannel, interval: float) -> None:
        token = 0
        while True:
            await asyncio.sleep(interval)
            token += 1
            channel.send(Ping(token))

    async def _open(
        self,
        ll: Address,
        channel: FrameChannel,
        session: AgentHandshake,
        request: Open,
        ready: bool = False,
    ) -> None:
        """Serve one OPEN: from the control connection (`channel` is the control channel
        and a data connection is dialed), or on a ready data connection (`ready`: the
        answer and then the stream go on `channel` itself)."""
        over = self._limits.acquire(ll, request.service)
        if over is not None:
            # Each connection costs two sockets: an LL must not be able to take them all.
            self._refusals.refused(
                f"refused OPEN for service '{request.service}' from LL {ll}: {over}"
            )
            channel.send(OpenFailed(request.conn_id, "the agent is at its connection limit"))
            self.metrics.child(self.metrics.clients_refused, request.service, "agent_limit").inc()
            if ready:
                channel.link.close()  # a ready connection serves one client at most
            return
        self._opening += 1
        self._idle.clear()
        relay = None
        try:
            relay = await self._connect_both(ll, channel, session, request, ready)
        finally:
            self._opening -= 1
            if relay is None:
                self._limits.release(ll, request.service)
        if relay is None:
            self._check_idle()
            return
        relays = self._relays.setdefault(ll, {})
        relays[relay] = request
        self.metrics.child(self.metrics.clients_active, request.service).inc()
        # A callback, not this task, sees the connection through: idle connections
        # then cost no task and no frames (and a partial less than a closure).
        relay.on_done = partial(self._finished, ll, relays, relay)

    def _finished(
        self, ll: Address, relays: dict[AnyRelay, Open], relay: AnyRelay, _: RelayResult
    ) -> None:
        request = relays.pop(relay)
        self._limits.release(ll, request.service)
        self.metrics.child(self.metrics.clients_active, request.service).dec()
        self._check_idle()
        result = relay.result
        log.info(
            "service '%s' connection done after %.3f s: %d bytes to server, %d bytes from it, %s",
            request.service,
            result.duration,
            result.bytes_b_to_a,
            result.bytes_a_to_b,
            result.ended,
        )

    def _check_idle(self) -> None:
        if not self._active():
            self._idle.set()

    async def _connect_both(
        self,
        ll: Address,
        channel: FrameChannel,
        session: AgentHandshake,
        request: Open,
        ready: bool,
    ) -> AnyRelay | None:
        """Dial the server, then claim the client with a data connection (a new one, or
        the ready one `channel` runs on). The server comes first so that a refusal is
        reported to the LL as such (OPEN_FAILED) instead of as a connection that closes."""
        server = self.config.services.get(request.service)
        if server is None:
            log.warning(
                "LL %s asked for service '%s', which this agent does not serve", ll, request.service
            )
            channel.send(
                OpenFailed(
                    request.conn_id, f"service '{request.service}' is not served by this agent"
                )
            )
            if ready:
                channel.link.close()  # a ready connection serves one client at most
            return None
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                server_link = await dial(server.connect_host, server.port)
        except (OSError, TimeoutError) as exc:
            reason = describe(exc)
            log.warning(
                "cannot reach server %s for service '%s': %s", server, request.service, reason
            )
            channel.send(OpenFailed(request.conn_id, f"cannot reach its server: {reason}"))
            self.metrics.child(
                self.metrics.clients_refused, request.service, "server_unreachable"
            ).inc()
            if ready:
                channel.link.close()  # a ready connection serves one client at most
            return None
        if ready and (channel.link.is_closed or channel.link.got_eof):
            # The LL gave up on this client meanwhile (and may have given it to another
            # agent): its first bytes, which came with the OPEN, must not reach a server.
            log.info("LL %s closed the connection of a client being opened: dropped", ll)
            server_link.abort()
            channel.link.abort()
            return None
        early = b""
        proof = data_proof(session.session_key, request.conn_id, session.binding)
        data = Data(MAX_VERSION, request.conn_id, proof)
        if ready:
            data_frame = channel.encode(data)  # the reply to this connection's OPEN
            data_link = channel.link
            channel.detach()
            early = _take_first_chunk(data_link)
        else:
            data_frame = encode(data)  # a new connection: no frames before it
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    data_link, _ = await self._dial_ll(ll, session)
            except (TcpgcError, OSError, ssl.SSLError, TimeoutError) as exc:
                log.warning("cannot open a data connection to LL %s: %s", ll, describe(exc))
                server_link.abort()
                return None
            except BaseException:  # cancelled: the session or the node is stopping
                server_link.abort()
                raise
        version = self.config.proxy_protocol.get(request.service)
        if version:
            client = (request.client_host, request.client_port)
            server_link.write(header(version, client, (request.local_host, request.local_port)))
        if early:
            # The client's first bytes go to the server before anything else is done:
            # its answer is then on its way while the relay is being set up.
            server_link.write(early)
            if server_link.is_closing:
                early = b""  # not delivered (the server went away): not counted
        data_link.write(data_frame)
        self.metrics.child(self.metrics.clients_accepted, request.service).inc()
        counted = self.metrics.bytes
        counters = (
            self.metrics.child(counted, request.service, "out"),
            self.metrics.child(counted, request.service, "in"),
        )
        # The data connection carries the client chunked, and is reused after it.
        relay = start_chunked_relay(
            server_link, data_link, *counters, on_idle=partial(self._reuse, ll)
        )
        if early:
            relay.result.bytes_b_to_a += len(early)
            counters[1].inc(len(early))
        return relay


def _format_endpoint(host: str, port: int) -> str:
    if not host:
        return "unknown"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _take_first_chunk(link: Link) -> bytes:
    """The client's first bytes, if they came whole behind OPEN (as the LL's first
    chunk), taken off the link's buffer; else b"" and the relay will read them."""
    held = link.buffered
    if len(held) < HEADER_SIZE:
        return b""
    length = int.from_bytes(held[:HEADER_SIZE], "big")
    if not 0 < length <= MAX_CHUNK or len(held) < HEADER_SIZE + length:
        return b""
    link.consume(HEADER_SIZE + length)
    return held[HEADER_SIZE : HEADER_SIZE + length]
