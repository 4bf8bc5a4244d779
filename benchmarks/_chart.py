"""The chart of a benchmark run (docs/performance.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _report import LOOP_VARIANTS, ORDER, SHORT, _num, get


def chart(doc: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no chart (pip install matplotlib)")
        return False
    keys = [k for k in ORDER if k in doc["systems"] and k not in LOOP_VARIANTS]
    names = [SHORT[k] for k in keys]
    x = list(range(len(keys)))
    colors = {"direct": "#999999", "socat": "#d62728", "ssh": "#ff7f0e", "tls": "#1f77b4",
              "plain": "#2ca02c", "classic": "#9467bd", "haproxy": "#8c564b"}  # fmt: skip
    col = [colors[k] for k in keys]

    def val(k: str, *p: str) -> float:
        v = get(doc, k, *p)
        return float(v) if isinstance(v, int | float) else 0.0

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    ax = axes[0][0]
    w = 0.4
    one = [val(k, "iperf_1", "gbit_s") for k in keys]
    four = [val(k, "iperf_4", "gbit_s") for k in keys]
    ax.bar([i - w / 2 for i in x], one, w, color=col, label="1 stream")
    ax.bar([i + w / 2 for i in x], four, w, color=col, alpha=0.55, hatch="//", label="4 streams")
    for i, (a, b) in enumerate(zip(one, four, strict=True)):
        ax.text(i - w / 2, a, f"{a:.1f}" if a else "×", ha="center", va="bottom", fontsize=8)
        ax.text(i + w / 2, b, f"{b:.1f}" if b else "×", ha="center", va="bottom", fontsize=8)
    ax.set_title("iperf3 throughput (Gbit/s, higher is better; × = failed)")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    p50 = [val(k, "connect", "p50_ms") for k in keys]
    p99 = [val(k, "connect", "p99_ms") for k in keys]
    ax.bar([i - w / 2 for i in x], p50, w, color=col, label="p50")
    ax.bar([i + w / 2 for i in x], p99, w, color=col, alpha=0.55, hatch="//", label="p99")
    for i, (a, b) in enumerate(zip(p50, p99, strict=True)):
        ax.text(i - w / 2, a, _num(a), ha="center", va="bottom", fontsize=8)
        ax.text(i + w / 2, b, _num(b), ha="center", va="bottom", fontsize=8, rotation=0)
    ax.set_yscale("log")
    ax.set_title("new connection + 4-byte echo (ms, log scale, lower is better)")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    rate = [val(k, "rate", "per_s") for k in keys]
    ax.bar(x, [max(r, 0.1) for r in rate], color=col)
    for i, r in enumerate(rate):
        ax.text(i, max(r, 0.1), f"{r:,.0f}" if r >= 10 else f"{r:.2g}", ha="center",
                va="bottom", fontsize=8)  # fmt: skip
    ax.set_yscale("log")
    ax.set_title("new connections per second (connect + echo + close; log scale)")

    ax = axes[1][1]
    rss = [val(k, "hold", "rss_mb") for k in keys]
    usable = [get(doc, k, "hold", "usable") for k in keys]
    tried = [get(doc, k, "hold", "target") for k in keys]
    ax.bar(x, rss, color=col)
    for i, (r, u, t) in enumerate(zip(rss, usable, tried, strict=True)):
        label = f"{u:,}/{t:,} held" if u is not None else "–"
        mb = "not a tunnel" if keys[i] == "direct" else f"{r:.0f} MB"
        ax.text(i, r, f"{mb}\n{label}", ha="center", va="bottom", fontsize=8)
    ax.set_title("RSS of the system's own processes, connections held open")
    ax.set_ylim(0, max(rss + [1]) * 1.3)

    for row in axes:
        for a in row:
            a.set_xticks(x)
            a.set_xticklabels(names, rotation=20, fontsize=8)
            a.grid(axis="y", alpha=0.3)
    m = doc["machine"]
    fig.suptitle(
        f"tcpgc vs peers on loopback — {m['nproc']} × {m['cpu']}, Linux {m['kernel']}, "
        f"Python {m['python']} — {doc['started'][:10]}" + (" (quick)" if doc.get("quick") else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
