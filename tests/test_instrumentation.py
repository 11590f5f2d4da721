"""OpenTelemetry instrumentation: spans linked through the messages' properties, counters, gauges, and
nothing once uninstrumented. Runs on memory:// and sqlite:///."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import msgstream as ms
from msgstream import aio
from msgstream import stream as stream_module
from msgstream.instrumentation import MsgStreamInstrumentor


@pytest.fixture
def otel() -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader]]:
    spans = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    MsgStreamInstrumentor().instrument(tracer_provider=tp, meter_provider=mp)
    try:
        yield spans, reader
    finally:
        MsgStreamInstrumentor().uninstrument()


@pytest.fixture(params=["memory", "sqlite"])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ms.Client]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'otel.db'}"
    with ms.connect(url) as c:
        yield c


def _channels(client: ms.Client, n: int) -> list[str]:
    return client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="t"), num_channels=n))


def _data(i: int, props: dict[str, str] | None = None) -> ms.InsertMsg:
    return ms.InsertMsg(begin_ts=i, end_ts=i, hash_values=[i], row_ids=[i], properties=props or {})


def _consume_all(inp: Any, n: int, timeout: float = 20.0) -> list[ms.TsMsg]:
    got: list[ms.TsMsg] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"received {len(got)} of {n}"
        pack = inp.consume(timeout=0.5)
        if pack is not None:
            got += pack.msgs
    return got


def _metric(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    if data is None:
        return []
    return [
        point
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def _total(reader: InMemoryMetricReader, name: str) -> int:
    return sum(int(p.value) for p in _metric(reader, name))


def test_consumer_span_links_every_producer_span_and_counters_match(
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader], client: ms.Client
) -> None:
    spans, reader = otel
    chans = _channels(client, 2)
    with client.msg_stream() as out, client.msg_stream() as inp:
        inp.create_consumers("s", chans)
        out.create_producers(chans)
        mine = [_data(i, {"tenant": "t1"} if i % 2 else None) for i in range(10)]
        out.produce(ms.MsgPack.of(mine[:6]))
        out.produce(ms.MsgPack.of(mine[6:]))
        out.broadcast(ms.MsgPack(20, 20, [ms.TimeTickMsg(begin_ts=20, end_ts=20)]))  # not traced
        assert [m.properties for m in mine] == [{"tenant": "t1"} if i % 2 else {} for i in range(10)]
        got = _consume_all(inp, 12)
    data = [m for m in got if not isinstance(m, ms.TimeTickMsg)]
    assert len(data) == 10
    ticks = [m for m in got if isinstance(m, ms.TimeTickMsg)]
    assert len(ticks) == 2 and all(m.properties == {} for m in ticks)
    producers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.PRODUCER]
    consumers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    assert len(producers) == 2 and {s.name for s in producers} == {"send"}
    assert all(s.attributes is not None and s.attributes["messaging.operation.type"] == "send" for s in producers)
    assert [s.attributes and s.attributes["messaging.batch.message_count"] for s in producers] == [6, 4]
    by_span = {(s.context.trace_id, s.context.span_id): s for s in producers}
    for m in data:  # each data message carries its producing span's context, and properties of its own
        assert m.properties["traceparent"].split("-")[2] in {f"{sid:016x}" for _, sid in by_span}
        assert isinstance(m, ms.InsertMsg)
        if m.row_ids[0] % 2:
            assert m.properties["tenant"] == "t1"
    linked = {(link.context.trace_id, link.context.span_id) for s in consumers for link in s.links}
    assert linked == set(by_span)
    assert all(s.name == "receive" and s.attributes is not None for s in consumers)
    assert sum(s.attributes["messaging.batch.message_count"] for s in consumers if s.attributes) == 10
    assert _total(reader, "messaging.client.sent.messages") == 10
    assert _total(reader, "messaging.client.consumed.messages") == 10
    durations = _metric(reader, "messaging.client.operation.duration")
    assert sum(p.count for p in durations) == 2 + len(consumers)


def test_frames_and_timetick_streams_are_linked_too(
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader], client: ms.Client
) -> None:
    spans, reader = otel
    chans = _channels(client, 1)
    with client.msg_stream() as out, client.msg_stream() as frames, client.tt_msg_stream() as tt:
        frames.create_consumers("f", chans)
        tt.create_consumers("t", chans)
        MsgStreamInstrumentor().observe(tt)
        out.create_producers(chans)
        out.produce(ms.MsgPack.of([_data(1), _data(2)]))
        seen = 0
        deadline = time.monotonic() + 20
        while seen < 2:
            assert time.monotonic() < deadline
            pack = frames.consume_frames(timeout=0.5)
            seen += len(pack) if pack is not None else 0
        for _ in range(50):  # the time-tick stream holds both until a tick
            tt.consume(timeout=0.05)
            if tt.buffered == 2:
                break
        assert tt.buffered == 2
        assert [p.value for p in _metric(reader, "msgstream.timetick.buffered.messages")] == [2]
        out.broadcast(ms.MsgPack(5, 5, [ms.TimeTickMsg(begin_ts=5, end_ts=5)]))
        assert [m.end_ts for m in _consume_all(tt, 2)] == [1, 2]
    (producer,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.PRODUCER]
    assert producer.name == f"send {chans[0]}"
    consumers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    assert consumers and all(s.name == f"receive {chans[0]}" for s in consumers)
    assert all([link.context.span_id for link in s.links] == [producer.context.span_id] for s in consumers)
    assert _total(reader, "messaging.client.consumed.messages") == 4  # 2 as frames, 2 through the tick stream


def test_lag_gauges_report_a_consumers_real_lag(
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader], client: ms.Client
) -> None:
    _, reader = otel
    chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="t"), num_channels=1))
    with client.msg_stream() as out, client.msg_stream() as inp:
        out.create_producers(chans)
        inp.create_consumers("lagging", chans)
        out.produce(
            ms.MsgPack.of([ms.InsertMsg(begin_ts=i + 1, end_ts=i + 1, hash_values=[0], row_ids=[i]) for i in range(4)])
        )
        pack = inp.consume(timeout=5)
        assert pack is not None and len(pack.msgs) == 4
        out.produce(
            ms.MsgPack.of([ms.InsertMsg(begin_ts=9, end_ts=9 + i, hash_values=[0], row_ids=[i]) for i in range(3)])
        )
        MsgStreamInstrumentor().observe(inp)
        lagged = [
            (p.value, dict(p.attributes)["messaging.destination.name"])
            for p in _metric(reader, "msgstream.consumer.lag.messages")
        ]
        assert lagged == [(3, chans[0])]
        assert inp.lag() == [ms.ChannelLag(chans[0], 3, pytest.approx(0.0, abs=1.0))]


def test_the_callers_messages_are_never_changed_even_while_they_are_sent(
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader], client: ms.Client
) -> None:
    chans = _channels(client, 1)
    mine = [_data(1, {"tenant": "t1"}), _data(2)]
    seen_during_send: list[dict[str, str]] = []

    def repack(msgs: Any, hash_keys: Any) -> dict[int, ms.MsgPack]:
        seen_during_send.extend(m.properties for m in mine)  # another thread producing them sees these
        assert all("traceparent" in m.properties for m in msgs)  # what is sent carries the context
        return ms.repack.default(msgs, hash_keys)

    with client.msg_stream() as out, client.msg_stream() as inp:
        out.create_producers(chans)
        out.set_repack_func(repack)
        inp.create_consumers("s", chans)
        out.produce(ms.MsgPack.of(mine))
        got = _consume_all(inp, 2)
    assert seen_during_send == [{"tenant": "t1"}, {}]
    assert [m.properties for m in mine] == [{"tenant": "t1"}, {}]
    assert all("traceparent" in m.properties for m in got)
    assert got[0].properties["tenant"] == "t1"


def test_instrumenting_again_on_the_same_provider_keeps_the_gauges_live(client: ms.Client) -> None:
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    chans = _channels(client, 1)
    instrumentor = MsgStreamInstrumentor()
    try:
        with client.msg_stream() as out, client.msg_stream() as a, client.msg_stream() as b:
            out.create_producers(chans)
            out.produce(ms.MsgPack.of([_data(i + 1) for i in range(3)]))
            for sub, stream in (("sub-a", a), ("sub-b", b)):
                instrumentor.instrument(meter_provider=mp)
                stream.create_consumers(sub, chans)
                stream.consume(timeout=0)  # joins, and is seen by the gauges
                lag = {
                    dict(p.attributes)["messaging.destination.subscription.name"]: p.value
                    for p in _metric(reader, "msgstream.consumer.lag.messages")
                }
                assert sub in lag
                instrumentor.uninstrument()
                assert _metric(reader, "msgstream.consumer.lag.messages") == []
    finally:
        instrumentor.uninstrument()


def test_a_timetick_streams_lag_gauge_counts_what_it_holds(
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader], client: ms.Client
) -> None:
    _, reader = otel
    chans = _channels(client, 1)
    with client.msg_stream() as out, client.tt_msg_stream() as tt:
        out.create_producers(chans)
        tt.create_consumers("tt", chans)
        out.produce(ms.MsgPack.of([_data(i + 1) for i in range(5)]))
        deadline = time.monotonic() + 10
        while tt.buffered < 5:  # held, waiting for a tick
            assert time.monotonic() < deadline, f"{tt.buffered} of 5 buffered"
            assert tt.consume(timeout=0.1) is None
        assert [(row.channel, row.messages) for row in tt.lag()] == [(chans[0], 5)]
        # not observed: its inner stream is reported, which counts from what it received (all of it)
        assert [p.value for p in _metric(reader, "msgstream.consumer.lag.messages")] == [0]
        MsgStreamInstrumentor().observe(tt)  # then the time-tick stream, in place of its inner stream
        assert [
            (dict(p.attributes)["messaging.destination.name"], p.value)
            for p in _metric(reader, "msgstream.consumer.lag.messages")
        ] == [(chans[0], 5)]


def test_uninstrument_stops_everything(client: ms.Client) -> None:
    spans = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    instrumentor = MsgStreamInstrumentor()
    instrumentor.instrument(tracer_provider=tp, meter_provider=MeterProvider(metric_readers=[reader]))
    assert stream_module._hooks is not None and instrumentor.is_instrumented
    instrumentor.uninstrument()
    assert stream_module._hooks is None and not instrumentor.is_instrumented
    chans = _channels(client, 1)
    with client.msg_stream() as out, client.msg_stream() as inp:
        inp.create_consumers("s", chans)
        out.create_producers(chans)
        out.produce(ms.MsgPack.of([_data(1)]))
        (got,) = _consume_all(inp, 1)
    assert got.properties == {}
    assert spans.get_finished_spans() == ()
    assert _total(reader, "messaging.client.sent.messages") == 0


def test_the_core_imports_no_opentelemetry() -> None:
    code = "import sys, msgstream as ms; ms.connect('memory://'); "
    code += "print([m for m in sys.modules if 'opentelemetry' in m])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("scheme", ["memory", "sqlite"])
def test_aio_spans_are_children_of_the_calling_tasks_span(
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader], tmp_path: Path, scheme: str
) -> None:
    # instrumented, every produce runs on the producing worker (memory:// too): in the awaiting task's context
    spans, _ = otel
    tracer = TracerProvider().get_tracer("caller")
    url = "memory://otel-aio" if scheme == "memory" else f"sqlite:///{tmp_path / 'otel-aio.db'}"

    async def main() -> None:
        async with aio.connect(url) as client:
            [chan] = await client.create_channels(
                ms.CreateChannelRequest(owner=ms.OwnerDescription(role="t"), num_channels=1)
            )
            async with client.msg_stream() as out, client.msg_stream() as inp:
                await out.create_producers([chan])
                await inp.create_consumers("otel-aio", [chan])
                with tracer.start_as_current_span("handler") as handler:
                    await out.produce(ms.MsgPack.of([_data(1)]))
                    assert _rows_of(await inp.consume(timeout=5)) == [1]
                caller = handler.get_span_context()
        by_kind = {s.kind: s for s in spans.get_finished_spans()}
        for kind in (SpanKind.PRODUCER, SpanKind.CONSUMER):
            span = by_kind[kind]
            assert span.parent is not None and span.parent.span_id == caller.span_id, kind
            assert span.context.trace_id == caller.trace_id, kind

    asyncio.run(main())


def _rows_of(pack: ms.MsgPack | None) -> list[int]:
    assert pack is not None
    return [row for m in pack.msgs if isinstance(m, ms.InsertMsg) for row in m.row_ids]


class _Counted(ms.TsMsg, kw_only=True):
    """A user type whose construction does work, and that frames itself from an attribute beside its
    fields: what a produce sends must be what the caller built."""

    msg_type = 7401
    made: int = 0  # how many times it was constructed or decoded
    blob: bytes = b""

    def __post_init__(self) -> None:
        self.made += 1

    def marshal(self) -> bytes:
        self.blob = getattr(self, "kept", self.blob)
        return super().marshal()


def test_a_traced_produce_sends_the_callers_messages_as_built(
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader], client: ms.Client
) -> None:
    chans = _channels(client, 1)
    dispatcher = ms.UnmarshalDispatcher()
    dispatcher.add_msg_template(7401, _Counted)
    mine = _Counted(begin_ts=1, end_ts=1, hash_values=[0])
    mine.kept = b"kept"  # type: ignore[attr-defined]
    with client.msg_stream() as out, client.msg_stream() as inp:
        out.create_producers(chans)
        inp.create_consumers("s", chans, dispatcher)
        out.produce(ms.MsgPack.of([mine, mine]))  # the same object twice
        got = _consume_all(inp, 2)
        # built once by the caller, decoded once by the consumer: never built again on the way
        assert [(m.made, m.blob) for m in got if isinstance(m, _Counted)] == [(mine.made + 1, b"kept")] * 2
        assert all("traceparent" in m.properties for m in got)
        with pytest.raises(ms.errors.InvalidArgumentError, match="must be a list"):
            out.produce(ms.MsgPack(1, 1, (m for m in [_data(1)])))  # type: ignore[arg-type]


def test_instrumenting_twice_before_the_global_provider_is_set_reports_once_it_is() -> None:
    code = """
import msgstream as ms
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from msgstream.instrumentation import MsgStreamInstrumentor
MsgStreamInstrumentor().instrument()  # at import time of a library, say
MsgStreamInstrumentor().instrument()  # and again by the application
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
with ms.connect("memory://") as c:
    chans = c.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="t"), num_channels=1))
    with c.msg_stream() as inp:
        inp.create_consumers("s", chans)
        inp.consume(timeout=0)
        data = reader.get_metrics_data()
        names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
        print("msgstream.consumer.lag.messages" in names)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "True", out.stdout + out.stderr


def test_a_forwarded_message_carries_this_trace_only(
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader], client: ms.Client
) -> None:
    """A message consumed from another trace and produced again: the current context replaces the old
    ``traceparent`` and ``tracestate`` both (this process has no tracestate), other properties stay."""
    chans = _channels(client, 1)
    old = {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01", "tracestate": "vendor=upstream", "k": "v"}
    with client.msg_stream() as out, client.msg_stream() as inp:
        out.create_producers(chans)
        inp.create_consumers("s", chans)
        out.produce(ms.MsgPack.of([_data(1, old)]))
        [got] = _consume_all(inp, 1)
    assert got.properties["k"] == "v" and "tracestate" not in got.properties
    assert got.properties["traceparent"] != old["traceparent"]


def test_an_observed_asyncio_time_tick_stream_reports_its_lag(
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader], tmp_path: Path
) -> None:
    _, reader = otel

    async def main() -> list[Any]:
        async with aio.connect(f"sqlite:///{tmp_path / 'a.db'}") as client:
            chans = await client.create_channels(
                ms.CreateChannelRequest(owner=ms.OwnerDescription(role="o"), num_channels=1)
            )
            async with client.msg_stream() as out, client.tt_msg_stream() as tt:
                await out.create_producers(chans)
                await tt.create_consumers("tt", chans)
                await out.produce(ms.MsgPack.of([_data(i + 1) for i in range(5)]))
                deadline = time.monotonic() + 10
                while tt.buffered < 5:
                    assert time.monotonic() < deadline, f"{tt.buffered} of 5 buffered"
                    assert await tt.consume(timeout=0.1) is None
                MsgStreamInstrumentor().observe(tt)
                return [p.value for p in _metric(reader, "msgstream.consumer.lag.messages")]

    assert asyncio.run(main()) == [5]


def test_the_sent_counter_counts_what_a_fanning_out_repack_sent(
    otel: tuple[InMemorySpanExporter, InMemoryMetricReader], client: ms.Client
) -> None:
    """``all_keys`` sends a message to the channel of each of its hash keys: the sent counter and the
    span's batch count say how many went to the broker, as the consumers count them."""
    spans, reader = otel
    chans = _channels(client, 2)
    with client.msg_stream() as out, client.msg_stream() as inp:
        out.create_producers(chans)
        out.set_repack_func(ms.repack.all_keys)
        inp.create_consumers("s", chans)
        msg = ms.InsertMsg(begin_ts=1, end_ts=1, hash_values=[0, 1], row_ids=[1])
        sent = out.produce(ms.MsgPack.of([msg]))
        assert sum(len(ids) for ids in sent.values()) == 2
        assert len(_consume_all(inp, 2)) == 2
    assert _total(reader, "messaging.client.sent.messages") == 2
    assert _total(reader, "messaging.client.consumed.messages") == 2
    [send] = [s for s in spans.get_finished_spans() if s.kind is SpanKind.PRODUCER]
    assert send.attributes is not None and send.attributes["messaging.batch.message_count"] == 2
