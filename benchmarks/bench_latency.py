"""Latency benchmark: produce -> consume time of single messages at a fixed rate, msgstream beside the raw
client of each broker with the same settings.

``python -m benchmarks latency [--seconds S] [--repeats N] [--json PATH] [--rate R]``

For each backend (memory://, and Redis, Apache Kafka and Apache Pulsar started for the run through
``scripts/broker.py``, each pinned to CPUs of its own, or the brokers ``MSGSTREAM_*_URL`` name) one thread
produces one-message packs (a 100 B ``InsertMsg``) at ``--rate`` messages per second, paced by the
clock, into one channel, while another thread consumes with ``MsgStream.consume`` and notes, per
message, the time from just before ``produce`` to the return of the ``consume`` that delivered it. Both
threads share the process (and so the GIL), as a service that produces and consumes would. The first
second is warm-up and not counted. Each side first has one untimed run; then each figure is the median
over ``--repeats`` runs of that run's percentile, the msgstream and raw runs of a backend alternating.

The raw clients run the same loop on the same broker, with the settings msgstream's backend uses:
redis-py ``XADD`` / ``XREADGROUP BLOCK`` + ``XACK``; confluent-kafka with the backend's producer and
consumer configuration (``acks=all``, idempotence, ``linger.ms=5``; ``fetch.wait.max.ms=100``, ...):
``produce`` + ``flush`` / ``poll`` then ``consume`` of what is fetched + asynchronous commit;
pulsar-client with the backend's producer configuration (unbatched) and consumer settings (Failover,
receiver queue 1000): ``send`` / ``receive`` + ``acknowledge``. A raw message is the same 100 B frame,
made just before the clock starts (msgstream marshals its message within the measured time) and decoded
on arrival on both sides (msgstream returns it typed; the raw loop unmarshals it to learn its index).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import msgstream as ms
from benchmarks.bench_core import environment, print_environment
from benchmarks.brokers import given_url, server
from benchmarks.report import progress

WARMUP_SECONDS = 1.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Side(Protocol):
    """One way of moving a message: msgstream, or a raw client doing the same work."""

    def send(self, i: int, frame: bytes) -> None: ...  # returns once the broker accepted it

    def receive(self, timeout: float) -> list[int]: ...  # indexes of what arrived (acknowledged), [] on timeout


class MsgStreamSide:
    def __init__(self, url: str) -> None:
        self.client = client = ms.connect(url)
        [chan] = self.channels = client.create_channels(
            ms.CreateChannelRequest(owner=ms.OwnerDescription(role="latency"), num_channels=1)
        )
        self.out = client.msg_stream()
        self.out.create_producers([chan])
        self.inp = client.msg_stream()
        self.inp.create_consumers("latency", [chan], position=ms.SubscriptionPosition.LATEST)
        self.inp.consume(timeout=0.5)  # joins / subscribes before the clock starts

    def send(self, i: int, frame: bytes) -> None:
        msg = ms.InsertMsg(begin_ts=i + 1, end_ts=i + 1, hash_values=[0], row_ids=[i], row_data=[_ROW])
        self.out.produce(ms.MsgPack(i + 1, i + 1, [msg]))

    def receive(self, timeout: float) -> list[int]:
        pack = self.inp.consume(timeout)
        return [] if pack is None else [m.row_ids[0] for m in pack.msgs]  # type: ignore[attr-defined]

    def close(self) -> None:
        self.out.close()
        self.inp.close()
        self.client.destroy_channels(self.channels)
        self.client.close()


_ROW = b"x" * 100
_DISPATCHER = ms.UnmarshalDispatcher()


def _frame(i: int) -> bytes:
    return ms.InsertMsg(begin_ts=i + 1, end_ts=i + 1, hash_values=[0], row_ids=[i], row_data=[_ROW]).marshal()


def _index(data: bytes) -> int:
    """The index a raw side's frame carries (its row id)."""
    msg = _DISPATCHER.unmarshal(data)
    return int(msg.row_ids[0])  # type: ignore[attr-defined]


def measure(open_side: Callable[[], Any], rate: float, seconds: float) -> dict[str, float]:
    """One run: latencies (ms) of the messages produced after the warm-up, between a producing thread
    (this one) and a consuming thread of the side ``open_side()`` returns."""
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    total = int(rate * (seconds + WARMUP_SECONDS))
    counted_from = int(rate * WARMUP_SECONDS)
    side = open_side()
    try:
        done = threading.Event()
        failure: list[BaseException] = []

        def consume() -> None:
            got = 0
            deadline = time.monotonic() + seconds + WARMUP_SECONDS + 30
            try:
                while got < total:
                    indexes = side.receive(1.0)
                    now = time.perf_counter()
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{got} of {total} messages arrived")
                    for i in indexes:
                        if i >= counted_from:
                            latencies.append((now - sent_at[i]) * 1000)
                        got += 1
            except BaseException as exc:  # reported by the main thread
                failure.append(exc)
            finally:
                done.set()

        reader = threading.Thread(target=consume)
        reader.start()
        start = time.perf_counter()
        for i in range(total):
            due = start + i / rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            frame = _frame(i)
            sent_at[i] = time.perf_counter()
            side.send(i, frame)
            if failure:
                break
        done.wait(60)
        reader.join(5)
        if failure:
            raise RuntimeError(f"latency run on {side!r}: {failure[0]}")
    finally:
        side.close()
    return {
        "p50_ms": _percentile(latencies, 0.50),
        "p99_ms": _percentile(latencies, 0.99),
        "max_ms": max(latencies),
        "messages": float(len(latencies)),
    }


# -- raw clients, each doing what the backend does for one message ----------------------------------
class RawRedis:
    """redis-py: ``XADD`` / ``XREADGROUP ... BLOCK`` + ``XACK`` on a stream key of its own."""

    def __init__(self, url: str) -> None:
        from benchmarks.bench_redis import raw_client

        self.r = raw_client(url)
        self.key = f"msgstream-latency-raw-{uuid.uuid4().hex[:8]}"
        self.r.xgroup_create(self.key, "latency", id="$", mkstream=True)

    def send(self, i: int, frame: bytes) -> None:
        self.r.execute_command("XADD", self.key, "*", "d", frame)  # type: ignore[no-untyped-call]

    def receive(self, timeout: float) -> list[int]:
        reply = self.r.execute_command(  # type: ignore[no-untyped-call]
            "XREADGROUP", "GROUP", "latency", "c", "COUNT", 1000, "BLOCK", int(timeout * 1000), "STREAMS", self.key, ">"
        )
        if not reply:
            return []
        entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        self.r.xack(self.key, "latency", *[entry_id for entry_id, _ in entries])
        return [_index(fields[1]) for _, fields in entries]

    def close(self) -> None:
        self.r.delete(self.key)
        self.r.close()


class RawKafka:
    """confluent-kafka with the backend's own producer and consumer settings: ``produce`` + ``flush``;
    ``consume`` + asynchronous commit, on a channel's topic."""

    def __init__(self, url: str) -> None:
        import confluent_kafka as ck

        self.client = ms.connect(url)
        backend: Any = self.client.backend
        [self.topic] = self.client.create_channels(
            ms.CreateChannelRequest(owner=ms.OwnerDescription(role="latency-raw"), num_channels=1)
        )
        plain = {k: v for k, v in backend.consumer_conf.items() if k != "logger"}
        self.producer = ck.Producer({k: v for k, v in backend.producer_conf.items() if k != "logger"})
        group = f"latency-raw-{uuid.uuid4().hex[:8]}"
        self.consumer = ck.Consumer({**plain, "group.id": group, "auto.offset.reset": "earliest"})
        self.consumer.subscribe([self.topic])
        deadline = time.monotonic() + 30
        while not self.consumer.assignment():  # joins before the clock starts
            if time.monotonic() > deadline:
                raise RuntimeError("raw Kafka consumer got no partition within 30 s")
            self.consumer.poll(0.1)

    def send(self, i: int, frame: bytes) -> None:
        self.producer.produce(self.topic, frame, partition=0)
        if self.producer.flush(10) != 0:
            raise RuntimeError("raw Kafka produce not confirmed within 10 s")

    def receive(self, timeout: float) -> list[int]:
        # consume(1000, timeout) alone waits out the timeout unless 1000 arrive: block for the first
        # message only, then take what is fetched already (as an expert would, and as the backend does)
        first = self.consumer.poll(timeout)
        batch = [] if first is None else [first, *self.consumer.consume(999, 0)]
        out = [_index(v) for m in batch if m.error() is None and (v := m.value()) is not None]
        if batch:
            self.consumer.commit(asynchronous=True)
        return out

    def close(self) -> None:
        self.consumer.close()
        self.client.destroy_channels([self.topic])
        self.client.close()


class RawPulsar:
    """pulsar-client with the backend's settings: its producer configuration (unbatched by default)
    ``send``; a Failover subscription with its receiver queue, ``receive`` + ``acknowledge``; on a
    channel's topic."""

    def __init__(self, url: str) -> None:
        import pulsar

        self.client = ms.connect(url)
        backend: Any = self.client.backend
        [self.channel] = self.client.create_channels(
            ms.CreateChannelRequest(owner=ms.OwnerDescription(role="latency-raw"), num_channels=1)
        )
        topic = backend._registry[self.channel].topic
        self.raw = pulsar.Client(
            url.split("?", 1)[0].rstrip("/"),
            operation_timeout_seconds=max(1, round(backend.timeout)),
            logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn),
        )
        self.producer = self.raw.create_producer(topic, **backend.producer_conf)
        self.consumer = self.raw.subscribe(
            topic,
            "latency",
            consumer_type=backend.consumer_type,
            initial_position=pulsar.InitialPosition.Earliest,
            receiver_queue_size=backend.receiver_queue_size,
        )

    def send(self, i: int, frame: bytes) -> None:
        self.producer.send(frame)

    def receive(self, timeout: float) -> list[int]:
        import pulsar

        try:
            msg = self.consumer.receive(int(timeout * 1000))
        except pulsar.Timeout:
            return []
        self.consumer.acknowledge(msg)
        return [_index(msg.data())]

    def close(self) -> None:
        self.raw.close()
        self.client.destroy_channels([self.channel])
        self.client.close()


@contextmanager
def _started(name: str) -> Iterator[str]:
    with server(name, given_url(name)) as broker:
        yield broker.url


@contextmanager
def _backends() -> Iterator[list[tuple[str, Callable[[], AbstractContextManager[str]]]]]:
    """(name, a context manager that gives its URL) for every backend: memory://, then Redis, Kafka and
    Pulsar, each started when its turn comes (one broker at a time) unless ``MSGSTREAM_*_URL`` names one."""
    yield [
        ("memory", lambda: nullcontext("memory://latency")),
        ("redis", partial(_started, "redis")),
        ("kafka", partial(_started, "kafka")),
        ("pulsar", partial(_started, "pulsar")),
    ]


def latency_table(results: list[dict[str, Any]]) -> str:
    """Markdown: a row per backend, msgstream's percentiles beside the raw client's."""
    lines = [
        "| Backend | msgstream p50 (ms) | raw p50 (ms) | msgstream p99 (ms) | raw p99 (ms) |"
        " msgstream max (ms) | raw max (ms) | messages per run | p50 msgstream/raw | p99 msgstream/raw |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    raw = {r["backend"]: r for r in results if r["side"] == "raw"}

    def cell(row: dict[str, Any] | None, key: str, digits: int) -> str:
        return "-" if row is None else f"{row[key]:.{digits}f}"

    def ratio(mine: dict[str, Any], theirs: dict[str, Any] | None, key: str) -> str:
        return "" if theirs is None or not theirs[key] else f"{mine[key] / theirs[key]:.2f}x"

    for r in results:
        if r["side"] != "msgstream":
            continue
        b = raw.get(r["backend"])
        lines.append(
            f"| {r['backend']} | {cell(r, 'p50_ms', 2)} | {cell(b, 'p50_ms', 2)} | {cell(r, 'p99_ms', 2)} |"
            f" {cell(b, 'p99_ms', 2)} | {cell(r, 'max_ms', 1)} | {cell(b, 'max_ms', 1)} | {r['messages']:,.0f} |"
            f" {ratio(r, b, 'p50_ms')} | {ratio(r, b, 'p99_ms')} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rate: float = args.rate
    results: list[dict[str, Any]] = []
    env = environment()
    print_environment(
        env,
        f"{rate:g} msgs/s, runs of {args.seconds:g} s after {WARMUP_SECONDS:g} s of warm-up,"
        f" median of {args.repeats} runs",
    )
    raw_sides: dict[str, Callable[[str], Any]] = {"redis": RawRedis, "kafka": RawKafka, "pulsar": RawPulsar}
    servers: dict[str, str] = {}
    with _backends() as backends:
        for name, open_server in backends:
            progress(f"latency, {name} ...")
            with open_server() as url:
                servers[name] = url
                sides: dict[str, Callable[[], Any]] = {"msgstream": partial(MsgStreamSide, url)}
                if name in raw_sides:
                    sides["raw"] = partial(raw_sides[name], url)
                for open_side in sides.values():  # untimed: a broker's JIT compiler, the clients' first calls
                    measure(open_side, rate, WARMUP_SECONDS)
                runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
                for _ in range(args.repeats):  # the sides' runs alternate
                    for side, open_side in sides.items():
                        runs[side].append(measure(open_side, rate, args.seconds))
                for side, side_runs in runs.items():
                    medians = {k: statistics.median(r[k] for r in side_runs) for k in side_runs[0]}
                    results.append({"backend": name, "side": side, **medians})
    print("## Results\n")
    print(latency_table(results))
    print(
        f"\nOne 100 B InsertMsg per pack at {rate:g} msgs/s; produce -> consume time of each message after"
        f" {WARMUP_SECONDS:g} s of warm-up, median over {args.repeats} runs of each run's percentile."
        " raw: the broker's own client with the settings msgstream's backend uses (see the module docstring)."
    )
    if args.json is not None:
        Path(args.json).write_text(
            json.dumps(
                {"benchmark": "latency", "environment": env, "rate": rate, "servers": servers, "results": results},
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
    return 0
