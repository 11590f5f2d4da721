"""The in-process ``memory://`` backend: the zero-setup default and the reference SPI implementation.

``memory://`` and ``memory://NAME`` name brokers living in this process: every client opened on the
same URL (host part) shares one broker, so a second client describes the first one's channels.
Nothing survives the process. Message ids are 8-byte big-endian offsets into the channel's log.

Subscriptions work like Redis consumer groups: per channel a cursor shared by the members, a pending
list of delivered-but-unacknowledged offsets per member, and offsets returned by a closed member
redelivered first to the next member that asks. A member acknowledges only what it holds; closing the
backend closes the consumers it opened that are still open.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from .backend import CHANNEL_NAME, CLOSED, URL, Backend, Consumer, Features, Producer, RawMessage, SubscriptionPosition
from .errors import (
    ChannelExistsError,
    ChannelNotFoundError,
    InvalidArgumentError,
    InvalidURLError,
    ProduceError,
    SeekError,
    StreamClosedError,
    SubscriptionInUseError,
)

__all__ = ["MemoryBackend"]

_ID_LEN = 8


def _msg_id(offset: int) -> bytes:
    return offset.to_bytes(_ID_LEN, "big")


class _Subscription:
    __slots__ = ("cursor", "members", "pending", "redeliver")

    def __init__(self, cursor: int) -> None:
        self.cursor = cursor  # next never-delivered offset
        self.pending: dict[int, int] = {}  # offset -> consumer token
        self.redeliver: list[int] = []  # offsets to deliver again, ascending
        self.members: set[int] = set()  # tokens of the open consumers


class _Channel:
    __slots__ = ("log", "metadata", "subs")

    def __init__(self, metadata: bytes) -> None:
        self.metadata = metadata
        self.log: list[bytes] = []
        self.subs: dict[str, _Subscription] = {}


class _Broker:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.channels: dict[str, _Channel] = {}

    def channel(self, name: str) -> _Channel:
        ch = self.channels.get(name)
        if ch is None:
            raise ChannelNotFoundError(name)
        return ch


_BROKERS: dict[str, _Broker] = {}
_BROKERS_LOCK = threading.Lock()
_TOKENS = itertools.count(1)


class MemoryBackend(Backend):
    """In-process broker; see the module docstring."""

    features = Features(shared_subscription=True, durable=False, cross_process=False, nonblocking_send=True)

    def __init__(self, url: URL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        if len(url.hosts) > 1 or url.path not in ("", "/"):
            raise InvalidURLError(f"memory URLs are memory:// or memory://NAME, got {url.redacted()!r}")
        name = url.host or ""
        with _BROKERS_LOCK:
            self._broker = _BROKERS.setdefault(name, _Broker())
        self._consumers: dict[int, _MemoryConsumer] = {}  # open ones, by token: close() closes them

    def create_channel(self, name: str, metadata: bytes) -> None:
        if not CHANNEL_NAME.fullmatch(name):
            raise InvalidArgumentError(f"invalid channel name {name!r}")
        with self._broker.lock:
            if name in self._broker.channels:
                raise ChannelExistsError(f"channel exists: {name!r}")
            self._broker.channels[name] = _Channel(bytes(metadata))

    def channel_metadata(self, name: str) -> bytes:
        with self._broker.lock:
            return self._broker.channel(name).metadata

    def delete_channel(self, name: str) -> None:
        with self._broker.lock:
            self._broker.channel(name)
            del self._broker.channels[name]
            self._broker.changed.notify_all()

    def create_producer(self, channel: str) -> Producer:
        self.channel_metadata(channel)
        return _MemoryProducer(self._broker, channel)

    def create_consumer(self, subscription: str, channels: Sequence[str], initial: SubscriptionPosition) -> Consumer:
        with self._broker.lock:
            chs = [self._broker.channel(name) for name in channels]  # every channel exists, or nothing changes
            consumer = _MemoryConsumer(self._broker, subscription, channels, self._consumers)
            for ch in chs:
                start = 0 if initial is SubscriptionPosition.EARLIEST else len(ch.log)
                ch.subs.setdefault(subscription, _Subscription(start)).members.add(consumer.token)
        return consumer

    def close(self) -> None:
        """Close the consumers still open, as a broker connection that goes away leaves its groups: what
        they held goes to the other members (a stream dropped without ``close()`` holds it till then)."""
        for consumer in list(self._consumers.values()):
            consumer.close()

    def latest_message_id(self, channel: str) -> bytes | None:
        with self._broker.lock:
            n = len(self._broker.channel(channel).log)
        return _msg_id(n - 1) if n else None

    def ping(self, timeout: float) -> None:
        """The broker is this process: it always answers."""

    def list_channels(self) -> list[str]:
        with self._broker.lock:
            return list(self._broker.channels)

    def list_subscriptions(self, channel: str) -> list[str]:
        with self._broker.lock:
            return list(self._broker.channel(channel).subs)

    def drop_subscription(self, subscription: str, channels: Sequence[str]) -> None:
        with self._broker.lock:
            subs = [self._broker.channel(name).subs for name in channels]
            for name, by_name in zip(channels, subs, strict=True):
                sub = by_name.get(subscription)
                if sub is not None and sub.members:
                    raise SubscriptionInUseError(
                        f"subscription {subscription!r} has {len(sub.members)} open consumer(s) on {name!r}"
                    )
            for by_name in subs:
                by_name.pop(subscription, None)

    def read_message(self, channel: str, msg_id: bytes) -> bytes | None:
        offset = int.from_bytes(msg_id, "big")
        with self._broker.lock:
            log = self._broker.channel(channel).log
            return log[offset] if len(msg_id) == _ID_LEN and offset < len(log) else None

    def count_after(self, channel: str, msg_id: bytes | None) -> int | None:
        with self._broker.lock:
            n = len(self._broker.channel(channel).log)
        return n if msg_id is None else max(0, n - int.from_bytes(msg_id, "big") - 1)

    def unacknowledged(self, subscription: str, channel: str) -> tuple[int | None, bytes | None]:
        with self._broker.lock:
            ch = self._broker.channel(channel)
            sub = ch.subs.get(subscription) or _Subscription(0)
            held = [*sub.pending, *sub.redeliver]
            count = len(held) + len(ch.log) - sub.cursor
            oldest = min(held) if held else sub.cursor
        return count, (_msg_id(max(0, oldest - 1)) if count else None)


class _MemoryProducer(Producer):
    def __init__(self, broker: _Broker, channel: str) -> None:
        super().__init__(channel)
        self._broker = broker

    def send(self, payloads: Sequence[bytes], timeout: float) -> list[bytes]:
        broker = self._broker  # once: a close() in another thread does not cut a send that began short
        with broker.lock:
            ch = broker.channels.get(self.channel)
            if ch is None:
                raise ProduceError(f"channel {self.channel!r} does not exist (deleted?)", channel=self.channel)
            start = len(ch.log)
            ch.log.extend(payloads)
            broker.changed.notify_all()
        return [_msg_id(i) for i in range(start, start + len(payloads))]

    def close(self) -> None:
        self._broker = CLOSED


class _MemoryConsumer(Consumer):
    def __init__(
        self, broker: _Broker, subscription: str, channels: Sequence[str], registry: dict[int, _MemoryConsumer]
    ) -> None:
        super().__init__(subscription, channels)
        self._broker = broker
        self.token = next(_TOKENS)
        self._registry = registry
        registry[self.token] = self
        self._next_channel = 0
        self._closed = False

    def receive(self, max_messages: int, timeout: float) -> list[RawMessage]:
        deadline = time.monotonic() + timeout
        with self._broker.changed:
            while True:
                if self._closed:  # also by another thread while we waited: take nothing
                    raise StreamClosedError("consumer is closed")
                out = self._take(max_messages)
                remaining = deadline - time.monotonic()
                if out or remaining <= 0:
                    return out
                self._broker.changed.wait(remaining)

    def _take(self, max_messages: int) -> list[RawMessage]:
        """Collect up to ``max_messages``, an equal share from each channel first (from a rotating start),
        then what room is left from the channels that have more."""
        out: list[RawMessage] = []
        first = self._next_channel
        self._next_channel = (first + 1) % len(self.channels)
        order = self.channels[first:] + self.channels[:first]
        for share in (-(-max_messages // len(order)), max_messages):
            for name in order:
                self._take_from(name, min(share, max_messages - len(out)), out)
        return out

    def _take_from(self, name: str, room: int, out: list[RawMessage]) -> None:
        ch = self._broker.channel(name)
        sub = ch.subs.get(self.subscription)
        if sub is None:  # channel recreated under the same name: a new subscription
            sub = ch.subs[self.subscription] = _Subscription(0)
            sub.members.add(self.token)
        if room <= 0:
            return
        offsets = sub.redeliver[:room]
        del sub.redeliver[: len(offsets)]
        room -= len(offsets)
        if room > 0 and sub.cursor < len(ch.log):
            end = min(len(ch.log), sub.cursor + room)
            offsets.extend(range(sub.cursor, end))
            sub.cursor = end
        token = self.token
        log = ch.log
        for off in offsets:
            sub.pending[off] = token
            out.append(RawMessage(name, _msg_id(off), log[off]))

    def ack(self, messages: Sequence[RawMessage]) -> None:
        with self._broker.lock:
            for msg in messages:
                ch = self._broker.channels.get(msg.channel)
                sub = ch.subs.get(self.subscription) if ch is not None else None
                offset = int.from_bytes(msg.msg_id, "big")
                if sub is not None and sub.pending.get(offset) == self.token:  # not another member's hold
                    del sub.pending[offset]

    def seek(self, targets: Mapping[str, bytes | None], inclusive: Collection[str] = frozenset()) -> None:
        if self._closed:
            raise StreamClosedError("consumer is closed")
        with self._broker.changed:
            cursors: dict[str, int] = {}
            for channel, after in targets.items():  # check every target before moving any
                if channel not in self.channels:
                    raise SeekError(f"channel {channel!r} is not consumed by this consumer")
                log = self._broker.channel(channel).log
                if not after:
                    cursors[channel] = 0
                    continue
                if len(after) != _ID_LEN:
                    raise SeekError(f"not a memory message id: {after.hex()!r} on {channel!r}")
                offset = int.from_bytes(after, "big")
                if offset >= len(log):
                    raise SeekError(f"message id {after.hex()} is past the end of {channel!r} ({len(log)} messages)")
                cursors[channel] = offset if channel in inclusive else offset + 1
            for channel, cursor in cursors.items():
                ch = self._broker.channels[channel]
                sub = ch.subs.setdefault(self.subscription, _Subscription(cursor))
                sub.members.add(self.token)
                sub.cursor = cursor
                sub.pending.clear()
                sub.redeliver.clear()
            self._broker.changed.notify_all()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._registry.pop(self.token, None)
        with self._broker.changed:
            for name in self.channels:
                ch = self._broker.channels.get(name)
                sub = ch.subs.get(self.subscription) if ch is not None else None
                if sub is None:
                    continue
                sub.members.discard(self.token)
                mine = [off for off, tok in sub.pending.items() if tok == self.token]
                for off in mine:
                    del sub.pending[off]
                sub.redeliver = sorted(sub.redeliver + mine)
            self._broker.changed.notify_all()
