"""Latency benchmark: produce -> consume time of single messages at a fixed rate, on every backend.

``python -m benchmarks latency [--seconds S] [--repeats N] [--json PATH] [--rate R]``

For each backend (memory://, and Redis, Kafka and Pulsar on brokers started for the run exactly as
their throughput benchmarks start them) one thread produces one-message packs (a 100 B ``InsertMsg``)
at ``--rate`` messages per second, paced by the clock, into one channel, while another thread
consumes with ``MsgStream.consume`` and notes, per message, the time from just before ``produce`` to
the return of the ``consume`` that delivered it. Both threads share the process (and so the GIL), as
a service that produces and consumes would. The first second is warm-up and not counted. Each figure
is the median over ``--repeats`` runs of that run's percentile.

Not measured yet: the raw clients' own latency on the same brokers (issue 7).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import msgstream as ms
from benchmarks.bench_core import environment
from benchmarks.report import progress

WARMUP_SECONDS = 1.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(url: str, rate: float, seconds: float) -> dict[str, float]:
    """One run: latencies (ms) of the messages produced after the warm-up."""
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    total = int(rate * (seconds + WARMUP_SECONDS))
    counted_from = int(rate * WARMUP_SECONDS)
    with ms.connect(url) as client:
        [chan] = client.create_channels(
            ms.CreateChannelRequest(owner=ms.OwnerDescription(role="latency"), num_channels=1)
        )
        with client.msg_stream() as out, client.msg_stream() as inp:
            out.create_producers([chan])
            inp.create_consumers("latency", [chan], position=ms.SubscriptionPosition.LATEST)
            inp.consume(timeout=0.5)  # joins / subscribes before the clock starts
            done = threading.Event()
            failure: list[BaseException] = []

            def consume() -> None:
                got = 0
                try:
                    while got < total:
                        pack = inp.consume(timeout=5)
                        now = time.perf_counter()
                        if pack is None:
                            raise RuntimeError(f"no message within 5 s ({got} of {total})")
                        for m in pack.msgs:
                            i = m.row_ids[0]  # type: ignore[attr-defined]
                            if i >= counted_from:
                                latencies.append((now - sent_at[i]) * 1000)
                            got += 1
                except BaseException as exc:  # reported by the main thread
                    failure.append(exc)
                finally:
                    done.set()

            reader = threading.Thread(target=consume)
            reader.start()
            row = b"x" * 100
            start = time.perf_counter()
            for i in range(total):
                due = start + i / rate
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                msg = ms.InsertMsg(begin_ts=i + 1, end_ts=i + 1, hash_values=[0], row_ids=[i], row_data=[row])
                sent_at[i] = time.perf_counter()
                out.produce(ms.MsgPack(i + 1, i + 1, [msg]))
                if failure:
                    break
            done.wait(30)
            reader.join(5)
            if failure:
                raise RuntimeError(f"latency run on {client.backend!r}: {failure[0]}")
    return {
        "p50_ms": _percentile(latencies, 0.50),
        "p99_ms": _percentile(latencies, 0.99),
        "max_ms": max(latencies),
        "messages": float(len(latencies)),
    }


@contextmanager
def _backends() -> Iterator[list[tuple[str, Callable[[], AbstractContextManager[str]]]]]:
    from benchmarks.bench_kafka import tansu_server
    from benchmarks.bench_pulsar import pulsar_lite
    from benchmarks.bench_redis import redis_server

    @contextmanager
    def kafka() -> Iterator[str]:
        with tansu_server() as tansu:
            yield tansu.url

    @contextmanager
    def pulsar() -> Iterator[str]:
        with pulsar_lite() as (url, _version):
            yield url

    yield [
        ("memory", lambda: nullcontext("memory://latency")),
        ("redis", redis_server),
        ("kafka", kafka),
        ("pulsar", pulsar),
    ]


def run(args: argparse.Namespace) -> int:
    rate: float = args.rate
    results: list[dict[str, Any]] = []
    print("## Environment\n")
    env = environment()
    for key, value in env.items():
        print(f"- {key}: {value}")
    print(
        f"- settings: {rate:g} msgs/s, runs of {args.seconds:g} s after {WARMUP_SECONDS:g} s of warm-up,"
        f" median of {args.repeats} runs\n"
    )
    with _backends() as backends:
        for name, server in backends:
            progress(f"latency, {name} ...")
            with server() as url:
                runs = [measure(url, rate, args.seconds) for _ in range(args.repeats)]
            results.append({"backend": name, **{k: statistics.median(r[k] for r in runs) for k in runs[0]}})
    print("## Results\n")
    print("| Backend | p50 (ms) | p99 (ms) | max (ms) | messages per run |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['backend']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} | {r['messages']:,.0f} |")
    if args.json is not None:
        Path(args.json).write_text(
            json.dumps({"benchmark": "latency", "environment": env, "rate": rate, "results": results}, indent=2) + "\n",
            encoding="utf-8",
        )
    return 0
