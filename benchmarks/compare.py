"""Two versions of tcpgc measured alternately, in one run, with run.py's figures.

    python benchmarks/compare.py --before ../old-checkout --after .   # ~25 min on 2 cores
    python benchmarks/compare.py --before ../old-checkout --quick     # a smoke run
    python benchmarks/compare.py --before ../old --systems plain,haproxy --rounds 5
    python benchmarks/compare.py --report benchmarks/results/compare-….json

Each tree is a checkout with its own src/: the tcpgc systems run from it
(PYTHONPATH=TREE/src, the interpreter running this script). Every round measures each
chosen system with "before", then with "after" (before/after/before/after...), so both
see the same machine in the same minutes. The systems without tcpgc (direct, the HAProxy
chain) are measured in both slots too: the same code on both sides, so their after ÷
before is the noise of this machine in this hour, the yardstick for tcpgc's.

Per system and figure the table gives each side's median and min–max over the rounds,
after ÷ before (of the medians, and the range of the per-round ratios), each side's
spread ((max − min) ÷ median), and a verdict: "worse" or "better" only when the two
sides' ranges do not overlap and the medians differ by 2 % or more, "~" otherwise. The
JSON and the table go to benchmarks/results/compare-*.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs  # noqa: E402
import run  # noqa: E402
from _report import SHORT, get  # noqa: E402
from _systems import ALL, ROOT, System, Tcpgc, classic_available, tcpgc_env, tcpgc_loop  # noqa: E402

DEFAULT_SYSTEMS = "plain,tls,haproxy,direct"
SIDES = ("before", "after")
#: a smaller difference of the medians is never called worse or better
MIN_CHANGE = 0.02

#: (label, path in a system's result, +1: higher is better, -1: lower is better)
FIGURES: list[tuple[str, tuple[str, str], int]] = [
    ("iperf3 1 stream, Gbit/s", ("iperf_1", "gbit_s"), 1),
    ("iperf3 4 streams, Gbit/s", ("iperf_4", "gbit_s"), 1),
    ("connect+echo p50, ms", ("connect", "p50_ms"), -1),
    ("connect+echo p99, ms", ("connect", "p99_ms"), -1),
    ("req/resp p50, ms", ("rr", "p50_ms"), -1),
    ("req/resp p99, ms", ("rr", "p99_ms"), -1),
    ("new conn/s", ("rate", "per_s"), 1),
    ("CPU ms/conn", ("rate", "cpu_ms_per_conn"), -1),
    ("1,000 at once: served", ("burst", "served"), 1),
    ("held: usable", ("hold", "usable"), 1),
    ("held: RSS, MB", ("hold", "rss_mb"), -1),
]


def tree_info(tree: Path) -> dict[str, Any]:
    """Where a tree's tcpgc is imported from (it must be the tree's own src/) and which
    commit the tree is at. ValueError when the tree has no src/tcpgc or it is not the
    one a tcpgc process would run."""
    src = tree.resolve() / "src"
    if not (src / "tcpgc" / "__init__.py").exists():
        raise ValueError(f"{tree}: no src/tcpgc in it")
    done = subprocess.run(
        [sys.executable, "-c", "import tcpgc; print(tcpgc.__file__)"],
        env=tcpgc_env(src=src), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    module = done.stdout.strip()
    if not module.startswith(str(src)):
        raise ValueError(f"{tree}: tcpgc is imported from {module or done.stderr!r}, not {src}")

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", "-C", str(tree), *args], capture_output=True,
                                 text=True, timeout=30, check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return out.stdout.strip() or "?"

    commit = git("log", "-1", "--format=%h %s")
    return {
        "path": str(tree.resolve()),
        "src": str(src),
        "commit": commit if len(commit) <= 72 else commit[:71] + "…",
        "src_modified": git("status", "--porcelain", "--", "src") not in ("", "?"),
    }


def values(runs: list[dict[str, Any]], path: tuple[str, str]) -> list[float]:
    out = []
    for res in runs:
        value = get({"systems": {"x": res}}, "x", *path)
        if isinstance(value, int | float):
            out.append(float(value))
    return out


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    """Per system and figure: each side's median, min, max, n; after ÷ before."""
    summary: dict[str, Any] = {}
    for key, entry in doc["systems"].items():
        rows = {}
        for label, path, better in FIGURES:
            if key == "direct" and path[0] == "hold" and path[1] == "rss_mb":
                continue  # no process of its own
            sides = {side: values(entry[side], path) for side in SIDES}
            if not any(sides.values()):
                continue
            row: dict[str, Any] = {"path": list(path), "better": better}
            for side, vals in sides.items():
                row[side] = (
                    {
                        "median": statistics.median(vals),
                        "min": min(vals),
                        "max": max(vals),
                        "n": len(vals),
                    }  # fmt: skip
                    if vals
                    else None
                )
            pairs = [
                (a, b)
                for a, b in zip(entry["before"], entry["after"], strict=False)
                if values([a], path) and values([b], path)
            ]
            ratios = [values([b], path)[0] / values([a], path)[0] for a, b in pairs
                      if values([a], path)[0]]  # fmt: skip
            row["round_ratios"] = ratios
            b, a = row["before"], row["after"]
            row["ratio"] = a["median"] / b["median"] if a and b and b["median"] else None
            row["verdict"] = verdict(b, a, better)
            rows[label] = row
        summary[key] = rows
    return summary


def verdict(before: dict[str, Any] | None, after: dict[str, Any] | None, better: int) -> str:
    """`worse` or `better` when the two ranges do not overlap and the medians differ by
    MIN_CHANGE or more, `~` otherwise."""
    if not before or not after:
        return "?"
    if before["n"] < 2 or after["n"] < 2:
        return "? (1 round)"  # no spread to judge against
    if before["median"] and abs(after["median"] / before["median"] - 1) < MIN_CHANGE:
        return "~"  # e.g. RSS steady to 1 %: disjoint ranges, but no change worth a word
    if after["min"] > before["max"]:
        return "better" if better > 0 else "worse"
    if after["max"] < before["min"]:
        return "worse" if better > 0 else "better"
    return "~"


def _n(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _side(s: dict[str, Any] | None, rounds: int) -> str:
    if not s:
        return "failed"
    missing = f" n={s['n']}" if s["n"] < rounds else ""
    return f"{_n(s['median'])} ({_n(s['min'])}–{_n(s['max'])}){missing}"


def _spread(s: dict[str, Any] | None) -> str:
    if not s or not s["median"]:
        return "–"
    return f"{(s['max'] - s['min']) / s['median']:.0%}"


def table(doc: dict[str, Any]) -> str:
    rounds = doc["rounds_done"]
    lines = [
        f"{side}: {t['path']} ({t['commit']}{', src/ modified' if t['src_modified'] else ''})"
        for side, t in ((side, doc[side]) for side in SIDES)
    ]
    lines += [
        f"{rounds} round(s); median (min–max) over the rounds; verdict: worse/better only "
        f"when the ranges do not overlap and the medians differ by {MIN_CHANGE:.0%} or more, "
        "~ otherwise.",
    ]
    if doc.get("stopped_early"):
        lines.append(f"Stopped early ({doc['stopped_early']}): fewer rounds than asked.")
    for key, rows in doc["summary"].items():
        same = not doc["systems"][key]["tcpgc"]
        note = " — same code both sides: after ÷ before is noise" if same else ""
        lines += [
            "",
            f"### {SHORT.get(key, key)}{note}",
            "",
            "| figure | before | after | after ÷ before | per round | spread before / after "
            "| verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, row in rows.items():
            ratio = "–" if row["ratio"] is None else f"{row['ratio']:.3f}"
            per = row["round_ratios"]
            per_round = f"{min(per):.2f}–{max(per):.2f}" if per else "–"
            lines.append(
                f"| {label} | {_side(row['before'], rounds)} | {_side(row['after'], rounds)} | "
                f"{ratio} | {per_round} | {_spread(row['before'])} / {_spread(row['after'])} | "
                f"{row['verdict']} |"
            )
    controls = [
        row["verdict"]
        for key, rows in doc["summary"].items()
        if not doc["systems"][key]["tcpgc"]
        for row in rows.values()
        if row["verdict"] in ("~", "worse", "better")
    ]
    if controls:
        flagged = sum(v in ("worse", "better") for v in controls)
        lines += [
            "",
            f"Noise check: with the same code on both sides, {flagged} of {len(controls)} "
            "figures got a worse/better verdict"
            + ("." if not flagged else ": read tcpgc's verdicts with as much doubt."),
        ]
    return "\n".join(lines)


def choose(spec: str, ap: argparse.ArgumentParser) -> list[type[System]]:
    keys = [k for k in spec.split(",") if k]
    known = {cls.key: cls for cls in ALL}
    unknown = [k for k in keys if k not in known]
    if unknown:
        ap.error(f"unknown systems: {', '.join(unknown)} (known: {', '.join(known)})")
    chosen = [known[k] for k in keys]
    if tcpgc_loop() == "asyncio":
        chosen = [c for c in chosen if not c.key.endswith("-asyncio")]
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, help="the older tree (has src/); required")
    ap.add_argument("--after", type=Path, default=ROOT, help="the newer tree (default: this one)")
    ap.add_argument("--systems", default=DEFAULT_SYSTEMS,
                    help=f"comma-separated, default {DEFAULT_SYSTEMS}")  # fmt: skip
    ap.add_argument("--rounds", type=int, help="before/after pairs per system (default 3, "
                    "--quick 2)")  # fmt: skip
    ap.add_argument("--quick", action="store_true",
                    help="run.py --quick's shorter figures, 2 rounds: a smoke run")  # fmt: skip
    ap.add_argument("--max-minutes", type=float, default=30.0,
                    help="start no new measurement after this (default 30): the table then "
                    "covers the rounds done")  # fmt: skip
    ap.add_argument("--quiet-limit", type=float, default=_procs.QUIET_LIMIT,
                    help="seconds to wait at most for an idle machine before each "
                    f"measurement (default {_procs.QUIET_LIMIT:.0f})")  # fmt: skip
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="measure nothing: print the table of an earlier comparison")  # fmt: skip
    args = ap.parse_args(argv)
    if args.report:
        doc = json.loads(args.report.read_text())
        doc["summary"] = summarize(doc)
        print(table(doc))
        return 0
    if args.before is None:
        ap.error("--before is required")
    rounds = args.rounds or (2 if args.quick else 3)
    if rounds < 1:
        ap.error("--rounds must be at least 1")
    chosen = choose(args.systems, ap)
    try:
        trees = {"before": tree_info(args.before), "after": tree_info(args.after)}
    except ValueError as exc:
        ap.error(str(exc))
    if any(c.key == "classic" for c in chosen) and not all(
        classic_available(Path(t["src"])) for t in trees.values()
    ):
        ap.error("one tree's tcpgc has no --classic")
    _procs.QUIET_LIMIT = args.quiet_limit

    run.ensure_tools()
    params = run.fit_nofile(run.QUICK if args.quick else run.FULL)
    started = datetime.datetime.now(datetime.UTC)
    doc: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": "python benchmarks/compare.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "before": trees["before"],
        "after": trees["after"],
        "quick": args.quick,
        "rounds": rounds,
        "rounds_done": 0,
        "params": params,
        "machine": run.machine(),
        "tcpgc_loop": tcpgc_loop(),
        "load_before": run.loadavg(),
        "systems": {
            c.key: {"label": c.label, "tcpgc": issubclass(c, Tcpgc), "before": [], "after": []}
            for c in chosen
        },
    }
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = run.RESULTS / f"compare-{started.strftime('%Y%m%d-%H%M%S')}.json"
    workdir = Path(tempfile.mkdtemp(prefix="tcpgc-compare-"))
    systems = {
        side: [
            cls(workdir / side, src=Path(trees[side]["src"]))
            if issubclass(cls, Tcpgc)
            else cls(workdir / side)
            for cls in chosen
        ]  # fmt: skip
        for side in SIDES
    }
    print(f"machine: {doc['machine']}\nload average: {doc['load_before']}", flush=True)
    for side in SIDES:
        print(f"{side}: {trees[side]['path']} ({trees[side]['commit']})", flush=True)
    t0 = time.monotonic()
    deadline = t0 + args.max_minutes * 60
    longest = 0.0  # the longest before+after pair so far: none is started that cannot end
    try:
        echo = run.start_echo(workdir)
        for rnd in range(1, rounds + 1):
            for i, cls in enumerate(chosen):
                if time.monotonic() + longest > deadline:
                    raise TimeoutError(f"--max-minutes {args.max_minutes:g} reached")
                p0 = time.monotonic()
                for side in SIDES:
                    system = systems[side][i]
                    quiet = _procs.wait_quiet()
                    print(
                        f"== round {rnd}/{rounds}: {system.label}, {side} "
                        f"(after {quiet:.1f} s waiting for an idle machine)",
                        flush=True,
                    )
                    s0 = time.monotonic()
                    res = run.measure_system(system, params, echo, workdir)
                    res["seconds"] = round(time.monotonic() - s0, 1)
                    res["round"] = rnd
                    doc["systems"][cls.key][side].append(res)
                    out_json.write_text(json.dumps(doc, indent=1))
                longest = max(longest, time.monotonic() - p0)
    except TimeoutError as exc:
        print(f"stopped early: {exc}", flush=True)
        doc["stopped_early"] = str(exc)
    finally:
        _procs.stop_all()
        doc["load_after"] = run.loadavg()
        doc["seconds"] = round(time.monotonic() - t0, 1)
        shutil.rmtree(workdir, ignore_errors=True)
    # a round cut short still counts for the systems it measured
    doc["rounds_done"] = max((len(e["before"]) for e in doc["systems"].values()), default=0)
    doc["summary"] = summarize(doc)
    out_json.write_text(json.dumps(doc, indent=1))
    text = table(doc)
    out_json.with_suffix(".md").write_text(text + "\n")
    print()
    print(text)
    print(f"\nwhole run: {doc['seconds']:.0f} s; load average before {doc['load_before']}, "
          f"after {doc['load_after']}")  # fmt: skip
    print(f"results: {out_json}")
    return 0


if __name__ == "__main__":
    _procs.run_script(main)
