"""Tables and targets of the UDP section (udp.py)."""

from __future__ import annotations

from typing import Any

from _report import _f, _target

SHORT = {"direct": "direct", "tls": "tcpgc TLS", "plain": "tcpgc plaintext"}
TUNNELS = ("tls", "plain")
#: datagrams/s of 64 B through the tunnel, one flow; loss at 10,000/s
RATE_TARGET = 50_000.0
LOSS_TARGET = 0.01


def brief(res: dict[str, Any]) -> str:
    wall = f"[{res.get('wall_s', 0):.0f} s]"
    if res.get("error"):
        return f"ERROR {res['error']} {wall}"
    cpu = res.get("cpu", {})
    cpus = ", ".join(f"{role} {c['pct']:.0f} %" for role, c in cpu.items())
    if res.get("other_cpu_pct") is not None:
        cpus += f", others {res['other_cpu_pct']:.0f} %, host {res['host_cpu_pct']:.0f} %"
    drops = {k: v for k, v in res.get("kernel_drops", {}).items() if v}
    tcpgc = {f"{node} {k}": v for node, d in res.get("tcpgc", {}).items()
             for k, v in d.items() if k.startswith("drops")}  # fmt: skip
    extra = "".join(f"; {label} {d}" for label, d in (("kernel drops", drops),
                                                       ("tcpgc drops", tcpgc)) if d)  # fmt: skip
    if "per_s" in res:
        flat = f" (sent {_f(res['sent_per_s'])}/s)" if not res.get("window") else ""
        return (f"{_f(res['per_s'])} echoes/s{flat}, {res['flows']} flow(s) of "
                f"{res['size']} B; CPU {cpus}{extra} {wall}")  # fmt: skip
    if "loss" in res:
        rtt = res["rtt"]
        return (f"{res['sent']:,} sent at {res['rate']:,.0f}/s, loss {_pct(res['loss'])}, "
                f"RTT p50 {_f(rtt['p50_ms'], 3)} / p99 {_f(rtt['p99_ms'], 3)} ms; "
                f"CPU {cpus}{extra} {wall}")  # fmt: skip
    socks = res.get("sockets")
    held = f"; sockets held: {', '.join(f'{r} {n}' for r, n in socks.items())}" if socks else ""
    return (f"p50 {_f(res['p50_ms'], 3)} ms, p99 {_f(res['p99_ms'], 3)} ms, n={res['n']}, "
            f"lost {res['lost']}{extra}{held} {wall}")  # fmt: skip


def _pct(loss: float | None) -> str:
    return "–" if loss is None else f"{loss * 100:.2f} %"


def _get(doc: dict[str, Any], key: str, fig: str, *path: str) -> Any:
    node: Any = doc["systems"].get(key, {}).get(fig)
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key in TUNNELS:
        if key not in doc["systems"]:
            continue
        who = SHORT[key]
        out.append(_target(f"{who}: ≥ {RATE_TARGET:,.0f} datagrams/s of 64 B (one flow)",
                           _get(doc, key, "flood_64", "per_s"), ">=", RATE_TARGET))  # fmt: skip
        loss = _get(doc, key, "paced_10k", "loss")
        out.append(_target(f"{who}: < 1 % loss at 10,000/s of 64 B",
                           None if loss is None else loss * 100, "<=", LOSS_TARGET * 100,
                           " %"))  # fmt: skip
    return out


def _rate(res: dict[str, Any] | None, size: int) -> str:
    if not res:
        return "–"
    if res.get("per_s") is None:
        return "failed"
    mbit = f" ({res['per_s'] * size * 8 / 1e6:,.0f} Mbit/s)" if size > 64 else ""
    return f"{res['per_s']:,.0f}{mbit}"


def _lat(res: dict[str, Any] | None) -> str:
    if not res or res.get("p50_ms") is None:
        return "failed" if res else "–"
    lost = f" ({res['lost']} lost)" if res.get("lost") else ""
    return f"{res['p50_ms']:.3f} / {res['p99_ms']:.3f} ms{lost}"


def _loss(res: dict[str, Any] | None) -> str:
    if not res or res.get("loss") is None:
        return "failed" if res else "–"
    return f"{_pct(res['loss'])} (p99 RTT {res['rtt']['p99_ms']:.2f} ms)"


def _ratio(a: Any, b: Any) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}×"


def tables(doc: dict[str, Any]) -> str:
    keys = [k for k in SHORT if k in doc["systems"]]
    p = doc["params"]
    n = p["flows"]
    lines = [
        f"| UDP | 64 B/s, 1 flow | 1,400 B/s, 1 flow | 64 B/s, {n} flows | 1,400 B/s, {n} "
        "flows | 64 B flat out: sent → echoed/s | loss at 10,000/s | loss at 50,000/s | "
        "RTT p50 / p99 | new flow p50 / p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in keys:
        s = doc["systems"][k]
        flat = s.get("open_64") or {}
        lines.append("| " + " | ".join([
            SHORT[k], _rate(s.get("flood_64"), 64), _rate(s.get("flood_1400"), 1400),
            _rate(s.get("flood_64_n"), 64), _rate(s.get("flood_1400_n"), 1400),
            f"{_f(flat.get('sent_per_s'))} → {_f(flat.get('per_s'))}" if flat else "–",
            _loss(s.get("paced_10k")), _loss(s.get("paced_50k")), _lat(s.get("rtt")),
            _lat(s.get("newflow")),
        ]) + " |")  # fmt: skip
    if "direct" in doc["systems"]:
        lines += ["", f"| ÷ direct (same run) | 64 B, 1 flow | 1,400 B, 1 flow | 64 B, {n} "
                  f"flows | 1,400 B, {n} flows | 64 B flat out | RTT p50 | RTT p99 |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for k in keys:
            if k == "direct":
                continue
            cells = [_ratio(_get(doc, k, fig, *path), _get(doc, "direct", fig, *path))
                     for fig, path in (("flood_64", ("per_s",)), ("flood_1400", ("per_s",)),
                                       ("flood_64_n", ("per_s",)), ("flood_1400_n", ("per_s",)),
                                       ("open_64", ("per_s",)), ("rtt", ("p50_ms",)),
                                       ("rtt", ("p99_ms",)))]  # fmt: skip
            lines.append(f"| {SHORT[k]} | {' | '.join(cells)} |")
    lines += [
        "",
        "| CPU (% of one core; µs per echoed datagram) | figure | LL | CC | echo server "
        "| generator | others on the host | host busy (all CPUs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in keys:
        for fig in ("flood_64", "flood_1400", "flood_64_n", "open_64", "paced_10k", "paced_50k"):
            cpu = _get(doc, k, fig, "cpu")
            if not cpu:
                continue

            def cell(role: str, cpu: dict[str, Any] = cpu) -> str:
                c = cpu.get(role)
                if not c:
                    return "–"
                us = f" ({c['us_per_datagram']:.1f} µs)" if "us_per_datagram" in c else ""
                return (
                    f"{c['pct']:.0f} % (sys {c['sys_s'] / (c['user_s'] + c['sys_s'] or 1):.0%}){us}"
                )

            other = _get(doc, k, fig, "other_cpu_pct")
            others = "–" if other is None else f"{other:.0f} %"
            lines.append(f"| {SHORT[k]} | {fig} | {cell('LL')} | {cell('CC')} | {cell('echo')} "
                         f"| {cell('load')} | {others} "
                         f"| {_get(doc, k, fig, 'host_cpu_pct') or 0:.0f} % |")  # fmt: skip
    drops = ["", "| where datagrams were dropped | figure | kernel (socket buffers) | tcpgc "
             "counters |", "|---|---|---|---|"]  # fmt: skip
    for k in keys:
        for fig, res in doc["systems"][k].items():
            if not isinstance(res, dict):
                continue
            kern = ", ".join(f"{r} {v:,}" for r, v in res.get("kernel_drops", {}).items() if v)
            own = ", ".join(f"{node} {name} {v:,.0f}" for node, d in res.get("tcpgc", {}).items()
                            for name, v in d.items() if name.startswith("drops"))  # fmt: skip
            if kern or own:
                drops.append(f"| {SHORT[k]} | {fig} | {kern or '–'} | {own or '–'} |")
    if len(drops) > 3:
        lines += drops
    tl = ["", "| target | result | value | margin |", "|---|---|---|---|"]
    for t in doc.get("targets", []):
        value = t["value"]
        shown = "–" if value is None else f"{value:,.3g}" if value < 100 else f"{value:,.0f}"
        tl.append(f"| {t['target']} | **{t['status']}** | {shown} | {t['margin']} |")
    return "\n".join(lines + tl)
