"""An example msgstream backend over the standard library's ``sqlite3``: ``sqlite:///absolute/path/file.db``.

This is the worked example of docs/plugins.md. Every client, thread or process that opens the same file
shares one broker: the file is in WAL mode (readers run beside the writer) and every read-modify-write runs
in a ``BEGIN IMMEDIATE`` transaction, so two members of a subscription never take the same message.

Semantics follow the reference ``memory://`` backend. A message id is the message's 0-based sequence
number in its channel as 8 big-endian bytes. Each (channel, subscription) has a cursor shared by its
members and a ``pending`` table of delivered-but-unacknowledged messages; a row whose ``consumer`` is NULL
waits for redelivery. A member that closes, or whose process died (checked by pid, so every client of a
file must run on one host), hands its pending messages back; the next member receives them first.

SQLite has no notifications, so ``receive`` polls the file with a sleep that backs off from 1 to 20 ms.
Option ``timeout``: seconds a call waits for another connection's write lock (default 5).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from sqlite3 import Connection
from typing import Any
from urllib.parse import unquote

from msgstream.backend import CHANNEL_NAME, URL, Backend, Consumer, Features, Producer, RawMessage, SubscriptionPosition
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
)

__all__ = ["SqliteBackend"]

_ID_LEN = 8
_POLL_MIN, _POLL_MAX = 0.001, 0.02  # receive's poll interval backs off between these (seconds)
_REAP_EVERY = 1.0  # seconds between two looks for consumers whose process died
_SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (name TEXT PRIMARY KEY, metadata BLOB NOT NULL, length INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    channel TEXT, seq INTEGER, payload BLOB NOT NULL, PRIMARY KEY (channel, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscriptions (
    channel TEXT, sub TEXT, cursor INTEGER NOT NULL, PRIMARY KEY (channel, sub)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (
    channel TEXT, sub TEXT, seq INTEGER, consumer TEXT, PRIMARY KEY (channel, sub, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_by_consumer ON pending (consumer);
CREATE TABLE IF NOT EXISTS consumers (token TEXT PRIMARY KEY, pid INTEGER NOT NULL) WITHOUT ROWID;
"""
_PAYLOAD = "SELECT payload FROM messages WHERE channel = ? AND seq = ?"
_REDELIVER = "SELECT seq FROM pending WHERE channel = ? AND sub = ? AND consumer IS NULL ORDER BY seq LIMIT ?"
# Is there anything for this subscription on this channel? No row: the channel does not exist.
_READY = """
SELECT c.length > COALESCE(s.cursor, 0)
       OR EXISTS (SELECT 1 FROM pending p WHERE p.channel = c.name AND p.sub = ?1 AND p.consumer IS NULL)
FROM channels c LEFT JOIN subscriptions s ON s.channel = c.name AND s.sub = ?1 WHERE c.name = ?2
"""

ErrorFactory = Callable[[str, bool], MsgStreamError]


def _msg_id(seq: int) -> bytes:
    return seq.to_bytes(_ID_LEN, "big")


def _error_factory(cls: type[MsgStreamError]) -> ErrorFactory:
    def make(text: str, retriable: bool) -> MsgStreamError:
        exc = cls(text)
        exc.retriable = retriable
        return exc

    return make


_unavailable, _consume_error = _error_factory(BrokerUnavailableError), _error_factory(ConsumeError)


def _busy(exc: BaseException | None) -> bool:
    """A lock held by another connection outlasted the busy timeout: worth another try."""
    return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        pass
    return True


class SqliteBackend(Backend):
    """A broker in one SQLite file; see the module docstring."""

    features = Features(shared_subscription=True, durable=True, cross_process=True)

    def __init__(self, url: URL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        if url.hosts or url.path in ("", "/"):
            raise InvalidURLError(f"sqlite URLs are sqlite:///absolute/path/file.db, got {url.redacted()!r}")
        try:
            self._timeout = float(self.options.get("timeout", 5.0))
        except (TypeError, ValueError):
            raise InvalidURLError(f"option timeout must be a number of seconds in {url.redacted()!r}") from None
        if not 0 <= self._timeout <= 3600:
            raise InvalidURLError(f"option timeout must be between 0 and 3600 seconds in {url.redacted()!r}")
        self._lock = threading.Lock()  # one connection, used by one thread at a time
        self._consumers: weakref.WeakSet[_SqliteConsumer] = weakref.WeakSet()  # closed with the backend
        self._conn: Connection | None = None
        try:
            conn = sqlite3.connect(unquote(url.path), self._timeout, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.executescript(_SCHEMA)
            except sqlite3.Error:
                conn.close()
                raise
        except sqlite3.Error as exc:
            raise _unavailable(f"cannot open {url.redacted()}: {exc}", _busy(exc)) from exc
        self._conn = conn

    @contextlib.contextmanager
    def _tx(self, error: ErrorFactory, *, write: bool = True, wait: float | None = None) -> Iterator[Connection]:
        """The connection, inside a ``BEGIN IMMEDIATE`` transaction if ``write`` (else each statement is
        its own snapshot); sqlite3 errors become ``error(text, retriable)``, anything raised rolls back."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StreamClosedError(f"backend {self.url.redacted()} is closed")
            try:
                conn.execute(f"PRAGMA busy_timeout = {int((self._timeout if wait is None else wait) * 1000)}")
                if write:
                    conn.execute("BEGIN IMMEDIATE")
                yield conn
                if conn.in_transaction:
                    conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    text = f"sqlite {self.url.redacted()}: {type(exc).__name__}: {exc}"
                    raise error(text, isinstance(exc, sqlite3.OperationalError)) from exc
                raise

    @staticmethod
    def _length(conn: Connection, channel: str) -> int:
        row = conn.execute("SELECT length FROM channels WHERE name = ?", (channel,)).fetchone()
        if row is None:
            raise ChannelNotFoundError(channel)
        return int(row[0])

    def create_channel(self, name: str, metadata: bytes) -> None:
        if not isinstance(name, str) or not CHANNEL_NAME.fullmatch(name):
            raise InvalidArgumentError(f"invalid channel name {name!r}")
        with self._tx(_unavailable) as conn:
            if conn.execute("SELECT 1 FROM channels WHERE name = ?", (name,)).fetchone():
                raise ChannelExistsError(f"channel exists: {name!r}")
            conn.execute("INSERT INTO channels VALUES (?, ?, 0)", (name, bytes(metadata)))

    def channel_metadata(self, name: str) -> bytes:
        with self._tx(_unavailable, write=False) as conn:
            row = conn.execute("SELECT metadata FROM channels WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ChannelNotFoundError(name)
        return bytes(row[0])

    def delete_channel(self, name: str) -> None:
        with self._tx(_unavailable) as conn:
            self._length(conn, name)
            for table in ("messages", "subscriptions", "pending"):
                conn.execute(f"DELETE FROM {table} WHERE channel = ?", (name,))
            conn.execute("DELETE FROM channels WHERE name = ?", (name,))

    def create_producer(self, channel: str) -> Producer:
        self.channel_metadata(channel)
        return _SqliteProducer(self, channel)

    def create_consumer(self, subscription: str, channels: Sequence[str], initial: SubscriptionPosition) -> Consumer:
        token = uuid.uuid4().hex
        self._reap(_unavailable)
        with self._tx(_unavailable) as conn:
            for name in channels:
                length = self._length(conn, name)
                start = 0 if initial is SubscriptionPosition.EARLIEST else length
                conn.execute("INSERT OR IGNORE INTO subscriptions VALUES (?, ?, ?)", (name, subscription, start))
            conn.execute("INSERT INTO consumers VALUES (?, ?)", (token, os.getpid()))
        consumer = _SqliteConsumer(self, subscription, channels, token)
        self._consumers.add(consumer)
        return consumer

    def latest_message_id(self, channel: str) -> bytes | None:
        with self._tx(_unavailable, write=False) as conn:
            n = self._length(conn, channel)
        return _msg_id(n - 1) if n else None

    def _reap(self, error: ErrorFactory, wait: float | None = None) -> None:
        """Hand the pending messages of consumers whose process died back for redelivery."""
        with self._tx(error, write=False, wait=wait) as conn:
            dead = [pid for (pid,) in conn.execute("SELECT DISTINCT pid FROM consumers") if not _alive(pid)]
        if dead:
            with self._tx(error, wait=wait) as conn:
                for pid in dead:
                    tokens = "SELECT token FROM consumers WHERE pid = ?"
                    conn.execute(f"UPDATE pending SET consumer = NULL WHERE consumer IN ({tokens})", (pid,))
                    conn.execute("DELETE FROM consumers WHERE pid = ?", (pid,))

    def close(self) -> None:
        for consumer in list(self._consumers):  # give their pending messages back while we can
            with contextlib.suppress(MsgStreamError):
                consumer.close()
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class _SqliteProducer(Producer):
    def __init__(self, backend: SqliteBackend, channel: str) -> None:
        super().__init__(channel)
        self._backend = backend
        self._closed = False

    def _error(self, text: str, retriable: bool) -> MsgStreamError:
        return ProduceError(f"send to {self.channel!r} failed: {text}", channel=self.channel, retriable=retriable)

    def send(self, payloads: Sequence[bytes], timeout: float) -> list[bytes]:
        if self._closed:
            raise StreamClosedError("producer is closed")
        with self._backend._tx(self._error, wait=timeout) as conn:
            row = conn.execute("SELECT length FROM channels WHERE name = ?", (self.channel,)).fetchone()
            if row is None:
                raise ProduceError(f"channel {self.channel!r} does not exist (deleted?)", channel=self.channel)
            start = int(row[0])
            rows = [(self.channel, start + i, p) for i, p in enumerate(payloads)]
            conn.executemany("INSERT INTO messages VALUES (?, ?, ?)", rows)
            conn.execute("UPDATE channels SET length = ? WHERE name = ?", (start + len(rows), self.channel))
        return [_msg_id(seq) for seq in range(start, start + len(rows))]

    def close(self) -> None:
        self._closed = True


class _SqliteConsumer(Consumer):
    def __init__(self, backend: SqliteBackend, subscription: str, channels: Sequence[str], token: str) -> None:
        super().__init__(subscription, channels)
        self._backend = backend
        self._token = token
        self._next_channel = 0
        self._next_reap = time.monotonic() + _REAP_EVERY
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StreamClosedError("consumer is closed")

    def receive(self, max_messages: int, timeout: float) -> list[RawMessage]:
        self._check_open()
        deadline = time.monotonic() + timeout
        delay = _POLL_MIN
        while True:
            try:
                out = self._poll(max_messages, wait=max(deadline - time.monotonic(), 0.01))
            except ConsumeError as exc:
                if not _busy(exc.__cause__):
                    raise
                out = []  # another connection held the write lock too long: poll again until the deadline
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, _POLL_MAX)

    def _poll(self, max_messages: int, wait: float) -> list[RawMessage]:
        if time.monotonic() >= self._next_reap:
            self._next_reap = time.monotonic() + _REAP_EVERY
            self._backend._reap(_consume_error, wait)
        ready = False
        with self._backend._tx(_consume_error, write=False, wait=wait) as conn:  # cheap look, no write lock
            for name in self.channels:
                row = conn.execute(_READY, (self.subscription, name)).fetchone()
                if row is None:
                    raise ChannelNotFoundError(name)
                ready = ready or bool(row[0])
        return self._take(max_messages, wait) if ready else []

    def _take(self, max_messages: int, wait: float) -> list[RawMessage]:
        """Collect up to ``max_messages``, visiting channels round-robin from a rotating start; per
        channel, messages waiting for redelivery come first, then the cursor moves on."""
        out: list[RawMessage] = []
        n, first, sub = len(self.channels), self._next_channel, self.subscription
        self._next_channel = (first + 1) % n
        with self._backend._tx(_consume_error, wait=wait) as conn:
            for k in range(n):
                name = self.channels[(first + k) % n]
                length = SqliteBackend._length(conn, name)
                room = max_messages - len(out)
                if room <= 0:
                    break
                row = conn.execute(
                    "SELECT cursor FROM subscriptions WHERE channel = ? AND sub = ?", (name, sub)
                ).fetchone()
                cursor = row[0] if row else 0  # no row: the channel was recreated under the same name
                seqs = [seq for (seq,) in conn.execute(_REDELIVER, (name, sub, room))]
                end = max(cursor, min(length, cursor + room - len(seqs)))
                seqs.extend(range(cursor, end))
                if not seqs:
                    continue
                conn.execute("INSERT OR REPLACE INTO subscriptions VALUES (?, ?, ?)", (name, sub, end))
                conn.executemany(
                    "INSERT OR REPLACE INTO pending VALUES (?, ?, ?, ?)", [(name, sub, s, self._token) for s in seqs]
                )
                for seq in seqs:
                    (payload,) = conn.execute(_PAYLOAD, (name, seq)).fetchone()
                    out.append(RawMessage(name, _msg_id(seq), bytes(payload)))
        return out

    def ack(self, messages: Sequence[RawMessage]) -> None:
        self._check_open()
        rows = [(m.channel, self.subscription, int.from_bytes(m.msg_id, "big")) for m in messages]
        if rows:
            with self._backend._tx(_consume_error) as conn:
                conn.executemany(
                    "DELETE FROM pending WHERE channel = ? AND sub = ? AND seq = ? AND consumer IS NOT NULL", rows
                )

    def seek(self, targets: Mapping[str, bytes | None], inclusive: Collection[str] = frozenset()) -> None:
        self._check_open()
        with self._backend._tx(_consume_error) as conn:  # one transaction: all targets or none
            cursors: dict[str, int] = {}
            for channel, after in targets.items():
                if channel not in self.channels:
                    raise SeekError(f"channel {channel!r} is not consumed by this consumer")
                length = SqliteBackend._length(conn, channel)
                cursors[channel] = 0
                if after:
                    if len(after) != _ID_LEN:
                        raise SeekError(f"not a sqlite message id: {after.hex()!r} on {channel!r}")
                    offset = int.from_bytes(after, "big")
                    cursors[channel] = offset if channel in inclusive else offset + 1
                    if offset >= length:
                        raise SeekError(f"message id {after.hex()} is past the end of {channel!r} ({length} messages)")
            for channel, cursor in cursors.items():
                conn.execute(
                    "INSERT OR REPLACE INTO subscriptions VALUES (?, ?, ?)", (channel, self.subscription, cursor)
                )
                conn.execute("DELETE FROM pending WHERE channel = ? AND sub = ?", (channel, self.subscription))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._backend._consumers.discard(self)
        with self._backend._tx(_consume_error) as conn:
            conn.execute("UPDATE pending SET consumer = NULL WHERE consumer = ?", (self._token,))
            conn.execute("DELETE FROM consumers WHERE token = ?", (self._token,))
