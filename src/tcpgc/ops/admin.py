"""The admin endpoint: Prometheus metrics, a health check and a live status page.

A deliberately small HTTP/1.1 server on asyncio streams (GET and HEAD, one request per
connection, `Connection: close`; the bytes are h11's, see `tcpgc.ops.admin_http`), so
the nodes need no web framework:

    GET /              the status page (one self-contained HTML page; polls /status.json)
    GET /status.json   the node's status snapshot, plus cumulative totals
    GET /metrics       Prometheus text format
    GET /healthz       200 "ok" while the node serves, else 503 with the reason

With a token, every path but /healthz requires ``Authorization: Bearer TOKEN``; the
status page also takes it as ``/?token=TOKEN`` and sends it on to /status.json in the
header. The token is compared in constant time and never logged. Without a token, every
path but /healthz is served only to requests that name the endpoint by one of its own
names (`tcpgc.admin_access.HostAllowlist`), against DNS rebinding.

A newcomer is always taken; past a cap, a random open connection is closed instead
(see `MAX_OPEN`), so connections held idle cannot keep a health check out.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import struct
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tcpgc import __version__
from tcpgc.addresses import Address
from tcpgc.admin_access import ConnectionCap, HostAllowlist, exposure_problem
from tcpgc.cc.node import ConnectNode
from tcpgc.errors import BadRequest, ConnectionClosed, UsageError
from tcpgc.ll.node import ListenNode
from tcpgc.ops import status_page
from tcpgc.ops.admin_http import MAX_LINE, HttpExchange, RequestHead, Response
from tcpgc.task_set import TaskSet
from tcpgc.transport.peer_address import format_peer

log = logging.getLogger("tcpgc.admin")

#: Time a client has to send its whole request head, and to take the response. Health
#: checks, scrapers and browsers send their request at once; the short head deadline
#: bounds how long an idle connection is held even below the caps.
HEAD_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
#: Admin connections open at once, in all and per source address. Scrapers, health
#: checks and a few browser tabs need a handful. Past either cap the newcomer is still
#: taken and a random other connection is closed (random early drop, as on the agent
#: port): every open connection is waiting on its client, for a request head or for it
#: to take its reply (one request per connection, no keep-alive), so a peer holding many
#: is the one that loses them. Of SHED_DRAWS connections drawn, the one open longest is
#: closed, and one whose request is already waiting to be read only if all are such:
#: a health check, which sends its request at once, is then hardly ever the one, even
#: while newcomers pour in faster than the loop reads.
MAX_OPEN = 64
MAX_OPEN_PER_SOURCE = 16
SHED_DRAWS = 2
#: At most one log line per this many seconds about closed excess connections.
SHED_LOG_INTERVAL = 60.0


class AdminServer:
    """Serves one node's admin endpoint on `address` until closed. Without `token` it
    must be on loopback, and serves status and metrics only to requests whose Host is an
    IP address, 'localhost', the host of `address` or one of `hosts`."""

    def __init__(
        self,
        node: ListenNode | ConnectNode,
        address: Address,
        token: str | None,
        hosts: Iterable[str] = (),
    ) -> None:
        if node.metrics.registry is None:
            raise UsageError(
                "this node counts nothing: set its admin address in its config before "
                "creating it, so that it keeps metrics"
            )
        self.node = node
        self._wanted = address
        if token is not None:
            token = token.strip()
            if not token:
                raise UsageError("the admin token is empty: put a token in admin_token_file")
        self._token = token.encode() if token is not None else None
        if token is None and (problem := exposure_problem(address, None)) is not None:
            raise UsageError(problem)
        self._hosts = HostAllowlist([*hosts, address.host] if address.host else hosts)
        self._server: asyncio.Server | None = None
        self._address: Address | None = None
        self._tasks = TaskSet()
        self._open: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}
        self._guard = ConnectionCap(
            MAX_OPEN, MAX_OPEN_PER_SOURCE, draws=SHED_DRAWS, spare=_request_waiting
        )
        self._shed_unlogged = 0
        self._shed_log_after = 0.0

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._accepted,
                self._wanted.bind_host,
                self._wanted.port,
                # The stream's buffer: reads stop past it until the head is parsed.
                limit=MAX_LINE,
                reuse_address=True,
            )
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {self._wanted} for admin: {exc.strerror or exc}"
            ) from None
        host, port = self._server.sockets[0].getsockname()[:2]
        self._address = Address(self._wanted.host or str(host), port)

    @property
    def address(self) -> Address:
        """The bound address (port 0 resolved). Only after `start`."""
        if self._address is None:
            raise RuntimeError("AdminServer.address is known only after start()")
        return self._address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):
            writer.transport.abort()
        await self._tasks.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # ---- connections -------------------------------------------------------------------

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if peer else "unknown"
        victims = self._guard.admit(writer, source)
        self._open[writer] = self._tasks.spawn(
            self._serve(reader, writer), f"admin request from {peer}"
        )
        for victim in victims:
            assert isinstance(victim, asyncio.StreamWriter)
            # Done here rather than in its task's finally: a task cancelled before its
            # first step never runs it. The guard has already forgotten it.
            self._open.pop(victim).cancel()
            victim.transport.abort()
        if victims:
            self._note_shed(len(victims))

    def _note_shed(self, count: int) -> None:
        """Log closed excess connections, at most one line per SHED_LOG_INTERVAL: a
        flood of connections must not become a flood of log lines."""
        self._shed_unlogged += count
        now = asyncio.get_running_loop().time()
        if now < self._shed_log_after:
            return
        log.warning(
            "admin: closed %d connection%s that sent no request or took no reply in time "
            "(%d open at most, %d per address)",
            self._shed_unlogged,
            "" if self._shed_unlogged == 1 else "s",
            MAX_OPEN,
            MAX_OPEN_PER_SOURCE,
        )
        self._shed_unlogged = 0
        self._shed_log_after = now + SHED_LOG_INTERVAL

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        exchange = HttpExchange()
        try:
            try:
                async with asyncio.timeout(HEAD_TIMEOUT):
                    request = await _read_request(reader, exchange)
                response = self._respond(request, writer)
            except BadRequest as exc:
                response = Response(exc.status, f"{exc}\n")
            except TimeoutError:
                response = Response(408, "request head not received in time\n")
            writer.write(exchange.respond(response))
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, TimeoutError, ConnectionClosed):
            pass  # the client went away; nothing to tell anyone
        finally:
            self._open.pop(writer, None)
            self._guard.release(writer)
            writer.close()

    # ---- routing -----------------------------------------------------------------------

    def _respond(self, request: RequestHead, writer: asyncio.StreamWriter) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Response(405, "only GET and HEAD\n", headers={"Allow": "GET, HEAD"})
        headers = request.headers
        url = urlsplit(request.target)
        path = url.path
        if path == "/healthz":
            return self._health()
        if path not in ("/", "/status.json", "/metrics"):
            return Response(404, "not found: try /, /status.json, /metrics or /healthz\n")
        # An absolute-form target ("GET http://name/ HTTP/1.1") names the host instead.
        host = url.netloc if url.scheme else headers.get("host")
        if self._token is None and not self._hosts.allows(host):
            # A browser sent this for a page of another name (DNS rebinding?). The token,
            # when there is one, is the gate instead: no page can make a browser send it.
            log.info(
                "admin: refused request for %s from %s: Host %.80r is not one of its names",
                path,
                _peer(writer),
                host,
            )
            return Response(
                421,
                "this Host is not a name of this admin endpoint: use its IP address or "
                "localhost, or add the name to admin_hosts in the node's config\n",
            )
        query_token = parse_qs(url.query).get("token", [None])[0] if path == "/" else None
        if not self._authorized(headers.get("authorization"), query_token):
            # The path only, never the query: it may hold a (wrong) token.
            log.info(
                "admin: unauthorized request for %s from %s",
                path,
                _peer(writer),
            )
            return Response(
                401,
                "a bearer token is required: 'Authorization: Bearer TOKEN' "
                "(the status page also takes /?token=TOKEN)\n",
                headers={"WWW-Authenticate": 'Bearer realm="tcpgc admin"'},
            )
        if path == "/metrics":
            return Response(200, generate_latest(self.node.metrics.registry), CONTENT_TYPE_LATEST)
        if path == "/status.json":
            return Response(200, json.dumps(self.snapshot()), "application/json")
        page, page_headers = status_page.render()
        return Response(200, page, "text/html; charset=utf-8", headers=page_headers)

    def _authorized(self, authorization: str | None, query_token: str | None) -> bool:
        if self._token is None:
            return True
        offered: str | None = None
        if authorization is not None:
            scheme, _, credentials = authorization.strip().partition(" ")
            if scheme.lower() == "bearer":
                offered = credentials.strip()
        if offered is None:
            offered = query_token
        if offered is None:
            return False
        return hmac.compare_digest(offered.encode("utf-8", "replace"), self._token)

    def _health(self) -> Response:
        reason = health_problem(self.node)
        if reason is None:
            return Response(200, "ok\n")
        return Response(503, f"unavailable: {reason}\n")

    def snapshot(self) -> dict[str, Any]:
        """`node.status()` plus the version and cumulative totals from the metrics (the
        status page computes overall throughput from them, closed connections included)."""
        status = self.node.status()
        status["version"] = __version__
        status["totals"] = totals(self.node.metrics.registry)
        return status


def health_problem(node: ListenNode | ConnectNode) -> str | None:
    """None if `node` is serving, else why not. An LL serves while it listens for agents
    and for every service's clients (it stops on drain); a CC while at least one of its
    LL sessions is up."""
    if isinstance(node, ListenNode):
        if node.agent_address is None or not node.services:
            return "not listening yet"
        closed = [name for name, s in node.services.items() if not s.server.is_serving()]
        if closed:
            return f"not taking clients for {', '.join(sorted(closed))} (draining?)"
        return None
    up = sum(1 for event in node.connected.values() if event.is_set())
    if up == 0:
        return f"no LL session up (0 of {len(node.connected)} connected)"
    return None


def totals(registry: CollectorRegistry) -> dict[str, float]:
    """Cumulative counts over every service, from the node's registry."""
    out = {"bytes_in": 0.0, "bytes_out": 0.0, "clients_accepted": 0.0, "handshake_failures": 0.0}
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "tcpgc_bytes_total":
                key = "bytes_in" if sample.labels.get("direction") == "in" else "bytes_out"
                out[key] += sample.value
            elif sample.name == "tcpgc_clients_accepted_total":
                out["clients_accepted"] += sample.value
            elif sample.name == "tcpgc_handshake_failures_total":
                out["handshake_failures"] += sample.value
    return out


async def _read_request(reader: asyncio.StreamReader, exchange: HttpExchange) -> RequestHead:
    """Reads until `exchange` has the request's whole head."""
    while True:
        request = exchange.receive(await reader.read(exchange.wanted()))
        if request is not None:
            return request


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return format_peer(peer) if peer else "unknown"


def _request_waiting(key: object) -> bool:
    """True if the connection's client has sent bytes the event loop has not read yet:
    under a flood of connections the loop lags, and a health check that sent its
    request at once must not be the one shed before that request is read."""
    assert isinstance(key, asyncio.StreamWriter)
    sock = key.get_extra_info("socket")
    if sock is None:
        return False
    try:
        # Unix only, imported here: the endpoint serves where FIONREAD is missing too.
        import fcntl
        import termios

        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (ImportError, OSError):
        return False
    return bool(struct.unpack("i", raw)[0])
