"""The admin endpoint's status page: one self-contained HTML file (styles and script
inline, no external assets) that polls /status.json. `{nonce}` is replaced per response
with the Content-Security-Policy nonce."""

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
