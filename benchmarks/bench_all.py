"""``python -m benchmarks all``: every suite in one run, written up as one report with a plot.

Runs, in this order, each starting its own brokers (or taking the suites' ``MSGSTREAM_*_URL``):
``core`` (codec, memory backend, time-tick), ``redis``, ``kafka``, ``pulsar`` (the default unbatched
layout; ``python -m benchmarks pulsar`` adds the batched one), ``latency`` (msgstream and the raw
clients), ``scaling`` (message size, channels, time-tick vs plain on every backend) and ``peer``
(FastStream on Redis and Kafka). It writes ``<out>/benchmark-report.md`` (every suite's tables and
environment, with the command and the time each took) and ``<out>/benchmark-throughput-vs-size.png``,
plus the raw numbers as ``<out>/benchmark-report.json``. ``--seconds`` / ``--repeats`` reach every
suite that takes them (defaults here: 1 s, 3 repeats, chosen so that the whole run stays under 10
minutes on a 2-core machine).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.bench_core import clock
from benchmarks.report import progress, size_text

SUITES: list[tuple[str, dict[str, Any]]] = [
    ("core", {}),
    ("redis", {"url": os.environ.get("MSGSTREAM_REDIS_URL")}),
    ("kafka", {"url": os.environ.get("MSGSTREAM_KAFKA_URL")}),
    ("pulsar", {"url": os.environ.get("MSGSTREAM_PULSAR_URL"), "unbatched_only": True}),
    ("latency", {"rate": 500.0, "seconds": 1.0}),
    ("scaling", {}),
    ("peer", {}),
]


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    seconds: float = args.seconds
    sections: list[str] = []
    numbers: dict[str, Any] = {}
    started = clock()
    with tempfile.TemporaryDirectory(prefix="msgstream-bench-all-") as tmp:
        for name, extra in SUITES:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            json_path = Path(tmp) / f"{name}.json"
            suite_args = argparse.Namespace(**{"seconds": seconds, "repeats": args.repeats, "json": json_path, **extra})
            if name == "scaling":
                suite_args.plot = out / "benchmark-throughput-vs-size.png"
            progress(f"== {name}")
            t0 = clock()
            text = io.StringIO()
            with contextlib.redirect_stdout(text):
                try:
                    module.run(suite_args)
                except Exception as exc:  # the report says so; the other suites still run
                    print(f"\n**This suite failed:** `{type(exc).__name__}: {exc}`")
                    progress(f"{name} failed: {exc!r}")
            took = clock() - t0
            command = f"python -m benchmarks {name} --seconds {suite_args.seconds:g} --repeats {args.repeats}"
            if extra.get("unbatched_only"):
                command += " --unbatched-only"
            body = text.getvalue().replace("## ", "### ")
            sections.append(f"## {name}\n\n`{command}` ({took:.0f} s)\n\n{body.strip()}\n")
            numbers[name] = json.loads(json_path.read_text(encoding="utf-8")) if json_path.exists() else None
    total = clock() - started
    report = (
        "# Benchmark report\n\n"
        f"Written by `python -m benchmarks all` in {total / 60:.1f} minutes; docs/performance.md explains the"
        " figures, the targets and what was done about the misses.\n\n"
        "![throughput vs message size](benchmark-throughput-vs-size.png)\n\n" + "\n".join(sections)
    )
    (out / "benchmark-report.md").write_text(report, encoding="utf-8")
    (out / "benchmark-report.json").write_text(json.dumps(numbers, indent=1) + "\n", encoding="utf-8")
    write_summary(out / "performance.md", summary(numbers, total))
    progress(f"wrote {out / 'benchmark-report.md'} and the summary in {out / 'performance.md'} in {total:.0f} s")
    return 0


START, END = "<!-- benchmarks all: start -->", "<!-- benchmarks all: end -->"


def summary(numbers: dict[str, Any], total: float) -> str:
    """The targets at a glance, from the suites' JSON: what ``write_summary`` puts in performance.md."""
    lines = [
        f"Last `python -m benchmarks all`: {total / 60:.1f} minutes; full tables in"
        " [benchmark-report.md](benchmark-report.md), plot below.",
        "",
        "| Backend | Comparison | Row data | Figure | Target |",
        "|---|---|---:|---:|---|",
    ]

    def row(backend: str, what: str, size: str, figure: str, target: str = "") -> None:
        lines.append(f"| {backend} | {what} | {size} | {figure} | {target} |")

    def verdict(met: bool, target: str) -> str:
        return f"{target}: {'met' if met else 'MISSED'}"

    for backend in ("redis", "kafka", "pulsar"):
        for r in (numbers.get(backend) or {}).get("results", []):
            if r.get("target") is not None:
                what = f"{r['section']}: {r['name'].removeprefix('msgstream ')} vs {r['ratio_to']}"
                target = verdict(r["target_met"], f">= {r['target']:.2f}x")
                row(backend, what, size_text(r["row_bytes"]), f"{r['ratio']:.2f}x", target)
    for backend, r in ((numbers.get("scaling") or {}).get("results") or {}).items():
        ratio = r["timetick"]["ratio"]
        row(backend, "time-tick consume vs plain consume", "100 B", f"{ratio:.2f}x", verdict(ratio >= 0.8, ">= 0.80x"))
    for r in (numbers.get("core") or {}).get("results", []):
        if r["section"] == "codec" and r["name"] == "marshal+unmarshal" and r["row_bytes"] == 100:
            rate = r["msgs_per_s"]
            row("-", "codec marshal+unmarshal pairs/s", "100 B", f"{rate:,.0f}", verdict(rate >= 1e6, ">= 1,000,000"))
    peers: dict[str, float] = {}
    for r in (numbers.get("peer") or {}).get("results", []):
        # equal work only: FastStream's handler gets bytes, as consume_frames does; typed consume
        # also decodes every message (its row is in the report, not in this verdict)
        if r["vs_faststream"] is not None and "typed" not in r["side"]:
            peers[r["backend"]] = min(peers.get(r["backend"], float("inf")), r["vs_faststream"])
    for backend, factor in peers.items():
        row(
            backend,
            "msgstream vs FastStream, slowest equal-work case (typed consume: see the report)",
            "100 B, 1 KiB",
            f"{factor:.1f}x",
            verdict(factor > 1, "> 1x"),
        )
    latency = (numbers.get("latency") or {}).get("results", [])
    raw_p50 = {r["backend"]: r["p50_ms"] for r in latency if r["side"] == "raw"}
    for r in latency:
        if r["side"] == "msgstream":
            vs_raw = f"; raw client's p50 {raw_p50[r['backend']]:.2f}" if r["backend"] in raw_p50 else ""
            figure = f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}"
            row(r["backend"], f"latency p50 / p99 at 500 msgs/s (ms){vs_raw}", "100 B", figure)
    lines += ["", "![msgstream throughput vs message size](benchmark-throughput-vs-size.png)"]
    return "\n".join(lines)


def write_summary(path: Path, text: str) -> None:
    """Replace the block between the markers in ``path`` (appended, with the markers, if absent)."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{START}\n{text}\n{END}"
    if START in old and END in old:
        new = old[: old.index(START)] + block + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new, encoding="utf-8")
