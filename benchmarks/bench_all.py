"""``python -m benchmarks all``: every suite in one run, written up as one report with a plot.

Runs, in this order, each starting the brokers it needs through ``scripts/broker.py`` (or taking the
suites' ``MSGSTREAM_*_URL``): ``core`` (codec, memory backend, time-tick), ``redis``, ``kafka`` (Apache
Kafka), ``pulsar`` (Apache Pulsar, the default unbatched layout; ``python -m benchmarks pulsar`` adds the
batched one), ``latency`` (msgstream beside the raw clients), ``scaling`` (message size, channels,
time-tick vs plain on every backend), ``peer`` (FastStream on Redis and Kafka), ``aio`` (msgstream.aio
against the sync API on every backend), ``sqlite`` (sqlite:/// against raw sqlite3) and ``otel`` (the cost
of message properties and of the OpenTelemetry instrumentation). It writes
``<out>/benchmark-report.md`` (every suite's tables and environment, with the command and the time each
took), ``<out>/benchmark-throughput-vs-size.png``, the raw numbers as ``<out>/benchmark-report.json``,
and the summary block of ``<out>/performance.md`` (between its markers). ``--seconds`` / ``--repeats``
reach every suite that takes them (defaults here: 1 s, 3 repeats); the Pulsar suite's runs are three times
``--seconds``.
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
from benchmarks.report import progress

SUITES: list[tuple[str, dict[str, Any]]] = [
    ("core", {}),
    ("redis", {"url": os.environ.get("MSGSTREAM_REDIS_URL")}),
    ("kafka", {"url": os.environ.get("MSGSTREAM_KAFKA_URL")}),
    # runs 3x --seconds: a Pulsar round's pace moves with the broker's (±40% between rounds); in 1 s each side has
    # one or two rounds, and single runs spread too widely for a median of three to settle
    ("pulsar", {"url": os.environ.get("MSGSTREAM_PULSAR_URL"), "unbatched_only": True, "seconds_times": 3}),
    ("latency", {"rate": 500.0, "seconds": 1.0}),
    ("scaling", {}),
    ("peer", {}),
    ("aio", {}),
    ("sqlite", {"path": None}),
    ("otel", {}),
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
            suite_args.seconds *= extra.get("seconds_times", 1)
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
        f"Written by `python -m benchmarks all` in {total / 60:.1f} minutes; [performance.md](performance.md)"
        " explains the method and the targets.\n\n"
        "![throughput vs message size](benchmark-throughput-vs-size.png)\n\n" + "\n".join(sections)
    )
    (out / "benchmark-report.md").write_text(report, encoding="utf-8")
    (out / "benchmark-report.json").write_text(json.dumps(numbers, indent=1) + "\n", encoding="utf-8")
    write_summary(out / "performance.md", summary(numbers, total))
    progress(f"wrote {out / 'benchmark-report.md'} and the summary in {out / 'performance.md'} in {total:.0f} s")
    return 0


START, END = "<!-- benchmarks all: start -->", "<!-- benchmarks all: end -->"


BACKENDS = {"redis": "Redis", "kafka": "Apache Kafka", "pulsar": "Apache Pulsar", "memory": "memory://"}
# the comparisons of equal work that carry a target: (section, what msgstream does, its raw baseline)
COMPARISONS = [
    ("produce", "produce (typed messages in)", "raw + marshal"),
    ("consume", "consume_frames (bytes out)", "raw"),
    ("consume", "consume (typed messages out)", "raw + unmarshal"),
]


def _verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def _raw_rate(results: list[dict[str, Any]], r: dict[str, Any]) -> float | None:
    """The msgs/s of the raw row that target row ``r`` is divided by (same section and size)."""
    for x in results:
        if x["section"] != r["section"] or x["row_bytes"] != r["row_bytes"] or x["ratio_to"] is not None:
            continue
        name = x["name"]
        codec = name.endswith((", marshalling each message", " + unmarshal"))
        if name.startswith("raw") and codec == (r["ratio_to"] != "raw"):
            return float(x["msgs_per_s"])
    return None


def _target_row(results: list[dict[str, Any]], section: str, baseline: str, row_bytes: int) -> str:
    for r in results:
        if r["section"] == section and r["ratio_to"] == baseline and r["row_bytes"] == row_bytes:
            if r.get("target") is None:
                continue
            if section == "consume" and ("consume_frames" in r["name"]) != (baseline == "raw"):
                continue
            raw = _raw_rate(results, r)
            rates = f"{r['msgs_per_s']:,.0f} / {raw:,.0f}" if raw else f"{r['msgs_per_s']:,.0f} / ?"
            return f"{rates} | {r['ratio']:.2f}x {_verdict(r['target_met'])}"
    return "not measured | "


def summary(numbers: dict[str, Any], total: float) -> str:
    """The figures at a glance, from the suites' JSON: what ``write_summary`` puts in performance.md."""
    servers = []
    for backend in ("kafka", "pulsar", "redis"):
        server = ((numbers.get(backend) or {}).get("environment") or {}).get("server")
        if server:
            servers.append(server.split(", started for the run")[0].split(" (")[0])
    env: dict[str, Any] = next((n["environment"] for n in numbers.values() if n and n.get("environment")), {})
    lines = [
        f"Last `python -m benchmarks all`: {total / 60:.1f} minutes on {env.get('cpu', '?')},"
        f" {env.get('cores', '?')} cores, {env.get('python', '')}; brokers: {', '.join(servers) or 'given by URL'}."
        " Full tables and each suite's environment: [benchmark-report.md](benchmark-report.md).",
        "",
        "**Throughput against the raw client, equal work** (median msgs/s of msgstream / of the raw side, and"
        " the median of the per-run ratios; target at least 0.70x at 100 B, 0.85x at 1 KiB; Apache Pulsar in"
        " msgstream's default unbatched layout):",
        "",
        "| Backend | msgstream | raw client | 100 B: msgs/s | 100 B | 1 KiB: msgs/s | 1 KiB |",
        "|---|---|---|---:|---|---:|---|",
    ]
    for backend in ("redis", "kafka", "pulsar"):
        results = (numbers.get(backend) or {}).get("results") or []
        if not results:
            lines.append(f"| {BACKENDS[backend]} | suite failed or not run | | | | | |")
            continue
        for section, what, baseline in COMPARISONS:
            cells = " | ".join(_target_row(results, section, baseline, size) for size in (100, 1024))
            lines.append(f"| {BACKENDS[backend]} | {what} | {baseline} | {cells} |")
    scaling = (numbers.get("scaling") or {}).get("results") or {}
    if scaling:
        lines += [
            "",
            "**msgstream alone, every backend** (msgs/s, one channel, packs of up to 1000, typed messages in and"
            " out, a new subscription per run; from the scaling suite):",
            "",
            "| Backend | 100 B produce | 100 B consume | 1 KiB produce | 1 KiB consume |",
            "|---|---:|---:|---:|---:|",
        ]
        for backend, r in scaling.items():
            points = {p["row_bytes"]: p for p in r["size"]}
            rates = [
                f"{points[size][op]:,.0f}" if size in points and points[size][op] == points[size][op] else "-"
                for size in (100, 1024)
                for op in ("produce_msgs_s", "consume_msgs_s")
            ]
            lines.append(f"| {BACKENDS.get(backend, backend)} | {' | '.join(rates)} |")
    lines += [
        "",
        "**The other targets:**",
        "",
        "| Target | Backend | Figure | Verdict |",
        "|---|---|---:|---|",
    ]
    for r in (numbers.get("core") or {}).get("results", []):
        if r["section"] == "codec" and r["name"] == "marshal+unmarshal" and r["row_bytes"] == 100:
            rate = r["msgs_per_s"]
            lines.append(
                f"| codec: >= 1,000,000 marshal+unmarshal pairs/s (100 B row) | - | {rate:,.0f} |"
                f" {_verdict(rate >= 1e6)} |"
            )
    for backend, r in ((numbers.get("scaling") or {}).get("results") or {}).items():
        ratio = r["timetick"]["ratio"]
        lines.append(
            f"| time-tick consume >= 0.80x plain consume (100 B, 4 channels) | {BACKENDS.get(backend, backend)} |"
            f" {ratio:.2f}x | {_verdict(ratio >= 0.8)} |"
        )
    peers: dict[str, float] = {}
    for r in (numbers.get("peer") or {}).get("results", []):
        # equal work only: FastStream's handler gets bytes, as consume_frames does; typed consume
        # also decodes every message (its row is in the report, not in this verdict)
        if r["vs_faststream"] is not None and "typed" not in r["side"]:
            peers[r["backend"]] = min(peers.get(r["backend"], float("inf")), r["vs_faststream"])
    for backend, factor in peers.items():
        lines.append(
            f"| faster than FastStream (slowest equal-work case, 100 B and 1 KiB) | {BACKENDS.get(backend, backend)} |"
            f" {factor:.1f}x | {_verdict(factor > 1)} |"
        )
    latency = numbers.get("latency") or {}
    results = latency.get("results", [])
    if results:
        raw = {r["backend"]: r for r in results if r["side"] == "raw"}
        lines += [
            "",
            f"**Produce -> consume latency** (one 100 B message per pack at {latency.get('rate', 500):g} msgs/s, ms;"
            " raw: the broker's client with the backend's settings):",
            "",
            "| Backend | msgstream p50 | raw p50 | msgstream p99 | raw p99 |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in results:
            if r["side"] != "msgstream":
                continue
            b = raw.get(r["backend"])
            raw50, raw99 = (f"{b['p50_ms']:.2f}", f"{b['p99_ms']:.2f}") if b else ("-", "-")
            lines.append(
                f"| {BACKENDS.get(r['backend'], r['backend'])} | {r['p50_ms']:.2f} | {raw50} | {r['p99_ms']:.2f} |"
                f" {raw99} |"
            )
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
