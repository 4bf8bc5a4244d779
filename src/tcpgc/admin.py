"""The admin endpoint: Prometheus metrics, a health check and a live status page.

A deliberately small HTTP/1.1 server on asyncio streams (GET and HEAD, one request per
connection, `Connection: close`), so the nodes need no web framework:

    GET /              the status page (one self-contained HTML page; polls /status.json)
    GET /status.json   the node's status snapshot, plus cumulative totals
    GET /metrics       Prometheus text format
    GET /healthz       200 "ok" while the node serves, else 503 with the reason

With a token, every path but /healthz requires ``Authorization: Bearer TOKEN``; the
status page also takes it as ``/?token=TOKEN`` and sends it on to /status.json in the
header. The token is compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tcpgc import __version__
from tcpgc.cc import ConnectNode
from tcpgc.config import Address
from tcpgc.errors import UsageError
from tcpgc.ll import ListenNode
from tcpgc.status_page import STATUS_PAGE
from tcpgc.tasks import TaskGroup

log = logging.getLogger("tcpgc.admin")

#: A request line or one header line longer than this is refused (431): the requests
#: this endpoint serves are a few hundred bytes; browsers send a few KiB of headers.
MAX_LINE = 8192
#: The whole request head (request line and headers) at most.
MAX_HEAD = 32768
MAX_HEADERS = 100
#: Time a client has to send its whole request head, and to take the response.
HEAD_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0
#: Admin connections served at once; more are closed at once. Scrapers and a few
#: browser tabs need a handful; the cap keeps a misbehaving client from piling up tasks.
MAX_CONNECTIONS = 64

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_TEXT = "text/plain; charset=utf-8"


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Response:
    def __init__(
        self,
        status: int,
        body: bytes | str,
        content_type: str = _TEXT,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.content_type = content_type
        self.headers = headers or {}


class AdminServer:
    """Serves one node's admin endpoint on `address` until closed."""

    def __init__(self, node: ListenNode | ConnectNode, address: Address, token: str | None) -> None:
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
        self._server: asyncio.Server | None = None
        self._address: Address | None = None
        self._tasks = TaskGroup()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._accepted,
                self._wanted.bind_host,
                self._wanted.port,
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
        for writer in list(self._writers):
            writer.transport.abort()
        await self._tasks.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # ---- connections -------------------------------------------------------------------

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._writers.add(writer)
        peer = writer.get_extra_info("peername")
        self._tasks.spawn(self._serve(reader, writer), f"admin request from {peer}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"
        try:
            try:
                async with asyncio.timeout(HEAD_TIMEOUT):
                    method, target, headers = await _read_head(reader)
                response = self._respond(method, target, headers, writer)
            except _BadRequest as exc:
                response = _Response(exc.status, f"{exc}\n")
            except TimeoutError:
                response = _Response(408, "request head not received in time\n")
            await self._send(writer, response, head_only=method == "HEAD")
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to tell anyone
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _send(
        self, writer: asyncio.StreamWriter, response: _Response, head_only: bool
    ) -> None:
        head = [
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Error')}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Connection: close",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            f"Server: tcpgc/{__version__}",
            *(f"{name}: {value}" for name, value in response.headers.items()),
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(response.body)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    # ---- routing -----------------------------------------------------------------------

    def _respond(
        self, method: str, target: str, headers: dict[str, str], writer: asyncio.StreamWriter
    ) -> _Response:
        if method not in ("GET", "HEAD"):
            return _Response(405, "only GET and HEAD\n", headers={"Allow": "GET, HEAD"})
        url = urlsplit(target)
        path = url.path
        if path == "/healthz":
            return self._health()
        if path not in ("/", "/status.json", "/metrics"):
            return _Response(404, "not found: try /, /status.json, /metrics or /healthz\n")
        query_token = parse_qs(url.query).get("token", [None])[0] if path == "/" else None
        if not self._authorized(headers.get("authorization"), query_token):
            # The path only, never the query: it may hold a (wrong) token.
            log.info(
                "admin: unauthorized request for %s from %s",
                path,
                writer.get_extra_info("peername"),
            )
            return _Response(
                401,
                "a bearer token is required: 'Authorization: Bearer TOKEN' "
                "(the status page also takes /?token=TOKEN)\n",
                headers={"WWW-Authenticate": 'Bearer realm="tcpgc admin"'},
            )
        if path == "/metrics":
            return _Response(200, generate_latest(self.node.metrics.registry), CONTENT_TYPE_LATEST)
        if path == "/status.json":
            return _Response(200, json.dumps(self.snapshot()), "application/json")
        nonce = secrets.token_urlsafe(16)
        return _Response(
            200,
            STATUS_PAGE.replace("{nonce}", nonce),
            "text/html; charset=utf-8",
            headers={
                # Only our own inline script and style run; the page talks only to us.
                "Content-Security-Policy": (
                    f"default-src 'none'; script-src 'nonce-{nonce}'; "
                    f"style-src 'nonce-{nonce}'; connect-src 'self'; img-src data:; "
                    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
                ),
                # The URL may carry ?token=: never send it on to anyone.
                "Referrer-Policy": "no-referrer",
                "X-Frame-Options": "DENY",
            },
        )

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

    def _health(self) -> _Response:
        reason = health_problem(self.node)
        if reason is None:
            return _Response(200, "ok\n")
        return _Response(503, f"unavailable: {reason}\n")

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


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    """Method, request target and headers (lower-cased names) of one request."""
    line = await _read_line(reader)
    size = len(line)
    parts = line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(505, "only HTTP/1.0 and HTTP/1.1")
    headers: dict[str, str] = {}
    while True:
        line = await _read_line(reader)
        size += len(line)
        if size > MAX_HEAD or len(headers) >= MAX_HEADERS:
            raise _BadRequest(431, "request head too large")
        if not line:
            return method, target, headers
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400, "malformed header line")
        headers[name.lower()] = value.strip()


async def _read_line(reader: asyncio.StreamReader) -> str:
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, "request line or header line too long") from None
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise _BadRequest(400, "incomplete request head") from None
        raise
    # Header values are ASCII in practice; latin-1 maps any byte without failing.
    return raw.decode("latin-1").rstrip("\r\n")
