"""sqlite:/// benchmark: throughput beside raw sqlite3 doing equal work, cross-process latency, idle CPU.

``python -m benchmarks sqlite [--seconds S] [--repeats N] [--json PATH] [--path FILE]``

1. produce / typed consume: as the core benchmark's memory backend section (``produce()`` packs of 1000
   one-row ``InsertMsg`` of 100 B over 4 channels, then ``consume()`` until all arrived, in this
   thread), on a fresh file with the default URL (WAL, ``synchronous=full``).
2. raw sqlite3 doing equal work on its own file with the same settings: the same frames, already
   encoded, inserted 1000 per ``BEGIN IMMEDIATE`` transaction into a table keyed like the backend's;
   read back 1000 per transaction, each read moving a cursor row. No msgstream codec, no bookkeeping of
   what is unacknowledged: the floor below which the backend cannot go.
3. latency: another process produces one message every 2 ms (500/s) through ``MsgStream.produce``; this
   process's ``consume()`` stamps its arrival; p50 / p99 of (arrival - the send time the message carries).
4. idle CPU: the share of one core a ``consume(timeout=5)`` on an empty channel takes (process time /
   wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import msgstream as ms

from .bench_core import PACK_SIZE, Figure, _memory_round, environment, insert_msg, markdown_table, print_environment

ROW_BYTES = 100
ROUND_MSGS = 100_000
LATENCY_RATE = 500.0

_SENDER = textwrap.dedent("""
    import sys, time
    import msgstream as ms
    url, chan, n, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    with ms.connect(url) as client, client.msg_stream() as out:
        out.create_producers([chan])
        start = time.monotonic()
        for i in range(n):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            out.produce(ms.MsgPack.of([ms.InsertMsg(begin_ts=1, end_ts=1, hash_values=[0], row_ids=[time.time_ns()])]))
""")


def _throughput(url: str, seconds: float, repeats: int) -> list[Figure]:
    row = os.urandom(ROW_BYTES)
    pack = ms.MsgPack.of([insert_msg(i, 1 + i, row) for i in range(PACK_SIZE)])
    size = sum(len(m.marshal()) for m in pack.msgs) / PACK_SIZE
    produce, consume = Figure("sqlite", "produce", ROW_BYTES, size), Figure("sqlite", "consume", ROW_BYTES, size)
    with ms.connect(url) as client:
        _memory_round(client, pack, 0.2, ROUND_MSGS)  # warm-up
        for _ in range(repeats):
            msgs, tp, tc = 0, 0.0, 0.0
            while tp + tc < seconds:
                n, p, c = _memory_round(client, pack, seconds / 2, ROUND_MSGS)
                msgs, tp, tc = msgs + n, tp + p, tc + c
            produce.rates.append(msgs / tp)
            consume.rates.append(msgs / tc)
    frames = [m.marshal() for m in pack.msgs]
    raw_p, raw_c = (
        Figure("sqlite", "raw sqlite3 insert", ROW_BYTES, size),
        Figure("sqlite", "raw sqlite3 read", ROW_BYTES, size),
    )
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(f"{tmp}/raw.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE m (chan INTEGER, seq INTEGER, payload BLOB, PRIMARY KEY (chan, seq)) WITHOUT ROWID")
        conn.execute("CREATE TABLE cursor (chan INTEGER PRIMARY KEY, next INTEGER)")
        conn.execute("INSERT INTO cursor VALUES (0, 0)")
        seq = 0
        for _ in range(repeats):
            t0, first = time.perf_counter(), seq
            while time.perf_counter() - t0 < seconds / 2:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO m VALUES (0, ?, ?)", [(seq + i, f) for i, f in enumerate(frames)])
                conn.execute("COMMIT")
                seq += PACK_SIZE
            t1 = time.perf_counter()
            while True:
                conn.execute("BEGIN IMMEDIATE")
                (nxt,) = conn.execute("SELECT next FROM cursor WHERE chan = 0").fetchone()
                rows = conn.execute(
                    "SELECT seq, payload FROM m WHERE chan = 0 AND seq >= ? LIMIT ?", (nxt, PACK_SIZE)
                ).fetchall()
                if rows:
                    conn.execute("UPDATE cursor SET next = ? WHERE chan = 0", (rows[-1][0] + 1,))
                conn.execute("COMMIT")
                if not rows:
                    break
            t2 = time.perf_counter()
            raw_p.rates.append((seq - first) / (t1 - t0))
            raw_c.rates.append((seq - first) / (t2 - t1))
        conn.close()
    for mine, raw in ((produce, raw_p), (consume, raw_c)):
        mine.ratios = [m / r for m, r in zip(mine.rates, raw.rates, strict=True)]
        mine.ratio_to = raw.name
    return [produce, consume, raw_p, raw_c]


def _latency(url: str, seconds: float) -> dict[str, float]:
    with ms.connect(url) as client:
        [chan] = client.create_channels(
            ms.CreateChannelRequest(owner=ms.OwnerDescription(role="bench"), num_channels=1)
        )
        n = int(seconds * LATENCY_RATE)
        with client.msg_stream() as inp:
            inp.create_consumers("latency", [chan], position=ms.SubscriptionPosition.EARLIEST)
            cpu, wall = time.process_time(), time.monotonic()
            assert inp.consume(timeout=5.0) is None
            idle = (time.process_time() - cpu) / (time.monotonic() - wall)
            sender = subprocess.Popen([sys.executable, "-c", _SENDER, url, chan, str(n), str(LATENCY_RATE)])
            latencies: list[float] = []
            while len(latencies) < n:
                pack = inp.consume(timeout=30)
                if pack is None:
                    raise RuntimeError(f"latency: {len(latencies)} of {n} arrived")
                now = time.time_ns()
                latencies += [(now - m.row_ids[0]) / 1e6 for m in pack.msgs if isinstance(m, ms.InsertMsg)]
            sender.wait(30)
    q = statistics.quantiles(latencies, n=100)
    return {"messages": n, "p50_ms": statistics.median(latencies), "p99_ms": q[98], "idle_cpu_share": idle}


def run(args: argparse.Namespace) -> int:
    env = environment()
    print_environment(env, f"median of {args.repeats} runs of ~{args.seconds:g} s each, after a warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or Path(tmp) / "bench.db"
        url = f"sqlite:///{path}"
        figures = _throughput(url, args.seconds, args.repeats)
        latency = _latency(url, max(args.seconds, 4.0))
    print("## Results\n")
    print(markdown_table(figures))
    print(
        f"\ncross-process latency at {LATENCY_RATE:g} msgs/s: p50 {latency['p50_ms']:.2f} ms, p99"
        f" {latency['p99_ms']:.2f} ms over {latency['messages']:.0f} messages; an idle consume(timeout=5)"
        f" took {latency['idle_cpu_share']:.1%} of a core"
    )
    if args.json is not None:
        report = {"benchmark": "sqlite", "environment": env, "figures": [f.as_dict() for f in figures]}
        Path(args.json).write_text(json.dumps({**report, "latency": latency}, indent=2))
    return 0
