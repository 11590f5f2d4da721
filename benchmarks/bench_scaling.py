"""Scaling benchmark: msgstream throughput as messages grow and as channels grow, and the time-tick
stream against plain consume, on every backend.

``python -m benchmarks scaling [--seconds S] [--repeats N] [--json PATH]``

For each backend (memory://, and Redis, Apache Kafka and Apache Pulsar started for the run through
``scripts/broker.py``, as the other suites start them, or the brokers ``MSGSTREAM_*_URL`` name), with
one-row ``InsertMsg``:

1. size: 100 B, 1 KiB, 16 KiB and 256 KiB of row data on one channel;
2. channels: 1, 4, 16 and 64 channels at 1 KiB (row i has hash value i, so the default repack spreads the rows evenly);

each point produces a bounded batch (at most ``MAX_MSGS`` messages or ``MAX_BYTES`` of frames, packs
of up to 1000) and consumes it with a new subscription (``consume``, typed messages, at least 8 packs
of at most 1000). The first pack a consumer returns is not timed (it carries a Kafka group join or a
Pulsar subscribe). Each figure is the median of ``--repeats`` runs. A point whose consumer gets nothing
for ``TIMEOUT`` seconds is reported as not measured (its reason is listed under the tables).

3. time-tick: 100 B rows over 4 channels with a tick after every 1000 (``bench_core``'s time-tick
   rounds, on this backend): ``TimeTickStream.consume`` against plain ``MsgStream.consume`` of the same
   messages, the ratio per run, median reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import msgstream as ms
from benchmarks.bench_core import bench_timetick, clock, environment, insert_msg, print_environment, timed_drain
from benchmarks.report import progress, size_text

SIZES = (100, 1024, 16384, 262144)
CHANNELS = (1, 4, 16, 64)
MAX_MSGS = 5_000
MAX_BYTES = 8 * 2**20
PACK = 1000
TIMEOUT = 10.0  # a consume that returns nothing for this long means a bug, not a slow machine
STALLS: list[str] = []  # the points that could not be measured, and why


class Stalled(RuntimeError):
    pass


def point(client: ms.Client, row_bytes: int, n_channels: int) -> dict[str, float]:
    """One run: produce a bounded batch, then consume it; msgs/s of each."""
    row = os.urandom(row_bytes)
    frame_bytes = len(insert_msg(0, 1, row).marshal())
    n = max(n_channels * 2, min(MAX_MSGS, MAX_BYTES // frame_bytes))
    pack_size = min(PACK, n)
    owner = ms.OwnerDescription(role="bench", description_text="benchmarks.bench_scaling")
    channels = client.create_channels(ms.CreateChannelRequest(owner=owner, num_channels=n_channels))
    try:
        ts = ms.timestamp.now()
        packs = [
            ms.MsgPack.of([insert_msg(i, ts + i, row) for i in range(j, min(n, j + pack_size))])
            for j in range(0, n, pack_size)
        ]
        with client.msg_stream() as out:
            out.create_producers(channels)
            gc.collect()
            t0 = clock()
            for pack in packs:
                out.produce(pack)
            t_produce = clock() - t0
        # the first pack is not timed: at least 8 packs, so that large messages leave something to time
        with client.msg_stream(receive_batch=max(1, min(PACK, n // 8))) as inp:
            inp.create_consumers(f"scale-{os.urandom(4).hex()}", channels)
            timed, t_consume = timed_drain(inp, n, client.url, TIMEOUT, Stalled)
    finally:
        client.destroy_channels(channels)
    return {
        "messages": n,
        "frame_bytes": frame_bytes,
        "produce_msgs_s": n / t_produce,
        "consume_msgs_s": timed / t_consume if timed > 0 else float("nan"),
    }


def _median(make: Callable[[], dict[str, float]], repeats: int) -> dict[str, float]:
    """Median of ``repeats`` runs of a point; a point whose consumer stalled is reported as NaN (the stall
    is listed under the tables), not dropped and not fatal to the other points."""
    try:
        runs = [make() for _ in range(repeats)]
    except Stalled as exc:
        STALLS.append(str(exc))
        return {
            "messages": float("nan"),
            "frame_bytes": float("nan"),
            "produce_msgs_s": float("nan"),
            "consume_msgs_s": float("nan"),
        }
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def measure_backend(url: str, seconds: float, repeats: int) -> dict[str, Any]:
    """Every scaling point and the time-tick ratio of one backend."""
    out: dict[str, Any] = {"size": [], "channels": []}
    with ms.connect(url) as client:
        point(client, 100, 1)  # warm-up: connections, first topic, first subscription
        for row_bytes in SIZES:
            progress(f"  size {size_text(row_bytes)} ...")
            r = _median(partial(point, client, row_bytes, 1), repeats)
            out["size"].append({"row_bytes": row_bytes, **r})
        for n_channels in CHANNELS:
            if n_channels == 1:  # the size axis measured this point (1 KiB, one channel) already
                same = next(p for p in out["size"] if p["row_bytes"] == 1024)
                out["channels"].append({"channels": 1, **{k: v for k, v in same.items() if k != "row_bytes"}})
                continue
            progress(f"  {n_channels} channels ...")
            r = _median(partial(point, client, 1024, n_channels), repeats)
            out["channels"].append({"channels": n_channels, **r})
        progress("  time-tick vs plain ...")
        plain, tt = bench_timetick(client, 100, seconds, repeats)
        out["timetick"] = {
            "plain_msgs_s": plain.msgs_per_s,
            "tt_msgs_s": tt.msgs_per_s,
            "ratio": tt.ratio,
        }
    return out


def tables(results: dict[str, dict[str, Any]]) -> str:
    """Markdown tables of ``{backend: measure_backend(...)}``."""
    lines = [
        "### Throughput vs message size (1 channel)",
        "",
        "| Backend | Row data | Bytes/msg | produce msgs/s | produce MB/s | consume msgs/s | consume MB/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        for p in r["size"]:
            mb = p["frame_bytes"] / 1e6
            lines.append(
                f"| {name} | {size_text(p['row_bytes'])} | {p['frame_bytes']:,.0f} | {p['produce_msgs_s']:,.0f} |"
                f" {p['produce_msgs_s'] * mb:,.1f} | {p['consume_msgs_s']:,.0f} | {p['consume_msgs_s'] * mb:,.1f} |"
            )
    lines += [
        "",
        "### Throughput vs channels (1 KiB rows)",
        "",
        "| Backend | Channels | produce msgs/s | consume msgs/s |",
        "|---|---:|---:|---:|",
    ]
    for name, r in results.items():
        for p in r["channels"]:
            lines.append(f"| {name} | {p['channels']} | {p['produce_msgs_s']:,.0f} | {p['consume_msgs_s']:,.0f} |")
    lines += [
        "",
        "### Time-tick consume vs plain consume (100 B rows, 4 channels, a tick per 1000)",
        "",
        "| Backend | plain msgs/s | time-tick msgs/s | time-tick/plain | Target |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        t = r["timetick"]
        verdict = "met" if t["ratio"] >= 0.8 else "MISSED"
        lines.append(
            f"| {name} | {t['plain_msgs_s']:,.0f} | {t['tt_msgs_s']:,.0f} | {t['ratio']:.2f}x | >= 0.80x: {verdict} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """PNG: consume and produce MB/s against message size, a line per backend (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, op in zip(axes, ("produce", "consume"), strict=True):
        for name, r in results.items():
            xs = [p["frame_bytes"] for p in r["size"]]
            ys = [p[f"{op}_msgs_s"] * p["frame_bytes"] / 1e6 for p in r["size"]]
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bytes per message (frame)")
        ax.set_title(f"msgstream {op}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("MB/s")
    axes[1].legend()
    fig.suptitle("msgstream throughput vs message size (1 channel, median of runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from benchmarks.bench_latency import _backends

    env = environment()
    print_environment(
        env, f"median of {args.repeats} runs; at most {MAX_MSGS:,} messages or {MAX_BYTES >> 20} MiB a run"
    )
    results: dict[str, dict[str, Any]] = {}
    started = clock()
    with _backends() as backends:
        for name, server in backends:
            progress(f"scaling, {name} ...")
            begun = clock()
            with server() as url:
                results[name] = measure_backend(url, args.seconds, args.repeats)
            results[name]["seconds"] = round(clock() - begun, 1)
    print("## Results\n")
    print(tables(results))
    print(
        f"\nTotal time {clock() - started:.0f} s ("
        + ", ".join(f"{name} {r['seconds']:.0f} s" for name, r in results.items())
        + f"). Points not measured (a consumer got nothing for {TIMEOUT:g} s): {len(STALLS)}"
        + "".join(f"; {x}" for x in STALLS)
        + "."
    )
    if args.json is not None:
        Path(args.json).write_text(
            json.dumps({"benchmark": "scaling", "environment": env, "results": results}, indent=2) + "\n",
            encoding="utf-8",
        )
    if getattr(args, "plot", None) is not None:
        plot(results, Path(args.plot))
        progress(f"wrote {args.plot}")
    return 0
