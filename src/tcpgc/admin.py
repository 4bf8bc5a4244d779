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


# The status page: one file, no external assets. Data goes into the DOM through
# textContent only (never innerHTML), so nothing from the status can inject markup.
STATUS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>tcpgc status</title>
<link rel="icon" href="data:,">
<style nonce="{nonce}">
:root {
  --bg: #f4f6f9; --card: #fff; --ink: #18202e; --muted: #667085; --line: #e4e7ec;
  --ok: #12a150; --bad: #d92d20; --accent: #2f6fed; --chip: #eef3ff;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #0f141c; --card: #171e29; --ink: #e6e9ef; --muted: #98a2b3; --line: #273142;
    --ok: #32d583; --bad: #f97066; --accent: #7aa2ff; --chip: #1e2a40;
  }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
header { display: flex; align-items: center; gap: 14px; padding: 14px 28px;
  background: var(--card); border-bottom: 1px solid var(--line); }
header h1 { font-size: 18px; margin: 0; letter-spacing: .02em; }
.chip { background: var(--chip); color: var(--accent); border-radius: 999px; padding: 2px 10px;
  font-size: 12px; font-weight: 600; }
.ident { color: var(--muted); font-size: 13px; }
.spacer { flex: 1; }
.live { display: flex; align-items: center; gap: 8px; color: var(--muted); font-size: 13px; }
.dot { width: 9px; height: 9px; border-radius: 50%; background: var(--muted); }
.dot.ok { background: var(--ok);
  box-shadow: 0 0 0 3px color-mix(in srgb, var(--ok) 25%, transparent); }
.dot.bad { background: var(--bad); }
main { max-width: 1200px; margin: 0 auto; padding: 22px 28px 40px; }
.stats { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 14px; }
.stat { background: var(--card); border: 1px solid var(--line); border-radius: 12px;
  padding: 14px 18px; }
.stat .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .05em; }
.stat .value { font-size: 24px; font-weight: 650; margin-top: 4px;
  font-variant-numeric: tabular-nums; }
.stat .sub { color: var(--muted); font-size: 12px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 12px;
  margin-top: 18px; overflow: hidden; }
section h2 { font-size: 14px; margin: 0; padding: 12px 18px; border-bottom: 1px solid var(--line); }
section h2 .count { color: var(--muted); font-weight: 500; margin-left: 6px; }
table { width: 100%; border-collapse: collapse; }
th, td { padding: 8px 18px; text-align: left; white-space: nowrap; }
th { color: var(--muted); font-size: 11px; font-weight: 600; text-transform: uppercase;
  letter-spacing: .05em; background: color-mix(in srgb, var(--bg) 60%, var(--card)); }
td { border-top: 1px solid var(--line); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; }
.empty { color: var(--muted); padding: 14px 18px; }
.up { color: var(--ok); font-weight: 600; } .down { color: var(--bad); font-weight: 600; }
footer { color: var(--muted); font-size: 12px; text-align: center; padding: 0 0 24px; }
@media (max-width: 800px) { .stats { grid-template-columns: repeat(2, minmax(0, 1fr)); } }
</style>
</head>
<body>
<header>
  <h1>tcpgc</h1>
  <span class="chip" id="role">…</span>
  <span class="ident" id="ident"></span>
  <span class="spacer"></span>
  <span class="live"><span class="dot" id="dot"></span><span id="live">connecting…</span></span>
</header>
<main>
  <div class="stats">
    <div class="stat"><div class="label">Active connections</div>
      <div class="value" id="s-active">–</div><div class="sub" id="s-accepted"></div></div>
    <div class="stat"><div class="label">In (client → server)</div>
      <div class="value" id="s-in">–</div><div class="sub" id="s-in-total"></div></div>
    <div class="stat"><div class="label">Out (server → client)</div>
      <div class="value" id="s-out">–</div><div class="sub" id="s-out-total"></div></div>
    <div class="stat"><div class="label" id="s-peers-label">Agents</div>
      <div class="value" id="s-peers">–</div><div class="sub" id="s-peers-sub"></div></div>
  </div>
  <section><h2>Services<span class="count" id="c-services"></span></h2>
    <div id="services"></div></section>
  <section><h2><span id="peers-title">Agents</span><span class="count" id="c-peers"></span></h2>
    <div id="peers"></div></section>
  <section><h2>Connections<span class="count" id="c-connections"></span></h2>
    <div id="connections"></div></section>
</main>
<footer>Refreshes every second · throughput from byte counts between refreshes</footer>
<script nonce="{nonce}">
"use strict";
// The token (if the endpoint needs one) comes from ?token= and goes on in the header.
const token = new URLSearchParams(location.search).get("token");
const headers = token ? { Authorization: "Bearer " + token } : {};
const $ = (id) => document.getElementById(id);
let prev = null;

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0) : String(Math.round(n))) + " " + units[i];
}
function rate(n) { return n == null ? "–" : bytes(n) + "/s"; }
function duration(s) {
  if (s < 60) return s.toFixed(1) + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + " min " + Math.floor(s % 60) + " s";
  const h = Math.floor(m / 60);
  if (h < 48) return h + " h " + (m % 60) + " min";
  return Math.floor(h / 24) + " d " + (h % 24) + " h";
}
function cell(value, cls) {
  const td = document.createElement("td");
  if (value instanceof Node) td.append(value);
  else td.textContent = value == null ? "" : String(value);
  if (cls) td.className = cls;
  return td;
}
function badge(ok, yes, no) {
  const span = document.createElement("span");
  span.className = ok ? "up" : "down";
  span.textContent = ok ? yes : no;
  return span;
}
// columns: [label, (row) => value, class]; class "num" right-aligns, "mono" for addresses.
function table(id, columns, rows, empty) {
  const box = $(id);
  if (!rows.length) {
    const p = document.createElement("div");
    p.className = "empty";
    p.textContent = empty;
    box.replaceChildren(p);
    return;
  }
  const t = document.createElement("table");
  const head = t.createTHead().insertRow();
  for (const [label, , cls] of columns) {
    const th = document.createElement("th");
    th.textContent = label;
    if (cls === "num") th.className = "num";
    head.append(th);
  }
  const body = t.createTBody();
  for (const row of rows) {
    const tr = body.insertRow();
    for (const [, get, cls] of columns) tr.append(cell(get(row), cls));
  }
  box.replaceChildren(t);
}

// A connection has no id in the status: match it to the previous poll by its addresses
// and its age (a connection only gets older), so per-connection rates survive reordering.
function key(c) { return [c.service, c.client, c.ll, c.server].join("|"); }
function rates(conns, now) {
  const pool = new Map();
  if (prev) for (const c of prev.conns) {
    if (!pool.has(key(c))) pool.set(key(c), []);
    pool.get(key(c)).push(c);
  }
  for (const c of conns) {
    const candidates = pool.get(key(c)) || [];
    let best = -1;
    for (let i = 0; i < candidates.length; i++) {
      const aged = c.seconds - candidates[i].seconds;
      if (aged >= -0.1 && (best < 0 || aged < c.seconds - candidates[best].seconds)) best = i;
    }
    if (best >= 0) {
      const p = candidates.splice(best, 1)[0];
      const dt = (now - prev.t) / 1000;
      c.rate_in = Math.max(0, c.bytes_in - p.bytes_in) / dt;
      c.rate_out = Math.max(0, c.bytes_out - p.bytes_out) / dt;
    }
  }
}

function render(s, now) {
  const ll = s.role === "ll";
  const conns = s.connections || [];
  rates(conns, now);
  $("role").textContent = ll ? "LL · outside node" : "CC · agent";
  $("ident").textContent = (ll ? "agents connect to " + s.agent_address : "agent " + s.agent_id)
    + " · " + (s.tls ? "TLS 1.3" : "PLAINTEXT") + " · v" + s.version;
  document.title = "tcpgc " + s.role.toUpperCase() + " · " + conns.length + " connections";

  const t = s.totals || {};
  let rin = null, rout = null;
  if (prev && prev.totals) {
    const dt = (now - prev.t) / 1000;
    rin = Math.max(0, t.bytes_in - prev.totals.bytes_in) / dt;
    rout = Math.max(0, t.bytes_out - prev.totals.bytes_out) / dt;
  }
  $("s-active").textContent = conns.length;
  $("s-accepted").textContent = ll ? (t.clients_accepted || 0) + " clients accepted in all" : "";
  $("s-in").textContent = rate(rin);
  $("s-out").textContent = rate(rout);
  $("s-in-total").textContent = bytes(t.bytes_in || 0) + " in all";
  $("s-out-total").textContent = bytes(t.bytes_out || 0) + " in all";

  const services = s.services || [];
  $("c-services").textContent = services.length;
  if (ll) {
    table("services", [
      ["Service", (r) => r.name],
      ["Listening on", (r) => r.listen, "mono"],
      ["Agents", (r) => r.agents, "num"],
      ["Clients", (r) => r.clients, "num"],
    ], services, "No services.");
  } else {
    table("services", [
      ["Service", (r) => r.name],
      ["Server", (r) => r.server, "mono"],
    ], services, "No services.");
  }

  const peers = ll ? (s.agents || []) : (s.lls || []);
  $("peers-title").textContent = ll ? "Agents" : "LLs";
  $("s-peers-label").textContent = ll ? "Agents connected" : "LL sessions up";
  $("c-peers").textContent = peers.length;
  if (ll) {
    $("s-peers").textContent = peers.length;
    $("s-peers-sub").textContent = peers.length ? "" : "clients wait for an agent";
    table("peers", [
      ["Agent", (r) => r.id, "mono"],
      ["From", (r) => r.peer, "mono"],
      ["Services", (r) => (r.services || []).join(", ")],
      ["Connected for", (r) => duration(r.connected_for), "num"],
      ["Connections", (r) => r.connections, "num"],
    ], peers, "No agent connected.");
  } else {
    const up = peers.filter((p) => p.connected).length;
    $("s-peers").textContent = up + " / " + peers.length;
    $("s-peers-sub").textContent = up ? "" : "not connected to any LL";
    table("peers", [
      ["LL", (r) => r.address, "mono"],
      ["Session", (r) => badge(r.connected, "up", "down")],
    ], peers, "No LL configured.");
  }

  $("c-connections").textContent = conns.length;
  const columns = ll
    ? [["Client", (r) => r.client, "mono"], ["Service", (r) => r.service]]
    : [["LL", (r) => r.ll, "mono"], ["Server", (r) => r.server, "mono"]];
  table("connections", columns.concat([
    ["Bytes in", (r) => bytes(r.bytes_in), "num"],
    ["Bytes out", (r) => bytes(r.bytes_out), "num"],
    ["Rate in", (r) => rate(r.rate_in), "num"],
    ["Rate out", (r) => rate(r.rate_out), "num"],
    ["Duration", (r) => duration(r.seconds), "num"],
  ]), conns, "No active connection.");

  prev = { t: now, totals: t, conns };
}

function live(ok, text) {
  $("dot").className = "dot " + (ok ? "ok" : "bad");
  $("live").textContent = text;
}

async function poll() {
  try {
    const response = await fetch("status.json", { headers, cache: "no-store" });
    if (response.status === 401) throw new Error("unauthorized: open this page as /?token=TOKEN");
    if (!response.ok) throw new Error("status.json: HTTP " + response.status);
    render(await response.json(), performance.now());
    live(true, "live · " + new Date().toLocaleTimeString());
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (e) {
    live(false, e.message || String(e));
  } finally {
    setTimeout(poll, 1000);
  }
}
poll();
</script>
</body>
</html>
"""
