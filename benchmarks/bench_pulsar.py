"""Pulsar benchmark: msgstream's Pulsar backend against raw pulsar-client doing the same work.

``python -m benchmarks pulsar [--seconds S] [--repeats N] [--json PATH] [--url URL]``

Runs against pulsar-lite (a Pulsar-protocol broker, from its PyPI wheel) started for the run on a free
loopback port with its metrics server off, unless ``--url`` or ``MSGSTREAM_PULSAR_URL`` names a broker.
Both sides use the same broker from the same process; each side has its own ``pulsar.Client``.

Every figure is measured twice, once per topic layout, because batching is the one setting that changes
both the speed and the semantics (docs/backends.md): **unbatched** (msgstream's default: one broker entry
per message, so acknowledgements are exact) and **batched** (``batching=true``; the raw producer with
``batching_enabled=True``, batches of up to 1000 messages, 1 ms publish delay). Within a layout both sides
use the same producer settings (``block_if_queue_full``, ``max_pending_messages=10000``) and consumer
settings (Failover subscription, ``receiver_queue_size=1000``, earliest).

For one-row ``InsertMsg`` of 100 B and 1 KiB row data (the pack and its frames are built once):

1. produce: ``MsgStream.produce`` of a pack of 1000 messages into one channel (pack checks, routing,
   marshal, validation, then ``send_async`` per frame with one shared callback collecting every result,
   and a wait for the last) against raw pulsar-client: ``send_async(frame, callback)`` of the same 1000
   frames and one ``flush()``, the callback counting errors: what someone who must know that every
   message landed writes. Raw runs twice: with the frames made beforehand, and marshalling each message
   (``msg.marshal()``) as it sends it; the target applies to the second, equal work (typed messages in on
   both sides).
2. consume: ``MsgStream.consume`` (``receive_batch=1000``) of N pre-produced messages until all arrived,
   then one more ``consume(timeout=0)``, which acknowledges the last pack; against a raw consumer on the
   same layout: ``batch_receive()`` (policy: 1000 messages or 10 ms), ``data()`` of each message, and an
   individual ``acknowledge`` of each. Raw runs twice: decoding nothing, and with
   ``UnmarshalDispatcher().unmarshal`` of every payload. On both sides the clock starts when the first
   batch has arrived (subscribing is not timed), and the messages of that batch are not counted.

A produce run opens every side (a fresh topic each: pulsar-lite cannot delete topics), then the sides
send one pack each in turn, who goes first rotating (``report.interleaved``), until the run's timed
seconds reach ``--seconds`` (a side moves to a fresh topic after ``ROUND_MSGS``). Consume rounds of the
sides take turns (the order alternates) until the run's timed seconds reach ``--seconds``, each on a
fresh topic. Each section (operation x row size x layout) has a fresh pulsar-lite, on CPUs of its own
(``bench_core.apart``). Each figure is the median of ``--repeats`` runs after an untimed warm-up of
every side; a ratio is the median of the per-run ratios (msgstream rate over
raw rate, measured in the same run). MB = 10**6 bytes of frames.

pulsar-lite now and then stops delivering to a consumer for seconds although messages wait (raw
pulsar-client consumers as well as msgstream's; more often on long 1 KiB unbatched rounds). A consume
round that gets nothing for ``TIMEOUT_MS`` is run again, untimed, and the report counts those stalls.
A msgstream round recovers by itself (the backend's ``stall_timeout`` check, docs/backends.md gap 7),
but its time would then hold the stall as well: such a round is treated as stalled too, run again and
counted, so that both sides are measured on rounds the broker served.
The raw side also counts the repeated deliveries pulsar-lite makes (msgstream drops them), so its rate
is, if anything, flattered.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import logging
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pulsar  # type: ignore[import-untyped]

import msgstream as ms
from benchmarks.bench_core import apart, clock, environment, print_environment, take_until
from benchmarks.report import (
    TARGET_RULE,
    PackFrames,
    Round,
    Row,
    SendPack,
    consume_rows,
    consume_sides,
    free_port,
    interleaved,
    markdown_table,
    produce_rows,
    produce_sides,
    progress,
    runs,
    size_text,
    subscribed,
    verdicts,
    workload,
)

ROW_SIZES = (100, 1024)
PACK_SIZE = 1000
TARGETS = {100: 0.7, 1024: 0.9}
ROUND_MSGS = {False: 20_000, True: 50_000}  # most messages one round writes or reads, by batching
ROUND_BYTES = 12 * 2**20  # and at most this many frame bytes (pulsar-lite stalls more on long 1 KiB rounds)
WARMUP_MSGS = 2 * PACK_SIZE
TIMEOUT_MS = 5_000  # a consumer that gets nothing for this long is stalled, not slow
PRODUCER = {"block_if_queue_full": True, "max_pending_messages": 10000, "send_timeout_millis": 30000}
BATCHED = {"batching_enabled": True, "batching_max_messages": 1000, "batching_max_publish_delay_ms": 1}


@contextmanager
def pulsar_lite() -> Iterator[tuple[str, str]]:
    """pulsar-lite on a free loopback port (metrics off, its own data dir): (URL, version)."""
    try:
        from pulsar_lite.binary_finder import find_pulsar_lite_binary
    except ImportError:
        raise SystemExit("pulsar-lite is not installed (pip install pulsar-lite) and no --url given") from None
    binary = Path(find_pulsar_lite_binary())
    version = importlib.metadata.version("pulsar-lite")
    with apart() as pinned, tempfile.TemporaryDirectory(prefix="msgstream-bench-pulsar-") as tmp:
        config = Path(tmp) / "pl.toml"
        config.write_text('log_level = "warn"\ndefault_partitions = 0\n\n[metrics]\nenabled = false\n')
        for _ in range(5):
            port = free_port()
            argv = [str(binary), "--config", str(config), "--addr", f"127.0.0.1:{port}", "--db-path", f"{tmp}/data"]
            with open(Path(tmp) / "pl.out", "ab") as log:
                proc = subprocess.Popen([*pinned, *argv], stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    time.sleep(0.02)
            if proc.poll() is None:
                break
        else:
            raise SystemExit(f"pulsar-lite did not start: {(Path(tmp) / 'pl.out').read_text()[-2000:]}")
        try:
            yield f"pulsar://127.0.0.1:{port}", f"pulsar-lite {version}"
        finally:
            proc.terminate()
            proc.wait(10)


class Stalled(RuntimeError):
    """The broker stopped delivering to a consumer for TIMEOUT_MS (pulsar-lite does, now and then, to raw
    pulsar-client consumers too): the round is run again and the stall counted in the report."""


STALLS: list[str] = []


class _Recoveries(logging.Handler):
    """Counts the Pulsar backend's stall recoveries (its ``stall_timeout`` check subscribing again)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "subscribing again" in record.getMessage():
            self.count += 1


RECOVERIES = _Recoveries()
logging.getLogger("msgstream.pulsar").addHandler(RECOVERIES)


def retrying(side: str, round_: Round) -> Round:
    def run_round() -> tuple[int, float]:
        for _ in range(6):
            try:
                return round_()
            except (Stalled, pulsar.Timeout) as exc:
                STALLS.append(f"{side}: {exc}")
                progress(f"  stalled ({side}): {exc}; running the round again")
        raise RuntimeError(f"{side}: the broker stalled six rounds in a row")

    return run_round


class Bench:
    """Both sides on one broker: a msgstream Client per layout and a raw pulsar.Client."""

    def __init__(self, url: str, run_id: str) -> None:
        self.url = url
        self.run_id = run_id
        self.clients = {batched: ms.connect(url, batching=str(batched).lower()) for batched in (False, True)}
        self.raw = pulsar.Client(
            url, operation_timeout_seconds=30, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn)
        )
        self.owner = ms.OwnerDescription(role="bench")
        self._n = 0

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.raw.close()

    def new_topic(self) -> str:
        self._n += 1
        return f"persistent://public/default/bench-raw-{self.run_id}-{self._n}"

    def new_channel(self, batched: bool) -> str:
        [name] = self.clients[batched].create_channels(ms.CreateChannelRequest(owner=self.owner, num_channels=1))
        return name

    def topic_of(self, batched: bool, channel: str) -> str:
        return str(self.clients[batched].backend._registry[channel].topic)  # type: ignore[attr-defined]

    def fill(self, topic: str, frames: list[bytes], n: int, batched: bool) -> None:
        """``n`` messages into ``topic`` by a raw producer of the layout (untimed)."""
        producer = self.raw.create_producer(topic, **PRODUCER, **(BATCHED if batched else {}))
        try:
            for _ in range(n // len(frames)):
                self._send(producer, frames)
        finally:
            producer.close()

    @staticmethod
    def _send(producer: Any, frames: Iterable[bytes]) -> None:
        """One pack: ``send_async`` of each frame, then one ``flush``."""
        errors: list[Any] = []

        def callback(result: Any, _msg_id: Any) -> None:
            if result != pulsar.Result.Ok:
                errors.append(result)

        send_async = producer.send_async
        for frame in frames:
            send_async(frame, callback)
        producer.flush()
        if errors:
            raise RuntimeError(f"raw produce: {len(errors)} failed ({errors[0]})")

    # -- produce ------------------------------------------------------------------------------------
    @contextmanager
    def produce_msgstream(self, pack: ms.MsgPack, batched: bool) -> Iterator[SendPack]:
        """A fresh channel of the layout and a stream producing to it; yields the send of one pack."""
        channel = self.new_channel(batched)

        def send() -> None:
            ids = stream.produce(pack)[channel]
            if len(ids) != PACK_SIZE:
                raise RuntimeError(f"msgstream produce returned {len(ids)} ids")

        with self.clients[batched].msg_stream() as stream:
            stream.create_producers([channel])
            stream.start()
            yield send

    @contextmanager
    def produce_raw(self, pack_frames: PackFrames, batched: bool) -> Iterator[SendPack]:
        """A raw producer of the layout on a fresh topic; yields the send of one pack (see :meth:`_send`)."""
        producer = self.raw.create_producer(self.new_topic(), **PRODUCER, **(BATCHED if batched else {}))
        try:
            yield lambda: self._send(producer, pack_frames())
        finally:
            producer.close()

    # -- consume ------------------------------------------------------------------------------------
    def consume_msgstream(
        self, frames: list[bytes], batched: bool, n: int, as_frames: bool = False
    ) -> tuple[int, float]:
        channel = self.new_channel(batched)
        self.fill(self.topic_of(batched, channel), frames, n, batched)
        recoveries = RECOVERIES.count
        with subscribed(self.clients[batched], "bench", channel, as_frames, PACK_SIZE) as (stream, take):
            first = take(TIMEOUT_MS / 1000)
            if first is None:
                raise RuntimeError("msgstream consume returned nothing")
            received = skipped = first
            t0 = clock()
            received = take_until(take, received, n, TIMEOUT_MS / 1000, Stalled)
            if stream.consume(timeout=0) is not None:  # acknowledges the last pack
                raise RuntimeError("msgstream consume returned more messages than were sent")
            elapsed = clock() - t0
        if RECOVERIES.count != recoveries:  # the broker stalled; the backend recovered after stall_timeout
            raise Stalled(f"msgstream consume: the backend subscribed again after a delivery stall ({channel})")
        return received - skipped, elapsed

    def consume_raw(
        self, frames: list[bytes], batched: bool, n: int, unmarshal: Callable[[bytes], ms.TsMsg] | None
    ) -> tuple[int, float]:
        topic = self.new_topic()
        self.fill(topic, frames, n, batched)
        consumer = self.raw.subscribe(
            topic,
            "bench",
            consumer_type=pulsar.ConsumerType.Failover,
            initial_position=pulsar.InitialPosition.Earliest,
            receiver_queue_size=1000,
            batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(PACK_SIZE, -1, 10),
        )
        try:
            acknowledge = consumer.acknowledge

            def take() -> int:
                batch = consumer.batch_receive()  # returns within the policy's 10 ms, maybe empty
                if not batch:
                    batch = [consumer.receive(TIMEOUT_MS)]  # raises Timeout if the topic ran dry
                if unmarshal is None:
                    for m in batch:
                        m.data()
                        acknowledge(m)
                else:
                    for m in batch:
                        unmarshal(m.data())
                        acknowledge(m)
                return len(batch)

            gc.collect()
            first = consumer.receive(TIMEOUT_MS)  # untimed: subscribing, the first fetch
            acknowledge(first)
            received = skipped = 1
            t0 = clock()
            while received < n:
                received += take()
            elapsed = clock() - t0
        finally:
            consumer.close()
        # pulsar-lite now and then delivers a message of a new subscription twice (msgstream drops such
        # repeats; the raw side just reads on): so at least n, not exactly n
        if received < n:
            raise RuntimeError(f"raw consume read {received} of {n}")
        return received - skipped, elapsed


def bench_produce(bench: Bench, row_bytes: int, batched: bool, seconds: float, repeats: int) -> list[Row]:
    pack, frames, size = workload(row_bytes, PACK_SIZE)
    max_packs = ROUND_MSGS[batched] // PACK_SIZE
    sides = produce_sides(
        lambda: bench.produce_msgstream(pack, batched),
        lambda pack_frames: bench.produce_raw(pack_frames, batched),
        pack,
        frames,
    )
    interleaved(sides, 0.05, 1, PACK_SIZE, WARMUP_MSGS // PACK_SIZE)
    rates = interleaved(sides, seconds, repeats, PACK_SIZE, max_packs)
    layout = "batched" if batched else "unbatched"
    rows = produce_rows(
        f"raw pulsar-client, {layout}: 1000 send_async + 1 flush", row_bytes, size, TARGETS[row_bytes], rates
    )
    for row in rows:
        if row.name.startswith("msgstream"):
            row.name += f", {layout}"
    return rows


def bench_consume(bench: Bench, row_bytes: int, batched: bool, seconds: float, repeats: int) -> list[Row]:
    pack, frames, size = workload(row_bytes, PACK_SIZE)
    n = max(1, min(ROUND_MSGS[batched], int(ROUND_BYTES / size)) // PACK_SIZE) * PACK_SIZE
    unmarshal = ms.UnmarshalDispatcher().unmarshal
    if unmarshal(frames[0]) != pack.msgs[0]:
        raise AssertionError("codec round trip changed the message")
    for side in consume_sides(
        lambda f: bench.consume_msgstream(frames, batched, WARMUP_MSGS, f),
        lambda u: bench.consume_raw(frames, batched, WARMUP_MSGS, u),
    ).values():
        side()  # warm-up
    sides = consume_sides(
        lambda f: bench.consume_msgstream(frames, batched, n, f), lambda u: bench.consume_raw(frames, batched, n, u)
    )
    rates = runs({side: retrying(side, round_) for side, round_ in sides.items()}, seconds, repeats)
    layout = "batched" if batched else "unbatched"
    rows = consume_rows(
        f"raw pulsar-client, {layout}: batch_receive + acknowledge", row_bytes, size, TARGETS[row_bytes], rates
    )
    for row in rows:
        if row.name.startswith("msgstream"):
            row.name += f", {layout}"
    return rows


def run(args: argparse.Namespace) -> int:
    seconds: float = args.seconds
    repeats: int = args.repeats
    url: str | None = args.url
    env: dict[str, Any] = {}
    rows: list[Row] = []
    started = clock()
    layouts = (False,) if getattr(args, "unbatched_only", False) else (False, True)
    for row_bytes in ROW_SIZES:
        for batched in layouts:
            for operation in ("produce", "consume"):
                # a fresh broker per section: pulsar-lite stalls deliveries more often as its data grows
                with pulsar_lite() if url is None else _given(url) as (server_url, server):
                    bench = Bench(server_url, uuid.uuid4().hex[:8])
                    try:
                        if not env:
                            env = {
                                **environment(),
                                "pulsar-client": importlib.metadata.version("pulsar-client"),
                                "server": f"{server} on loopback (a fresh one per section), e.g. {server_url}",
                            }
                            print_environment(env, f"median of {repeats} runs of ~{seconds:g} s each, after a warm-up")
                        layout = "batched" if batched else "unbatched"
                        progress(f"{operation}, {size_text(row_bytes)} rows, {layout} ...")
                        bench_section = bench_produce if operation == "produce" else bench_consume
                        rows += bench_section(bench, row_bytes, batched, seconds, repeats)
                    finally:
                        bench.close()
    elapsed = clock() - started

    print("## Results\n")
    print(markdown_table(rows))
    print(
        "\nOne-row InsertMsg, one channel / topic per produce side and per consume round,"
        f" {PACK_SIZE} messages per produce call and consume"
        " batch; each comparison on one topic layout (unbatched: one entry per message, msgstream's default;"
        f" batched: `batching=true`). {TARGET_RULE} Spread: (max - min) / median of the {repeats} runs."
        f" Total time {elapsed:.0f} s. Consume rounds run again after a broker stall (no delivery for"
        f" {TIMEOUT_MS / 1000:g} s, not timed): {len(STALLS)} in this run"
        + (f" ({'; '.join(STALLS)})" if STALLS else "")
        + ".\n"
    )
    print(verdicts(rows))
    if args.json is not None:
        report = {
            "benchmark": "pulsar",
            "environment": env,
            "settings": {"seconds": seconds, "repeats": repeats, "pack_size": PACK_SIZE, "round_msgs": ROUND_MSGS},
            "elapsed_s": round(elapsed, 1),
            "stalls": STALLS,
            "results": [r.as_dict() for r in rows],
        }
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        progress(f"wrote {args.json}")
    return 0


@contextmanager
def _given(url: str) -> Iterator[tuple[str, str]]:
    yield url, "given broker"
