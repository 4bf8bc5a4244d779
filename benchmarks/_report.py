"""Tables and targets of a benchmark run (the chart is _chart.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ORDER = [
    "direct",
    "socat",
    "ssh",
    "haproxy",
    "tls",
    "plain",
    "classic",
    "tls-asyncio",
    "plain-asyncio",
]
#: measured for a few figures only, to compare event loops: tables, not the chart
LOOP_VARIANTS = {"tls-asyncio": "tls", "plain-asyncio": "plain"}
SHORT = {
    "direct": "direct",
    "socat": "socat pair",
    "ssh": "ssh -R",
    "haproxy": "HAProxy 2-hop",
    "tls": "tcpgc TLS",
    "plain": "tcpgc plaintext",
    "classic": "tcpgc classic",
    "tls-asyncio": "tcpgc TLS (asyncio loop)",
    "plain-asyncio": "tcpgc plaintext (asyncio loop)",
}


def get(doc: dict[str, Any], system: str, *path: str) -> Any:
    node: Any = doc.get("systems", {}).get(system)
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _f(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}{suffix}"
        if abs(value) >= 10:
            return f"{value:.1f}{suffix}"
        return f"{value:.{digits}f}{suffix}"
    return f"{value:,}{suffix}" if isinstance(value, int) else f"{value}{suffix}"


def brief(name: str, res: dict[str, Any]) -> str:
    wall = f"[{res.get('wall_s', 0):.0f} s]"
    if res.get("error") and name != "rr":
        return f"ERROR {res['error']} {wall}"
    if name.startswith("iperf"):
        return f"{_f(res.get('gbit_s'))} Gbit/s {wall}"
    if name in ("connect", "rr"):
        extra = f", {res.get('failed', 0)} failed {res.get('errors')}" if res.get("failed") else ""
        err = f" error {res['error']}" if res.get("error") else ""
        return (
            f"p50 {_f(res.get('p50_ms'), 3)} ms, p99 {_f(res.get('p99_ms'), 3)} ms, "
            f"n={res.get('n')}{extra}{err} {wall}"
        )
    if name == "rate":
        failed = f"{res['failed']} failed {res['errors']}"
        return f"{_f(res.get('per_s'))}/s ({res['ok']} ok, {failed}) {wall}"
    if name == "burst":
        served = f"{res['served']}/{res['clients']} served in {res['seconds']:.1f} s"
        return f"{served} {res['errors'] or ''} {wall}"
    if name == "hold":
        return (
            f"{res['usable']} usable of {res['opened']} opened ({res['target']} tried), "
            f"RSS {_f(res.get('rss_mb'))} MB, {_f(res.get('kb_per_conn'))} KB/conn, "
            f"pipes {res.get('pipe_fds')}, open errors {res['open_errors'] or '-'} {wall}"
        )
    return str(res)


# ---------------------------------------------------------------- targets


def _target(name: str, value: float | None, op: str, threshold: float | None, unit: str = "",
            note: str = "") -> dict[str, Any]:  # fmt: skip
    if value is None or threshold is None:
        return {"target": name, "status": "n/a", "value": value, "threshold": threshold,
                "margin": note or "not measured"}  # fmt: skip
    ok = value >= threshold if op == ">=" else value <= threshold
    if op == ">=":
        margin = f"{(value / threshold - 1) * 100:+.0f} %" if threshold else ""
    else:
        margin = (
            f"{threshold - value:+.3g}{unit} headroom"
            if ok
            else f"over by {value - threshold:.3g}{unit}"
        )
    return {
        "target": name,
        "status": "PASS" if ok else "MISS",
        "value": value,
        "threshold": threshold,
        "margin": margin + (f"; {note}" if note else ""),
    }


def _ratio_target(doc: dict[str, Any], name: str, a: str, b: str, path: tuple[str, ...],
                  factor: float) -> dict[str, Any]:  # fmt: skip
    va, vb = get(doc, a, *path), get(doc, b, *path)
    if a not in doc["systems"] or b not in doc["systems"]:
        return _target(name, None, ">=", None, note="system not run")
    if va is not None and vb is None:
        return {"target": name, "status": "PASS", "value": None, "threshold": factor,
                "margin": f"{SHORT[b]} failed this measurement ({SHORT[a]}: {va:.2f})"}  # fmt: skip
    ratio = va / vb if va is not None and vb else None
    return _target(name, ratio, ">=", factor, "×")


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for streams, key in (("1 stream", "iperf_1"), ("4 streams", "iperf_4")):
        out.append(_ratio_target(doc, f"plaintext throughput ≥ 2.5 × socat pair ({streams})",
                                 "plain", "socat", (key, "gbit_s"), 2.5))  # fmt: skip
        out.append(_ratio_target(doc, f"plaintext throughput ≥ 60 % of direct ({streams})",
                                 "plain", "direct", (key, "gbit_s"), 0.6))  # fmt: skip
        out.append(_ratio_target(doc, f"TLS throughput ≥ 1.2 × ssh -R ({streams})",
                                 "tls", "ssh", (key, "gbit_s"), 1.2))  # fmt: skip
    direct_p50 = get(doc, "direct", "connect", "p50_ms")
    for key in ("plain", "tls"):
        if key not in doc["systems"]:
            continue
        who = SHORT[key]
        out.append(_target(f"{who}: connect + echo p50 ≤ direct + 0.3 ms",
                           get(doc, key, "connect", "p50_ms"), "<=",
                           None if direct_p50 is None else direct_p50 + 0.3, " ms"))  # fmt: skip
        out.append(_target(f"{who}: connect + echo p99 ≤ 2 ms",
                           get(doc, key, "connect", "p99_ms"), "<=", 2.0, " ms"))  # fmt: skip
        clients = get(doc, key, "burst", "clients")
        out.append(_target(f"{who}: {clients or 1000} clients at once, all served",
                           get(doc, key, "burst", "served"), ">=", clients))  # fmt: skip
        tried = get(doc, key, "hold", "target")
        out.append(_target(f"{who}: {tried or 8000} connections held, all usable",
                           get(doc, key, "hold", "usable"), ">=", tried))  # fmt: skip
        limit = 200.0 if key == "plain" else 400.0
        out.append(_target(f"{who}: LL+CC RSS with {tried or 8000} held < {limit:.0f} MB",
                           get(doc, key, "hold", "rss_mb"), "<=", limit, " MB"))  # fmt: skip
        rate = 3000.0 if key == "plain" else 1000.0
        out.append(_target(f"{who}: ≥ {rate:,.0f} new tunneled connections/s",
                           get(doc, key, "rate", "per_s"), ">=", rate))  # fmt: skip
        if key == "plain":
            out.append(_target(f"{who}: pipe fds of LL+CC with {tried or 8000} idle ≤ 1,000 "
                               f"(one pair per connection would be {2 * (tried or 8000):,})",
                               get(doc, key, "hold", "pipe_fds"), "<=", 1000.0))  # fmt: skip
    return out


# ---------------------------------------------------------------- tables


def _num(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _ratio(a: Any, b: Any) -> str:
    if a is None or not b:
        return "–" if a is None or b is None else "∞"
    return f"{a / b:.2f}×"


def _diff(a: Any, b: Any) -> str:
    return "–" if a is None or b is None else f"{a - b:+.2f} ms"


def tables(doc: dict[str, Any]) -> str:
    keys = [k for k in ORDER if k in doc["systems"]]
    lines = [
        "| system | iperf3 1 stream | iperf3 4 streams | connect+echo p50 / p99 | "
        "req/resp p50 / p99 | new conn/s | CPU ms/conn | 1,000 at once | held usable / tried | "
        "RSS held | KB/conn | pipe fds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in keys:
        s = doc["systems"][k]

        def gb(name: str, s: dict[str, Any] = s) -> str:
            res = s.get(name) or {}
            if res.get("gbit_s") is not None:
                return f"{res['gbit_s']:.2f} Gbit/s"
            return "failed" if res else "–"

        def lat(name: str, s: dict[str, Any] = s) -> str:
            res = s.get(name) or {}
            if not res.get("n"):
                return "failed" if res else "–"
            fails = f" ({res['failed']} failed)" if res.get("failed") else ""
            n = f" n={res['n']}" if res["n"] < 100 else ""
            return f"{_f(res['p50_ms'], 2)} / {_f(res['p99_ms'], 2)} ms{n}{fails}"

        rate = s.get("rate") or {}
        burst = s.get("burst") or {}
        hold = s.get("hold") or {}
        lines.append(
            "| "
            + " | ".join(
                [
                    SHORT[k],
                    gb("iperf_1"),
                    gb("iperf_4"),
                    lat("connect"),
                    lat("rr"),
                    _f(rate.get("per_s"))
                    + (f" ({rate['failed']} failed)" if rate.get("failed") else ""),
                    _f(rate.get("cpu_ms_per_conn"), 2),
                    f"{burst['served']:,}" if "served" in burst else "–",
                    f"{hold['usable']:,} / {hold['target']:,}" if "usable" in hold else "–",
                    ("–" if k == "direct" else f"{hold['rss_mb']:.0f} MB")
                    if "rss_mb" in hold
                    else "–",
                    ("–" if k == "direct" else _f(hold.get("kb_per_conn_over_idle"), 1))
                    if hold
                    else "–",
                    str(hold.get("pipe_fds")) if hold.get("pipe_fds") is not None else "–",
                ]
            )
            + " |"
        )

    def v(k: str, *path: str) -> Any:
        return get(doc, k, *path)

    rl = [
        "",
        "| ratio (same run) | iperf3 1 stream | iperf3 4 streams | new conn/s | held usable |",
        "|---|---|---|---|---|",
    ]
    for a, b in (("plain", "socat"), ("plain", "haproxy"), ("plain", "direct"), ("tls", "ssh"),
                 ("tls", "haproxy"), ("tls", "direct"), ("classic", "socat")):  # fmt: skip
        if a in doc["systems"] and b in doc["systems"]:
            held = "–" if b == "direct" else _ratio(v(a, "hold", "usable"), v(b, "hold", "usable"))
            cells = [
                _ratio(v(a, *path), v(b, *path))
                for path in (("iperf_1", "gbit_s"), ("iperf_4", "gbit_s"), ("rate", "per_s"))
            ]
            rl.append(f"| {SHORT[a]} ÷ {SHORT[b]} | {' | '.join(cells)} | {held} |")
    anchored = [a for a in ("plain", "tls") if a in doc["systems"]]
    if "haproxy" in doc["systems"] and anchored:
        # the same two hops with the best C relay and no tunnel logic: the practical limit
        rl += [
            "",
            f"| ÷ {SHORT['haproxy']} (time, CPU, memory: above 1× is slower or larger) "
            "| connect+echo p50 | connect+echo p99 | req/resp p50 | CPU ms/conn | RSS held |",
            "|---|---|---|---|---|---|",
        ]
        for a in anchored:
            cells = [
                _ratio(v(a, *path), v("haproxy", *path))
                for path in (
                    ("connect", "p50_ms"),
                    ("connect", "p99_ms"),
                    ("rr", "p50_ms"),
                    ("rate", "cpu_ms_per_conn"),
                    ("hold", "rss_mb"),
                )  # fmt: skip
            ]
            rl.append(f"| {SHORT[a]} | {' | '.join(cells)} |")
    variants = [(k, base) for k, base in LOOP_VARIANTS.items()
                if k in doc["systems"] and base in doc["systems"]]  # fmt: skip
    if variants:
        loop = doc.get("tcpgc_loop", "uvloop")
        rl += [
            "",
            f"| {loop} ÷ asyncio loop | new conn/s | CPU ms/conn | connect+echo p50 | "
            "connect+echo p99 |",
            "|---|---|---|---|---|",
        ]
        for k, base in variants:
            cells = [
                _ratio(v(base, *path), v(k, *path))
                for path in (
                    ("rate", "per_s"),
                    ("rate", "cpu_ms_per_conn"),
                    ("connect", "p50_ms"),
                    ("connect", "p99_ms"),
                )  # fmt: skip
            ]
            rl.append(f"| {SHORT[base]} | {' | '.join(cells)} |")
    if "direct" in doc["systems"]:
        rl += [
            "",
            "| latency vs direct | connect+echo p50 | connect+echo p99 "
            "| req/resp p50 | req/resp p99 | LL and CC on one CPU (connect+echo) |",
            "|---|---|---|---|---|---|",
        ]
        for k in keys:
            if k == "direct":
                continue
            cells = [
                _diff(v(k, name, q), v("direct", name, q))
                for name in ("connect", "rr")
                for q in ("p50_ms", "p99_ms")
            ]
            shared = v(k, "connect", "ll_cc_same_cpu")
            cells.append("–" if shared is None else f"{shared:.0%} of samples")
            rl.append(f"| {SHORT[k]} | {' | '.join(cells)} |")
    tl = ["", "| target | result | value | margin |", "|---|---|---|---|"]
    for t in doc.get("targets", []):
        value = t["value"]
        shown = (
            "–" if value is None else (_num(value) if isinstance(value, float) else f"{value:,}")
        )
        tl.append(f"| {t['target']} | **{t['status']}** | {shown} | {t['margin']} |")
    return "\n".join(lines + rl + tl)


# ---------------------------------------------------------------- docs


BEGIN = "<!-- results:begin (written by benchmarks/run.py) -->"
END = "<!-- results:end -->"


def update_doc(path: Path, doc: dict[str, Any], tables_md: str) -> bool:
    """Replace the generated block of docs/performance.md, leaving the prose alone."""
    if not path.exists():
        return False
    text = path.read_text()
    if BEGIN not in text or END not in text:
        return False
    m = doc["machine"]
    block = (
        f"{BEGIN}\n"
        f"Run of {doc['started']} (`{doc['command']}`, {doc['seconds']:.0f} s): "
        f"{m['nproc']} × {m['cpu']}, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}; {m['socat']}; {m['openssh']}; {m['iperf3']}; "
        f"{m.get('haproxy', 'HAProxy ?')}; "
        f"tcpgc on {doc.get('tcpgc_loop', 'asyncio')}. "
        f"Load average before {doc['load_before']}, after {doc['load_after']}.\n\n"
        f"{tables_md}\n{END}"
    )
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    path.write_text(new)
    return True
