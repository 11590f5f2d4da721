"""Kafka backend for msgstream on confluent-kafka: ``kafka://host:port[,host:port...][/][?options]``.

Mapping (docs/backends.md has the long form):

* channel -> a topic with one partition; the channel registry (owner records, and which channels
  exist) is the topic ``__msgstream_channels`` (records ``C<metadata>`` / ``D`` keyed by channel),
  read to its end and cached for at most ``registry_refresh`` seconds. Destroying a channel deletes its
  topic (``delete_topics``); the producer never has a topic created by writing to it.
* message id -> the offset as 8 signed big-endian bytes.
* produce -> one idempotent producer (``acks=all``); a pack is queued by one ``produce_batch`` call where
  nothing in it can be refused (else a ``produce()`` each), every delivery report is collected and the
  batch is flushed with the timeout; any failure raises ``ProduceError`` with the offsets that were
  accepted, and a refused message stops the pack there.
* subscription -> consumer group; receive = ``consume(num_messages, timeout)``; ack -> the contiguous
  acknowledged prefix of each partition is committed (asynchronously; synchronously on revoke, and by
  the flush of an acknowledging close).
* LATEST for a new group -> its committed offset is set to the end when the consumer is made (the group
  joins on the first receive; what is produced meanwhile belongs to it); seek -> the offset is checked
  against the partition, committed, and the assigned partition is moved.
* latest message id -> the high watermark - 1.

Options: librdkafka properties pass through (``linger.ms=5``, ``security.protocol=SASL_SSL``, ...);
prefix one with ``producer.``, ``consumer.`` or ``admin.`` to give it to that client only. msgstream's
own: ``registry_topic``, ``registry_refresh`` (1 s), ``operation_timeout`` (10 s), ``replication_factor``
(1), ``delete_topics`` (true; false leaves a destroyed channel's topic on the broker, refused by msgstream).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import struct
import threading
import time
import uuid
from collections.abc import Collection, Generator, Mapping, Sequence
from typing import Any, NoReturn

import confluent_kafka as ck
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from msgstream.backend import (
    CHANNEL_NAME,
    CLOSED,
    URL,
    Backend,
    Consumer,
    Features,
    Producer,
    RawMessage,
    SubscriptionPosition,
    Unacked,
    ids_by_channel,
    redact_options,
    scrub,
)
from msgstream.errors import (
    BrokerUnavailableError,
    ChannelExistsError,
    ChannelNotFoundError,
    ConsumeError,
    InvalidArgumentError,
    InvalidURLError,
    MsgStreamError,
    ProduceError,
    SeekError,
    StreamClosedError,
    SubscriptionInUseError,
    UnsupportedOperationError,
)

__all__ = ["KafkaBackend"]

log = logging.getLogger("msgstream.kafka")

_OWN_OPTIONS = {"registry_topic", "registry_refresh", "operation_timeout", "replication_factor", "delete_topics"}
_ROLES = ("producer.", "consumer.", "admin.")
_NO_OFFSET = -1001  # librdkafka's OFFSET_INVALID: nothing committed yet
_READER_GROUP = "msgstream-reader-"  # prefix of the group ids of backends' readers, which never join
# what the backend's guarantees rest on: a URL may repeat these, not change them
_PRODUCER_NEEDS = {
    "acks": "all",  # a message is confirmed once the in-sync replicas have it
    "enable.idempotence": True,  # a retried send is stored once, in order
    # librdkafka's producer asks the broker to create a topic it writes to (Apache Kafka's brokers allow
    # it by default): a late produce would bring a destroyed channel back. Channels are created only by
    # create_channel.
    "allow.auto.create.topics": False,
}
_CONSUMER_NEEDS = {
    "enable.auto.commit": False,  # offsets are committed for what the caller acknowledged, not polled
    "enable.auto.offset.store": False,
    # one partition per channel: the default range assignor would give partition 0 of every topic, so
    # every channel, to the same member; round-robin spreads the channels over the members. Its eager
    # rebalance (every partition revoked, then assigned) is what the rebalance callbacks are written for
    "partition.assignment.strategy": "roundrobin",
}
# defaults a URL may change
_PRODUCER_DEFAULTS = {"linger.ms": 5}
_CONSUMER_DEFAULTS = {
    # librdkafka pauses fetching for 1 s whenever its local queue is full; a consumer that decodes
    # then sits idle on a long backlog
    "fetch.queue.backoff.ms": 10,
    "max.poll.interval.ms": 300000,
}


#: librdkafka's other names for the needed properties
_ALIASES = {"request.required.acks": "acks"}
#: how a URL (all strings) may spell a needed value
_SPELLINGS: dict[Any, set[str]] = {True: {"true", "1"}, False: {"false", "0"}, "all": {"all", "-1"}}


def _settings(defaults: Mapping[str, Any], given: Mapping[str, Any], needs: Mapping[str, Any]) -> dict[str, Any]:
    """A client's configuration: ``defaults``, then what the URL gave, then ``needs``; a URL value that
    differs from what the backend needs is refused (``InvalidURLError``), not silently replaced."""
    for key, value in given.items():
        need = needs.get(_ALIASES.get(key, key))
        if need is not None and str(value).lower() not in _SPELLINGS.get(need, {str(need).lower()}):
            raise InvalidURLError(f"kafka option {key}={value!r} is not supported: msgstream needs {key}={need}")
    return {**defaults, **given, **needs}


def _take(consumer: ck.Consumer, n: int, timeout: float) -> list[Any]:
    """Up to ``n`` messages, returning as soon as there is one. ``consume(n, timeout)`` alone waits out
    the whole timeout unless ``n`` arrive; so drain what is fetched already, and block only for the
    first message."""
    batch: list[Any] = consumer.consume(n, 0)
    if batch:
        return batch
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(n - 1, 0)] if n > 1 else [first]


_NO_TOPIC = (ck.KafkaError.UNKNOWN_TOPIC_OR_PART, ck.KafkaError._UNKNOWN_TOPIC)
#: refusals that asking again cannot change (every other failure to read the registry's end offset is
#: asked again until the timeout: around a broker restart librdkafka reports, for a moment, an unknown
#: partition or topic, or a broker handle it replaced, for a topic that exists)
_REFUSED = (
    ck.KafkaError.TOPIC_AUTHORIZATION_FAILED,
    ck.KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    ck.KafkaError.SASL_AUTHENTICATION_FAILED,
    ck.KafkaError._AUTHENTICATION,
    ck.KafkaError._SSL,
)
_TRANSIENT = (
    ck.KafkaError._TRANSPORT,
    ck.KafkaError._ALL_BROKERS_DOWN,
    ck.KafkaError._TIMED_OUT,
    ck.KafkaError._MSG_TIMED_OUT,
    ck.KafkaError.REQUEST_TIMED_OUT,
    ck.KafkaError._PURGE_QUEUE,  # taken back from the local queue (see send): never left the client
)
#: a synchronous commit refused while the group is between generations (a rebalance): made again
_REBALANCING = (
    ck.KafkaError.REBALANCE_IN_PROGRESS,
    ck.KafkaError.UNKNOWN_MEMBER_ID,
    ck.KafkaError.ILLEGAL_GENERATION,
    ck.KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
)


def _error_of(exc: ck.KafkaException) -> ck.KafkaError | None:
    return exc.args[0] if exc.args and isinstance(exc.args[0], ck.KafkaError) else None


def _code(exc: ck.KafkaException) -> int | None:
    err = _error_of(exc)
    return None if err is None else err.code()


def _verdict(err: ck.KafkaError | None) -> tuple[type[MsgStreamError] | None, bool]:
    """A librdkafka error's msgstream class (``None``: the caller's) and whether trying again may work."""
    if err is not None and err.code() in _NO_TOPIC:
        return ChannelNotFoundError, False
    return None, err is None or err.retriable() or err.code() in _TRANSIENT


# confluent-kafka 2.12 added Producer.produce_batch: one call queues a pack, for less CPU than a
# produce() each (docs/performance.md); older versions take the per-message path
_HAS_BATCH = hasattr(ck.Producer, "produce_batch")


class _BatchLimits:
    """What librdkafka refuses a message for, from the producer's configuration: the checks that keep
    ``produce_batch`` from refusing a message of a pack while queueing later ones (it does: refused
    messages are skipped, the rest queued, which would send the pack out of order)."""

    __slots__ = ("max_bytes", "queue_bytes", "queue_msgs")

    # librdkafka compares a record's size with message.max.bytes after adding its framing (under 100
    # bytes for a value without key or headers); the margin keeps the check on the safe side
    _FRAMING = 256

    def __init__(self, max_bytes: int, queue_msgs: int, queue_bytes: int) -> None:
        self.max_bytes, self.queue_msgs, self.queue_bytes = max_bytes, queue_msgs, queue_bytes

    @classmethod
    def of(cls, conf: Mapping[str, Any]) -> _BatchLimits:
        def setting(key: str, default: int) -> int:
            try:
                return int(conf.get(key, default))
            except (TypeError, ValueError):
                return 0  # librdkafka will refuse the configuration itself; never batch meanwhile

        return cls(
            setting("message.max.bytes", 1_000_000) - cls._FRAMING,
            setting("queue.buffering.max.messages", 100_000),
            setting("queue.buffering.max.kbytes", 1_048_576) * 1024,
        )

    def admit(self, producer: Any, payloads: Sequence[bytes]) -> bool:
        """Whether ``produce_batch`` can queue all of ``payloads`` now: none too large, and room in the
        local queue for all of them, counting every message, queued already or not, at the largest size
        (one pass over the sizes, not two: a bound that errs only towards the per-message path)."""
        n = len(producer) + len(payloads)
        if n > self.queue_msgs:
            return False
        largest = len(max(payloads, key=len))
        return largest <= self.max_bytes and n * largest <= self.queue_bytes


_pack_offset = struct.Struct(">q").pack  # offset -> message id: 8 signed big-endian bytes


def _offset(msg_id: bytes) -> int:
    return int.from_bytes(msg_id, "big", signed=True)


class KafkaBackend(Backend):
    """See the module docstring."""

    features = Features(durable=True, exact_acks=False, members_before_receive=False)

    def __init__(self, url: URL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        if not url.hosts:
            raise InvalidURLError(f"kafka URLs name at least one broker: {url.redacted()!r}")
        self.bootstrap = ",".join(f"{h}:{p or 9092}" for h, p in url.hosts)
        opts = self.options
        try:
            self.timeout = float(opts.get("operation_timeout", 10.0))
            self.replication = int(opts.get("replication_factor", 1))
            self.registry_refresh = float(opts.get("registry_refresh", 1.0))
        except (TypeError, ValueError):
            raise InvalidURLError(
                f"bad operation_timeout, replication_factor or registry_refresh in {url.redacted()!r}"
            ) from None
        self.registry_topic = str(opts.get("registry_topic", "__msgstream_channels"))
        # false: destroying a channel only tombstones it in the registry (msgstream refuses it from then
        # on) and leaves the topic, for brokers where a client may not delete topics
        self.delete_topics = str(opts.get("delete_topics", "true")).lower() not in ("false", "0", "no")
        # librdkafka's own log lines go to the "msgstream.kafka" logger, not to stderr
        common: dict[str, Any] = {"bootstrap.servers": self.bootstrap, "logger": log}
        roles: dict[str, dict[str, Any]] = {"": common, **{r: {} for r in _ROLES}}
        for key, value in opts.items():
            if key not in _OWN_OPTIONS:
                role = next((r for r in _ROLES if key.startswith(r)), "")
                roles[role][key.removeprefix(role)] = value
        self.producer_conf = _settings(_PRODUCER_DEFAULTS, {**common, **roles["producer."]}, _PRODUCER_NEEDS)
        self.batch_limits = _BatchLimits.of(self.producer_conf)
        self.consumer_conf = _settings(_CONSUMER_DEFAULTS, {**common, **roles["consumer."]}, _CONSUMER_NEEDS)
        self.admin_conf = {**common, **roles["admin."]}
        with self.errors("connect", BrokerUnavailableError):
            self.admin = AdminClient(self.admin_conf)
            metadata = self._brokers("connect", self.timeout)
            self._producer = ck.Producer(self.producer_conf)
            self._reader = ck.Consumer(  # reads to the end of a partition (registry, latest offset)
                {
                    **self.consumer_conf,
                    "group.id": _READER_GROUP + uuid.uuid4().hex,  # assign() only
                    "enable.partition.eof": True,
                    "fetch.wait.max.ms": 10,  # the end-of-partition event must not wait out a long poll
                    "fetch.error.backoff.ms": 10,
                }
            )
        self._lock = threading.RLock()
        self._registry: dict[str, bytes | None] = {}  # channel -> metadata; None = deleted
        self._registry_next = 0
        self._refreshed = 0.0
        self._consumers: set[_KafkaConsumer] = set()
        self._closed = False
        if self.registry_topic not in metadata.topics:
            self._create_topic(self.registry_topic, {"cleanup.policy": "compact"})

    # -- errors ---------------------------------------------------------------------------------
    def classify(self, exc: BaseException) -> tuple[type[MsgStreamError] | None, bool] | None:
        if not isinstance(exc, ck.KafkaException):
            return None
        return _verdict(_error_of(exc))

    def fail(
        self, cls: type[MsgStreamError], text: str, err: ck.KafkaError | None, channel: str | None = None
    ) -> NoReturn:
        """Raise for an error librdkafka reported as a value (a delivery report, a consumed error)."""
        kind, retriable = _verdict(err)
        raise self.error(kind or cls, text, retriable, channel) from None

    def _wait(self, future: Any, ignore: Collection[int] = ()) -> Any:
        """An admin-client call's result, within ``operation_timeout``; an error whose librdkafka code is
        in ``ignore`` counts as done (``None``)."""
        try:
            return future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:  # (TimeoutError from 3.11): a librdkafka timeout, for classify
            raise ck.KafkaException(ck.KafkaError(ck.KafkaError._TIMED_OUT, "no answer in time")) from None
        except ck.KafkaException as exc:
            if _code(exc) not in ignore:
                raise
            return None

    def _brokers(self, what: str, timeout: float) -> Any:
        """The cluster's metadata (``list_topics``), which some broker must answer within ``timeout``."""
        with self.errors(what, BrokerUnavailableError):
            try:
                metadata = self.admin.list_topics(timeout=timeout)
            finally:
                self.admin.poll(0)  # librdkafka's log lines reach the logger when its queue is served
        if not metadata.brokers:
            raise BrokerUnavailableError(f"no broker answered at {self.url.redacted()}")
        return metadata

    # -- topics and the registry ----------------------------------------------------------------
    def _create_topic(self, topic: str, config: dict[str, str] | None = None) -> None:
        new = NewTopic(topic, num_partitions=1, replication_factor=self.replication, config=config or {})
        with self.errors(f"create topic {topic!r}", BrokerUnavailableError):
            future = self.admin.create_topics([new], operation_timeout=self.timeout)[topic]
            self._wait(future, ignore=(ck.KafkaError.TOPIC_ALREADY_EXISTS,))

    def _read(
        self, topic: str, start: int, timeout: float, channel: str | None = None, batch: int = 500
    ) -> Generator[Any, None, None]:
        """The messages of ``topic`` from offset ``start`` to the end of its partition, read within
        ``timeout`` seconds by the reader (``batch`` at a time), which is held (with the lock) until this
        generator is closed."""
        with self._lock, self.errors(f"read {topic!r}", BrokerUnavailableError, channel):
            self._reader.assign([ck.TopicPartition(topic, 0, start)])
            deadline = time.monotonic() + timeout
            try:
                while True:
                    if time.monotonic() > deadline:
                        raise BrokerUnavailableError(f"reading {topic!r} took over {timeout}s")
                    done = False
                    for m in _take(self._reader, batch, min(0.5, timeout)):
                        err = m.error()
                        if err is None:
                            yield m
                        elif err.code() == ck.KafkaError._PARTITION_EOF:
                            done = True
                        else:
                            raise ck.KafkaException(err)
                    if done:
                        return
            finally:
                self._reader.unassign()

    def refresh_registry(self, force: bool = True, timeout: float | None = None) -> None:
        """Apply the registry records written since the last refresh (by any client), within ``timeout``
        seconds (default ``operation_timeout``). Without ``force`` only when that was more than
        ``registry_refresh`` seconds ago (the hot paths)."""
        if not force and time.monotonic() - self._refreshed < self.registry_refresh:
            return
        timeout = self.timeout if timeout is None else max(0.05, timeout)
        if not self._lock.acquire(timeout=timeout):
            raise BrokerUnavailableError(f"the channel registry was busy for {timeout:.1f}s")
        try:
            self._refreshed = start = time.monotonic()
            # the end offset first (one request): reading to the end, even with nothing new, is a fetch
            # round trip and the wait for end-of-partition on every refresh (docs/performance.md)
            if self._registry_end(start + timeout) <= self._registry_next:
                return
            left = max(0.05, timeout - (time.monotonic() - start))
            with contextlib.closing(self._read(self.registry_topic, self._registry_next, left)) as records:
                for m in records:
                    name = (m.key() or b"").decode()
                    value = m.value() or b""
                    self._registry[name] = value[1:] if value[:1] == b"C" else None
                    self._registry_next = m.offset() + 1
        finally:
            self._lock.release()

    def _registry_end(self, deadline: float) -> int:
        """The registry topic's end offset, asked again until ``deadline`` unless refused (``_REFUSED``)."""
        partition = ck.TopicPartition(self.registry_topic, 0)
        while True:
            try:
                _, end = self._reader.get_watermark_offsets(partition, timeout=max(0.01, deadline - time.monotonic()))
                return int(end)
            except ck.KafkaException as exc:
                refused = _code(exc) in _REFUSED
                if refused or time.monotonic() >= deadline:
                    text = f"read the channel registry: {_error_of(exc) or exc}"
                    raise self.error(BrokerUnavailableError, text, not refused) from None
            time.sleep(0.05)

    def _record(self, name: str, value: bytes) -> None:
        errors: list[ck.KafkaError] = []
        self._producer.produce(
            self.registry_topic,
            value,
            key=name.encode(),
            on_delivery=lambda err, _m: errors.append(err) if err else None,
        )
        if self._producer.flush(self.timeout) or errors:
            self.fail(BrokerUnavailableError, f"registry write for {name!r} failed", errors[0] if errors else None)

    def exists(self, name: str, refresh: bool = True, timeout: float | None = None) -> bool:
        """Whether ``name`` is a live channel; ``refresh=False``: by a registry at most ``registry_refresh``
        seconds old (read again within ``timeout`` if it is older)."""
        self.refresh_registry(force=refresh, timeout=timeout)
        return self.known(name)

    def known(self, name: str) -> bool:
        """Whether ``name`` is a live channel by the registry as last read (no broker call)."""
        return self._registry.get(name) is not None

    def check_channel(self, name: str, refresh: bool = True, timeout: float | None = None) -> None:
        if not self.exists(name, refresh, timeout):
            raise ChannelNotFoundError(name)

    # -- Backend --------------------------------------------------------------------------------
    def create_channel(self, name: str, metadata: bytes) -> None:
        if not CHANNEL_NAME.fullmatch(name) or name == self.registry_topic:
            raise InvalidArgumentError(f"invalid channel name {name!r}")
        with self._lock:
            if self.exists(name):
                raise ChannelExistsError(f"channel exists: {name!r}")
            self._create_topic(name)
            self._record(name, b"C" + metadata)
            self._registry[name] = bytes(metadata)

    def channel_metadata(self, name: str) -> bytes:
        self.refresh_registry()
        data = self._registry.get(name)
        if data is None:
            raise ChannelNotFoundError(name)
        return data

    def delete_channel(self, name: str) -> None:
        with self._lock:
            self.check_channel(name)
            self._record(name, b"D")
            self._registry[name] = None
            if not self.delete_topics:
                return
            with self.errors(f"delete topic {name!r}", BrokerUnavailableError, name):
                future = self.admin.delete_topics([name], operation_timeout=self.timeout)[name]
                with contextlib.suppress(ck.KafkaException):  # already gone: the registry says deleted
                    self._wait(future)
                self._wait_gone(name, time.monotonic() + self.timeout)

    def _wait_gone(self, topic: str, deadline: float) -> None:
        """Wait (until ``deadline``) for the brokers' metadata to lose ``topic``: the controller confirms a
        deletion before the brokers apply it, and until then another client's produce still lands there."""
        while time.monotonic() < deadline:
            try:  # every topic's metadata: a request naming the topic would have the broker create it again
                metadata = self.admin.list_topics(timeout=max(0.1, deadline - time.monotonic()))
            except ck.KafkaException:  # the deletion stands (the registry has it): this wait is a courtesy
                return
            if topic not in metadata.topics:
                return
            time.sleep(0.05)

    def create_producer(self, channel: str) -> Producer:
        self.check_channel(channel)
        return _KafkaProducer(self, channel)

    def create_consumer(self, subscription: str, channels: Sequence[str], initial: SubscriptionPosition) -> Consumer:
        for channel in channels:
            self.check_channel(channel)
        consumer = _KafkaConsumer(self, subscription, channels, initial)
        self._consumers.add(consumer)
        return consumer

    def watermarks(self, topic: str) -> tuple[int, int]:
        """The partition's first offset and the offset after its newest message."""
        with self._lock, self.errors(f"offsets of {topic!r}", BrokerUnavailableError, topic):
            low, high = self._reader.get_watermark_offsets(ck.TopicPartition(topic, 0), timeout=self.timeout)
        return int(low), int(high)

    def latest_message_id(self, channel: str) -> bytes | None:
        self.check_channel(channel)
        low, high = self.watermarks(channel)
        return _pack_offset(high - 1) if high > low else None

    # -- operations -----------------------------------------------------------------------------
    def ping(self, timeout: float) -> None:
        """A metadata request (``list_topics``) that some broker must answer within ``timeout``."""
        self._brokers("ping", timeout)

    def list_channels(self) -> list[str]:
        self.refresh_registry()
        return [name for name, metadata in self._registry.items() if metadata is not None]

    def _group_offsets(self, group: str, topics: Sequence[str] | None = None) -> dict[str, int]:
        """The committed offset of ``group`` on each topic (of ``topics``, else every one it has)."""
        parts = None if topics is None else [ck.TopicPartition(t, 0) for t in topics]
        request = [ck.ConsumerGroupTopicPartitions(group, parts)]
        with self.errors(f"committed offsets of {group!r}", BrokerUnavailableError):
            listed = self._wait(self.admin.list_consumer_group_offsets(request, request_timeout=self.timeout)[group])
        return {tp.topic: tp.offset for tp in listed.topic_partitions or [] if tp.offset >= 0 and tp.error is None}

    def list_subscriptions(self, channel: str) -> list[str]:
        """Consumer groups with an offset committed on the channel's topic (a group that joined and has
        acknowledged nothing is not listed yet)."""
        self.check_channel(channel)
        with self.errors("list consumer groups", BrokerUnavailableError):
            listing = self._wait(self.admin.list_consumer_groups(request_timeout=self.timeout))
        groups = [g.group_id for g in listing.valid if not g.group_id.startswith(_READER_GROUP)]
        return [g for g in groups if channel in self._group_offsets(g, [channel])]

    def drop_subscription(self, subscription: str, channels: Sequence[str]) -> None:
        """``delete_consumer_groups``: Kafka keeps one group per subscription, for all its channels, so
        every channel the group has an offset on must be among ``channels``."""
        others = sorted(t for t in self._group_offsets(subscription) if t not in channels and self.exists(t))
        if others:
            raise UnsupportedOperationError(
                f"Kafka drops the consumer group {subscription!r} as a whole; it also holds {others}: pass"
                " those channels too"
            )
        with self.errors(f"delete consumer group {subscription!r}", BrokerUnavailableError):
            future = self.admin.delete_consumer_groups([subscription], request_timeout=self.timeout)[subscription]
            try:
                self._wait(future, ignore=(ck.KafkaError.GROUP_ID_NOT_FOUND,))
            except ck.KafkaException as exc:
                if _code(exc) == ck.KafkaError.NON_EMPTY_GROUP:
                    raise SubscriptionInUseError(f"consumer group {subscription!r} has live members") from None
                raise

    def read_message(self, channel: str, msg_id: bytes) -> bytes | None:
        offset = _offset(msg_id)
        with contextlib.closing(self._read(channel, offset, self.timeout, channel, batch=1)) as messages:
            first = next(messages, None)
        return None if first is None or first.offset() != offset else bytes(first.value())

    def count_after(self, channel: str, msg_id: bytes | None) -> int | None:
        low, high = self.watermarks(channel)
        return high - low if msg_id is None else max(0, high - max(low, _offset(msg_id) + 1))

    def unacknowledged(self, subscription: str, channel: str) -> tuple[int | None, bytes | None]:
        """The high watermark less the group's committed offset (the partition's start without one)."""
        low, high = self.watermarks(channel)
        committed = max(low, self._group_offsets(subscription, [channel]).get(channel, low))
        count = max(0, high - committed)
        if not count:
            return 0, None
        return count, _pack_offset(committed - 1 if committed > low else committed)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for consumer in list(self._consumers):
            with contextlib.suppress(MsgStreamError):
                consumer.close()
        with contextlib.suppress(Exception):
            self._reader.close()
        self._producer.flush(self.timeout)
        # librdkafka's producer and admin client have no close(): they let go of their sockets and
        # threads when freed. Drop them now, not when the user drops this backend.
        self._producer = self._reader = self.admin = CLOSED

    def __repr__(self) -> str:
        return f"KafkaBackend({self.url.redacted()!r}, {redact_options(self.options)})"


class _KafkaProducer(Producer):
    def __init__(self, backend: KafkaBackend, channel: str) -> None:
        super().__init__(channel)
        self._backend = backend
        self._closed = False

    def send(self, payloads: Sequence[bytes], timeout: float) -> list[bytes]:
        if self._closed:
            raise StreamClosedError("producer is closed")
        if not self._backend.exists(self.channel, refresh=False, timeout=timeout):
            raise ProduceError(f"channel {self.channel!r} does not exist (deleted?)", channel=self.channel)
        try:
            return self._send(payloads, timeout)
        except ProduceError as exc:
            # a channel destroyed by another client since the registry was last read: its topic is gone,
            # and librdkafka holds the messages until they time out (never creating it again, see
            # allow.auto.create.topics above): say so rather than "not confirmed"
            backend = self._backend
            try:  # briefly: the send has had its time already
                backend.refresh_registry(timeout=1.0)
                gone = not exc.sent.get(self.channel) and not backend.known(self.channel)
            except MsgStreamError:
                gone = False
            if gone:
                # its messages would sit in librdkafka's queue until message.timeout.ms, and every later
                # send of this client would wait for them: purge what is queued (a send of another
                # thread that loses messages so fails, retriable, naming what was confirmed). Only a
                # send that queued messages gets here: a channel the registry already knows is gone
                # fails above, before queuing anything.
                backend._producer.purge(in_queue=True, in_flight=False, blocking=False)
                backend._producer.poll(0)
                raise ChannelNotFoundError(self.channel, "destroyed") from exc
            raise

    def _send(self, payloads: Sequence[bytes], timeout: float) -> list[bytes]:
        backend = self._backend
        # delivery reports come in produce order (one partition): the offsets confirmed, and each
        # failure with how many were confirmed before it
        offsets: list[Any] = []  # int; None where a broker confirmed without an offset
        failures: list[tuple[int, ck.KafkaError]] = []
        confirm = offsets.append

        def delivered(err: ck.KafkaError | None, msg: Any) -> None:
            if err is None:
                confirm(msg.offset())
            else:
                failures.append((len(offsets), err))

        producer = backend._producer
        produce = producer.produce
        topic = self.channel
        deadline = time.monotonic() + timeout

        def fail(err: ck.KafkaError, at: int | None = None) -> NoReturn:
            """Fail the send at a message that was not queued (refused, or no room until the deadline):
            the reports of what was queued are served first (until the deadline), so ``sent`` names the
            prefix confirmed before it. ``at``: its index in the pack, where later messages were queued
            behind it (by default it is the last one tried, so it comes after every report)."""
            producer.flush(max(0.0, deadline - time.monotonic()))
            failures.append((len(offsets) if at is None else at, err))
            failures.sort(key=lambda failure: failure[0])  # the earliest failure cuts the confirmed prefix
            note = "; messages after it were queued and may land out of order" if at is not None else ""
            self._fail_unconfirmed(len(payloads), offsets, failures, timeout, note)

        with backend.errors(f"send to {topic!r}", ProduceError, topic):
            rest: Sequence[bytes] = payloads
            if _HAS_BATCH and len(payloads) > 1 and backend.batch_limits.admit(producer, payloads):
                rest, hole = self._queue_batch(producer, payloads, delivered)
                if hole is not None:  # later messages were queued behind a refused one
                    fail(hole[1], at=hole[0])
            for payload in rest:  # the per-message path: a pack that cannot go in one call, or its refused tail
                while True:
                    try:
                        produce(topic, payload, partition=0, on_delivery=delivered)
                        break
                    except BufferError:  # local queue full: serve delivery reports, then retry
                        if time.monotonic() > deadline:
                            full = ck.KafkaError(
                                ck.KafkaError._QUEUE_FULL, f"local queue full for {timeout}s", retriable=True
                            )
                            fail(full)
                        producer.poll(0.05)
                    except ck.KafkaException as exc:  # refused (too large, ...)
                        err = _error_of(exc)
                        if err is None or err.code() in _NO_TOPIC:
                            raise  # ChannelNotFoundError, or what backend.errors makes of it
                        fail(err)
            producer.flush(max(0.0, deadline - time.monotonic()))
        if not failures and len(offsets) == len(payloads) and None not in offsets and min(offsets, default=0) >= 0:
            return list(map(_pack_offset, offsets))
        self._fail_unconfirmed(len(payloads), offsets, failures, timeout)

    def _queue_batch(
        self, producer: Any, payloads: Sequence[bytes], delivered: Any
    ) -> tuple[Sequence[bytes], tuple[int, ck.KafkaError] | None]:
        """Queue ``payloads`` with one ``produce_batch``: returns what it refused, and ``(index, error)``
        of a refused message that later ones were queued behind (else ``None``). A refusal is a tail of
        the pack where the queue filled up meanwhile (another thread shares the producer, or it holds
        larger messages than :class:`_BatchLimits` counted); the per-message path sends it, waiting for
        room. A refusal with later messages queued behind it would send the pack out of order;
        :class:`_BatchLimits` rules out the causes known (too large), and if it happens anyway the
        send fails."""
        records: list[dict[str, Any]] = [{"value": payload} for payload in payloads]
        queued = producer.produce_batch(self.channel, records, partition=0, on_delivery=delivered)
        if queued == len(records):
            return (), None
        first = next(i for i, record in enumerate(records) if "_error" in record)
        if all("_error" in record for record in records[first:]):
            return payloads[first:], None
        return (), (first, records[first]["_error"])

    def _fail_unconfirmed(
        self, count: int, offsets: list[Any], failures: list[tuple[int, ck.KafkaError]], timeout: float, note: str = ""
    ) -> NoReturn:
        """Raise ``ProduceError`` with the confirmed prefix (the offsets confirmed before anything failed)."""
        topic = self.channel
        reason: str | None = None
        retriable = True
        confirmed = offsets[: failures[0][0]] if failures else offsets
        if failures:
            err = failures[0][1]
            reason = err.str()
            retriable = _verdict(err)[1]  # as every other librdkafka error is judged
        accepted: list[bytes] = []
        for offset in confirmed:
            if offset is None or offset < 0:  # a report without an offset: nothing to name it by
                reason = "the broker confirmed a message without its offset"
                break
            accepted.append(_pack_offset(offset))
        raise ProduceError(
            f"send to {topic!r}: {count - len(accepted)} of {count} not confirmed in order"
            f" ({reason or f'not confirmed within {timeout}s'}){note}; some of them may have landed",
            channel=topic,
            sent={topic: accepted},
            retriable=retriable,
        )

    def close(self) -> None:
        self._closed = True


class _KafkaConsumer(Consumer):
    def __init__(
        self, backend: KafkaBackend, subscription: str, channels: Sequence[str], initial: SubscriptionPosition
    ) -> None:
        super().__init__(subscription, channels)
        self._backend = backend
        reset = "earliest" if initial is SubscriptionPosition.EARLIEST else "latest"
        conf = {
            **backend.consumer_conf,
            "group.id": subscription,
            "auto.offset.reset": reset,
            "on_commit": self._on_commit,
        }
        self._unacked: Unacked[None] = Unacked()
        self._only = channels[0] if len(channels) == 1 else None
        self._committed: dict[str, int] = {}  # commits still to make: channel -> next offset
        self._sent: dict[str, int] = {}  # channel -> the offset of the newest commit made (a seek's too)
        # channel -> the offset after the newest this member acknowledged; kept across rebalances. A
        # partition assigned again starts from the group's committed offset, which lags it when an
        # asynchronous commit was lost (a broker restart): what lies below it was acknowledged here
        # already and is dropped, not delivered twice (`_guard` holds the channels still to check).
        self._floor: dict[str, int] = {}
        self._guard: dict[str, int] = {}
        # channel -> the offset after the newest delivered here, while this member holds the channel. The
        # eager rebalance of any join revokes every partition and assigns them again, each from the
        # committed offset: a channel that comes back is guarded from there, so what this member holds
        # unacknowledged (a time-tick stream waiting for a tick) is not delivered to it a second time.
        self._delivered: dict[str, int] = {}
        self._assigned: set[str] = set()
        self._error: tuple[ck.KafkaError, str] | None = None  # an error event, raised once its batch is returned
        self._closed = False
        with backend.errors("create consumer", BrokerUnavailableError):
            self._c = ck.Consumer(conf)
            if initial is SubscriptionPosition.LATEST:
                self._start_new_partitions_at_end()
        # subscribe() starts the group join in librdkafka's own thread, and a commit made while that
        # join is half done is refused (UNKNOWN_MEMBER_ID). So the member joins on its first receive:
        # a seek on a fresh stream then commits as a plain non-member, which the broker accepts.
        self._subscribed = False

    def _start_new_partitions_at_end(self) -> None:
        """LATEST for a group new on a channel: commit the channel's end now, not when the group joins (on
        the first receive), so what is produced in between is delivered; channels the group already
        knows are left alone."""
        parts = [ck.TopicPartition(c, 0) for c in self.channels]
        committed = self._c.committed(parts, timeout=self._backend.timeout)
        fresh = [tp.topic for tp in committed if tp.offset == _NO_OFFSET]
        start = [ck.TopicPartition(topic, 0, self._backend.watermarks(topic)[1]) for topic in fresh]
        if start:
            self._c.commit(offsets=start, asynchronous=False)

    # -- rebalance callbacks (run inside consume) -----------------------------------------------
    def _on_assign(self, _c: Any, partitions: list[ck.TopicPartition]) -> None:
        back = {tp.topic for tp in partitions}
        self._drop([t for t in self.channels if t not in back])  # another member's now
        for tp in partitions:
            self._assigned.add(tp.topic)
            start = self._delivered.get(tp.topic, self._floor.get(tp.topic))
            if start is not None:
                self._guard[tp.topic] = start

    def _on_commit(self, err: ck.KafkaError | None, partitions: list[ck.TopicPartition]) -> None:
        """A failed commit of the newest offset committed is made again with the next ack or on revoke,
        not forgotten. (An older offset's failure is moot: a newer commit, or a seek's, was made after it;
        making it again would undo that.)"""
        if err is None and not any(tp.error is not None for tp in partitions):
            return
        for tp in partitions:
            if tp.topic in self._assigned and tp.offset >= 0 and tp.offset == self._sent.get(tp.topic):
                self._committed.setdefault(tp.topic, tp.offset)

    def _on_revoke(self, _c: Any, partitions: list[ck.TopicPartition]) -> None:
        pending = {
            tp.topic: self._committed[tp.topic]
            for tp in partitions
            if tp.topic in self._committed and self._backend.known(tp.topic)  # a deleted one has no offsets
        }
        if pending:
            try:
                self._commit_now(pending, forward_only=True)
            except ck.KafkaException as exc:  # the next owner starts before them: delivered again
                log.warning("commit of %s on revoke failed: %s", sorted(pending), self._text(exc))
        for tp in partitions:  # what this member holds stays tracked until the assignment shows who has it
            self._assigned.discard(tp.topic)

    def _on_lost(self, _c: Any, partitions: list[ck.TopicPartition]) -> None:
        """Partitions lost with the group session (the coordinator unreachable): other members may have
        owned them meanwhile, so nothing is committed for them and nothing held on them is kept."""
        for tp in partitions:
            self._assigned.discard(tp.topic)
        self._drop([tp.topic for tp in partitions])

    def _drop(self, topics: Sequence[str]) -> None:
        """Forget what this member knew of ``topics``, which another member may own now: what it held
        there, its acknowledged offsets (committed later, they could rewind the new owner) and guards."""
        for topic in topics:
            self._unacked.forget(topic)
            for known in (self._delivered, self._floor, self._committed, self._guard):
                known.pop(topic, None)

    def _commit(self, topics: Sequence[str]) -> None:
        """Commit, asynchronously, what acknowledgements left to commit on ``topics``."""
        offsets = [ck.TopicPartition(t, 0, self._committed[t]) for t in topics if t in self._committed]
        for tp in offsets:
            del self._committed[tp.topic]
            self._sent[tp.topic] = tp.offset
        if offsets:
            try:
                self._c.commit(offsets=offsets, asynchronous=True)
            except ck.KafkaException as exc:  # not queued: made again with the next ack, or by flush
                log.warning("commit of %s failed: %s", [tp.topic for tp in offsets], self._text(exc))
                for tp in offsets:
                    self._committed.setdefault(tp.topic, tp.offset)

    # -- Consumer -------------------------------------------------------------------------------
    def receive(self, max_messages: int, timeout: float) -> list[RawMessage]:
        if self._closed:
            raise StreamClosedError("consumer is closed")
        backend = self._backend
        self._raise_deferred()
        for channel in self.channels:
            backend.check_channel(channel, refresh=False, timeout=timeout)
        deadline = time.monotonic() + timeout
        if not self._subscribed:
            with backend.errors("subscribe"):
                self._c.subscribe(
                    list(self.channels), on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
                )
            self._subscribed = True
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            with backend.errors("receive"):
                batch = _take(self._c, max_messages, min(remaining, 1.0))
            # the hot path: one comprehension per batch, no per-message bookkeeping beyond the record (and
            # for a consumer of one channel, whose topic is that channel's name, not even the topic)
            only = self._only
            out = [
                RawMessage(only or m.topic(), _pack_offset(m.offset()), m.value() or b"")
                for m in batch
                if m.error() is None
            ]
            if len(out) != len(batch):  # end-of-partition events are skipped; any other error is raised
                self._keep_error(batch)  # once the good records beside it are returned
            if out and self._guard:
                out = self._unguarded(out)
            if out:
                for channel, ids in ids_by_channel(out, self._only).items():  # delivered, not yet acknowledged
                    self._unacked.deliver(channel, ids)
                    self._delivered[channel] = _offset(ids[-1]) + 1
                return out
            self._raise_deferred()  # an error kept by _keep_error, now nothing is left to return first
            if remaining <= 0:
                return out

    def _text(self, exc: BaseException) -> str:
        """A native error's text for a log line, without credentials."""
        return scrub(str(exc), self._backend.url, self._backend.options)

    def _raise_deferred(self) -> None:
        if self._error is not None:
            (err, topic), self._error = self._error, None
            self._backend.fail(ConsumeError, f"receive: {err.str()}", err, topic)

    def _keep_error(self, batch: list[Any]) -> None:
        """Keep the first error in ``batch`` that is not an end-of-partition event, for _raise_deferred:
        librdkafka has handed over the batch's records, so they are returned before it is raised."""
        for m in batch:
            err = m.error()
            if err is not None and err.code() != ck.KafkaError._PARTITION_EOF:
                self._error = (err, m.topic())
                return

    def _unguarded(self, out: list[RawMessage]) -> list[RawMessage]:
        """Drop what this member acknowledged before a rebalance whose commit was lost (see ``_floor``)."""
        guard = self._guard
        kept = []
        for raw in out:
            floor = guard.get(raw.channel)
            if floor is not None:
                if _offset(raw.msg_id) < floor:
                    continue
                del guard[raw.channel]
            kept.append(raw)
        return kept

    def ack(self, messages: Sequence[RawMessage]) -> None:
        """Commit, per channel, the offset after the longest delivered prefix now acknowledged."""
        if self._closed:
            raise StreamClosedError("consumer is closed")
        if not messages:
            return
        touched = []
        for channel, ids in ids_by_channel(messages, self._only).items():
            last = self._unacked.settle(channel, ids)
            if last is None:
                continue
            self._floor[channel] = _offset(last) + 1
            if channel in self._assigned:  # not in a rebalance: a commit then could rewind a new owner
                self._committed[channel] = self._floor[channel]
                touched.append(channel)
        self._commit(touched)

    def seek(self, targets: Mapping[str, bytes | None], inclusive: Collection[str] = frozenset()) -> None:
        if self._closed:
            raise StreamClosedError("consumer is closed")
        backend = self._backend
        offsets: list[ck.TopicPartition] = []
        for channel, after in targets.items():  # check every target before moving any
            if channel not in self.channels:
                raise SeekError(f"channel {channel!r} is not consumed by this consumer")
            low, high = backend.watermarks(channel)
            if after is None:
                offsets.append(ck.TopicPartition(channel, 0, low))
                continue
            if len(after) != 8:
                raise SeekError(f"not a Kafka offset id: {after.hex()!r} on {channel!r}")
            offset = _offset(after)
            if not low <= offset < high:
                raise SeekError(f"offset {offset} is not on {channel!r} (offsets {low} to {high - 1})")
            offsets.append(ck.TopicPartition(channel, 0, offset if channel in inclusive else offset + 1))
        with backend.errors("seek", SeekError):
            self._commit_now({tp.topic: tp.offset for tp in offsets})
            self._drop([tp.topic for tp in offsets])  # what was held or acknowledged there is moot now
            for tp in offsets:
                if tp.topic in self._assigned:
                    self._c.seek(tp)

    def flush(self) -> None:
        """Commit synchronously, per channel this member holds, the offset after the newest message it
        acknowledged (asynchronous commits may have failed unreported)."""
        if self._closed:  # closed already (with its backend): nothing left to make durable here
            return
        backend = self._backend
        try:  # a channel destroyed meanwhile has no offsets to commit
            backend.refresh_registry()
        except MsgStreamError as exc:
            err = ConsumeError(f"commit acknowledgements: {exc}")
            err.retriable = exc.retriable
            raise err from exc
        offsets = {
            ch: self._floor[ch]
            for ch in self.channels
            if ch in self._assigned and ch in self._floor and backend.known(ch)  # a deleted one has no offsets
        }
        if offsets:
            with backend.errors("commit acknowledgements", ConsumeError):
                self._commit_now(offsets, forward_only=True)

    def _commit_now(self, offsets: Mapping[str, int], forward_only: bool = False) -> None:
        """A synchronous commit within about the backend's timeout, tried again while the group is
        between generations (a rebalance); ``forward_only``: not where the group's offset is further on
        already. librdkafka's own commit waits for an unreachable coordinator up to session.timeout.ms
        (45 s), so the coordinator is asked first, by a call that takes a timeout."""
        deadline = time.monotonic() + self._backend.timeout
        group = self._c.committed([ck.TopicPartition(t, 0) for t in offsets], timeout=self._backend.timeout)
        if forward_only:
            ahead = {tp.topic for tp in group if tp.offset >= offsets[tp.topic]}
            offsets = {t: o for t, o in offsets.items() if t not in ahead}
            if not offsets:
                return
        parts = [ck.TopicPartition(t, 0, o) for t, o in offsets.items()]
        while True:
            try:
                self._c.commit(offsets=parts, asynchronous=False)
                break
            except ck.KafkaException as exc:
                if _code(exc) not in _REBALANCING or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        for topic, offset in offsets.items():
            self._sent[topic] = offset
            if self._committed.get(topic, offset) <= offset:
                self._committed.pop(topic, None)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._backend._consumers.discard(self)
        self._committed.clear()  # what flush did not make durable is delivered again: no commit on revoke
        with self._backend.errors("close consumer"):  # with the broker down: up to session.timeout.ms
            self._c.close()
        self._c = CLOSED
