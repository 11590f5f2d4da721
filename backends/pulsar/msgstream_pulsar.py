"""Pulsar backend for msgstream on pulsar-client: ``pulsar://host:6650[,host:6650...][/][?options]``,
``pulsar+ssl://``.

Mapping (docs/backends.md has the long form):

* channel -> a persistent topic ``persistent://<tenant>/<namespace>/<name>`` (``<name>:<n>`` for the n-th
  re-creation of a destroyed name). Which channels exist, with their metadata, is the registry topic
  ``__msgstream_channels``: a log of create/destroy records, read to its end by a kept reader. A
  concurrent create of one name is decided by the log's order: the first record wins, the other
  creator reads that back and raises ``ChannelExistsError``.
* destroy -> a destroy record: msgstream refuses the channel from then on (a producer reads the registry
  before each send; a consumer at most ``registry_refresh`` seconds later). With ``admin_url`` the topic
  is also terminated and deleted through the admin REST API; without it the topic stays, unlisted.
* message id -> ``MessageId.serialize()`` as the client hands it out (send callback, receive, reader).
* produce -> one producer per channel, ``send_async`` for every payload (batching off by default, see
  ``batching`` below); every callback's result is collected and waited for with the timeout; any failure
  raises ``ProduceError`` with the ids that were accepted. ``block_if_queue_full``: the async queue never
  drops a message.
* subscription -> a Pulsar subscription, ``Failover`` by default (each channel has one active member,
  which gets its messages in order; another member takes over a channel, unacknowledged messages
  included, when it leaves); ``subscription_type=shared`` spreads one channel's messages over members.
* receive -> one multi-topic consumer; one ``batch_receive`` takes what the client has fetched already
  (``receive(0)`` when one message is wanted); when that is nothing, a blocking ``receive`` waits for the
  first message, which is returned at once. ack -> individual acknowledgement of each message.
* seek -> each target is checked (it must be at or before the channel's newest message, and a reader
  started at it must read exactly it); then the consumer is closed, the subscription's cursor moved
  with ``seek`` by a short-lived consumer, and the consumer subscribed again. Pulsar resumes at the
  target's entry (a whole batch): what is at or before the target is acknowledged and dropped.
* latest message id -> ``get_last_message_id`` (on a short-lived subscription, removed again) gives the
  newest entry; a reader reads that entry to learn the id of its last message.

Options: ``tenant`` (public), ``namespace`` (default), ``operation_timeout`` (5 s), ``subscription_type``
(failover | shared), ``token`` (masked everywhere), ``admin_url``, ``registry_topic``, ``registry_refresh``
(1 s), ``batching`` (false: each message its own entry, so acknowledgements are exact; true: faster,
but a member leaving mid-batch makes the next one see the whole batch again), ``batch_index_ack``
(false; true fixes that where the broker has ``acknowledgmentAtBatchIndexLevelEnabled``),
``batching_max_messages`` (1000), ``batching_max_publish_delay_ms`` (1), ``max_pending_messages``
(10000), ``receiver_queue_size`` (1000), and for TLS ``tls_trust_certs_file_path``,
``tls_allow_insecure_connection``, ``tls_validate_hostname``, ``tls_certificate_file_path``,
``tls_private_key_file_path``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import http.client
import itertools
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Collection, Generator, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import msgspec
import pulsar  # type: ignore[import-untyped]  # pulsar-client ships no type information

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
)
from msgstream.errors import (
    BrokerUnavailableError,
    ChannelExistsError,
    ChannelNotFoundError,
    InvalidArgumentError,
    InvalidURLError,
    MsgStreamError,
    ProduceError,
    SeekError,
    StreamClosedError,
    SubscriptionInUseError,
    UnsupportedOperationError,
)

__all__ = ["PulsarBackend"]

log = logging.getLogger("msgstream.pulsar")
_SUBSCRIPTION_TYPES = {"failover": pulsar.ConsumerType.Failover, "shared": pulsar.ConsumerType.Shared}
_TLS_OPTIONS = {
    "tls_trust_certs_file_path": str,
    "tls_allow_insecure_connection": bool,
    "tls_validate_hostname": bool,
    "tls_certificate_file_path": str,
    "tls_private_key_file_path": str,
}
# results a retry may cure: the broker was unreachable, slow or moving the topic (pulsar-client names each
# Result and the exception raised for it alike)
_RETRIABLE_NAMES = (
    "Timeout",
    "ConnectError",
    "NotConnected",
    "LookupError",
    "ServiceUnitNotReady",
    "TooManyLookupRequestException",
    "BrokerPersistenceError",
    "BrokerMetadataError",
    "ProducerQueueIsFull",
    "MemoryBufferIsFull",
)
_RETRIABLE = {getattr(pulsar.Result, name) for name in _RETRIABLE_NAMES}
_RETRIABLE_EXC: tuple[type[BaseException], ...] = tuple(
    getattr(pulsar, name) for name in (*_RETRIABLE_NAMES, "ConsumerBusy", "ProducerBusy")
)
_Key = tuple[int, int, int]  # (ledger, entry, batch index): the order of messages on a topic


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):  # removed already (a temp cleaner, a forked child's exit)
        os.unlink(path)


class _NativeLog:
    """The C++ client's own log lines, forwarded to the ``msgstream.pulsar.client`` logger.

    pulsar-client takes one logger per process (the first client's) and offers three: stdout, a file, or
    a Python logger. The Python bridge is unusable here: it sends every DEBUG line into Python, whatever
    the logger's level, and a line that carries a binary payload (the multi-topic consumer logs each
    message it receives) fails to convert and is printed to stdout instead. So the client writes to a
    file, at the level the logger had when the first client was made, and a daemon thread reads the file
    and logs each line at its own level."""

    _LEVELS = {b"DEBUG": logging.DEBUG, b"INFO": logging.INFO, b"WARN": logging.WARNING, b"ERROR": logging.ERROR}
    _instance: _NativeLog | None = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        self.logger = log.getChild("client")
        level = self.logger.getEffectiveLevel()
        native = pulsar.LoggerLevel
        limits = ((logging.DEBUG, native.Debug), (logging.INFO, native.Info), (logging.WARNING, native.Warn))
        self.level = next((value for limit, value in limits if level <= limit), native.Error)
        fd, self.path = tempfile.mkstemp(prefix="msgstream-pulsar-", suffix=".log")
        os.close(fd)
        atexit.register(_remove, self.path)
        threading.Thread(target=self._forward, name="msgstream-pulsar-log", daemon=True).start()

    @classmethod
    def logger_for_client(cls) -> Any:
        with cls._guard:
            if cls._instance is None:
                cls._instance = cls()
            return pulsar.FileLogger(cls._instance.level, cls._instance.path)

    def _forward(self) -> None:
        level = logging.WARNING
        with open(self.path, "rb") as lines:
            while True:
                line = lines.readline()
                if not line.endswith(b"\n"):  # nothing new (or half a line): look again shortly
                    lines.seek(-len(line), os.SEEK_CUR)
                    time.sleep(0.2)
                    continue
                # "2026-01-01 12:00:00.000 WARN  [thread] File:line | text"
                head, _, text = line.partition(b" | ")
                words = head.split()
                if len(words) >= 3 and words[2] in self._LEVELS:
                    level = self._LEVELS[words[2]]
                    where = words[-1].decode(errors="replace")
                    self.logger.log(level, "%s | %s", where, text.rstrip().decode(errors="replace"))
                else:  # a continuation line: the level of the line before
                    self.logger.log(level, "%s", line.rstrip().decode(errors="replace"))


def _key(msg_id: Any) -> _Key:
    return (msg_id.ledger_id(), msg_id.entry_id(), msg_id.batch_index())


def _unwrapped(consumer: Any) -> Any:
    """The pybind11 consumer under pulsar-client's Python wrapper: the same receive / acknowledge, minus a
    Python wrapper object per message (a third of the consume cost at 100 B). Falls back to the wrapper
    if a pulsar-client release renames the attribute."""
    inner = getattr(consumer, "_consumer", None)
    return inner if inner is not None and hasattr(inner, "receive") and hasattr(inner, "acknowledge") else consumer


def _serialized(msg_id: Any) -> bytes | None:
    return None if msg_id is None else bytes(msg_id.serialize())


def _parse_id(raw: bytes, channel: str) -> Any:
    try:
        return pulsar.MessageId.deserialize(raw)
    except Exception:
        raise SeekError(f"not a Pulsar message id: {raw.hex()!r} on {channel!r}") from None


def _flag(value: Any) -> bool:
    return str(value).lower() not in ("false", "0", "no", "off", "")


class _Entry(msgspec.Struct, array_like=True, frozen=True):
    """A registry record: ``kind`` "C" (create, with the channel's metadata) or "D" (destroy); a record
    of another kind means nothing."""

    kind: str
    name: str
    nonce: bytes
    metadata: bytes = b""


class _Live(msgspec.Struct, frozen=True):
    topic: str
    nonce: bytes
    metadata: bytes


class _Admin:
    """Apache Pulsar's admin REST API, over one kept HTTP connection."""

    def __init__(self, base: str, token: str | None, timeout: float) -> None:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidURLError("admin_url must be http(s)://host[:port]")
        self._cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._host, self._port, self._prefix = parts.hostname, parts.port, parts.path.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def request(
        self, method: str, topic: str, tail: str = "", ok: Sequence[int] = (200,), absent: bytes | None = None
    ) -> bytes:
        """One call on a persistent topic's path (``persistent://tenant/namespace/name``) followed by
        ``tail``; its response body (``absent``, where given, for a 404). Raises BrokerUnavailableError
        unless the status is in ``ok``."""
        path = "/admin/v2/persistent/" + quote(topic.removeprefix("persistent://")) + tail
        with self._lock:
            for attempt in (1, 2):  # a kept connection the server closed meanwhile: reconnect once
                if self._conn is None:
                    self._conn = self._cls(self._host, self._port, timeout=self._timeout)
                try:
                    self._conn.request(method, self._prefix + path, headers=self._headers)
                    response = self._conn.getresponse()
                    data = response.read()
                    break
                except (OSError, http.client.HTTPException) as exc:
                    self._conn.close()
                    self._conn = None
                    if attempt == 2:
                        raise BrokerUnavailableError(f"admin {method} {path}: {type(exc).__name__}") from None
        if response.status == 404 and absent is not None and b"Topic" in data and b"not found" in data:
            return absent  # not a 404 of a wrong admin_url, tenant or namespace
        if response.status not in ok:
            refused = BrokerUnavailableError(
                f"admin {method} {path}: HTTP {response.status} {data[:200].decode(errors='replace')}"
            )
            refused.retriable = response.status >= 500  # a 4xx will not cure itself
            raise refused
        return data

    def json(self, topic: str, tail: str, absent: bytes | None = None) -> Any:
        """GET the topic's path followed by ``tail`` and decode its JSON body; ``absent`` (JSON) where the
        broker does not have the topic yet: a client without ``admin_url`` made the channel, and the
        broker creates its topic on first use."""
        return json.loads(self.request("GET", topic, tail, absent=absent))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class PulsarBackend(Backend):
    """See the module docstring."""

    features = Features(
        shared_subscription=True,
        durable=True,
        cross_process=True,
        # Apache Pulsar stores a producer's resend after a reconnect twice unless the namespace has
        # deduplication on (brokerDeduplicationEnabled, off as shipped); docs/backends.md
        idempotent_produce=False,
        # Failover (the default subscription_type) on non-partitioned topics: the broker makes the same
        # member active on every channel; the others stand by (docs/backends.md)
        balanced_members=False,
    )
    native_errors = (*((kind, True) for kind in _RETRIABLE_EXC), (pulsar.PulsarException, False))

    def __init__(self, url: URL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        if not url.hosts:
            raise InvalidURLError(f"pulsar URLs name at least one broker: {url.redacted()!r}")
        opts = self.options
        try:
            self.timeout = float(opts.get("operation_timeout", 5.0))
            self.registry_refresh = float(opts.get("registry_refresh", 1.0))
            self.producer_conf: dict[str, Any] = {
                # off by default: with batching, a batch is one broker entry, and a member that leaves
                # after acknowledging part of a batch gets the whole batch redelivered to the next
                # member, acknowledged messages included (unless batch-index acks are on, which the
                # broker must allow). docs/backends.md weighs the trade.
                "batching_enabled": _flag(opts.get("batching", False)),
                "batching_max_messages": int(opts.get("batching_max_messages", 1000)),
                "batching_max_publish_delay_ms": int(opts.get("batching_max_publish_delay_ms", 1)),
                "max_pending_messages": int(opts.get("max_pending_messages", 10000)),
                "block_if_queue_full": True,
                "send_timeout_millis": int(self.timeout * 1000),
            }
            self.receiver_queue_size = int(opts.get("receiver_queue_size", 1000))
            self.batch_index_ack = _flag(opts.get("batch_index_ack", False))
        except (TypeError, ValueError):
            raise InvalidURLError(f"a numeric option is not a number in {url.redacted()!r}") from None
        kind = str(opts.get("subscription_type", "failover")).lower()
        if kind not in _SUBSCRIPTION_TYPES:
            raise InvalidURLError(f"subscription_type must be one of {sorted(_SUBSCRIPTION_TYPES)}, got {kind!r}")
        self.consumer_type = _SUBSCRIPTION_TYPES[kind]
        self.tenant = str(opts.get("tenant", "public"))
        self.namespace = str(opts.get("namespace", "default"))
        self.registry_topic = self.topic(str(opts.get("registry_topic", "__msgstream_channels")))
        token = opts.get("token") or url.password  # pulsar://:TOKEN@host works too
        self.admin = _Admin(str(opts["admin_url"]), token, self.timeout) if opts.get("admin_url") else None
        default_port = 6651 if url.scheme == "pulsar+ssl" else 6650
        service = f"{url.scheme}://" + ",".join(f"{h}:{p or default_port}" for h, p in url.hosts)
        client_kw: dict[str, Any] = {
            "operation_timeout_seconds": max(1, round(self.timeout)),
            "connection_timeout_ms": int(self.timeout * 1000),
            "logger": _NativeLog.logger_for_client(),
            "use_tls": url.scheme == "pulsar+ssl",
        }
        for name, convert in _TLS_OPTIONS.items():
            if name in opts:
                client_kw[name] = _flag(opts[name]) if convert is bool else str(opts[name])
        if token:
            client_kw["authentication"] = pulsar.AuthenticationToken(str(token))
        self._lock = threading.RLock()
        self._registry: dict[str, _Live | None] = {}
        self._generations: dict[str, int] = {}
        self._refreshed = 0.0
        self._closed = False
        self._consumers: set[_PulsarConsumer] = set()
        self._producers: set[_PulsarProducer] = set()
        with self.errors("connect", BrokerUnavailableError):
            # one client (one connection pool, one set of threads) for the registry, producers and
            # every consumer
            self.client = pulsar.Client(service, **client_kw)
        try:
            with self.errors("connect", BrokerUnavailableError):
                # a durable subscription that never acknowledges keeps the registry's records from
                # retention (Apache Pulsar deletes what no subscription still needs)
                self.client.subscribe(self.registry_topic, "__msgstream_registry_keep").close()
                self._reader = self.client.create_reader(self.registry_topic, pulsar.MessageId.earliest)
                self._writer = self.client.create_producer(
                    self.registry_topic, send_timeout_millis=int(self.timeout * 1000)
                )
            self.refresh_registry()
        except BaseException:
            self.client.close()
            raise

    def topic(self, physical: str) -> str:
        return f"persistent://{self.tenant}/{self.namespace}/{physical}"

    # -- the registry ---------------------------------------------------------------------------
    def refresh_registry(self, force: bool = True) -> None:
        """Apply the registry records written since the last refresh (by any client). Without ``force``
        only when the last refresh is older than ``registry_refresh`` seconds (the hot paths)."""
        if not force:
            if time.monotonic() - self._refreshed < self.registry_refresh:
                return
            # a hot path never waits behind a create or destroy in another thread: it checks next time
            if not self._lock.acquire(blocking=False):
                return
        elif not self._lock.acquire(timeout=self.timeout):
            raise BrokerUnavailableError(f"the channel registry was busy for {self.timeout}s")
        try:
            with self.errors("read the channel registry", BrokerUnavailableError):
                for message in self._messages(self._reader):
                    try:
                        self._apply(msgspec.msgpack.decode(message.data(), type=_Entry))
                    except msgspec.DecodeError:
                        log.warning("skipped a record of the channel registry that is not msgstream's")
                self._refreshed = time.monotonic()
        finally:
            self._lock.release()

    def _apply(self, record: _Entry) -> None:
        live = self._registry.get(record.name)
        if record.kind == "C" and live is None:  # the first create after a destroy wins
            gen = self._generations.get(record.name, 0)
            self._generations[record.name] = gen + 1
            physical = record.name if gen == 0 else f"{record.name}:{gen}"
            self._registry[record.name] = _Live(self.topic(physical), record.nonce, record.metadata)
        elif record.kind == "D" and live is not None and live.nonce == record.nonce:
            self._registry[record.name] = None

    def _append(self, record: _Entry) -> None:
        with self.errors(f"write the channel registry for {record.name!r}", BrokerUnavailableError, record.name):
            self._writer.send(msgspec.msgpack.encode(record))

    def live(self, name: str, force: bool = True) -> _Live:
        self.refresh_registry(force)
        entry = self._registry.get(name)
        if entry is None:
            raise ChannelNotFoundError(name)
        return entry

    def still_live(self, name: str, nonce: bytes, force: bool = False) -> bool:
        """Whether the incarnation ``nonce`` of ``name`` is still the live one, by the registry as it is now
        (``force``) or as of at most ``registry_refresh`` seconds ago."""
        self.refresh_registry(force)
        entry = self._registry.get(name)
        return entry is not None and entry.nonce == nonce

    # -- Backend --------------------------------------------------------------------------------
    def create_channel(self, name: str, metadata: bytes) -> None:
        if not CHANNEL_NAME.fullmatch(name) or self.topic(name) == self.registry_topic:
            raise InvalidArgumentError(f"invalid channel name {name!r}")
        with self._lock:
            self.refresh_registry()
            if self._registry.get(name) is not None:
                raise ChannelExistsError(f"channel exists: {name!r}")
            nonce = uuid.uuid4().bytes
            self._append(_Entry("C", name, nonce, bytes(metadata)))
            if not self.still_live(name, nonce, force=True):  # another client created it first
                raise ChannelExistsError(f"channel exists: {name!r}")
            if self.admin is not None:  # Apache Pulsar: create it now, whatever auto-creation says
                self.admin.request("PUT", self.live(name, force=False).topic, ok=(204, 409))

    def channel_metadata(self, name: str) -> bytes:
        return self.live(name).metadata

    def delete_channel(self, name: str) -> None:
        with self._lock:
            entry = self.live(name)
            self._append(_Entry("D", name, entry.nonce))
            self.refresh_registry()  # applies our record in log order, as every other client will
        if self.admin is not None:
            # terminated first: its producers in other clients fail at once (TopicTerminated) instead of
            # reconnecting after the delete, which would create the topic again (auto-creation is on as
            # Apache Pulsar ships)
            self.admin.request("POST", entry.topic, "/terminate", ok=(200, 204, 404, 405))
            self.admin.request("DELETE", entry.topic, "?force=true", ok=(204, 404))

    def create_producer(self, channel: str) -> Producer:
        entry = self.live(channel)
        with self.errors(f"create producer for {channel!r}", BrokerUnavailableError, channel):
            native = self.client.create_producer(entry.topic, **self.producer_conf)
        producer = _PulsarProducer(self, channel, entry.nonce, native)
        self._producers.add(producer)
        return producer

    def create_consumer(self, subscription: str, channels: Sequence[str], initial: SubscriptionPosition) -> Consumer:
        if not subscription or "/" in subscription:
            raise InvalidArgumentError(f"invalid subscription name {subscription!r}")
        entries = {channel: self.live(channel) for channel in channels}
        consumer = _PulsarConsumer(self, subscription, entries, initial)
        self._consumers.add(consumer)
        return consumer

    def latest_message_id(self, channel: str) -> bytes | None:
        return _serialized(self.last_id(self.live(channel).topic))

    def last_id(self, topic: str) -> Any:
        """The MessageId of the topic's newest message, or None. ``get_last_message_id`` names an entry,
        not a message in a batch; reading that entry gives the exact id of its last message."""
        with self.errors(f"latest message of {topic!r}", BrokerUnavailableError):
            probe = self.client.subscribe(
                topic, f"__msgstream_probe_{uuid.uuid4().hex}", consumer_type=pulsar.ConsumerType.Exclusive
            )
            try:
                entry = probe.get_last_message_id()  # entry id -1 on an empty topic
            finally:
                try:  # a probe subscription left behind would hold the topic's backlog forever
                    probe.unsubscribe()
                except pulsar.PulsarException:
                    log.warning("could not remove probe subscription on %s", topic)
                probe.close()
            if entry is None or entry.entry_id() < 0:
                return None
            start = pulsar.MessageId(entry.partition(), entry.ledger_id(), entry.entry_id(), -1)
            last = None
            with contextlib.closing(self._read(topic, start)) as messages:
                for message in messages:
                    msg_id = message.message_id()
                    if msg_id.entry_id() != entry.entry_id():  # that entry only, not a newer one
                        break
                    last = msg_id
            return last

    def read_one(self, topic: str, start: Any) -> Any:
        """The id of the first message at or after ``start``, or None."""
        with contextlib.closing(self._read(topic, start)) as messages:
            first = next(messages, None)
        return None if first is None else first.message_id()

    def message_at(self, topic: str, msg_id: Any) -> Any:
        """The message ``msg_id`` names (its ledger, entry and batch index), or None."""
        with contextlib.closing(self._read(topic, msg_id)) as messages:
            found = next(messages, None)
        return found if found is not None and _key(found.message_id()) == _key(msg_id) else None

    def _read(self, topic: str, start: Any) -> Generator[Any, None, None]:
        """The topic's messages from ``start`` (inclusive) to its end, by a reader closed when this
        generator is."""
        reader = self.client.create_reader(topic, start, start_message_id_inclusive=True)
        try:
            yield from self._messages(reader)
        finally:
            reader.close()

    def _messages(self, reader: Any) -> Iterator[Any]:
        """What ``reader`` holds from where it is to the end of its topic."""
        while reader.has_message_available():
            yield reader.read_next(int(self.timeout * 1000))

    # -- operations -----------------------------------------------------------------------------
    def ping(self, timeout: float) -> None:
        """A topic lookup of the registry topic, waited for at most ``timeout`` seconds (the client's own
        timeout is ``operation_timeout``, so the call runs in a thread that is left to finish)."""
        done = threading.Event()
        failure: list[BaseException] = []

        def lookup() -> None:
            try:
                self.client.get_topic_partitions(self.registry_topic)
            except BaseException as exc:  # handed to the caller's thread
                failure.append(exc)
            finally:
                done.set()

        threading.Thread(target=lookup, name="msgstream-pulsar-ping", daemon=True).start()
        if not done.wait(timeout):
            raise BrokerUnavailableError(f"ping: no answer within {timeout}s [{self.url.redacted()}]")
        if failure:
            raise self.error(BrokerUnavailableError, f"ping: {type(failure[0]).__name__}: {failure[0]}", True)

    def list_channels(self) -> list[str]:
        self.refresh_registry()
        return [name for name, live in self._registry.items() if live is not None]

    def list_subscriptions(self, channel: str) -> list[str]:
        """The topic's subscriptions, from the admin REST API (``admin_url``)."""
        if self.admin is None:
            raise UnsupportedOperationError(
                "the pulsar backend needs admin_url for list_subscriptions() (the client protocol has no call for it)"
            )
        names = self.admin.json(self.live(channel).topic, "/subscriptions", absent=b"[]")
        return [str(n) for n in names if not str(n).startswith("__msgstream_probe_")]

    def drop_subscription(self, subscription: str, channels: Sequence[str]) -> None:
        """With ``admin_url``: the topics' stats are checked for connected consumers first, then each
        subscription is deleted. Without it: a consumer joins the subscription and unsubscribes, which the
        broker refuses while another consumer is connected (channels before that one stay dropped)."""
        topics = [self.live(channel).topic for channel in channels]
        if self.admin is not None:
            for channel, topic in zip(channels, topics, strict=True):
                stats = self.admin.json(topic, "/stats", absent=b"{}")
                sub = stats.get("subscriptions", {}).get(subscription)
                if sub and sub.get("consumers"):
                    raise SubscriptionInUseError(
                        f"subscription {subscription!r} has {len(sub['consumers'])} consumer(s) on {channel!r}"
                    )
            for topic in topics:
                try:
                    self.admin.request("DELETE", topic, f"/subscription/{quote(subscription, safe='')}", ok=(204, 404))
                except BrokerUnavailableError as exc:
                    if "HTTP 412" in str(exc):  # a consumer connected meanwhile
                        raise SubscriptionInUseError(f"subscription {subscription!r}: {exc}") from None
                    raise
            return
        for channel, topic in zip(channels, topics, strict=True):
            with self.errors(f"drop subscription {subscription!r}", BrokerUnavailableError, channel):
                member = self.client.subscribe(topic, subscription, consumer_type=self.consumer_type)
                try:
                    member.unsubscribe()
                except pulsar.PulsarException as exc:
                    raise SubscriptionInUseError(
                        f"subscription {subscription!r} on {channel!r} has other consumers: {exc}"
                    ) from None
                finally:
                    member.close()

    def read_message(self, channel: str, msg_id: bytes) -> bytes | None:
        target = _parse_id(msg_id, channel)
        with self.errors(f"read {channel!r}", BrokerUnavailableError, channel):
            found = self.message_at(self.live(channel).topic, target)
        return None if found is None else bytes(found.data())

    def count_after(self, channel: str, msg_id: bytes | None) -> int | None:
        """Exact with batching off (one message per entry); ``None`` with batching on, and across ledgers
        without ``admin_url``. Within one ledger entry ids are contiguous; across ledgers the admin API's
        internal stats give each ledger's entry count."""
        if self.producer_conf["batching_enabled"]:
            return None
        topic = self.live(channel).topic
        newest = self.last_id(topic)
        if newest is None:
            return 0
        if msg_id is None:
            if self.admin is None:
                return None
            return int(self.admin.json(topic, "/internalStats").get("numberOfEntries", 0))
        after = _parse_id(msg_id, channel)
        ledger, entry = int(after.ledger_id()), int(after.entry_id())
        if ledger == newest.ledger_id():
            return max(0, int(newest.entry_id()) - entry)
        if self.admin is None or ledger > newest.ledger_id():
            return None
        count = int(newest.entry_id()) + 1
        for item in self.admin.json(topic, "/internalStats").get("ledgers", []):
            lid = int(item["ledgerId"])
            if lid == ledger:
                count += max(0, int(item["entries"]) - entry - 1)
            elif ledger < lid < newest.ledger_id():
                count += int(item["entries"])
        return count

    def unacknowledged(self, subscription: str, channel: str) -> tuple[int | None, bytes | None]:
        """The subscription's ``msgBacklog`` and its cursor's mark-delete position, from the admin REST
        API; ``(None, None)`` without ``admin_url``. A client error of its reads raises ``BrokerUnavailableError``."""
        if self.admin is None:
            return None, None
        with self.errors(f"lag of {channel!r}", BrokerUnavailableError, channel):
            topic = self.live(channel).topic
            sub = self.admin.json(topic, "/stats", absent=b"{}").get("subscriptions", {}).get(subscription)
            if sub is None:  # would start at the first message
                count = self.count_after(channel, None)
                return count, _serialized(self.read_one(topic, pulsar.MessageId.earliest) if count else None)
            count = int(sub.get("msgBacklog", 0))
            if not count:
                return 0, None
            cursor = self.admin.json(topic, "/internalStats").get("cursors", {}).get(subscription, {})
            ledger, _, entry = str(cursor.get("markDeletePosition", "")).partition(":")
            if not ledger.lstrip("-").isdigit() or not entry.lstrip("-").isdigit():
                return count, None
            mark = pulsar.MessageId(-1, int(ledger), int(entry), -1)
            found = self.message_at(topic, mark) if int(entry) >= 0 else None
            if found is not None:
                return count, _serialized(found.message_id())
            return count, _serialized(self.read_one(topic, pulsar.MessageId(-1, int(ledger), int(entry) + 1, -1)))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for consumer in list(self._consumers):
            with contextlib.suppress(MsgStreamError):
                consumer.close()
        for producer in list(self._producers):
            producer.close()
        if self.admin is not None:
            self.admin.close()
        with contextlib.suppress(pulsar.PulsarException):
            self.client.close()
        # the C++ client lets go of its sockets when freed: drop it (and what refers to it) now
        self.client = self._reader = self._writer = CLOSED

    def __repr__(self) -> str:
        return f"PulsarBackend({self.url.redacted()!r}, {redact_options(self.options)})"


class _PulsarProducer(Producer):
    def __init__(self, backend: PulsarBackend, channel: str, nonce: bytes, native: Any) -> None:
        super().__init__(channel)
        self._backend = backend
        self._nonce = nonce
        self._native = native
        self._closed = False

    def send(self, payloads: Sequence[bytes], timeout: float) -> list[bytes]:
        if self._closed:
            raise StreamClosedError("producer is closed")
        backend, channel = self._backend, self.channel
        deadline = time.monotonic() + timeout
        # read the registry to its end first (one round trip): the topic of a channel another client
        # destroyed still takes writes (it is not deleted without admin_url), and a produce that started
        # after the destroy must not land there
        if not backend.still_live(channel, self._nonce, force=True):
            raise ProduceError(f"channel {channel!r} does not exist (deleted?)", channel=channel)
        n = len(payloads)
        # a callback per payload, writing into its own slot: most results come in send order, but a
        # failure the client detects at once (MessageTooBig, AlreadyClosed) is reported inside send_async,
        # ahead of earlier messages still in flight
        results: list[Any] = [None] * n
        finished_count = itertools.count(1)
        done = threading.Event()

        def delivered(i: int, result: Any, msg_id: Any) -> None:
            results[i] = (result, msg_id)
            if next(finished_count) == n:
                done.set()

        send_async = self._native.send_async
        ok = pulsar.Result.Ok
        with backend.errors(f"send to {channel!r}", ProduceError, channel):
            for i, payload in enumerate(payloads):
                send_async(payload, functools.partial(delivered, i))
                refused = results[i]
                if refused is not None and refused[0] != ok:  # refused at once: queue nothing after it,
                    for j in range(i + 1, n):  # so that the channel keeps the pack's order
                        delivered(j, None, None)
                    break
        finished = done.wait(max(0.0, deadline - time.monotonic())) if n else True
        accepted: list[bytes] = []
        failure = None if finished else f"not confirmed within {timeout}s"
        retriable = not finished
        for report in results:  # the confirmed prefix: what is known to be on the channel, in order
            if report is None or report[0] != ok:
                if report is not None:
                    failure, retriable = str(report[0]), report[0] in _RETRIABLE
                break
            accepted.append(report[1].serialize())
        if len(accepted) < n:
            raise ProduceError(
                f"send to {channel!r}: {n - len(accepted)} of {n} not confirmed in order ({failure}); messages"
                " after the first failure may still have landed",
                channel=channel,
                sent={channel: accepted},
                retriable=retriable,
            )
        return accepted

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._backend._producers.discard(self)
        with contextlib.suppress(pulsar.PulsarException):
            self._native.close()
        self._native = CLOSED


class _PulsarConsumer(Consumer):
    def __init__(
        self,
        backend: PulsarBackend,
        subscription: str,
        entries: dict[str, _Live],
        initial: SubscriptionPosition,
    ) -> None:
        super().__init__(subscription, list(entries))
        self._backend = backend
        self._entries = entries
        self._channel_of = {entry.topic: channel for channel, entry in entries.items()}
        earliest = initial is SubscriptionPosition.EARLIEST
        self._initial = pulsar.InitialPosition.Earliest if earliest else pulsar.InitialPosition.Latest
        self._pending: Unacked[Any] = Unacked()  # handles: the native MessageIds
        self._buffered: deque[Any] = deque()  # fetched beyond a receive's max_messages
        # after a seek: drop (and ack) what is before this MessageId, and the id itself unless inclusive
        self._skip: dict[str, tuple[Any, bool]] = {}
        self._ordered = backend.consumer_type == pulsar.ConsumerType.Failover
        self._last: dict[str, Any] = {}  # failover: the newest MessageId delivered per channel since subscribing
        self._closed = False
        self._native: Any = None
        self._fast: Any = None
        self._subscribe()

    def _subscribe(self) -> None:
        backend = self._backend
        with backend.errors(f"subscribe {self.subscription!r}", BrokerUnavailableError):
            self._native = backend.client.subscribe(
                [entry.topic for entry in self._entries.values()],
                self.subscription,
                consumer_type=backend.consumer_type,
                initial_position=self._initial,
                receiver_queue_size=backend.receiver_queue_size,
                batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(backend.receiver_queue_size, -1, 1),
                batch_index_ack_enabled=backend.batch_index_ack,
            )
            self._fast = _unwrapped(self._native)

    def _require(self) -> None:
        if self._closed:
            raise StreamClosedError("consumer is closed")
        if self._native is None:  # a seek could not subscribe again: try now
            self._subscribe()

    def _check(self) -> None:
        self._require()
        for channel, entry in self._entries.items():
            if not self._backend.still_live(channel, entry.nonce):
                raise ChannelNotFoundError(channel, "destroyed")

    def receive(self, max_messages: int, timeout: float) -> list[RawMessage]:
        self._check()
        deadline = time.monotonic() + timeout
        fetch = True
        while True:
            out = self._take(max_messages, fetch)
            fetch = True
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            with self._backend.errors("receive"):
                try:
                    self._buffered.append(self._fast.receive(max(1, int(remaining * 1000))))
                    # return it now: asking the client for more would hold it up to the batch policy's
                    # 1 ms; a backlog is fetched by the next call
                    fetch = False
                except pulsar.Timeout:
                    pass

    def _take(self, max_messages: int, fetch: bool = True) -> list[RawMessage]:
        """Up to ``max_messages`` of what was fetched (with ``fetch``, after asking the client for what it
        holds), less what was delivered already."""
        buffered = self._buffered
        fast = self._fast
        with self._backend.errors("receive"):
            want = max_messages - len(buffered) if fetch else 0
            if want > 1:  # one call for what the client holds (it waits at most the policy's 1 ms)
                buffered.extend(fast.batch_receive())
            elif want == 1:
                with contextlib.suppress(pulsar.Timeout):
                    buffered.append(fast.receive(0))
        out: list[RawMessage] = []
        pending = self._pending
        channel_of = self._channel_of
        skip = self._skip
        ordered = self._ordered
        last = self._last
        only = self.channels[0] if len(self.channels) == 1 else None
        while buffered and len(out) < max_messages:
            message = buffered.popleft()
            channel = only or channel_of[message.topic_name()]
            msg_id = message.message_id()
            if skip and channel in skip:
                target, inclusive = skip[channel]
                if msg_id < target if inclusive else msg_id <= target:
                    with self._backend.errors("receive"):
                        fast.acknowledge(msg_id)  # at or before the seek target: already consumed
                    continue
                del skip[channel]
            if ordered:  # failover: a channel's ids only grow, so a smaller one was delivered already
                newest = last.get(channel)
                if newest is not None and msg_id <= newest:
                    # a reconnect (a broker restart) redelivers what was in flight, which the caller
                    # may hold already. (A rewind by another member's seek would be dropped here too:
                    # seek from the member that consumes, docs/backends.md.)
                    continue
                last[channel] = msg_id
            raw = msg_id.serialize()
            if not ordered and pending.handle(channel, raw) is not None:  # delivered twice, the caller holds it
                continue
            pending.add(channel, raw, msg_id)
            out.append(RawMessage(channel, raw, message.data()))
        return out

    def ack(self, messages: Sequence[RawMessage]) -> None:
        self._require()
        pending = self._pending
        acknowledge = self._fast.acknowledge
        with self._backend.errors("ack"):
            for record in messages:
                msg_id = pending.handle(record.channel, record.msg_id)
                if msg_id is not None:  # else forgotten by a seek, or acked already
                    acknowledge(msg_id)
        # only once acknowledged: a failed ack keeps them all pending, and its retry acknowledges again
        # what the broker took already (Pulsar ignores a repeated acknowledgement)
        for channel, ids in ids_by_channel(messages).items():
            pending.settle(channel, ids)

    def seek(self, targets: Mapping[str, bytes | None], inclusive: Collection[str] = frozenset()) -> None:
        if self._closed:
            raise StreamClosedError("consumer is closed")
        backend = self._backend
        starts: dict[str, Any] = {}  # channel -> where its cursor goes (None: an empty channel)
        for channel, after in targets.items():  # check every target before moving any
            if channel not in self._entries:
                raise SeekError(f"channel {channel!r} is not consumed by this consumer")
            topic = self._entries[channel].topic
            with backend.errors(f"seek on {channel!r}", SeekError):
                if after is None:  # to the channel's first message (None: an empty channel stays)
                    starts[channel] = backend.read_one(topic, pulsar.MessageId.earliest)
                    continue
                target = _parse_id(after, channel)
                last = backend.last_id(topic)
                found = backend.message_at(topic, target) if last is not None and _key(target) <= _key(last) else None
            if found is None:
                raise SeekError(f"message id {after.hex()!r} is not on channel {channel!r}")
            starts[channel] = target
        with backend.errors("seek", SeekError):
            # a multi-topic consumer cannot seek one of its topics to a message id: close it, move each
            # cursor with a short-lived consumer of that topic, subscribe again. Channels not named keep
            # their state: what the caller holds of them comes again and is dropped as a repeat.
            if self._native is not None:
                self._native.close()
                self._native = None
            self._buffered.clear()
            for channel in starts:
                self._pending.forget(channel)
                self._last.pop(channel, None)
                self._skip.pop(channel, None)
            try:
                for channel, start in starts.items():
                    if start is None:
                        continue
                    mover = backend.client.subscribe(
                        self._entries[channel].topic, self.subscription, consumer_type=backend.consumer_type
                    )
                    try:  # the cursor goes to the target's entry, inclusive; its batch is filtered in receive
                        mover.seek(pulsar.MessageId(start.partition(), start.ledger_id(), start.entry_id(), -1))
                        # the broker drops a consumer that seeks, and the client subscribes it again: a close
                        # in between can leave it on the broker, where as the Failover subscription's active
                        # consumer it would take the channel's messages (pulsar-client-cpp#483)
                        deadline = time.monotonic() + backend.timeout
                        while not mover.is_connected() and time.monotonic() < deadline:
                            time.sleep(0.005)
                    finally:
                        mover.close()
                    if targets[channel] is not None:
                        self._skip[channel] = (start, channel in inclusive)
            finally:
                with contextlib.suppress(MsgStreamError):  # else the next receive subscribes again
                    self._subscribe()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._backend._consumers.discard(self)
        if self._native is not None:
            with self._backend.errors("close consumer"):
                self._native.close()
        self._native = self._fast = CLOSED
