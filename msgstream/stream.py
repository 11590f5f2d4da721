"""``MsgStream``: produce, broadcast, consume, positions and seek, written once over the backend SPI."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from operator import index
from typing import Any, Protocol, TypeVar

from .backend import Backend, Consumer, Producer, RawMessage, SubscriptionPosition
from .codec import UnmarshalDispatcher
from .errors import (
    InvalidArgumentError,
    MsgStreamError,
    ProduceError,
    RepackError,
    SeekError,
    StreamClosedError,
    StreamStateError,
    UnmarshalError,
    UnsupportedOperationError,
)
from .frames import FramePack, frame_timestamps
from .messages import (
    HEADER_SIZE,
    PROPERTIES,
    TsMsg,
    encode_body_into,
    set_record,
    split_properties,
    with_properties,
)
from .pack import MsgPack, Position, consumed_pack
from .repack import RepackFunc
from .repack import default as default_repack
from .values import ChannelLag

__all__ = ["Hooks", "MsgStream", "hooks", "set_hooks"]

log = logging.getLogger("msgstream.stream")
_DEFAULT_DISPATCHER = UnmarshalDispatcher()
MAX_TIMEOUT = 3600.0


class Hooks(Protocol):
    """What an instrumentation (msgstream.instrumentation) puts around the stream's operations. Each
    method gets the stream, the argument, and the un-instrumented operation to call."""

    def produce(self, stream: MsgStream, pack: MsgPack, send: Callable[[MsgPack], dict[str, list[bytes]]]) -> Any: ...

    def broadcast(self, stream: MsgStream, pack: MsgPack, send: Callable[[MsgPack], dict[str, list[bytes]]]) -> Any: ...

    def consume(self, stream: MsgStream, timeout: float, receive: Callable[[float], Any]) -> Any: ...


#: set by an instrumentation, ``None`` otherwise: the one branch per pack an un-instrumented stream pays
_hooks: Hooks | None = None


def set_hooks(hooks: Hooks | None) -> None:
    """Install (or with ``None`` remove) the hooks every ``MsgStream`` calls around produce, broadcast,
    consume, receive and consume_frames."""
    global _hooks  # noqa: PLW0603 (one module-level switch, read once per pack)
    _hooks = hooks


def hooks() -> Hooks | None:
    """The hooks installed with :func:`set_hooks`, if any."""
    return _hooks


class MsgStream:
    """A stream of typed messages over one backend: producers on some channels, one consumer (a
    member of one subscription) on some channels.

    Options: ``produce_timeout`` (seconds a produce may block until the broker accepted everything,
    default 30), ``receive_batch`` (most messages one consume returns, default 1024), ``on_error``
    (called with each ``UnmarshalError`` instead of raising it from consume), ``auto_ack`` (default
    True: a pack is acknowledged when the next consume, seek or close runs — not when a ``with`` block
    exits on an exception — so a consumer that dies while handling a pack gets it again; with False,
    call :meth:`ack`), ``validate`` (default True: each produced message is decoded back once, so a
    field of the wrong type is refused at produce; False skips that check, see docs/performance.md).

    One thread at a time may produce and one (possibly another) consume.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        produce_timeout: float = 30.0,
        receive_batch: int = 1024,
        on_error: Callable[[UnmarshalError], None] | None = None,
        auto_ack: bool = True,
        validate: bool = True,
    ) -> None:
        self._backend = backend
        self._produce_timeout = check_timeout(produce_timeout, "produce_timeout")
        if isinstance(receive_batch, bool) or not isinstance(receive_batch, int) or receive_batch < 1:
            raise InvalidArgumentError(f"receive_batch must be a positive int, got {receive_batch!r}")
        self._batch = receive_batch
        if on_error is not None and not callable(on_error):
            raise InvalidArgumentError(f"on_error must be a callable or None, got {on_error!r}")
        self._on_error = on_error
        self.auto_ack = auto_ack
        self._validate = validate
        self._repack: RepackFunc = default_repack
        self._producers: list[Producer] = []
        self._consumer: Consumer | None = None
        self._dispatcher = _DEFAULT_DISPATCHER
        self._unacked: list[RawMessage] = []
        self._in_hand = 0  # how many of _unacked (its end) the caller holds: the pack last returned
        self._reported: list[RawMessage] = []  # bad frames reported, acknowledged by the next call
        self._backlog: list[RawMessage] = []
        self._last: dict[str, bytes] = {}  # channel -> id of the last message returned (for lag)
        self._closed = False

    # -- set-up -------------------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        """The backend this stream talks to (shared with its client)."""
        return self._backend

    @property
    def produce_timeout(self) -> float:
        """Seconds a produce may block, per channel, until the broker accepted everything."""
        return self._produce_timeout

    @property
    def producer_channels(self) -> list[str]:
        return [p.channel for p in self._producers]

    @property
    def consumer_channels(self) -> list[str]:
        return list(self._consumer.channels) if self._consumer else []

    @property
    def subscription(self) -> str | None:
        return self._consumer.subscription if self._consumer else None

    def create_producers(self, channels: Sequence[str]) -> None:
        """Add a producer per channel; the channel order fixes the indexes repack routes to."""
        self._check_open()
        names = _names(channels, "channels")
        made: list[Producer] = []
        try:
            for name in names:
                made.append(self._backend.create_producer(name))
        except BaseException:
            for p in made:
                p.close()
            raise
        self._producers.extend(made)

    def create_consumers(
        self,
        subscription: str,
        channels: Sequence[str],
        dispatcher: UnmarshalDispatcher | None = None,
        position: SubscriptionPosition = SubscriptionPosition.EARLIEST,
    ) -> None:
        """Join ``subscription`` on ``channels``. ``position`` applies where the subscription is new;
        an existing subscription resumes after its last acknowledged message. ``dispatcher`` decodes
        (default: the seven stock types)."""
        self._check_open()
        if self._consumer is not None:
            raise StreamStateError(f"this stream already consumes {self.consumer_channels} as {self.subscription!r}")
        if not isinstance(subscription, str) or not subscription:
            raise InvalidArgumentError(f"subscription must be a non-empty str, got {subscription!r}")
        if dispatcher is not None and not isinstance(dispatcher, UnmarshalDispatcher):
            raise InvalidArgumentError(f"dispatcher must be an UnmarshalDispatcher, got {type(dispatcher).__name__}")
        if not isinstance(position, SubscriptionPosition):
            raise InvalidArgumentError(f"position must be a SubscriptionPosition, got {position!r}")
        names = _names(channels, "channels")
        self._consumer = self._backend.create_consumer(subscription, names, position)
        self._dispatcher = dispatcher or _DEFAULT_DISPATCHER

    def set_repack_func(self, repack: RepackFunc) -> None:
        """Route produced messages with ``repack`` (see :mod:`msgstream.repack`)."""
        if not callable(repack):
            raise InvalidArgumentError(f"repack function must be callable, got {repack!r}")
        self._repack = repack

    def start(self) -> None:
        """Milvus's ``Start``: checks that the stream has producers or a consumer. Nothing else waits for
        it: a stream produces and consumes as soon as they are created."""
        self._check_open()
        if not self._producers and self._consumer is None:
            raise StreamStateError("start() before create_producers() or create_consumers()")

    # -- producing ----------------------------------------------------------------------------
    def produce(self, pack: MsgPack) -> dict[str, list[bytes]]:
        """Route ``pack.msgs`` with the repack function and send them; returns once the broker accepted
        every message, as ``{channel: [message ids]}``. ``RepackError`` (nothing sent) for a bad
        routing, ``ProduceError`` naming the channel for a failed delivery (its ``sent`` lists what
        was accepted before)."""
        if _hooks is not None:
            return _hooks.produce(self, pack, self._produce)  # type: ignore[no-any-return]
        return self._produce(pack)

    def _produce(self, pack: MsgPack) -> dict[str, list[bytes]]:
        msgs, producers = self._check_pack(pack)
        n = len(producers)
        if not msgs:
            return {}
        try:  # operator.index: an int, not a float that happens to divide
            hash_keys = [[index(h) % n for h in m.hash_values] for m in msgs]
        except TypeError:
            raise InvalidArgumentError("hash_values must be a list of int on every message") from None
        try:
            routed = self._repack(msgs, hash_keys)
        except MsgStreamError:
            raise
        except Exception as exc:
            raise RepackError(f"repack function {self._repack!r} failed: {exc!r}") from exc
        if not isinstance(routed, dict):
            raise RepackError(f"repack function returned {type(routed).__name__}, not dict[int, MsgPack]")
        batches: list[tuple[Producer, list[bytes]]] = []
        for key in sorted(routed, key=lambda k: k if isinstance(k, int) else -1):
            sub = routed[key]
            if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < n:
                raise RepackError(f"repack routed to channel index {key!r}; this stream has {n} channels (0..{n - 1})")
            if not isinstance(sub, MsgPack) or not isinstance(sub.msgs, list):
                raise RepackError(f"repack result for channel {key} is {sub!r}, not a MsgPack of a list")
            batches.append((producers[key], self._marshal(sub.msgs)))
        return self._send(batches)

    def broadcast(self, pack: MsgPack) -> dict[str, list[bytes]]:
        """Send every message of ``pack`` to every producer channel (e.g. time ticks)."""
        if _hooks is not None:
            return _hooks.broadcast(self, pack, self._broadcast)  # type: ignore[no-any-return]
        return self._broadcast(pack)

    def _broadcast(self, pack: MsgPack) -> dict[str, list[bytes]]:
        msgs, producers = self._check_pack(pack)
        if not msgs:
            return {}
        payloads = self._marshal(msgs)
        return self._send([(p, payloads) for p in producers])

    def _marshal(self, msgs: Sequence[TsMsg]) -> list[bytes]:
        """Frames for ``msgs``; with ``validate`` each is decoded back once, so a message that no consumer
        could read (a float in ``row_ids``, a str in ``row_data``) is refused here, not on every consumer."""
        try:
            if not self._validate:
                return [m.marshal() for m in msgs]
            return _marshal_checked(msgs)
        except (InvalidArgumentError, RepackError):
            raise
        except Exception as exc:
            bad = next((type(m).__name__ for m in msgs if not isinstance(m, TsMsg)), None)
            if bad is not None:  # a repack function put something else in a pack
                raise RepackError(f"cannot marshal a {bad} (packs hold TsMsg instances)") from exc
            raise InvalidArgumentError(f"a message cannot be encoded: {exc}") from exc  # e.g. an int > 2**64

    def _check_pack(self, pack: MsgPack) -> tuple[list[TsMsg], list[Producer]]:
        """The pack's messages, checked, and the producers as checked (a close in another thread replaces the list)."""
        self._check_open()
        producers = self._producers
        if not producers:
            raise StreamStateError("no producers: call create_producers() first")
        if not isinstance(pack, MsgPack):
            raise InvalidArgumentError(f"produce takes a MsgPack, got {type(pack).__name__}")
        msgs = pack.msgs
        if not isinstance(msgs, list):
            raise InvalidArgumentError(f"MsgPack.msgs must be a list, got {type(msgs).__name__}")
        for cls in set(map(type, msgs)):  # per type, not per message
            if not issubclass(cls, TsMsg):
                raise InvalidArgumentError(f"a MsgPack holds TsMsg instances, got {cls.__name__}")
        return msgs, producers

    def _send(self, batches: list[tuple[Producer, list[bytes]]]) -> dict[str, list[bytes]]:
        sent: dict[str, list[bytes]] = {}
        for producer, payloads in batches:
            try:
                ids = producer.send(payloads, self._produce_timeout)
            except ProduceError as exc:
                exc.sent = {**sent, **exc.sent}  # the backend may name what it accepted of this batch
                exc.channel = exc.channel or producer.channel
                raise
            except MsgStreamError as exc:
                raise ProduceError(
                    f"send to {producer.channel!r} failed: {exc}",
                    channel=producer.channel,
                    sent=dict(sent),
                    retriable=exc.retriable,
                ) from exc
            if len(ids) != len(payloads):
                raise ProduceError(
                    f"backend accepted {len(ids)} of {len(payloads)} messages on {producer.channel!r}",
                    channel=producer.channel,
                    sent=dict(sent),
                )
            sent.setdefault(producer.channel, []).extend(ids)
        return sent

    # -- consuming ----------------------------------------------------------------------------
    def consume(self, timeout: float = 1.0) -> MsgPack | None:
        """The next messages (up to ``receive_batch``), or ``None`` if nothing arrived in ``timeout``
        seconds. A frame that cannot be decoded raises ``UnmarshalError`` carrying its ``position``
        (or goes to ``on_error``); the messages around it are not lost, the next call goes on."""
        if _hooks is not None:
            return _hooks.consume(self, timeout, self._consume)  # type: ignore[no-any-return]
        return self._consume(timeout)

    def _consume(self, timeout: float) -> MsgPack | None:
        consumer, deadline = self._start_receive(timeout)
        msgs = self._receive(consumer, deadline, self.auto_ack)
        return None if msgs is None else consumed_pack(msgs, len(consumer.channels) == 1)

    def receive(self, timeout: float = 1.0) -> list[TsMsg] | None:
        """The next decoded messages (up to ``receive_batch``), each carrying its ``position``, or ``None``
        if nothing arrived in ``timeout`` seconds; none is acknowledged, whatever ``auto_ack`` says, until
        the caller passes it to :meth:`ack`. For decorators that make packs of their own, such as
        :class:`~msgstream.TimeTickStream`. Bad frames as in :meth:`consume`."""
        if _hooks is not None:
            return _hooks.consume(self, timeout, self._receive_unacked)  # type: ignore[no-any-return]
        return self._receive_unacked(timeout)

    def _receive_unacked(self, timeout: float) -> list[TsMsg] | None:
        consumer, deadline = self._start_receive(timeout)  # acknowledges reported bad frames only
        return self._receive(consumer, deadline, False)

    def _start_receive(self, timeout: float) -> tuple[Consumer, float]:
        """The consumer and the deadline of a receiving call, after acknowledging what the caller moved on from."""
        consumer = self._require_consumer()
        deadline = time.monotonic() + check_timeout(timeout, "timeout")
        self._ack_delivered()
        return consumer, deadline

    def _next_raws(self, consumer: Consumer, deadline: float) -> list[RawMessage]:
        """The backlog, else what the consumer receives by ``deadline``."""
        raws = self._backlog or consumer.receive(self._batch, max(0.0, deadline - time.monotonic()))
        self._backlog = []
        return raws

    def _receive(self, consumer: Consumer, deadline: float, track: bool) -> list[TsMsg] | None:
        """Receive and decode; ``track``: the messages are acknowledged by the next consume (auto_ack)."""
        while raws := self._next_raws(consumer, deadline):
            msgs = self._decode(raws, track)
            if msgs is not None:
                return msgs
            # the batch began with a bad frame that went to on_error: go on with the rest
        return None

    def consume_frames(self, timeout: float = 1.0) -> FramePack | None:
        """As :meth:`consume`, but the messages stay encoded: a :class:`~msgstream.FramePack` of
        ``(channel, msg_id, payload)`` records, decoded only when asked (``pack.unmarshal()``). The
        same subscription, delivery and acknowledgement rules apply; nothing is decoded, so a corrupt
        frame comes out like any other and raises only when it is unmarshalled. For consumers that
        route, filter by type (``msgstream.frame_type``) or forward messages without reading them all.
        """
        if _hooks is not None:
            return _hooks.consume(self, timeout, self._consume_frames)  # type: ignore[no-any-return]
        return self._consume_frames(timeout)

    def _consume_frames(self, timeout: float) -> FramePack | None:
        consumer, deadline = self._start_receive(timeout)
        raws = self._next_raws(consumer, deadline)
        if not raws:
            return None
        self._hand_over(raws, self.auto_ack)
        return FramePack(raws, self._dispatcher)

    def _decode(self, raws: list[RawMessage], track: bool) -> list[TsMsg] | None:
        """Decode the longest good prefix of ``raws`` into a pack; what follows it waits in the backlog.
        A bad frame at the head is reported (raised, or given to ``on_error``) and acknowledged by the next
        call."""
        unmarshal = self._dispatcher.unmarshal
        msgs: list[TsMsg] = []
        for i, raw in enumerate(raws):
            try:
                msg = unmarshal(raw.payload)
            except UnmarshalError as exc:
                if msgs:  # return what decoded; the bad frame comes up on the next call
                    self._backlog = raws[i:]
                    raws = raws[:i]
                    break
                self._backlog = raws[1:]
                self._reported.append(raw)  # acknowledged by the next call, retried until it is
                self._last[raw.channel] = raw.msg_id
                exc.with_position(Position(raw.channel, raw.msg_id, 0))
                if self._on_error is None:
                    raise
                self._on_error(exc)
                return None
            set_record(msg, raw)
            msgs.append(msg)
        self._hand_over(raws, track)
        return msgs

    def _hand_over(self, raws: list[RawMessage], track: bool) -> None:
        """Note ``raws`` as returned to the caller: with ``track``, to be acknowledged by the next call;
        and, per channel, the last of them (what :meth:`lag` counts from)."""
        if track:
            self._unacked.extend(raws)
            self._in_hand = len(raws)
        if self._consumer is not None and len(self._consumer.channels) == 1:
            self._last[raws[-1].channel] = raws[-1].msg_id
            return
        last = self._last
        for raw in raws:
            last[raw.channel] = raw.msg_id

    def ack(self, msgs: Sequence[TsMsg] | Sequence[RawMessage]) -> None:
        """Acknowledge consumed messages (only needed with ``auto_ack=False``): typed messages from
        :meth:`consume`, or the frames of a :meth:`consume_frames` pack."""
        consumer = self._require_consumer()  # a closed or consumer-less stream raises even for an empty list
        if isinstance(msgs, (TsMsg, RawMessage)) or not isinstance(msgs, Sequence):
            raise InvalidArgumentError("ack takes a list of consumed TsMsg or of frames (RawMessage)")
        channels = set(consumer.channels)
        raws: list[RawMessage] = []
        for m in msgs:
            if isinstance(m, RawMessage):
                raw: RawMessage | None = m
            elif isinstance(m, TsMsg):
                raw = getattr(m, "_raw", None)
            else:
                raise InvalidArgumentError("ack takes a list of consumed TsMsg or of frames (RawMessage)")
            if raw is None:  # never consumed: nothing to acknowledge
                continue
            if raw.channel not in channels:  # another stream's message: its id means nothing here
                raise InvalidArgumentError(
                    f"ack of a message from {raw.channel!r}, a channel this stream does not consume"
                )
            raws.append(raw)
        if raws:
            consumer.ack(raws)

    def _ack_delivered(self) -> None:
        self._in_hand = 0  # the caller moved on: the pack it held is handled, whether or not this ack works
        if self._consumer is None:
            return
        if self._reported:
            self._consumer.ack(self._reported)  # on failure they stay, and the next call tries again
            self._reported = []
        if self._unacked:
            self._consumer.ack(self._unacked)
            self._unacked = []

    def seek(self, positions: Sequence[Position]) -> None:
        """Resume each position's channel right after that position (at it, for an ``inclusive`` one;
        a position with an empty msg_id: from the channel's start). Channels not named keep their place.
        Every position is checked before any channel moves: an invalid one raises ``SeekError`` and no
        channel moves; seek never falls back silently to the start or the end. As with every seek, the
        pack in hand counts as handled and is acknowledged first, also when the broker then refuses a
        position."""
        consumer = self._require_consumer()
        targets = seek_targets(positions, consumer.channels)
        self._ack_delivered()
        inclusive = {p.channel for p in positions if p.inclusive and p.msg_id}
        if inclusive:
            consumer.seek(targets, inclusive=inclusive)
        else:  # a plugin whose seek takes no `inclusive` still serves every other seek
            consumer.seek(targets)
        self._backlog = [r for r in self._backlog if r.channel not in targets]
        for channel in targets:  # counted from the subscription's new place from now on
            self._last.pop(channel, None)

    def lag(self, *, after: Mapping[str, bytes] | None = None) -> list[ChannelLag]:
        """How far this stream is behind on each consumed channel, in channel order: messages on the
        channel after the last one this stream returned (before it returned any on that channel, after
        the subscription's acknowledged position), and the time between the newest message's ``end_ts``
        and that message's. ``None`` where the backend cannot tell (docs/operations.md). ``after``
        (``{channel: msg_id}``) counts from those messages instead of the last returned, for decorators
        that return packs of their own, such as :class:`~msgstream.TimeTickStream`."""
        consumer = self._require_consumer()
        if after is not None and (
            not isinstance(after, Mapping) or not all(isinstance(v, bytes) for v in after.values())
        ):
            raise InvalidArgumentError(f"after maps channels to msg_id bytes, got {after!r}")
        last = self._last if after is None else after
        return channel_lags(self._backend, consumer.subscription, consumer.channels, last)

    def get_latest_positions(self) -> list[Position]:
        """The newest message of each consumed channel (else each produced channel); an empty
        channel's position has ``msg_id == b""``. ``timestamp`` is 0: the id alone is known."""
        self._check_open()
        channels = self.consumer_channels or self.producer_channels
        if not channels:
            raise StreamStateError("no channels: call create_consumers() or create_producers() first")
        return [Position(c, self._backend.latest_message_id(c) or b"", 0) for c in channels]

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self, *, acknowledge: bool = True) -> None:
        """Acknowledge what was consumed, close producers and consumer. Idempotent. If the
        acknowledgement fails, nothing is closed and the error is raised: call ``close()`` again, or
        ``close(acknowledge=False)`` to close without it (the subscription then delivers those messages
        again)."""
        if self._closed:
            return
        if acknowledge:
            self._ack_delivered()
            if self._consumer is not None:
                self._consumer.flush()
        errors: list[BaseException] = []
        self._closed = True
        closeables: list[Producer | Consumer] = [*self._producers, *([self._consumer] if self._consumer else [])]
        for closeable in closeables:
            try:
                closeable.close()
            except MsgStreamError as exc:
                errors.append(exc)
        self._producers = []
        self._consumer = None
        if errors:
            raise errors[0]

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise StreamClosedError("stream is closed")

    def _require_consumer(self) -> Consumer:
        self._check_open()
        if self._consumer is None:
            raise StreamStateError("no consumer: call create_consumers() first")
        return self._consumer

    def __enter__(self) -> MsgStream:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        end_block(self, failed=exc_type is not None)

    def _drop_in_hand(self) -> None:
        """Leave the pack last returned (or received and not handed over: msgstream.aio after a cancelled
        consume) unacknowledged, so the subscription delivers it again. Acknowledgements of packs handled
        before it (one that failed is kept for a retry) stay due."""
        del self._unacked[len(self._unacked) - self._in_hand :]
        self._in_hand = 0

    def _unreport(self) -> None:
        """Leave the bad frame last reported unacknowledged: its report reached no caller (msgstream.aio
        after a cancelled consume), so the subscription delivers it, and it is reported, again."""
        if self._reported:
            self._reported.pop()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"MsgStream({self._backend!r}, {state}, producers={self.producer_channels},"
            f" consumer={self.subscription!r}:{self.consumer_channels})"
        )


class _Block(Protocol):
    def _drop_in_hand(self) -> None: ...
    def close(self, *, acknowledge: bool = True) -> None: ...


def end_block(stream: _Block, failed: bool) -> None:
    """What leaving a stream's ``with`` block does: close it. A block that failed had not handled the pack
    in hand: it stays unacknowledged, to be delivered again. If acknowledging what was due before it fails
    as well (the broker is still down), the stream is closed without that too (delivered again: at least
    once) rather than left open, and the block's own exception goes on."""
    if not failed:
        stream.close()
        return
    stream._drop_in_hand()
    try:
        stream.close()
    except MsgStreamError as exc:
        log.warning("closing %r after its block failed: %s; closed without acknowledging", stream, exc)
        stream.close(acknowledge=False)


def _names(channels: Sequence[str], what: str) -> list[str]:
    if (
        not isinstance(channels, Sequence)
        or isinstance(channels, str)
        or not channels
        or not all(isinstance(c, str) and c for c in channels)
    ):
        raise InvalidArgumentError(f"{what} must be a non-empty list of channel names, got {channels!r}")
    if len(set(channels)) != len(channels):
        raise InvalidArgumentError(f"{what} lists a channel twice: {list(channels)}")
    return list(channels)


def _marshal_checked(msgs: Sequence[TsMsg]) -> list[bytes]:
    """Frames for ``msgs``, each body decoded back by its type's decoder before it gets its header.
    ``InvalidArgumentError`` names the first message that does not decode.

    Each body is encoded into one reused buffer, decoded from there, and copied once, with its header,
    into the frame: no bytes object per body and no slice to take the header off again."""
    frames: list[bytes] = []
    append = frames.append
    buf = bytearray(4096)  # encode_into grows it as needed
    cls: type | None = None
    for m in msgs:
        if type(m) is not cls:
            cls = type(m)
            own = cls.marshal is TsMsg.marshal  # else a user type that frames itself: decode its frame's body
            header = cls.prepare()
            decode = cls._decoder.decode
        if own:
            encode_body_into(m, buf)
            body: bytes | bytearray | memoryview = buf
        else:
            frame = m.marshal()
            plain = split_properties(frame)[1] if len(frame) > HEADER_SIZE and frame[3] & PROPERTIES else frame
            body = memoryview(plain)[HEADER_SIZE:]
        try:
            decode(body)
        except Exception as exc:
            raise InvalidArgumentError(
                f"message {len(frames)} ({cls.__name__}) has a field of the wrong type: {exc}"
            ) from None
        if m._props:  # rare: the frame gets the flag and the properties block
            append(with_properties(header + buf, m._props) if own else frame)
        else:
            append(header + buf if own else frame)
    return frames


_T = TypeVar("_T")
_LOGICAL_BITS = 18  # msgstream.timestamp.LOGICAL_BITS: a hybrid timestamp is physical_ms << 18 | logical


def _unless_unsupported(call: Callable[..., _T], *args: Any, default: _T) -> _T:
    try:
        return call(*args)
    except UnsupportedOperationError:  # a plugin that does not implement lag's operations: it cannot tell
        return default


def _end_ms(backend: Backend, channel: str, msg_id: bytes) -> int | None:
    payload = _unless_unsupported(backend.read_message, channel, msg_id, default=None)
    if payload is None:
        return None
    try:
        return frame_timestamps(payload)[1] >> _LOGICAL_BITS
    except UnmarshalError:  # not a msgstream frame: no time to read
        return None


def channel_lags(
    backend: Backend, subscription: str, channels: Sequence[str], last: Mapping[str, bytes]
) -> list[ChannelLag]:
    """:meth:`MsgStream.lag` for ``channels``, where ``last`` maps a channel to the id of the last message
    returned on it."""
    out: list[ChannelLag] = []
    for channel in channels:
        ref = last.get(channel)
        if ref is not None:
            count = _unless_unsupported(backend.count_after, channel, ref, default=None)
        else:
            unknown: tuple[int | None, bytes | None] = (None, None)
            count, ref = _unless_unsupported(backend.unacknowledged, subscription, channel, default=unknown)
        newest = backend.latest_message_id(channel)
        seconds: float | None
        if count == 0 or newest is None or newest == ref:
            seconds = 0.0
        elif ref is None:
            seconds = None
        else:
            newest_ms, ref_ms = _end_ms(backend, channel, newest), _end_ms(backend, channel, ref)
            seconds = None if newest_ms is None or ref_ms is None else max(0, newest_ms - ref_ms) / 1000
        out.append(ChannelLag(channel, count, seconds))
    return out


def check_timeout(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidArgumentError(f"{name} must be a number of seconds, got {value!r}")
    if not 0 <= value <= MAX_TIMEOUT:
        raise InvalidArgumentError(f"{name} must be between 0 and {MAX_TIMEOUT} seconds, got {value!r}")
    return float(value)


def seek_targets(positions: Sequence[Position], channels: Sequence[str]) -> dict[str, bytes | None]:
    """``{channel: msg_id or None}`` from positions, checked: a list of Position, each on a consumed
    channel, each channel once."""
    if not isinstance(positions, (list, tuple)) or not all(isinstance(p, Position) for p in positions):
        raise InvalidArgumentError(f"seek takes a list of Position, got {type(positions).__name__}")
    known = set(channels)
    targets: dict[str, bytes | None] = {}
    for pos in positions:
        if not isinstance(pos.channel, str) or not isinstance(pos.msg_id, bytes):
            raise InvalidArgumentError(
                f"a Position holds a str channel and a bytes msg_id, got {type(pos.channel).__name__}"
                f" and {type(pos.msg_id).__name__}"
            )
        ts = pos.timestamp
        if not isinstance(ts, int) or isinstance(ts, bool) or ts < 0 or not isinstance(pos.inclusive, bool):
            raise InvalidArgumentError(
                f"a Position's timestamp is an int >= 0 and inclusive a bool, got {pos.timestamp!r}, {pos.inclusive!r}"
            )
        if pos.channel not in known:
            raise SeekError(f"position for channel {pos.channel!r}, which this stream does not consume")
        if pos.channel in targets:
            raise SeekError(f"two positions for channel {pos.channel!r}")
        targets[pos.channel] = pos.msg_id or None
    return targets
