"""Kafka benchmark: msgstream's Kafka backend against raw confluent-kafka doing the same work.

``python -m benchmarks kafka [--seconds S] [--repeats N] [--json PATH] [--url URL]``

Runs against Apache Kafka (KRaft, one node) started for the run through ``scripts/broker.py`` on free
loopback ports, pinned to CPUs of its own (``bench_core.apart``), unless ``--url`` or
``MSGSTREAM_KAFKA_URL`` names a broker. Both sides use the same broker from the same process, each with
its own librdkafka clients, and the raw clients get exactly the settings msgstream's backend gives its
own (its producer and consumer configuration, the URL's librdkafka options included): producers
``acks=all, enable.idempotence=true, linger.ms=5, allow.auto.create.topics=false``; consumers
``enable.auto.commit=false, enable.auto.offset.store=false, partition.assignment.strategy=roundrobin,
fetch.queue.backoff.ms=10, fetch.wait.max.ms=100, max.poll.interval.ms=300000`` and
``auto.offset.reset=earliest``; everything else at librdkafka's defaults (the environment lists any
setting that differs).

For one-row ``InsertMsg`` of 100 B and 1 KiB row data (the pack and its frames are built once):

1. produce: ``MsgStream.produce`` of a pack of 1000 messages into one channel (pack checks, routing,
   marshal, validation by decoding each frame back, then the frames queued with a delivery callback
   that records each report, one ``flush``, and a message id per report) against raw confluent-kafka:
   ``produce(topic, frame, partition=0, on_delivery=cb)`` of the same 1000 frames and ONE ``flush``, the
   callback counting errors and the flush's count of messages left checked: what someone who must know
   that every message landed writes. Raw runs twice: with the frames made beforehand, and marshalling
   each message (``msg.marshal()``) as it sends it, so that, as for consume, the two ratios separate the
   codec's cost from the transport's; the target applies to equal work, typed messages in on both sides.
2. consume: ``MsgStream.consume`` (``receive_batch=1000``) of N pre-produced messages until all arrived,
   then one more ``consume(timeout=0)``, which commits the last pack; against a raw consumer in a group:
   ``consume(min(1000, left), timeout)``, a check of ``error()`` per message, and an asynchronous commit
   of each batch. Raw runs twice: decoding nothing, and with ``UnmarshalDispatcher().unmarshal`` of every
   payload, so that the two ratios separate the codec's cost from the transport's. Every consume round
   joins a new consumer group, and the join is not timed: on both sides the clock starts when the first
   batch has arrived, and the messages of that batch are not counted.

A produce run opens the three sides (each on a fresh topic with a unique name: a new channel for msgstream, a new
topic for raw), then the sides send one pack each in turn, who goes first rotating (``report.interleaved``), until the
run's timed seconds reach ``--seconds``; a side moves to a fresh topic after ``ROUND_BYTES``. Turns of one pack (a few
ms) rather than whole rounds give every side the same broker: its log segments, page cache and garbage collector in
the same state. A consume run is ``CONSUME_ROUNDS`` rounds of each side, taking turns. Every consume round of every side
reads the same topic, one msgstream channel filled once per section by the raw producer, from its start, as a new
consumer group: the same record batches for both sides, and no writes during the section. Rounds are capped at
``CONSUME_ROUND_BYTES`` / ``CONSUME_ROUND_MSGS``, which keep a round within librdkafka's local fetch queue (see there).
Topics are deleted after use (msgstream's when their channel is destroyed, the raw ones by the benchmark). Untimed:
creating topics and groups, filling the topics, the group join, closing, and checking what landed (the watermarks of
each produced topic, the committed offset of each group). Each figure is the median of ``--repeats`` runs after an
untimed warm-up of every side; a ratio is the median of the per-run ratios (msgstream rate over raw rate, both measured
in the same run). MB = 10**6 bytes of frames (header included); both sides move the same frames.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import confluent_kafka as ck
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from msgstream_kafka import KafkaBackend

import msgstream as ms
from benchmarks.bench_core import clock, environment, print_environment, take_until
from benchmarks.brokers import Server, server
from benchmarks.report import (
    TARGET_RULE,
    PackFrames,
    Row,
    SendPack,
    Sent,
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

ROW_SIZES = (100, 1024)  # bytes of row_data in each InsertMsg
PACK_SIZE = 1000  # messages per produce() / flush / consume batch
TARGETS = {100: 0.7, 1024: 0.85}  # least msgstream/raw ratio the project asks for, by row size
ROUND_BYTES = 32 * 2**20  # most frame bytes a produce side writes to one topic
# most frame bytes / messages one consume round reads: under librdkafka's local fetch queue limits
# (queued.max.messages.kbytes 64 MiB, queued.min.messages 100000). Past them the fetcher pauses for
# fetch.queue.backoff.ms (librdkafka's 1 s, the backend's 10 ms) each time the queue fills: a round
# within them measures per-message cost, not that tuning.
CONSUME_ROUND_BYTES = 56 * 2**20
CONSUME_ROUND_MSGS = 90_000
CONSUME_ROUNDS = 6  # consume rounds of each side per run
WARMUP_SECONDS = 0.1  # produce: timed seconds of the untimed warm-up run
WARMUP_MSGS = 5 * PACK_SIZE  # consume: messages of the untimed warm-up round of each side
JOIN_TIMEOUT = 30.0  # the first batch of a consume round (group join included) takes at most this
CONSUME_TIMEOUT = 10.0  # a consume that returns nothing for this long means a bug, not a slow machine
OPERATION_TIMEOUT = 30.0  # flush, topic creation, offset look-ups

# the raw consumer's one setting of its own: msgstream sets the start per subscription (earliest here)
RAW_CONSUMER: dict[str, Any] = {"auto.offset.reset": "earliest"}

_NAMES = itertools.count(1)  # numbers raw topics and groups across the sections of a run


# -- the two sides ----------------------------------------------------------------------------------
def _plain(conf: dict[str, Any]) -> dict[str, Any]:
    """A client configuration of the backend without its Python logger (librdkafka logs to stderr)."""
    return {k: v for k, v in conf.items() if k != "logger"}


class Bench:
    """One msgstream client and raw confluent-kafka clients on the same broker, and the rounds of each side."""

    def __init__(self, url: str, run_id: str) -> None:
        self.run_id = run_id
        self.client = ms.connect(url)
        backend = self.client.backend
        if not isinstance(backend, KafkaBackend):
            raise SystemExit(f"{self.client.url} is not served by the Kafka backend ({type(backend).__name__})")
        self.backend = backend
        # the backend's own client settings, the URL's librdkafka options (connection, security) included
        self.producer_conf = _plain(backend.producer_conf)
        self.consumer_conf = {**_plain(backend.consumer_conf), **RAW_CONSUMER}
        self.admin = AdminClient(_plain(backend.admin_conf))
        self.producer = ck.Producer(self.producer_conf)
        self.producer.list_topics(timeout=OPERATION_TIMEOUT)  # connected before the first round
        # reads watermarks and committed offsets; never joins a group
        self.reader = ck.Consumer({**self.consumer_conf, "group.id": f"bench-{run_id}-reader"})
        self.owner = ms.OwnerDescription(role="bench", description_text="benchmarks.bench_kafka")
        self._raw_topics: list[str] = []

    def close(self) -> None:
        try:
            if self.backend.delete_topics and self._raw_topics:  # left by a failed round
                for future in self.admin.delete_topics(self._raw_topics, operation_timeout=OPERATION_TIMEOUT).values():
                    with suppress(ck.KafkaException):
                        future.result(OPERATION_TIMEOUT)
        finally:
            self.producer.flush(OPERATION_TIMEOUT)
            self.reader.close()
            self.client.close()
            # let go of every librdkafka handle (threads, sockets) now, before the broker stops
            del self.producer, self.admin, self.reader, self.client, self.backend
            gc.collect()

    def settings_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "confluent_kafka": ck.version(),
            "librdkafka": ck.libversion()[0],
            "names": f"raw topics and groups bench-{self.run_id}-*, msgstream channels bench-<12 hex>-0",
            "raw_producer": {k: v for k, v in self.producer_conf.items() if k != "bootstrap.servers"},
            "raw_consumer": {k: v for k, v in self.consumer_conf.items() if k != "bootstrap.servers"},
        }
        differ = {
            f"{role} {key}": f"msgstream {mine.get(key)!r}, raw {value!r}"
            for role, mine, raw in (
                ("producer", self.backend.producer_conf, self.producer_conf),
                ("consumer", self.backend.consumer_conf, self.consumer_conf),
            )
            for key, value in raw.items()
            if key != "auto.offset.reset" and mine.get(key) != value
        }
        info["settings_that_differ"] = differ or "none (auto.offset.reset is set per msgstream subscription)"
        return info

    # -- helpers ------------------------------------------------------------------------------------
    def new_name(self, kind: str) -> str:
        return f"bench-{self.run_id}-{kind}-{next(_NAMES)}"

    def new_topic(self) -> str:
        topic = self.new_name("raw")
        new = NewTopic(topic, num_partitions=1, replication_factor=self.backend.replication)
        self.admin.create_topics([new], operation_timeout=OPERATION_TIMEOUT)[topic].result(OPERATION_TIMEOUT)
        self._raw_topics.append(topic)
        return topic

    def drop_topic(self, topic: str) -> None:
        """Delete a raw topic where msgstream deletes its channels' topics (``delete_topics``, the default)."""
        self._raw_topics.remove(topic)
        if self.backend.delete_topics:
            self.admin.delete_topics([topic], operation_timeout=OPERATION_TIMEOUT)[topic].result(OPERATION_TIMEOUT)

    @contextmanager
    def channel(self) -> Iterator[str]:
        """A fresh msgstream channel (its topic has the same name); destroyed afterwards."""
        [name] = self.client.create_channels(ms.CreateChannelRequest(owner=self.owner, num_channels=1))
        try:
            yield name
        finally:
            self.client.destroy_channels([name])

    def send_packs(self, topic: str, frames: list[bytes], n_msgs: int) -> None:
        """Untimed fill: ``n_msgs`` frames in flushes of ``PACK_SIZE``, as the raw produce rounds send them."""
        errors: list[ck.KafkaError] = []

        def on_delivery(err: ck.KafkaError | None, _msg: ck.Message) -> None:
            if err is not None:
                errors.append(err)

        for _ in range(n_msgs // PACK_SIZE):
            for frame in frames:
                self.producer.produce(topic, frame, partition=0, on_delivery=on_delivery)
            if self.producer.flush(OPERATION_TIMEOUT) or errors:
                raise RuntimeError(f"filling {topic}: {errors[0].str() if errors else 'flush timed out'}")

    def check_topic(self, topic: str, expected: int) -> None:
        low, high = self.reader.get_watermark_offsets(ck.TopicPartition(topic, 0), timeout=OPERATION_TIMEOUT)
        held = high - low
        if held != expected:
            raise RuntimeError(f"topic {topic} holds {held} messages, expected {expected}")

    def check_committed(self, group: str, topic: str, received: int, expected: int) -> None:
        if received != expected:
            raise RuntimeError(f"consumed {received} messages from {topic}, expected {expected}")
        checker = ck.Consumer({**self.consumer_conf, "group.id": group})  # never joins: reads offsets only
        try:
            [tp] = checker.committed([ck.TopicPartition(topic, 0)], timeout=OPERATION_TIMEOUT)
        finally:
            checker.close()
        if tp.offset != expected:
            raise RuntimeError(f"group {group} committed offset {tp.offset} on {topic}, expected {expected}")

    # -- produce ------------------------------------------------------------------------------------
    @contextmanager
    def produce_msgstream(self, pack: ms.MsgPack) -> Iterator[SendPack]:
        """A fresh channel and a stream producing to it; yields the send of one pack."""
        with self.channel() as name:
            with self.client.msg_stream() as stream:
                stream.create_producers([name])
                stream.start()
                sent = Sent(lambda: stream.produce(pack), PACK_SIZE)
                yield sent
            self.check_topic(name, sent.msgs)

    @contextmanager
    def produce_raw(self, pack_frames: PackFrames) -> Iterator[SendPack]:
        """A fresh topic; yields the send of one pack by the raw producer: a produce() per frame, one flush."""
        topic = self.new_topic()
        producer = self.producer
        produce, flush = producer.produce, producer.flush
        errors = 0

        def on_delivery(err: ck.KafkaError | None, _msg: ck.Message) -> None:
            nonlocal errors
            if err is not None:
                errors += 1

        def send() -> None:
            for frame in pack_frames():
                produce(topic, frame, partition=0, on_delivery=on_delivery)
            left = flush(OPERATION_TIMEOUT)
            if left or errors:
                raise RuntimeError(f"raw produce to {topic}: {errors} failed, {left} not confirmed")

        sent = Sent(send, PACK_SIZE)
        try:
            yield sent
            self.check_topic(topic, sent.msgs)
        finally:
            self.drop_topic(topic)

    # -- consume ------------------------------------------------------------------------------------
    def consume_msgstream(self, name: str, n_msgs: int, as_frames: bool = False) -> tuple[int, float]:
        """A new group reads channel ``name`` (``n_msgs`` messages) from its start."""
        group = self.new_name("group")
        with subscribed(self.client, group, name, as_frames, PACK_SIZE) as (stream, take):
            first = take(JOIN_TIMEOUT)  # untimed: joins the group
            if first is None:
                raise RuntimeError(f"msgstream consume returned nothing within {JOIN_TIMEOUT} s of joining")
            received = skipped = first
            t0 = clock()
            received = take_until(take, received, n_msgs, CONSUME_TIMEOUT)
            if stream.consume(timeout=0) is not None:  # commits the last pack (asynchronously)
                raise RuntimeError(f"msgstream consume returned more than the {n_msgs} messages of {name}")
            elapsed = clock() - t0
        self.check_committed(group, name, received, n_msgs)
        return received - skipped, elapsed

    def consume_raw(self, topic: str, n_msgs: int, unmarshal: Callable[[bytes], ms.TsMsg] | None) -> tuple[int, float]:
        """A new group reads ``topic`` (``n_msgs`` messages) from its start."""
        group = self.new_name("group")
        consumer = ck.Consumer({**self.consumer_conf, "group.id": group})
        try:
            consumer.subscribe([topic])

            def take(count: int, timeout: float) -> int:
                batch = consumer.consume(count, timeout)
                if not batch:
                    raise RuntimeError(f"raw consume returned nothing within {timeout} s ({topic})")
                payloads: list[Any]
                if unmarshal is None:
                    payloads = [m.value() for m in batch if m.error() is None]
                else:
                    payloads = [unmarshal(m.value()) for m in batch if m.error() is None]  # type: ignore[arg-type]
                if len(payloads) != len(batch):
                    raise ck.KafkaException(next(m.error() for m in batch if m.error() is not None))
                consumer.commit(message=batch[-1], asynchronous=True)
                return len(batch)

            gc.collect()
            received = skipped = take(min(PACK_SIZE, n_msgs), JOIN_TIMEOUT)  # untimed: joins the group
            t0 = clock()
            while received < n_msgs:
                received += take(min(PACK_SIZE, n_msgs - received), CONSUME_TIMEOUT)
            elapsed = clock() - t0
        finally:
            consumer.close()
        self.check_committed(group, topic, received, n_msgs)
        return received - skipped, elapsed


# -- runs -------------------------------------------------------------------------------------------
def _consume_round_msgs(size: float) -> int:
    return max(1, min(CONSUME_ROUND_MSGS, int(CONSUME_ROUND_BYTES / size)) // PACK_SIZE) * PACK_SIZE


def bench_produce(bench: Bench, row_bytes: int, seconds: float, repeats: int) -> list[Row]:
    pack, frames, size = workload(row_bytes, PACK_SIZE)
    max_packs = max(1, int(ROUND_BYTES / size / PACK_SIZE))
    sides = produce_sides(lambda: bench.produce_msgstream(pack), bench.produce_raw, pack, frames)
    interleaved(sides, WARMUP_SECONDS, 1, PACK_SIZE, max_packs)
    rates = interleaved(sides, seconds, repeats, PACK_SIZE, max_packs)
    return produce_rows("raw confluent-kafka: 1000 produce() + 1 flush", row_bytes, size, TARGETS[row_bytes], rates)


def bench_consume(bench: Bench, row_bytes: int, repeats: int) -> list[Row]:
    pack, frames, size = workload(row_bytes, PACK_SIZE)
    n_msgs = _consume_round_msgs(size)
    unmarshal = ms.UnmarshalDispatcher().unmarshal
    if unmarshal(frames[0]) != pack.msgs[0]:
        raise AssertionError("codec round trip changed the message")
    with bench.channel() as warm, bench.channel() as name:  # msgstream channels: raw reads their topics
        bench.send_packs(warm, frames, WARMUP_MSGS)
        bench.send_packs(name, frames, n_msgs)
        warm_up = consume_sides(
            lambda f: bench.consume_msgstream(warm, WARMUP_MSGS, f), lambda u: bench.consume_raw(warm, WARMUP_MSGS, u)
        )
        for side in warm_up.values():
            side()
        sides = consume_sides(
            lambda f: bench.consume_msgstream(name, n_msgs, f), lambda u: bench.consume_raw(name, n_msgs, u)
        )
        rates = runs(sides, 0.0, repeats, CONSUME_ROUNDS)  # not by time: each round joins a group (~1 s)
    return consume_rows("raw confluent-kafka: consume(1000) + async commit", row_bytes, size, TARGETS[row_bytes], rates)


# -- report -----------------------------------------------------------------------------------------


def _environment(bench: Bench, broker: Server) -> dict[str, Any]:
    return {**environment(), **bench.settings_info(), "server": broker.description}


def run(args: argparse.Namespace) -> int:
    seconds: float = args.seconds
    repeats: int = args.repeats
    run_id = uuid.uuid4().hex[:12]
    env: dict[str, Any] = {}
    rows: list[Row] = []
    rss: list[float] = []  # the broker's resident memory at the end of each section
    started = clock()
    with server("kafka", args.url) as broker:
        bench = Bench(broker.url, run_id)
        try:
            env = _environment(bench, broker)
            print_environment(
                env,
                f"produce: median of {repeats} runs of ~{seconds:g} s each; consume: median"
                f" of {repeats} runs of {CONSUME_ROUNDS} rounds per side; after a warm-up",
            )
            for row_bytes in ROW_SIZES:
                for operation in ("produce", "consume"):
                    progress(f"{operation}, {size_text(row_bytes)} rows ...")
                    if operation == "produce":
                        rows += bench_produce(bench, row_bytes, seconds, repeats)
                    else:
                        rows += bench_consume(bench, row_bytes, repeats)
                    if (mib := broker.rss_mib()) is not None:
                        rss.append(mib)
        finally:
            bench.close()
    elapsed = clock() - started

    print("## Results\n")
    print(markdown_table(rows))
    consume_msgs = {size_text(r.row_bytes): _consume_round_msgs(r.msg_bytes) for r in rows if r.section == "consume"}
    rounds = ", ".join(f"{n:,} at {size}" for size, n in consume_msgs.items())
    print(
        "\nOne-row InsertMsg, one single-partition topic per produce side (a fresh one after"
        f" {ROUND_BYTES >> 20} MiB) and per consume section, {PACK_SIZE} messages per produce call / flush"
        f" and per consume batch; consume rounds read {rounds} (the first batch, which waits for the group"
        " join, is not timed). MB = 10^6 bytes of frames (Bytes/msg; the same bytes on both sides)."
        f" {TARGET_RULE} Spread: (max - min) / median of the {repeats} runs."
        " Consume rounds fit librdkafka's local fetch queue"
        " (queued.min.messages 100000, queued.max.messages.kbytes 64 MiB)."
        f" Total time {elapsed:.0f} s"
        + (f"; the broker's resident memory reached {max(rss):,.0f} MiB." if rss else ".")
        + "\n"
    )
    print(verdicts(rows))
    if args.json is not None:
        report = {
            "benchmark": "kafka",
            "environment": env,
            "settings": {
                "seconds": seconds,
                "repeats": repeats,
                "pack_size": PACK_SIZE,
                "row_sizes": list(ROW_SIZES),
                "round_bytes": ROUND_BYTES,
                "consume_rounds": CONSUME_ROUNDS,
                "consume_round_msgs": consume_msgs,
            },
            "elapsed_s": round(elapsed, 1),
            "broker_rss_mib_per_section": [round(mib) for mib in rss],
            "results": [r.as_dict() for r in rows],
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        progress(f"wrote {args.json}")
    return 0
