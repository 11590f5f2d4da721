"""Redis Streams backend for msgstream: ``redis://[[user]:password@]host[:port][/db][?options]``, ``rediss://``.

Mapping (docs/backends.md has the long form):

* channel -> one stream key ``<prefix>ch:<name>``; the channel registry is the hash ``<prefix>channels``
  (name -> metadata, i.e. the owner record). A channel exists iff it is in the registry.
* produce -> ``XADD <key> NOMKSTREAM * d <frame>`` per payload, the whole batch packed by hand into one
  write and one round trip. ``create_channel`` makes the (empty) stream and ``NOMKSTREAM`` never creates
  one, so a deleted channel is never re-created by a late XADD: its XADD answers nil -> ProduceError.
  No automatic retry on produce: re-sending a batch whose reply was lost would duplicate it.
* subscription -> consumer group; each consumer -> a group member with a unique name; message id ->
  the entry id (``b"<ms>-<seq>"``).
* receive -> XREADGROUP ``>`` with COUNT and a BLOCK never longer than half the socket timeout.
  Entries that a member left pending are recovered with XPENDING ... IDLE and XCLAIM: a member that
  closes hands its pending entries over at once (XCLAIM with a large IDLE to a placeholder owner), and
  what a member that died left is claimed after ``claim_idle`` seconds by whichever member claims next.
* ack -> XACK. seek -> the entry must exist (XRANGE), then XGROUP SETID to it (``0`` for the start)
  and the group's pending entries on that stream are acknowledged (forgotten).
* latest message id -> XREVRANGE + - COUNT 1.

Options (URL query or ``connect(**options)``): ``prefix`` (``msgstream:``), ``socket_timeout`` (5 s),
``connect_timeout`` (5 s), ``retries`` (1), ``maxlen`` (0 = never trim; else approximate MAXLEN ~),
``claim_idle`` (30 s), ``claim_interval`` (5 s), and for ``rediss://`` ``ssl_ca_certs``,
``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
import uuid
from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

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
)

__all__ = ["RedisBackend"]

_ENTRY_ID = re.compile(rb"\d{1,20}-\d{1,20}")
_RELEASED = "__msgstream_released__"  # placeholder owner of entries handed over by a closing member
_RAW_COMMANDS = ("XCLAIM", "XPENDING", "XREVRANGE", "XRANGE")
_SEND_CHUNK = 5000  # payloads per write
#: Redis's replies to a consumer whose stream or group was deleted: no group; a blocked XREADGROUP
#: ended by the deletion; XGROUP SETID on a stream that is gone
_GONE = ("NOGROUP", "UNBLOCKED the stream key no longer exists", "requires the key to exist")
#: the registry field and the empty stream, made by XGROUP CREATE ... MKSTREAM with a group that the
#: same script destroys (so no client ever sees it)
_CREATE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XGROUP', 'CREATE', KEYS[2], '__msgstream_init', '$', 'MKSTREAM')
redis.call('XGROUP', 'DESTROY', KEYS[2], '__msgstream_init')
return 1
"""
_DELETE = """
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return removed
"""


def _resp(*args: bytes) -> bytes:
    """RESP encoding of a command's leading arguments (without the array length)."""
    return b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _before(entry: bytes) -> bytes:
    """The greatest stream entry id below ``entry``: a group set there delivers ``entry`` next."""
    ms, seq = (int(part) for part in entry.split(b"-"))
    return b"%d-%d" % ((ms, seq - 1) if seq else (ms - 1, 2**64 - 1))


def _payload(fields: Any) -> bytes:
    """The frame in an entry's fields (``[b"d", frame]``); an entry written otherwise gives ``b""``."""
    return fields[1] if fields and len(fields) > 1 and fields[0] == b"d" else b""


@contextlib.contextmanager
def _ignore_reply(reply: str) -> Iterator[None]:
    """Suppresses a Redis error reply that contains ``reply`` (one that a caller expects)."""
    try:
        yield
    except redis.ResponseError as exc:
        if reply not in str(exc):
            raise


def _number(options: Mapping[str, Any], name: str, default: float, url: URL) -> float:
    value = options.get(name, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidURLError(f"option {name}={value!r} is not a number (URL {url.redacted()!r})") from None
    if number < 0:
        raise InvalidURLError(f"option {name} must be >= 0, got {value!r}")
    return number


class RedisBackend(Backend):
    """See the module docstring."""

    features = Features(shared_subscription=True, durable=True, cross_process=True)

    def __init__(self, url: URL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        if url.scheme not in ("redis", "rediss"):
            raise InvalidURLError(f"the redis backend takes redis:// or rediss:// URLs, got {url.redacted()!r}")
        if len(url.hosts) > 1:
            raise InvalidURLError(f"one Redis host per URL (no cluster support): {url.redacted()!r}")
        db_text = url.path.strip("/") or "0"
        if not db_text.isdigit():
            raise InvalidURLError(f"the URL path is the database number, got {url.redacted()!r}")
        opts = self.options
        self.prefix = str(opts.get("prefix", "msgstream:"))
        self.socket_timeout = _number(opts, "socket_timeout", 5.0, url) or 5.0
        self.maxlen = int(_number(opts, "maxlen", 0, url))
        self.claim_idle = _number(opts, "claim_idle", 30.0, url)
        self.claim_interval = _number(opts, "claim_interval", 5.0, url)
        retries = int(_number(opts, "retries", 1, url))
        ssl_keys = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
        ssl = {"ssl": True, **{k: opts[k] for k in ssl_keys if k in opts}} if url.scheme == "rediss" else {}
        self._registry = self.prefix + "channels"
        self._connection: dict[str, Any] = {  # kept for ping's short-lived connection
            "host": url.host or "localhost",
            "port": url.port or 6379,
            "db": int(db_text),
            "username": url.username,
            "password": url.password or opts.get("password"),
            "client_name": "msgstream",
            **ssl,
        }
        self._redis = redis.Redis(
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=_number(opts, "connect_timeout", 5.0, url) or 5.0,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
            **self._connection,
        )
        for command in _RAW_COMMANDS:  # raw replies, the lists this module reads: no per-entry dicts
            self._redis.set_response_callback(command, lambda response, **_: response)
        self._consumers: set[_RedisConsumer] = set()
        self._closed = False
        with self.errors("connect", BrokerUnavailableError):
            self._redis.ping()

    # -- errors ---------------------------------------------------------------------------------
    native_errors = ((redis.ConnectionError, True), (redis.TimeoutError, True), (redis.RedisError, False))

    def classify(self, exc: BaseException) -> tuple[type[MsgStreamError] | None, bool] | None:
        if isinstance(exc, redis.AuthenticationError):  # a ConnectionError that trying again cannot fix
            return BrokerUnavailableError, False
        if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):  # the stream and its groups were deleted
            return ChannelNotFoundError, False
        if isinstance(exc, redis.exceptions.OutOfMemoryError):  # maxmemory reached: room again once trimmed
            return None, True
        return super().classify(exc)

    # -- keys -----------------------------------------------------------------------------------
    def key(self, channel: str) -> str:
        """The stream key of ``channel``."""
        return f"{self.prefix}ch:{channel}"

    def check_channel(self, channel: str) -> None:
        """``ChannelNotFoundError`` unless ``channel`` is in the registry."""
        with self.errors("check channel"):
            if not self._redis.hexists(self._registry, channel):
                raise ChannelNotFoundError(channel)

    # -- Backend --------------------------------------------------------------------------------
    def create_channel(self, name: str, metadata: bytes) -> None:
        if not CHANNEL_NAME.fullmatch(name):
            raise InvalidArgumentError(f"invalid channel name {name!r}")
        if not self._script("create channel", _CREATE, name, metadata, leaves=metadata):
            raise ChannelExistsError(f"channel exists: {name!r}")

    def channel_metadata(self, name: str) -> bytes:
        with self.errors("describe channel", BrokerUnavailableError):
            data = self._redis.hget(self._registry, name)
        if data is None:
            raise ChannelNotFoundError(name)
        return data if isinstance(data, bytes) else str(data).encode()

    def delete_channel(self, name: str) -> None:
        if not self._script("delete channel", _DELETE, name, leaves=None):
            raise ChannelNotFoundError(name)

    def _script(self, what: str, script: str, name: str, *args: bytes, leaves: bytes | None) -> Any:
        """``script`` on the registry and ``name``'s stream, sent once (:meth:`_once`). Its reply lost with
        the connection, after it ran or before: it ran, and this call succeeded, if the registry now holds
        ``leaves`` for ``name`` (``None``: nothing). Names are unique (the client draws them), so the
        metadata a create gave is this call's."""
        with self.errors(what, BrokerUnavailableError):
            try:
                return self._once("EVAL", script, 2, self._registry, self.key(name), name, *args)
            except redis.ConnectionError:
                if self._redis.hget(self._registry, name) != leaves:
                    raise
                return 1

    def create_producer(self, channel: str) -> Producer:
        self.check_channel(channel)
        return _RedisProducer(self, channel)

    def create_consumer(self, subscription: str, channels: Sequence[str], initial: SubscriptionPosition) -> Consumer:
        start = "0" if initial is SubscriptionPosition.EARLIEST else "$"
        for channel in channels:  # every channel exists, or no group is made
            self.check_channel(channel)
        for channel in channels:
            with self.errors("create consumer group"), _ignore_reply("BUSYGROUP"):  # the subscription exists: resumes
                self._redis.xgroup_create(self.key(channel), subscription, id=start, mkstream=True)
        consumer = _RedisConsumer(self, subscription, channels)
        made: list[str] = []
        try:  # a member from now on, not from its first XREADGROUP
            for channel in channels:
                with self.errors("create consumer", channel=channel):
                    self._redis.xgroup_createconsumer(self.key(channel), subscription, consumer._name)
                made.append(channel)
        except MsgStreamError:
            for channel in made:  # best effort: else it counts as live for claim_idle seconds
                with contextlib.suppress(redis.RedisError):
                    self._redis.xgroup_delconsumer(self.key(channel), subscription, consumer._name)
            raise
        self._consumers.add(consumer)
        return consumer

    def latest_message_id(self, channel: str) -> bytes | None:
        with self.errors("latest message id"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.hexists(self._registry, channel)
            pipe.xrevrange(self.key(channel), count=1)
            exists, newest = pipe.execute()
        if not exists:
            raise ChannelNotFoundError(channel)
        return bytes(newest[0][0]) if newest else None

    # -- operations -----------------------------------------------------------------------------
    def ping(self, timeout: float) -> None:
        """PING on a connection of its own whose connect and read timeouts are ``timeout``, no retry."""
        probe = redis.Redis(
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(ExponentialBackoff(), 0),
            **self._connection,
        )
        try:
            with self.errors("ping", BrokerUnavailableError):
                probe.ping()
        finally:
            probe.close()

    def list_channels(self) -> list[str]:
        with self.errors("list channels", BrokerUnavailableError):
            names = self._redis.hkeys(self._registry)
        return [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    def _groups(self, channel: str) -> list[dict[str, Any]]:
        self.check_channel(channel)
        with self.errors("XINFO GROUPS", channel=channel):
            groups = self._redis.xinfo_groups(self.key(channel))
        for group in groups:
            group["name"] = group["name"].decode()
        return groups

    def list_subscriptions(self, channel: str) -> list[str]:
        return [g["name"] for g in self._groups(channel)]

    def drop_subscription(self, subscription: str, channels: Sequence[str]) -> None:
        """XGROUP DESTROY on each channel, once no channel has a live member: one that is not the
        placeholder of released entries and interacted within ``claim_idle`` seconds (a member idle for
        longer counts as dead, as an entry pending that long counts as abandoned to the claim)."""
        for channel in channels:
            self.check_channel(channel)
            members: Any = []
            with self.errors("XINFO CONSUMERS", channel=channel), _ignore_reply("NOGROUP"):  # no group: not held
                members = self._redis.xinfo_consumers(self.key(channel), subscription)
            live = [m for m in members if m["name"] != _RELEASED.encode() and m["idle"] < self.claim_idle * 1000]
            if live:
                raise SubscriptionInUseError(
                    f"subscription {subscription!r} has {len(live)} live member(s) on {channel!r}"
                )
        for channel in channels:
            with self.errors("XGROUP DESTROY", channel=channel):
                self._redis.xgroup_destroy(self.key(channel), subscription)

    def read_message(self, channel: str, msg_id: bytes) -> bytes | None:
        if not _ENTRY_ID.fullmatch(msg_id):
            return None
        with self.errors("read message", channel=channel):
            entries = self.command("XRANGE", self.key(channel), msg_id, msg_id)
        return _payload(entries[0][1]) if entries else None

    def count_after(self, channel: str, msg_id: bytes | None) -> int | None:
        """XLEN for the whole stream; else XRANGE pages of ids after ``msg_id``, counted (O(count))."""
        key = self.key(channel)
        with self.errors("count messages", channel=channel):
            if msg_id is None:
                return int(self._redis.xlen(key))
            count, start = 0, b"(" + msg_id
            while True:
                page = self.command("XRANGE", key, start, "+", "COUNT", 1000)
                count += len(page)
                if len(page) < 1000:
                    return count
                start = b"(" + page[-1][0]

    def unacknowledged(self, subscription: str, channel: str) -> tuple[int | None, bytes | None]:
        """XINFO GROUPS: the group's pending entries plus its ``lag`` (counted after its last delivered
        entry where Redis does not know it); the oldest pending entry, else the next undelivered one."""
        group = next((g for g in self._groups(channel) if g["name"] == subscription), None)
        key = self.key(channel)
        with self.errors("unacknowledged", channel=channel):
            if group is None:
                count, after, pending = int(self._redis.xlen(key)), b"0-0", 0
            else:
                after = bytes(group["last-delivered-id"])
                pending = int(group["pending"])
                lag = group.get("lag")
                undelivered = int(lag) if lag is not None else self.count_after(channel, after)
                count = pending + (undelivered or 0)
            if not count:
                return 0, None
            if pending:
                oldest = bytes(self.command("XPENDING", key, subscription)[1])
            elif first := self.command("XRANGE", key, b"(" + after, "+", "COUNT", 1):
                oldest = bytes(first[0][0])
            else:
                return count, None
            before = self.command("XREVRANGE", key, b"(" + oldest, "-", "COUNT", 1)
        return count, bytes(before[0][0]) if before else oldest

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for consumer in list(self._consumers):
            with contextlib.suppress(MsgStreamError):
                consumer.close()
        self._redis.close()
        # redis-py's pool would connect again on the next command: any later use raises instead
        self._redis = CLOSED

    def command(self, *args: Any) -> Any:
        """One raw command (redis-py's ``execute_command`` is untyped)."""
        return self._redis.execute_command(*args)  # type: ignore[no-untyped-call]

    def _once(self, *args: Any, reply_within: float | None = None) -> Any:
        """One command sent once. redis-py sends a command again when the connection breaks before its
        reply: a create or delete that had run would then find its own work done and fail, and an
        XREADGROUP that had run would leave the entries it assigned behind newer ones. ``reply_within``:
        seconds to wait for the reply to start (else ``redis.TimeoutError``, the connection dropped)."""
        with self._raw_connection() as conn:
            conn.send_command(*args)
            if reply_within is not None and not conn.can_read(reply_within):
                raise redis.TimeoutError(f"no reply within {reply_within:g} s")
            return conn.read_response()

    @contextlib.contextmanager
    def _raw_connection(self) -> Iterator[Any]:
        """A connection of the pool for a command sent by hand; dropped if the block raises, since
        replies may be left unread on it."""
        pool = self._redis.connection_pool
        conn = pool.get_connection()  # without a command name: redis-py 5.3 and later
        try:
            yield conn
        except BaseException:
            conn.disconnect()  # type: ignore[no-untyped-call]
            raise
        finally:
            pool.release(conn)

    @property
    def client(self) -> redis.Redis:
        """The underlying redis-py client (for tests and diagnostics)."""
        return self._redis


class _RedisProducer(Producer):
    def __init__(self, backend: RedisBackend, channel: str) -> None:
        super().__init__(channel)
        self._backend = backend
        maxlen = [b"MAXLEN", b"~", str(backend.maxlen).encode()] if backend.maxlen else []
        args = [b"XADD", backend.key(channel).encode(), b"NOMKSTREAM", *maxlen, b"*", b"d"]
        self._head = b"*%d\r\n" % (len(args) + 1) + _resp(*args)  # every XADD up to its payload
        self._closed = False

    def send(self, payloads: Sequence[bytes], timeout: float) -> list[bytes]:
        if self._closed:
            raise StreamClosedError("producer is closed")
        ids: list[bytes] = []
        head = self._head
        deadline = time.monotonic() + timeout
        for start in range(0, len(payloads), _SEND_CHUNK):
            chunk = payloads[start : start + _SEND_CHUNK]
            parts: list[bytes] = []
            for p in chunk:
                parts += (head, b"$%d\r\n" % len(p), p, b"\r\n")
            replies: list[Any] = []
            errors = self._backend.errors(f"send to {self.channel!r}", ProduceError, self.channel)
            try:
                with errors, self._backend._raw_connection() as conn:
                    conn.send_packed_command([b"".join(parts)])
                    for _ in chunk:  # read every reply, errors included, to know what was accepted
                        # the wait for a reply's start is the send's timeout; the reply's end, the
                        # connection's socket_timeout
                        if not conn.can_read(max(0.0, deadline - time.monotonic())):
                            raise redis.TimeoutError(f"no reply within the send's {timeout:g} s")
                        try:
                            replies.append(conn.read_response())
                        except redis.ResponseError as exc:
                            replies.append(exc)
            except ProduceError as exc:  # connection lost or timed out: the replies read are what is known
                exc.sent = {self.channel: ids + [r for r in replies if isinstance(r, bytes)]}
                raise
            if failed := [r for r in replies if not isinstance(r, bytes)]:
                accepted = [r for r in replies if isinstance(r, bytes)]
                first = failed[0]
                reason = "the channel does not exist (deleted?)" if first is None else f"Redis said: {first}"
                raise ProduceError(
                    f"send to {self.channel!r}: {len(failed)} of {len(payloads)} messages refused, {reason};"
                    f" accepted ids are in .sent",
                    channel=self.channel,
                    sent={self.channel: ids + accepted},
                    retriable=isinstance(first, redis.exceptions.OutOfMemoryError),  # room again once trimmed
                )
            ids.extend(replies)
        return ids

    def close(self) -> None:
        self._closed = True


class _RedisConsumer(Consumer):
    def __init__(self, backend: RedisBackend, subscription: str, channels: Sequence[str]) -> None:
        super().__init__(subscription, channels)
        self._backend = backend
        self._r = backend.client
        self._name = f"m-{uuid.uuid4().hex[:16]}"
        self._key_of = {c: backend.key(c) for c in channels}
        self._channel_of = {k.encode(): c for c, k in self._key_of.items()}
        # delivered by Redis beyond what a receive returns (COUNT applies per stream), per channel
        self._buffer: dict[str, deque[RawMessage]] = {c: deque() for c in channels}
        self._next_claim = 0.0
        self._max_block = max(0.05, backend.socket_timeout / 2)
        self._closed = False
        # The entry ids this member has delivered and not seen acknowledged, per channel. If a
        # connection breaks during XREADGROUP, Redis may have assigned entries to this member whose
        # reply never arrived (and redis-py may have read again by itself, bringing newer ones): they
        # sit in its own pending list, where no claim of other members' entries finds them. So every
        # claim round, and an error brings the next one forward, looks through its own pending list
        # for entries it never delivered.
        self._held: Unacked[None] = Unacked()

    def receive(self, max_messages: int, timeout: float) -> list[RawMessage]:
        if self._closed:
            raise StreamClosedError("consumer is closed")
        if any(self._buffer.values()):
            return self._share(max_messages, [])
        try:
            return self._receive(max_messages, timeout)
        except MsgStreamError as exc:
            if exc.retriable:  # the connection broke: a reply may have been lost with it
                self._next_claim = 0.0
            raise

    def _recover_lost_replies(self, max_messages: int) -> list[RawMessage]:
        """Entries in this member's own pending list that it never delivered: assigned by Redis, lost
        on the way."""
        out: list[RawMessage] = []
        with self._errors("receive"):
            for channel, key in self._key_of.items():
                held = self._held.held(channel)
                for mine in self._pending(key, member=self._name):
                    lost = [p[0] for p in mine if p[0] not in held][: max_messages - len(out)]
                    if lost:  # XRANGE of each id, in one round trip: the entries' payloads
                        pipe = self._r.pipeline(transaction=False)
                        for entry_id in lost:
                            pipe.xrange(key, entry_id, entry_id)
                        gone = []
                        for entry_id, found in zip(lost, pipe.execute(), strict=True):
                            if found:
                                self._held.add(channel, entry_id)
                                out.append(RawMessage(channel, entry_id, _payload(found[0][1])))
                            else:  # trimmed meanwhile: nothing to deliver, nothing to keep pending
                                gone.append(entry_id)
                        if gone:
                            self._backend.command("XACK", key, self.subscription, *gone)
                    if len(out) >= max_messages:
                        return out
        return out

    def _receive(self, max_messages: int, timeout: float) -> list[RawMessage]:
        deadline = time.monotonic() + timeout
        args: list[Any] = ["XREADGROUP", "GROUP", self.subscription, self._name, "COUNT", max_messages]
        streams = ["STREAMS", *self._key_of.values(), *([">"] * len(self._key_of))]
        while True:
            now = time.monotonic()
            if now >= self._next_claim:  # also within one long receive: a member may die meanwhile
                self._next_claim = now + self._backend.claim_interval
                # entries whose reply was lost (also in a connection that redis-py re-established by
                # itself, which raised nothing), then other members' idle ones
                claimed = self._recover_lost_replies(max_messages) or self._claim(max_messages)
                if claimed:
                    if len(claimed) >= max_messages:  # more may wait: take them before any newer entry
                        self._next_claim = now
                    return claimed
            remaining = deadline - now
            # wake up for the next claim round too
            block = int(min(remaining, self._max_block, max(0.001, self._next_claim - now)) * 1000)
            with self._errors("receive"):  # sent once: a lost reply raises, and the next receive recovers it
                reply = self._backend._once(
                    *args,
                    *(["BLOCK", block] if block > 0 else []),
                    *streams,
                    reply_within=block / 1000 + min(1.0, self._backend.socket_timeout),
                )
            out = self._parse(reply)
            if out or remaining <= 0 or block <= 0:
                return out if len(out) <= max_messages else self._share(max_messages, out)

    def _share(self, max_messages: int, fresh: list[RawMessage]) -> list[RawMessage]:
        """Up to ``max_messages`` of what is buffered and ``fresh``: an equal share of every channel that
        has some first, then the room left; the rest stays buffered, per channel in order. (A reply
        holds up to COUNT entries of each stream: one stream's must not fill every batch.)"""
        for raw in fresh:
            self._buffer[raw.channel].append(raw)
        queues = [q for q in self._buffer.values() if q]
        out: list[RawMessage] = []
        for take in (-(-max_messages // len(queues)), max_messages):
            for q in queues:
                out += [q.popleft() for _ in range(min(take, len(q), max_messages - len(out)))]
        return out

    def _parse(self, reply: Any) -> list[RawMessage]:
        if not reply:
            return []
        items = reply.items() if isinstance(reply, dict) else reply
        out: list[RawMessage] = []
        channel_of = self._channel_of
        for key, entries in items:
            channel = channel_of[key]
            self._held.deliver(channel, [entry_id for entry_id, _ in entries])
            out += [RawMessage(channel, entry_id, _payload(fields)) for entry_id, fields in entries]
        return out

    def _claim(self, max_messages: int) -> list[RawMessage]:
        """Take over entries that *other* members left pending for ``claim_idle`` seconds (or handed
        over on close). Entries this member holds itself (a time-tick stream buffers them unacknowledged
        for as long as a tick takes) are never claimed back: that would deliver them twice."""
        idle_ms = int(self._backend.claim_idle * 1000)
        me = self._name.encode()
        out: list[RawMessage] = []
        with self._errors("claim pending entries"):
            for channel, key in self._key_of.items():
                for pending in itertools.islice(self._pending(key, idle=idle_ms), 10):  # a bounded scan
                    theirs = [p[0] for p in pending if p[1] != me][: max_messages - len(out)]
                    if theirs:
                        for entry_id, fields in self._backend.command(
                            "XCLAIM", key, self.subscription, self._name, idle_ms, *theirs
                        ):
                            if fields:  # deleted (trimmed) entries come back empty: nothing to deliver
                                out.append(RawMessage(channel, entry_id, _payload(fields)))
                                self._held.add(channel, entry_id)
                    if len(out) >= max_messages:
                        return out
        return out

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """``backend.errors``, where a stream or consumer group that is gone raises ``ChannelNotFoundError``
        naming the deleted channel, else a ``ConsumeError`` saying the group vanished."""
        with self._backend.errors(what):
            try:
                yield
            except redis.ResponseError as exc:
                if any(reply in str(exc) for reply in _GONE):
                    for channel in self.channels:
                        self._backend.check_channel(channel)
                    raise ConsumeError(f"consumer group {self.subscription!r} vanished from {self.channels}") from None
                raise

    def ack(self, messages: Sequence[RawMessage]) -> None:
        if self._closed:
            raise StreamClosedError("consumer is closed")
        by_channel = ids_by_channel(messages)
        with self._backend.errors("ack"):
            if len(by_channel) == 1:
                ((channel, ids),) = by_channel.items()
                self._backend.command("XACK", self._key_of[channel], self.subscription, *ids)
            else:
                pipe = self._r.pipeline(transaction=False)
                for channel, ids in by_channel.items():
                    pipe.xack(self._key_of[channel], self.subscription, *ids)
                pipe.execute()
        for channel, ids in by_channel.items():  # only once acknowledged: a failed ack keeps them held
            self._held.settle(channel, ids)

    def seek(self, targets: Mapping[str, bytes | None], inclusive: Collection[str] = frozenset()) -> None:
        if self._closed:
            raise StreamClosedError("consumer is closed")
        with self._errors("seek"):
            for channel, after in targets.items():  # check every target before moving any
                if channel not in self.channels:
                    raise SeekError(f"channel {channel!r} is not consumed by this consumer")
                if after is None:
                    continue
                if not _ENTRY_ID.fullmatch(after):
                    raise SeekError(f"not a Redis stream entry id: {after!r} on {channel!r}")
                if not self._backend.command("XRANGE", self._key_of[channel], after, after):
                    self._backend.check_channel(channel)
                    raise SeekError(f"entry {after.decode()} is not on {channel!r} (never written, or trimmed)")
            for channel, after in targets.items():
                key = self._key_of[channel]
                self._held.forget(channel)
                start = _before(after) if after and channel in inclusive else after
                self._r.xgroup_setid(key, self.subscription, start or "0")
                for pending in self._pending(key):  # forget the group's deliveries on this stream
                    self._r.xack(key, self.subscription, *[p[0] for p in pending])
        for channel in targets:
            self._buffer[channel].clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._backend._consumers.discard(self)
        with self._backend.errors("close consumer"):
            for key in self._key_of.values():
                with _ignore_reply("NOGROUP"):  # the channel was deleted meanwhile
                    self._release(key)

    def _release(self, key: str) -> None:
        """Hand what this member holds on ``key`` to the next member, then leave the group."""
        for mine in self._pending(key, member=self._name):
            ids = [p[0] for p in mine]
            self._backend.command("XCLAIM", key, self.subscription, _RELEASED, 0, *ids, "IDLE", 2**40, "JUSTID")
        self._r.xgroup_delconsumer(key, self.subscription, self._name)

    def _pending(self, key: str, *, member: str | None = None, idle: int | None = None) -> Iterator[list[Any]]:
        """The group's pending entries on ``key`` (``[id, owner, idle ms, deliveries]``) in id order, a page
        of up to 1000 at a time, each read after the caller handled the one before: ``member``'s only,
        or only those idle for ``idle`` ms, where given."""
        idle_filter = ["IDLE", idle] if idle is not None else []
        start: bytes | str = "-"
        while page := self._backend.command(
            "XPENDING", key, self.subscription, *idle_filter, start, "+", 1000, *([member] if member else [])
        ):
            yield page
            if len(page) < 1000:
                return
            start = b"(" + page[-1][0]
