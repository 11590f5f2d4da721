"""``msgstream bench``: produce and consume through the URL's broker and report rates and latency.

It creates its own channels and destroys them at the end, also after an error or an interrupt.
Latency is end to end: a message carries the time it was handed to ``produce`` (in ``row_ids``) and
the consumer, a thread of this process, subtracts it from the time it got the message.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import IO, Any

from ..client import Client, CreateChannelRequest, OwnerDescription
from ..errors import ConsumeError
from ..messages import InsertMsg, TsMsg
from ..pack import MsgPack
from ._format import json_line

_BATCH = 100  # messages per produce call
_STALL = 30.0  # seconds without a message before the consumer gives up


def bench(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    owner = OwnerDescription(role="bench", description_text="msgstream bench (removed when it ends)")
    channels = client.create_channels(CreateChannelRequest(owner=owner, num_channels=args.channels))
    saved = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = _run(client, channels, args.messages, args.size)
    finally:
        signal.signal(signal.SIGTERM, saved)
        client.destroy_channels(channels)
    result = {"url": client.url, "channels": args.channels, "size": args.size, **result}
    if args.json:
        out.write(json_line(result))
    else:
        out.write(
            f"{result['messages']} messages of {args.size} bytes over {args.channels} channels on {client.url}\n"
            f"produce  {result['produce_msgs_per_s']:>10,.0f} msgs/s  {result['produce_mb_per_s']:>8.2f} MB/s\n"
            f"consume  {result['consume_msgs_per_s']:>10,.0f} msgs/s  {result['consume_mb_per_s']:>8.2f} MB/s\n"
            f"latency  p50 {result['latency_p50_ms']:.2f} ms  p99 {result['latency_p99_ms']:.2f} ms\n"
        )
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _run(client: Client, channels: list[str], count: int, size: int) -> dict[str, Any]:
    payload = b"x" * size
    latencies: list[int] = []
    failure: list[BaseException] = []
    stop = threading.Event()
    done_at = [0.0]

    with client.msg_stream() as producer, client.msg_stream() as consumer:
        consumer.create_consumers("msgstream-bench", channels)
        producer.create_producers(channels)

        def consume() -> None:
            last = time.monotonic()
            try:
                while len(latencies) < count and not stop.is_set():
                    pack = consumer.consume(timeout=0.2)
                    now = time.perf_counter_ns()
                    if pack is None:
                        if time.monotonic() - last > _STALL:
                            raise ConsumeError(f"no message for {_STALL:.0f} s after {len(latencies)} of {count}")
                        continue
                    last = time.monotonic()
                    latencies.extend(now - m.row_ids[0] for m in pack.msgs if isinstance(m, InsertMsg))
                done_at[0] = time.perf_counter()
            except BaseException as exc:  # handed to the main thread
                failure.append(exc)

        reader = threading.Thread(target=consume, name="msgstream-bench-consumer", daemon=True)
        progress = _Progress(count)
        start = time.perf_counter()
        reader.start()
        try:
            for first in range(0, count, _BATCH):
                msgs: list[TsMsg] = []
                sent_at = time.perf_counter_ns()
                for i in range(first, min(first + _BATCH, count)):
                    msgs.append(InsertMsg(begin_ts=i, end_ts=i, hash_values=[i], row_ids=[sent_at], row_data=[payload]))
                producer.produce(MsgPack.of(msgs))
                progress.show(first + len(msgs), len(latencies))
            produced = time.perf_counter() - start
            while reader.is_alive():
                reader.join(0.2)
                progress.show(count, len(latencies))
        finally:
            stop.set()
            reader.join()
            progress.clear()
        if failure:
            raise failure[0]
    consumed = done_at[0] - start
    ordered = sorted(latencies)
    mb = count * size / 1e6
    return {
        "messages": count,
        "produce_msgs_per_s": count / produced,
        "produce_mb_per_s": mb / produced,
        "consume_msgs_per_s": count / consumed,
        "consume_mb_per_s": mb / consumed,
        "latency_p50_ms": ordered[len(ordered) // 2] / 1e6,
        "latency_p99_ms": ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)] / 1e6,
    }


class _Progress:
    """``produced x/n, consumed y/n`` on stderr, rewritten in place, only when stderr is a terminal."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._on = sys.stderr.isatty()
        self._last = 0.0

    def show(self, produced: int, consumed: int) -> None:
        now = time.monotonic()
        if self._on and now - self._last >= 0.2:
            self._last = now
            sys.stderr.write(f"\rproduced {produced}/{self._total}, consumed {consumed}/{self._total}")
            sys.stderr.flush()

    def clear(self) -> None:
        if self._on:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
