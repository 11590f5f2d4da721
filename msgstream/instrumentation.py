"""OpenTelemetry tracing and metrics for msgstream (``pip install "msgstream[otel]"``).

::

    from msgstream.instrumentation import MsgStreamInstrumentor
    MsgStreamInstrumentor().instrument(tracer_provider=tp, meter_provider=mp)   # global providers if omitted
    ...
    MsgStreamInstrumentor().uninstrument()

Once instrumented, every :class:`~msgstream.MsgStream` (and so every time-tick stream over one) reports,
following the OpenTelemetry messaging semantic conventions:

- a PRODUCER span ``send {channel}`` (``send`` for several channels) per ``produce`` / ``broadcast`` of
  data messages, whose W3C trace context (``traceparent``, ``tracestate``) goes into each data message's
  properties on the wire. The caller's message objects are not changed: the trace context goes on
  copies of them, which are what is sent;
- a CONSUMER span ``receive {channel}`` per ``consume`` / ``receive`` / ``consume_frames`` that returned
  data messages, spanning the call, with one span link per distinct producing span found in the
  messages' properties;
- counters ``messaging.client.sent.messages`` and ``messaging.client.consumed.messages`` (data messages)
  and the histogram ``messaging.client.operation.duration`` (seconds, per traced operation);
- observable gauges over the streams it saw consume (a time-tick stream given to :meth:`observe` in place
  of its inner stream), or that were given to :meth:`observe`:
  ``msgstream.consumer.lag.messages`` / ``msgstream.consumer.lag.seconds`` (per channel, from
  ``stream.lag()`` where the stream has it), ``msgstream.timetick.buffered.messages`` and
  ``msgstream.timetick.lagging.channels`` (time-tick streams given to :meth:`observe`).

Time ticks (``TimeTickMsg``) are control messages: they get no trace context, are not counted, and a
pack of ticks alone makes no span. Polls that return nothing make no span either.

Not instrumented, msgstream imports nothing of OpenTelemetry and each stream operation pays one
``None`` check (:func:`msgstream.stream.set_hooks`).
"""

from __future__ import annotations

import copy
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import __version__, stream
from .frames import FramePack
from .messages import PROPERTIES, MsgType, TimeTickMsg, TsMsg, frame_properties
from .pack import MsgPack
from .stream import MsgStream

__all__ = ["MsgStreamInstrumentor"]

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACE_KEYS = frozenset(_PROPAGATOR.fields)  # traceparent, tracestate
_TICK = int(MsgType.TIME_TICK)
_LOCK = threading.Lock()
#: (name, _Hooks method observing it, unit, description) of each gauge
_GAUGES = (
    (
        "msgstream.consumer.lag.messages",
        "lag",
        "{message}",
        "Messages on a channel after the last one the stream returned (stream.lag()).",
    ),
    (
        "msgstream.consumer.lag.seconds",
        "lag_seconds",
        "s",
        "Time between the newest message on a channel and the last one returned (stream.lag()).",
    ),
    (
        "msgstream.timetick.buffered.messages",
        "buffered",
        "{message}",
        "Messages a time-tick stream holds waiting for a tick.",
    ),
    ("msgstream.timetick.lagging.channels", "lagging", "{channel}", "Channels a time-tick stream waits on for a tick."),
)


def _attributes(s: MsgStream, operation: str, channels: list[str]) -> dict[str, Any]:
    """The messaging semantic-convention attributes every span and measurement of ``operation`` has."""
    scheme = getattr(getattr(s._backend, "url", None), "scheme", None)
    attrs: dict[str, Any] = {
        "messaging.system": scheme if isinstance(scheme, str) else "msgstream",
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
    }
    if len(channels) == 1:
        attrs["messaging.destination.name"] = channels[0]
    return attrs


class _Hooks:
    """What :func:`msgstream.stream.set_hooks` calls while instrumented."""

    def __init__(self, tracer: trace.Tracer, meter: metrics.Meter, provider: Any) -> None:
        self._tracer = tracer
        self.provider = provider  # the meter provider given to instrument() (None: the global one)
        self._sent = meter.create_counter(
            "messaging.client.sent.messages", unit="{message}", description="Data messages a producer sent."
        )
        self._consumed = meter.create_counter(
            "messaging.client.consumed.messages",
            unit="{message}",
            description="Data messages a consumer received.",
        )
        self._duration = meter.create_histogram(
            "messaging.client.operation.duration", unit="s", description="Duration of a traced messaging operation."
        )
        self.streams: weakref.WeakSet[Any] = weakref.WeakSet()  # for the gauges

    # -- producing ------------------------------------------------------------------------------
    def produce(self, s: MsgStream, pack: MsgPack, send: Callable[[MsgPack], dict[str, list[bytes]]]) -> Any:
        return self._send(s, pack, send, 1)

    def broadcast(self, s: MsgStream, pack: MsgPack, send: Callable[[MsgPack], dict[str, list[bytes]]]) -> Any:
        return self._send(s, pack, send, max(1, len(s.producer_channels)))

    def _send(self, s: MsgStream, pack: MsgPack, send: Callable[[MsgPack], dict[str, list[bytes]]], copies: int) -> Any:
        msgs = getattr(pack, "msgs", None)
        if not isinstance(pack, MsgPack) or type(msgs) is not list:  # a bad argument: the stream reports it
            return send(pack)
        data = [m for m in msgs if isinstance(m, TsMsg) and not isinstance(m, TimeTickMsg)]
        if not data:  # ticks only: nothing to trace
            return send(pack)
        channels = s.producer_channels
        attrs = _attributes(s, "send", channels)
        name = f"send {channels[0]}" if len(channels) == 1 else "send"
        start = time.perf_counter()
        with self._tracer.start_as_current_span(
            name, kind=SpanKind.PRODUCER, attributes=attrs, record_exception=False, set_status_on_exception=False
        ) as span:
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(carrier)
            traced: dict[int, TsMsg] = {}  # id of a caller's message -> the copy sent with the context
            for m in data:
                twin = copy.copy(m)  # the fields; no __post_init__ run again
                twin.__dict__.update(m.__dict__)  # and what a user type keeps beside them
                # this trace's context replaces any other (a forwarded message's tracestate included)
                kept = {k: v for k, v in m._props.items() if k not in _TRACE_KEYS} if m._props else {}
                twin._props = {**kept, **carrier}
                traced[id(m)] = twin
            try:
                result = send(msgspec.structs.replace(pack, msgs=[traced.get(id(m), m) for m in msgs]))
            except BaseException as exc:
                error_type = type(exc).__qualname__
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                span.set_attribute("error.type", error_type)
                self._duration.record(time.perf_counter() - start, {**attrs, "error.type": error_type})
                raise
            # what reached the broker: a repack may send one message to several channels
            ids = [i for got in result.values() for i in got] if isinstance(result, dict) else []
            sent = len(ids) if ids and len(data) == len(msgs) else len(data) * copies  # ticks mixed in: estimate
            if sent > 1:
                span.set_attribute("messaging.batch.message_count", sent)
            elif len(ids) == 1:
                span.set_attribute("messaging.message.id", ids[0].hex())
        self._duration.record(time.perf_counter() - start, attrs)
        self._sent.add(sent, attrs)
        return result

    # -- consuming ------------------------------------------------------------------------------
    def consume(self, s: MsgStream, timeout: float, receive: Callable[[float], Any]) -> Any:
        started_ns = time.time_ns()
        start = time.perf_counter()
        self.streams.add(s)
        result = receive(timeout)  # an exception passes through untraced: nothing was consumed
        if not result:
            return result
        count, contexts = _trace_contexts(result)
        if not count:
            return result
        channels = s.consumer_channels
        attrs = _attributes(s, "receive", channels)
        if s.subscription:
            attrs["messaging.destination.subscription.name"] = s.subscription
        producing = (trace.get_current_span(_PROPAGATOR.extract(c)).get_span_context() for c in contexts)
        links = [Link(ctx) for ctx in producing if ctx.is_valid]
        span_attrs = {**attrs, "messaging.batch.message_count": count}
        name = f"receive {channels[0]}" if len(channels) == 1 else "receive"
        span = self._tracer.start_span(
            name, kind=SpanKind.CONSUMER, attributes=span_attrs, links=links, start_time=started_ns
        )
        span.end()
        self._duration.record(time.perf_counter() - start, attrs)
        self._consumed.add(count, attrs)
        return result

    # -- gauges ---------------------------------------------------------------------------------
    def lag(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._lag(messages=True)

    def lag_seconds(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._lag(messages=False)

    def _lag(self, messages: bool) -> list[Observation]:
        out: list[Observation] = []
        streams = list(self.streams)
        # an observed time-tick stream reports its channels itself: its inner stream counts from what it
        # received, not what it returned
        wrapped = {id(getattr(s, "inner", None)) for s in streams}
        for s in streams:
            if id(s) in wrapped:
                continue
            lag = getattr(s, "lag", None)
            if not callable(lag) or getattr(s, "closed", False):
                continue
            try:
                rows = lag()
            except Exception:  # a gauge never breaks the export; the stream reports its errors itself
                continue
            sub = getattr(s, "subscription", None) or getattr(getattr(s, "inner", None), "subscription", None)
            for row in rows:
                value = row.messages if messages else row.seconds
                if value is not None:
                    attrs = {"messaging.destination.name": row.channel}
                    if sub:
                        attrs["messaging.destination.subscription.name"] = sub
                    out.append(Observation(value, attrs))
        return out

    def buffered(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(s.buffered) for s in list(self.streams) if hasattr(s, "buffered") and not s.closed]

    def lagging(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(len(s.lagging_channels()))
            for s in list(self.streams)
            if hasattr(s, "lagging_channels") and not s.closed
        ]


def _trace_contexts(result: Any) -> tuple[int, list[dict[str, str]]]:
    """``(data messages, distinct trace-context carriers)`` of what a consume returned."""
    if isinstance(result, FramePack):
        payloads = [raw.payload for raw in result.frames]
        found = [_frame_props(p) for p in payloads if len(p) >= 8 and int.from_bytes(p[4:8], "big") != _TICK]
    else:
        msgs = result.msgs if isinstance(result, MsgPack) else result
        found = [m._props for m in msgs if not isinstance(m, TimeTickMsg)]
    carriers: dict[str, dict[str, str]] = {}  # traceparent -> carrier: one link per producing span
    for props in filter(None, found):
        parent = props.get("traceparent")
        if parent is not None:
            carriers.setdefault(parent, props)
    return len(found), list(carriers.values())


def _frame_props(payload: bytes) -> dict[str, str] | None:
    """The properties of an encoded data message, if it has any."""
    if not payload[3] & PROPERTIES:
        return None
    try:
        return frame_properties(payload)
    except Exception:  # a bad frame is the consumer's to report when it unmarshals it
        return None


def _gauge(provider: Any, method: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    """A gauge callback reading the instrumentation active when it is called, if that one was given the
    same meter ``provider`` (``None``: the global one, whichever it is by then). A meter keeps the first
    instrument of a name, so an instrumentation made again on the same provider is read through the
    callbacks made by the first."""

    def observe(options: CallbackOptions) -> Iterable[Observation]:
        active = MsgStreamInstrumentor._active
        if active is None or active.provider is not provider:
            return []
        result: Iterable[Observation] = getattr(active, method)(options)
        return result

    return observe


class MsgStreamInstrumentor:
    """Turns msgstream's tracing and metrics on (:meth:`instrument`) and off (:meth:`uninstrument`) for
    every stream in the process. One instrumentation is active at a time; instrumenting again replaces it."""

    _active: _Hooks | None = None

    def instrument(self, *, tracer_provider: Any = None, meter_provider: Any = None) -> None:
        """Start tracing and measuring; ``tracer_provider`` / ``meter_provider`` default to the global ones."""
        tracer = trace.get_tracer("msgstream", __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter("msgstream", __version__, meter_provider=meter_provider)
        hooks = _Hooks(tracer, meter, meter_provider)
        for name, method, unit, description in _GAUGES:  # the meter keeps the first of a name: see _gauge
            meter.create_observable_gauge(name, [_gauge(meter_provider, method)], unit=unit, description=description)
        with _LOCK:
            if MsgStreamInstrumentor._active is not None:
                hooks.streams.update(MsgStreamInstrumentor._active.streams)
            MsgStreamInstrumentor._active = hooks
            stream.set_hooks(hooks)

    def uninstrument(self) -> None:
        """Stop: streams go back to their un-instrumented path (gauges report nothing more)."""
        with _LOCK:
            if MsgStreamInstrumentor._active is not None:
                MsgStreamInstrumentor._active.streams.clear()
            MsgStreamInstrumentor._active = None
            stream.set_hooks(None)

    @property
    def is_instrumented(self) -> bool:
        return MsgStreamInstrumentor._active is not None

    def observe(self, s: Any) -> None:
        """Report gauges for ``s`` (a ``MsgStream`` or ``TimeTickStream``, or their ``msgstream.aio``
        wrappers) while instrumented: lag where the stream has ``lag()``, and a time-tick stream's buffered
        messages and lagging channels. Consuming streams are observed on their own; a time-tick stream
        needs this call."""
        s = getattr(s, "sync", s)  # an aio wrapper: the gauges read the sync stream under it
        active = MsgStreamInstrumentor._active
        if active is not None:
            active.streams.add(s)
