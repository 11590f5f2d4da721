"""Peer benchmark: msgstream against FastStream, the framework a Python team would likely pick instead,
on the same Redis and Apache Kafka brokers in the same run (started through ``scripts/broker.py``, or the
brokers ``MSGSTREAM_REDIS_URL`` / ``MSGSTREAM_KAFKA_URL`` name).

``python -m benchmarks peer [--seconds S] [--repeats N] [--json PATH]``

Both sides move N one-row ``InsertMsg`` frames (100 B and 1 KiB of row data) through one channel:

- produce: msgstream ``MsgStream.produce`` of packs of 1000 against FastStream written the way its
  docs recommend for throughput: on Redis, ``broker.publish(frame, stream=key, pipeline=pipe)`` for
  1000 frames and one ``pipe.execute()``; on Kafka, ``broker.publish_batch(*frames, topic=topic)``, its
  producer with msgstream's settings (``acks=all``, idempotence, ``linger.ms=5``).
- consume: msgstream ``consume_frames`` (bytes out, as FastStream's handler gets them) and ``consume``
  (typed messages) against a FastStream subscriber whose handler counts the payloads: on Kafka a batch
  subscriber (``batch=True, max_records=1000``); on Redis ``StreamSub(group=..., max_records=1000)``
  with one handler call per message, because FastStream's Redis batch parser JSON-encodes the batch
  and fails on binary payloads (UnicodeDecodeError, FastStream 0.7). Timed from the first delivery to
  the last, so the group join is outside the clock on both sides.

FastStream runs on asyncio (its only mode); msgstream is synchronous. Each figure is the median of
``--repeats`` runs; the ratio is msgstream over FastStream in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import msgstream as ms
from benchmarks.bench_core import clock, environment, print_environment
from benchmarks.report import progress, size_text, workload

ROW_SIZES = (100, 1024)
_QUIET: Any = None  # FastStream's logger=None: no per-message log lines
PACK = 1000
N_MSGS = 10_000
TIMEOUT = 60.0


def _frames(row_bytes: int) -> tuple[ms.MsgPack, list[bytes], float]:
    return workload(row_bytes, PACK)


# -- msgstream side ---------------------------------------------------------------------------------
def msgstream_produce(url: str, pack: ms.MsgPack, n: int) -> float:
    with ms.connect(url) as client:
        [chan] = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="peer"), num_channels=1))
        with client.msg_stream() as out:
            out.create_producers([chan])
            t0 = clock()
            for _ in range(n // PACK):
                out.produce(pack)
            elapsed = clock() - t0
        client.destroy_channels([chan])
    return n / elapsed


def msgstream_consume(url: str, pack: ms.MsgPack, n: int, frames: bool) -> float:
    with ms.connect(url) as client:
        [chan] = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="peer"), num_channels=1))
        with client.msg_stream() as out:
            out.create_producers([chan])
            for _ in range(n // PACK):
                out.produce(pack)
        with client.msg_stream(receive_batch=PACK) as inp:
            inp.create_consumers("peer", [chan])
            take: Callable[[float], Any] = inp.consume_frames if frames else inp.consume
            first = take(TIMEOUT)
            if first is None:
                raise RuntimeError("msgstream consumed nothing")
            got = skipped = len(first) if frames else len(first.msgs)
            t0 = clock()
            while got < n:
                p = take(TIMEOUT)
                if p is None:
                    raise RuntimeError(f"msgstream consume stopped at {got} of {n}")
                got += len(p) if frames else len(p.msgs)
            elapsed = clock() - t0
        client.destroy_channels([chan])
    return (n - skipped) / elapsed


# -- FastStream side --------------------------------------------------------------------------------
class _Counter:
    """Counts what a batch handler receives; times from the first batch to the last."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.got = 0
        self.skipped = 0
        self.t0 = 0.0
        self.t1 = 0.0
        self.done = asyncio.Event()

    def add(self, batch: list[Any]) -> None:
        if self.got == 0:
            self.skipped = len(batch)
            self.t0 = clock()
        self.got += len(batch)
        if self.got >= self.n and not self.done.is_set():
            self.t1 = clock()
            self.done.set()

    def rate(self) -> float:
        return (self.got - self.skipped) / (self.t1 - self.t0)


def _redis_url(url: str) -> str:
    return url.split("?", 1)[0]


async def faststream_redis_produce(url: str, frames: list[bytes], n: int) -> float:
    from faststream.redis import RedisBroker

    broker = RedisBroker(_redis_url(url), logger=_QUIET)
    key = f"peer-{uuid.uuid4().hex[:8]}"
    async with broker:
        redis = await broker.connect()
        t0 = clock()
        await _redis_publish(broker, redis, key, frames, n)
        elapsed = clock() - t0
        await redis.delete(key)
    return n / elapsed


async def _redis_publish(broker: Any, redis: Any, key: str, frames: list[bytes], n: int) -> None:
    """FastStream on Redis at its fastest: ``n`` frames, a pipeline of ``len(frames)`` per round trip."""
    for _ in range(n // len(frames)):
        async with redis.pipeline(transaction=False) as pipe:
            for frame in frames:
                await broker.publish(frame, stream=key, pipeline=pipe)
            await pipe.execute()


async def faststream_redis_consume(url: str, frames: list[bytes], n: int) -> float:
    from faststream.redis import RedisBroker, StreamSub

    key = f"peer-{uuid.uuid4().hex[:8]}"
    filler = RedisBroker(_redis_url(url), logger=_QUIET)
    async with filler:
        await _redis_publish(filler, await filler.connect(), key, frames, n)
    counter = _Counter(n)
    broker = RedisBroker(_redis_url(url), logger=_QUIET)

    # not batch=True: FastStream's Redis batch parser JSON-encodes the batch and fails on binary payloads
    @broker.subscriber(stream=StreamSub(key, group="peer", consumer="c", max_records=PACK, last_id="0"))
    async def handle(body: bytes) -> None:
        counter.add([body])

    async with broker:
        await broker.start()
        await asyncio.wait_for(counter.done.wait(), TIMEOUT)
        redis = await broker.connect()
        await redis.delete(key)
    return counter.rate()


async def faststream_kafka_produce(url: str, frames: list[bytes], n: int) -> float:
    from faststream.confluent import KafkaBroker

    bootstrap = url.split("://", 1)[1].split("/", 1)[0]
    broker = KafkaBroker(bootstrap, logger=_QUIET, acks="all", enable_idempotence=True, linger_ms=5)
    topic = f"peer-{uuid.uuid4().hex[:8]}"
    async with broker:
        await broker.publish_batch(frames[0], topic=topic)  # creates the topic, untimed
        t0 = clock()
        for _ in range(n // PACK):
            await broker.publish_batch(*frames, topic=topic)
        elapsed = clock() - t0
    return n / elapsed


async def faststream_kafka_consume(url: str, frames: list[bytes], n: int) -> float:
    from faststream.confluent import KafkaBroker

    bootstrap = url.split("://", 1)[1].split("/", 1)[0]
    topic = f"peer-{uuid.uuid4().hex[:8]}"
    filler = KafkaBroker(bootstrap, logger=_QUIET)
    async with filler:
        for _ in range(n // PACK):
            await filler.publish_batch(*frames, topic=topic)
    counter = _Counter(n)
    broker = KafkaBroker(bootstrap, logger=_QUIET)

    @broker.subscriber(
        topic,
        group_id=f"peer-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        batch=True,
        max_records=PACK,
        fetch_max_wait_ms=100,
    )
    async def handle(batch: list[bytes]) -> None:
        counter.add(batch)

    async with broker:
        await broker.start()
        await asyncio.wait_for(counter.done.wait(), TIMEOUT)
    return counter.rate()


PEERS: dict[str, dict[str, Callable[..., Any]]] = {
    "redis": {"produce": faststream_redis_produce, "consume": faststream_redis_consume},
    "kafka": {"produce": faststream_kafka_produce, "consume": faststream_kafka_consume},
}


def _run(coroutine: Callable[..., Any], *args: Any) -> float:
    rate: float = asyncio.run(coroutine(*args))
    return rate


def measure(name: str, url: str, repeats: int) -> list[dict[str, Any]]:
    """Rows of one broker: every operation and size, msgstream and FastStream, median of runs."""
    rows: list[dict[str, Any]] = []
    peer = PEERS[name]
    for row_bytes in ROW_SIZES:
        pack, frames, size = _frames(row_bytes)
        sides: dict[str, Callable[[], float]] = {
            "produce: msgstream produce": partial(msgstream_produce, url, pack, N_MSGS),
            "produce: FastStream": partial(_run, peer["produce"], url, frames, N_MSGS),
            "consume: msgstream consume_frames": partial(msgstream_consume, url, pack, N_MSGS, True),
            "consume: msgstream consume (typed)": partial(msgstream_consume, url, pack, N_MSGS, False),
            "consume: FastStream": partial(_run, peer["consume"], url, frames, N_MSGS),
        }
        rates: dict[str, list[float]] = {k: [] for k in sides}
        for side in sides.values():  # warm-up
            side()
        for _ in range(repeats):
            for label, side in sides.items():
                rates[label].append(side())
        for label, values in rates.items():
            op = label.split(":", 1)[0]
            base = rates[f"{op}: FastStream"]
            ratio = statistics.median(m / b for m, b in zip(values, base, strict=True))
            rows.append(
                {
                    "backend": name,
                    "row_bytes": row_bytes,
                    "frame_bytes": size,
                    "side": label,
                    "msgs_s": statistics.median(values),
                    "vs_faststream": None if label.endswith("FastStream") else ratio,
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| Broker | Row data | Side | msgs/s | msgstream/FastStream |", "|---|---:|---|---:|---:|"]
    for r in rows:
        ratio = "" if r["vs_faststream"] is None else f"{r['vs_faststream']:.1f}x"
        lines.append(f"| {r['backend']} | {size_text(r['row_bytes'])} | {r['side']} | {r['msgs_s']:,.0f} | {ratio} |")
    return "\n".join(lines)


@contextmanager
def _brokers() -> Iterator[list[tuple[str, Callable[[], Any]]]]:
    from benchmarks.bench_latency import _backends

    with _backends() as backends:
        yield [(name, server) for name, server in backends if name in PEERS]


def run(args: argparse.Namespace) -> int:
    try:
        import faststream
    except ImportError:
        raise SystemExit("FastStream is not installed: pip install 'faststream[redis,confluent]'") from None
    logging.getLogger("faststream").setLevel(logging.WARNING)
    from importlib.metadata import version

    env = {**environment(), "faststream": version("faststream")}
    del faststream
    print_environment(env, f"{N_MSGS:,} messages a run, median of {args.repeats} runs after a warm-up")
    rows: list[dict[str, Any]] = []
    started = clock()
    with _brokers() as brokers:
        for name, server in brokers:
            progress(f"peer, {name} ...")
            with server() as url:
                rows += measure(name, url, args.repeats)
    print("## Results\n")
    print(table(rows))
    print(
        "\nEqual work: msgstream produce against FastStream's publish, and msgstream consume_frames (bytes"
        " out) against FastStream's handler, which gets bytes. msgstream consume (typed) also decodes every"
        " message into an InsertMsg, which the FastStream handler here does not: its ratio is shown, not"
        " judged (raw + unmarshal is its equal-work baseline in the broker suites)."
        f" Total time {clock() - started:.0f} s."
    )
    if args.json is not None:
        Path(args.json).write_text(
            json.dumps({"benchmark": "peer", "environment": env, "results": rows}, indent=2) + "\n", encoding="utf-8"
        )
    return 0
