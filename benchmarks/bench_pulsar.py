"""Pulsar benchmark: msgstream's Pulsar backend against raw pulsar-client doing the same work.

``python -m benchmarks pulsar [--seconds S] [--repeats N] [--json PATH] [--url URL] [--unbatched-only]``

Runs against Apache Pulsar standalone started for the run through ``scripts/broker.py`` on free loopback
ports, pinned to CPUs of its own (``bench_core.apart``), unless ``--url`` or ``MSGSTREAM_PULSAR_URL``
names a broker (add ``?admin_url=http://host:8080`` to have topics deleted after use). Both sides use
the same broker from the same process; each side has its own ``pulsar.Client``.

Every figure is measured twice, once per topic layout, because batching is the one setting that changes
both the speed and the semantics (docs/backends.md): **unbatched** (msgstream's default: one broker entry
per message, so acknowledgements are exact) and **batched** (``batching=true``). Within a layout the raw
side gets exactly the settings msgstream's backend uses: its producer configuration (``producer_conf``:
batching on or off, batches of up to 1000 messages and 1 ms publish delay, ``block_if_queue_full``,
``max_pending_messages=10000``, the send timeout) and its consumer's (Failover subscription,
``receiver_queue_size=1000``, a batch-receive policy of 1000 messages or 1 ms, earliest), and a client
with the same operation timeout.

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
   same layout: ``batch_receive()``, ``data()`` of each message, and an individual ``acknowledge`` of
   each. Raw runs twice: decoding nothing, and with ``UnmarshalDispatcher().unmarshal`` of every payload.
   On both sides the clock starts when the first batch has arrived (subscribing is not timed), and the
   messages of that batch are not counted.

A produce run opens every side (a fresh topic each), then the sides send one pack each in turn, who goes
first rotating (``report.interleaved``), until the run's timed seconds reach ``--seconds`` (a side moves
to a fresh topic after ``ROUND_MSGS``). Consume rounds of the sides take turns (the order alternates)
until the run's timed seconds reach ``--seconds``, each on a fresh topic filled by a raw producer of the
layout. Topics are deleted after use through the admin REST API (msgstream's when their channel is
destroyed, with ``admin_url``). Each figure is the median of ``--repeats`` runs after an untimed warm-up
of every side; a ratio is the median of the per-run ratios (msgstream rate over raw rate, measured in
the same run). MB = 10**6 bytes of frames.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pulsar  # type: ignore[import-untyped]
from msgstream_pulsar import PulsarBackend

import msgstream as ms
from benchmarks.bench_core import clock, environment, print_environment, take_until
from benchmarks.brokers import server
from benchmarks.report import (
    TARGET_RULE,
    PackFrames,
    Row,
    SendPack,
    consume_rows,
    consume_sides,
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
TARGETS = {100: 0.7, 1024: 0.85}  # least msgstream/raw ratio the project asks for, by row size
ROUND_MSGS = {False: 10_000, True: 50_000}  # most messages one round writes or reads, by batching
ROUND_BYTES = 12 * 2**20  # and at most this many frame bytes
WARMUP_MSGS = 2 * PACK_SIZE
TIMEOUT_MS = 10_000  # a consumer that gets nothing for this long means a bug, not a slow machine


class Bench:
    """Both sides on one broker: a msgstream Client per layout and a raw pulsar.Client with the backend's
    settings."""

    def __init__(self, url: str, run_id: str) -> None:
        self.url = url
        self.run_id = run_id
        self.clients = {batched: ms.connect(url, batching=str(batched).lower()) for batched in (False, True)}
        backend: Any = self.clients[False].backend
        if not isinstance(backend, PulsarBackend):
            raise SystemExit(f"{url} is not served by the Pulsar backend ({type(backend).__name__})")
        self.backend = backend
        self.admin_url: str | None = backend.options.get("admin_url")  # deletes the raw topics too
        self.raw = pulsar.Client(
            url.split("?", 1)[0].rstrip("/"),
            operation_timeout_seconds=max(1, round(backend.timeout)),
            logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn),
        )
        self.owner = ms.OwnerDescription(role="bench")
        self._n = 0

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.raw.close()

    def settings_info(self) -> dict[str, Any]:
        backend = self.backend
        return {
            "pulsar-client": importlib.metadata.version("pulsar-client"),
            "raw_producer (unbatched layout)": self.producer_conf(False),
            "raw_producer (batched layout)": self.producer_conf(True),
            "raw_consumer": f"{backend.consumer_type}, receiver_queue_size={backend.receiver_queue_size},"
            f" batch_receive_policy=({backend.receiver_queue_size} messages, 1 ms), earliest",
            "topics": "deleted after use" if self.admin_url else "left on the broker (no admin_url in the URL)",
        }

    def producer_conf(self, batched: bool) -> dict[str, Any]:
        """The backend's producer settings for the layout: the raw producers get the very same."""
        conf: dict[str, Any] = self.clients[batched].backend.producer_conf  # type: ignore[attr-defined]
        return dict(conf)

    def new_topic(self) -> str:
        self._n += 1
        return f"persistent://public/default/bench-raw-{self.run_id}-{self._n}"

    def drop_topic(self, topic: str) -> None:
        """Delete a raw topic through the admin REST API (where the URL names one)."""
        if not self.admin_url:
            return
        path = urllib.parse.quote(topic.removeprefix("persistent://"))
        request = urllib.request.Request(f"{self.admin_url}/admin/v2/persistent/{path}?force=true", method="DELETE")
        with suppress(OSError), urllib.request.urlopen(request, timeout=30):
            pass

    @contextmanager
    def channel(self, batched: bool) -> Iterator[str]:
        """A fresh msgstream channel of the layout; destroyed (its topic deleted, with admin_url) afterwards."""
        client = self.clients[batched]
        [name] = client.create_channels(ms.CreateChannelRequest(owner=self.owner, num_channels=1))
        try:
            yield name
        finally:
            client.destroy_channels([name])

    def topic_of(self, batched: bool, channel: str) -> str:
        return str(self.clients[batched].backend._registry[channel].topic)  # type: ignore[attr-defined]

    def fill(self, topic: str, frames: list[bytes], n: int, batched: bool) -> None:
        """``n`` messages into ``topic`` by a raw producer of the layout (untimed)."""
        producer = self.raw.create_producer(topic, **self.producer_conf(batched))
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
        with self.channel(batched) as channel:

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
        topic = self.new_topic()
        producer = self.raw.create_producer(topic, **self.producer_conf(batched))
        try:
            yield lambda: self._send(producer, pack_frames())
        finally:
            producer.close()
            self.drop_topic(topic)

    # -- consume ------------------------------------------------------------------------------------
    def consume_msgstream(
        self, frames: list[bytes], batched: bool, n: int, as_frames: bool = False
    ) -> tuple[int, float]:
        with self.channel(batched) as channel:
            self.fill(self.topic_of(batched, channel), frames, n, batched)
            with subscribed(self.clients[batched], "bench", channel, as_frames, PACK_SIZE) as (stream, take):
                first = take(TIMEOUT_MS / 1000)
                if first is None:
                    raise RuntimeError("msgstream consume returned nothing")
                received = skipped = first
                t0 = clock()
                received = take_until(take, received, n, TIMEOUT_MS / 1000)
                if stream.consume(timeout=0) is not None:  # acknowledges the last pack
                    raise RuntimeError("msgstream consume returned more messages than were sent")
                elapsed = clock() - t0
        return received - skipped, elapsed

    def consume_raw(
        self, frames: list[bytes], batched: bool, n: int, unmarshal: Callable[[bytes], ms.TsMsg] | None
    ) -> tuple[int, float]:
        topic = self.new_topic()
        self.fill(topic, frames, n, batched)
        backend = self.backend
        consumer = self.raw.subscribe(
            topic,
            "bench",
            consumer_type=backend.consumer_type,
            initial_position=pulsar.InitialPosition.Earliest,
            receiver_queue_size=backend.receiver_queue_size,
            batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(backend.receiver_queue_size, -1, 1),
            batch_index_ack_enabled=backend.batch_index_ack,
        )
        try:
            acknowledge = consumer.acknowledge

            def take() -> int:
                batch = consumer.batch_receive()  # returns within the policy's 1 ms, maybe empty
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
            self.drop_topic(topic)
        if received != n:
            raise RuntimeError(f"raw consume read {received} messages, {n} were sent")
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
    rates = runs(sides, seconds, repeats)
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
    env: dict[str, Any] = {}
    rows: list[Row] = []
    started = clock()
    layouts = (False,) if getattr(args, "unbatched_only", False) else (False, True)
    with server("pulsar", args.url) as broker:
        bench = Bench(broker.url, uuid.uuid4().hex[:8])
        try:
            env = {**environment(), **bench.settings_info(), "server": broker.description}
            print_environment(env, f"median of {repeats} runs of ~{seconds:g} s each, after a warm-up")
            for row_bytes in ROW_SIZES:
                for batched in layouts:
                    for operation in ("produce", "consume"):
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
        f" Total time {elapsed:.0f} s.\n"
    )
    print(verdicts(rows))
    if args.json is not None:
        report = {
            "benchmark": "pulsar",
            "environment": env,
            "settings": {"seconds": seconds, "repeats": repeats, "pack_size": PACK_SIZE, "round_msgs": ROUND_MSGS},
            "elapsed_s": round(elapsed, 1),
            "results": [r.as_dict() for r in rows],
        }
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        progress(f"wrote {args.json}")
    return 0
