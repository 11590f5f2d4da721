"""``python -m benchmarks aio``: msgstream.aio against the sync API, produce and consume, every backend,
and the event loop's lag meanwhile.

For each backend (memory://, sqlite:/// in a new file, Redis, Apache Kafka, Apache Pulsar; brokers as for
the other suites: the ``MSGSTREAM_*_URL`` ones, else started here) and row size (100 B, 1 KiB), on one channel:

- produce: packs of 1000 one-row inserts, the sync ``MsgStream.produce`` and the async ``await
  produce`` taking turns in chunks of a few packs, only the sends timed;
- consume: a batch of packs is produced, then drained by a sync and an async stream (each its own
  fresh subscription, ``receive_batch=1000``), who goes first alternating; only the drains are timed,
  from the first pack on (joining a subscription, seconds on Kafka, is not consuming).

Ratio: async msgs/s over sync msgs/s of the same run (median over runs; target >= 0.8x); nothing else
runs on the loop meanwhile. Loop lag, measured apart: for ``seconds`` one task produces packs and another
consumes them through msgstream.aio while a third sleeps 1 ms at a time and records how much later than
asked it woke (median, 99th percentile, maximum, in ms); the same probe on an otherwise idle loop is the
baseline (what the machine itself adds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgstream as ms
from benchmarks.bench_core import environment, print_environment
from benchmarks.brokers import given_url, server
from benchmarks.report import Row, progress, size_text, target_text, workload
from msgstream import aio

T = TypeVar("T")
ROW_SIZES = (100, 1024)
PACK_SIZE = 1000
CHUNK = 4  # packs per turn in the produce comparison
CONSUME_PACKS = 20  # packs produced for each consume round
TARGET = 0.8
BACKENDS = ("memory", "sqlite", "redis", "kafka", "pulsar")


class LagProbe:
    """How late the loop wakes a task that sleeps ``interval`` at a time, while ``measure`` runs."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.lags: list[float] = []

    async def _probe(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.lags.append(time.perf_counter() - t0 - self.interval)

    async def measure(self, work: Awaitable[T]) -> T:
        probe = asyncio.create_task(self._probe())
        try:
            return await work
        finally:
            probe.cancel()

    def summary(self) -> dict[str, float]:
        if not self.lags:
            return {"samples": 0}
        lags = sorted(self.lags)
        return {
            "samples": len(lags),
            "median_ms": round(statistics.median(lags) * 1e3, 3),
            "p99_ms": round(lags[int(len(lags) * 0.99)] * 1e3, 3),
            "max_ms": round(lags[-1] * 1e3, 3),
        }


@contextmanager
def _channel(client: ms.Client) -> Iterator[str]:
    owner = ms.OwnerDescription(role="bench", description_text="benchmarks.bench_aio")
    [channel] = client.create_channels(ms.CreateChannelRequest(owner=owner, num_channels=1))
    try:
        yield channel
    finally:
        client.destroy_channels([channel])


def _sync_drain(client: ms.Client, channel: str, n: int) -> tuple[int, float]:
    """Drain ``n`` messages: (messages of the first pack, which is not timed, seconds for the rest)."""
    with client.msg_stream(receive_batch=PACK_SIZE) as inp:
        inp.create_consumers(f"sync-{uuid.uuid4().hex[:8]}", [channel])
        first = inp.consume(timeout=30)  # joining the subscription is not timed
        if first is None:
            raise RuntimeError("sync consume: nothing within 30 s")
        got = len(first.msgs)
        t0 = time.perf_counter()
        while got < n:
            pack = inp.consume(timeout=10)
            if pack is None:
                raise RuntimeError(f"sync consume: {got} of {n} within 10 s")
            got += len(pack.msgs)
        return len(first.msgs), time.perf_counter() - t0


async def _async_drain(client: aio.AsyncClient, channel: str, n: int) -> tuple[int, float]:
    async with client.msg_stream(receive_batch=PACK_SIZE) as inp:
        await inp.create_consumers(f"async-{uuid.uuid4().hex[:8]}", [channel])
        first = await inp.consume(timeout=30)  # joining the subscription is not timed
        if first is None:
            raise RuntimeError("async consume: nothing within 30 s")
        got = len(first.msgs)
        t0 = time.perf_counter()
        while got < n:
            pack = await inp.consume(timeout=10)
            if pack is None:
                raise RuntimeError(f"async consume: {got} of {n} within 10 s")
            got += len(pack.msgs)
        return len(first.msgs), time.perf_counter() - t0


def bench_backend(url: str, name: str, seconds: float, repeats: int) -> tuple[list[Row], dict[str, Any]]:
    rows: list[Row] = []
    probe = LagProbe()
    idle = LagProbe()
    loop = asyncio.new_event_loop()
    try:
        aclient = loop.run_until_complete(aio.connect(url).open())
        client = aclient.sync  # the same backend for both sides
        for row_bytes in ROW_SIZES:
            pack, _frames, size = workload(row_bytes, PACK_SIZE)
            rows += _bench_size(
                loop, client, aclient, pack, row_bytes=row_bytes, size=size, seconds=seconds, repeats=repeats, name=name
            )
            with _channel(client) as channel:  # loop lag while the async side produces and consumes
                loop.run_until_complete(probe.measure(_lag_round(aclient, channel, pack, seconds)))
        loop.run_until_complete(idle.measure(asyncio.sleep(seconds)))  # the same probe with nothing else running
        loop.run_until_complete(aclient.close())
    finally:
        loop.close()
    return rows, {**probe.summary(), "idle": idle.summary()}


async def _lag_round(client: aio.AsyncClient, channel: str, pack: ms.MsgPack, seconds: float) -> float:
    """A producer task and a consumer task on ``channel`` for ``seconds``."""
    t0 = time.perf_counter()
    async with client.msg_stream() as out, client.msg_stream(receive_batch=PACK_SIZE) as inp:
        await out.create_producers([channel])
        await out.produce(pack)  # the topic has data before a consumer joins (as in the consume rounds)
        sent = len(pack.msgs)
        await inp.create_consumers(f"lag-{uuid.uuid4().hex[:8]}", [channel])

        async def produce() -> None:
            nonlocal sent
            while time.perf_counter() - t0 < seconds:
                await out.produce(pack)
                sent += len(pack.msgs)

        producer = asyncio.create_task(produce())
        try:
            got = 0
            while not producer.done() or got < sent:
                got += len(p.msgs) if (p := await inp.consume(timeout=1.0)) else 0
        finally:
            if not producer.done():
                producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
        await producer
    return time.perf_counter() - t0


def _bench_size(
    loop: asyncio.AbstractEventLoop,
    client: ms.Client,
    aclient: aio.AsyncClient,
    pack: ms.MsgPack,
    *,
    row_bytes: int,
    size: float,
    seconds: float,
    repeats: int,
    name: str,
) -> list[Row]:
    rows: list[Row] = []
    with _channel(client) as channel:
        # -- produce
        progress(f"aio: {name} produce, {size_text(row_bytes)} rows ...")
        sync_out = client.msg_stream()
        sync_out.create_producers([channel])
        async_out = aclient.msg_stream()
        loop.run_until_complete(async_out.create_producers([channel]))

        def sync_chunk() -> float:
            t0 = time.perf_counter()
            for _ in range(CHUNK):
                sync_out.produce(pack)
            return time.perf_counter() - t0

        async def async_chunk() -> float:
            t0 = time.perf_counter()
            for _ in range(CHUNK):
                await async_out.produce(pack)
            return time.perf_counter() - t0

        sync_chunk()  # warm-up, untimed
        loop.run_until_complete(async_chunk())
        produce = _turns(
            lambda: (CHUNK * PACK_SIZE, sync_chunk()),
            lambda: (CHUNK * PACK_SIZE, loop.run_until_complete(async_chunk())),
            seconds,
            repeats,
        )
        sync_out.close()
        loop.run_until_complete(async_out.close())
        rows += _rows("produce", row_bytes, size, produce)
    # -- consume: a fresh channel per round, drained by both sides
    progress(f"aio: {name} consume, {size_text(row_bytes)} rows ...")
    n = CONSUME_PACKS * PACK_SIZE

    def paired(first: str) -> dict[str, tuple[int, float]]:
        with _channel(client) as channel, client.msg_stream() as out:
            out.create_producers([channel])
            for _ in range(CONSUME_PACKS):
                out.produce(pack)
            spent: dict[str, tuple[int, float]] = {}
            for side in (first, "async" if first == "sync" else "sync"):
                if side == "sync":
                    spent[side] = _sync_drain(client, channel, n)
                else:
                    spent[side] = loop.run_until_complete(_async_drain(aclient, channel, n))
            return spent

    paired("sync")  # warm-up
    consume = _paired_runs(paired, n, seconds, repeats)
    rows += _rows("consume", row_bytes, size, consume)
    return rows


def _turns(
    sync: Callable[[], tuple[int, float]], asynchronous: Callable[[], tuple[int, float]], seconds: float, repeats: int
) -> dict[str, list[float]]:
    """Msgs/s of each side per run, the sides taking turns (order alternating) until ``seconds`` are timed."""
    rates: dict[str, list[float]] = {"sync": [], "async": []}
    sides = {"sync": sync, "async": asynchronous}
    turn = 0
    for _ in range(repeats):
        msgs = dict.fromkeys(sides, 0)
        spent = dict.fromkeys(sides, 0.0)
        while sum(spent.values()) < seconds:
            order = ["sync", "async"] if turn % 2 == 0 else ["async", "sync"]
            turn += 1
            for side in order:
                n, t = sides[side]()
                msgs[side] += n
                spent[side] += t
        for side in sides:
            rates[side].append(msgs[side] / spent[side])
    return rates


def _paired_runs(
    paired: Callable[[str], dict[str, tuple[int, float]]], n: int, seconds: float, repeats: int
) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"sync": [], "async": []}
    turn = 0
    for _ in range(repeats):
        spent = {"sync": 0.0, "async": 0.0}
        msgs = {"sync": 0, "async": 0}
        rounds = 0
        while sum(spent.values()) < seconds or rounds < 2:
            got = paired("sync" if turn % 2 == 0 else "async")
            turn += 1
            rounds += 1
            for side, (untimed, t) in got.items():
                spent[side] += t
                msgs[side] += n - untimed
        for side, t in spent.items():
            rates[side].append(msgs[side] / t)
    return rates


def _rows(section: str, row_bytes: int, size: float, rates: dict[str, list[float]]) -> list[Row]:
    call = "produce" if section == "produce" else "consume"
    sync = Row(section, f"MsgStream.{call} (packs of 1000)", row_bytes, size)
    asynchronous = Row(
        section, f"aio AsyncMsgStream.{call} (packs of 1000)", row_bytes, size, ratio_to="sync", target=TARGET
    )
    sync.rates, asynchronous.rates = rates["sync"], rates["async"]
    asynchronous.ratios = [a / s for a, s in zip(rates["async"], rates["sync"], strict=True)]
    return [sync, asynchronous]


def table(results: dict[str, list[Row]], lags: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| Backend | Operation | Measurement | Row data | msgs/s | async/sync | Target | Spread |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    for backend, rows in results.items():
        for r in rows:
            ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
            lines.append(
                f"| {backend} | {r.section} | {r.name} | {size_text(r.row_bytes)} | {r.msgs_per_s:,.0f} | {ratio} |"
                f" {target_text(r)} | {r.spread:.1%} |"
            )
    lines += [
        "",
        "| Backend | loop lag under load: median | p99 | max | idle loop: p99 | max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for backend, lag in lags.items():
        idle = lag["idle"]
        if lag.get("samples") and idle.get("samples"):
            lines.append(
                f"| {backend} | {lag['median_ms']:.2f} ms | {lag['p99_ms']:.2f} ms | {lag['max_ms']:.2f} ms |"
                f" {idle['p99_ms']:.2f} ms | {idle['max_ms']:.2f} ms |"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    seconds: float = args.seconds
    repeats: int = args.repeats
    chosen = [b.strip() for b in (getattr(args, "backends", None) or ",".join(BACKENDS)).split(",") if b.strip()]
    env = environment()
    print_environment(env, f"median of {repeats} runs of ~{seconds:g} s per side and figure")
    results: dict[str, list[Row]] = {}
    lags: dict[str, dict[str, Any]] = {}
    servers: dict[str, str] = {}
    for name in chosen:
        if name == "memory":
            url = f"memory://bench-aio-{uuid.uuid4().hex[:8]}"
            servers[name] = "in-process"
            results[name], lags[name] = bench_backend(url, name, seconds, repeats)
            continue
        if name == "sqlite":
            with tempfile.TemporaryDirectory(prefix="msgstream-bench-aio-") as tmp:
                servers[name] = "a new file in the temporary directory"
                results[name], lags[name] = bench_backend(f"sqlite:///{tmp}/broker.db", name, seconds, repeats)
            continue
        with server(name, given_url(name)) as srv:
            servers[name] = srv.description
            results[name], lags[name] = bench_backend(srv.url, name, seconds, repeats)
    print("## msgstream.aio against the sync API\n")
    print(table(results, lags))
    print(
        "\nOne channel, packs of 1000 one-row inserts. async/sync: median over runs of the async side's rate"
        " divided by the sync side's in the same run. Loop lag: how much later than asked a task sleeping"
        " 1 ms woke while a producer task and a consumer task ran on the loop (idle: the loop with nothing"
        " else). Brokers: " + "; ".join(f"{k}: {v}" for k, v in servers.items())
    )
    if args.json is not None:
        report = {
            "benchmark": "aio",
            "environment": env,
            "settings": {"seconds": seconds, "repeats": repeats, "pack_size": PACK_SIZE, "row_sizes": list(ROW_SIZES)},
            "results": {k: [r.as_dict() for r in rows] for k, rows in results.items()},
            "loop_lag": lags,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        progress(f"wrote {args.json}")
    return 0
