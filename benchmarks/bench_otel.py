"""The cost of message properties and of OpenTelemetry instrumentation on memory://.

Each variant produces packs of 1000 one-row InsertMsgs (100 B rows) on one channel and consumes them
again; variants run interleaved, ``--repeats`` rounds of ``--seconds`` each, and the median round counts:

- plain: no properties, not instrumented (the baseline)
- 3 properties: every message carries three short properties, not instrumented
- instrumented: no properties of the caller's, instrumented with the OpenTelemetry SDK (spans go to a
  processor that drops them; metrics to a reader that is never collected), so trace context is
  injected into, and extracted from, every message
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Callable

import msgstream as ms

PACK_SIZE = 1000
ROW_BYTES = 100


def _pack(props: dict[str, str] | None) -> ms.MsgPack:
    row = os.urandom(ROW_BYTES)
    return ms.MsgPack.of(
        [
            ms.InsertMsg(
                begin_ts=i,
                end_ts=i,
                hash_values=[0],
                row_ids=[i],
                timestamps=[i],
                row_data=[row],
                properties=props or {},
            )
            for i in range(PACK_SIZE)
        ]
    )


def _round(client: ms.Client, pack: ms.MsgPack, seconds: float) -> float:
    """Produce then consume ``pack`` repeatedly for about ``seconds``; messages per second end to end."""
    chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="bench"), num_channels=1))
    moved = 0
    with client.msg_stream() as out, client.msg_stream() as inp:
        out.create_producers(chans)
        inp.create_consumers("bench", chans)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            out.produce(pack)
            got = 0
            while got < PACK_SIZE:
                p = inp.consume(timeout=5.0)
                if p is None:
                    raise RuntimeError("memory:// returned nothing")
                got += len(p.msgs)
            moved += got
        elapsed = time.perf_counter() - t0
    client.destroy_channels(chans)
    return moved / elapsed


def _instrumented() -> tuple[Callable[[], None], Callable[[], None]]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    from msgstream.instrumentation import MsgStreamInstrumentor

    class Drop(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(Drop()))
    mp = MeterProvider(metric_readers=[InMemoryMetricReader()])
    inst = MsgStreamInstrumentor()
    return (lambda: inst.instrument(tracer_provider=tp, meter_provider=mp)), inst.uninstrument


def run(args: argparse.Namespace) -> int:
    seconds: float = args.seconds
    repeats: int = args.repeats
    on, off = _instrumented()
    plain, with_props = _pack(None), _pack({"tenant": "t1", "region": "eu-west-1", "request": "8f2c1a"})
    variants: dict[str, tuple[ms.MsgPack, bool]] = {
        "plain": (plain, False),
        "3 properties": (with_props, False),
        "instrumented": (plain, True),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    with ms.connect(f"memory://otel-{uuid.uuid4().hex[:8]}") as client:
        for pack, traced in variants.values():  # warm-up
            (on if traced else off)()
            _round(client, pack, min(seconds, 0.5))
        off()
        for _ in range(repeats):
            for name, (pack, traced) in variants.items():
                (on if traced else off)()
                try:
                    rates[name].append(_round(client, pack, seconds))
                finally:
                    off()
    base = statistics.median(rates["plain"])
    print(
        f"memory://, packs of {PACK_SIZE} x {ROW_BYTES} B rows, produce then consume;"
        f" median of {repeats} x {seconds:g} s\n"
    )
    print("| Variant | msgs/s | vs plain | Spread |")
    print("|---|---:|---:|---:|")
    for name, got in rates.items():
        med = statistics.median(got)
        spread = (max(got) - min(got)) / med
        print(f"| {name} | {med:,.0f} | {med / base:.2f}x | {spread:.0%} |")
    return 0
