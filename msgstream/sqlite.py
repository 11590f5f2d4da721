"""The ``sqlite:///`` backend: durable streams in one SQLite file, shared by the processes of one host.

``sqlite:///relative/file.db`` or ``sqlite:////absolute/file.db`` (the file is the URL's path less its
first slash). Every client, thread and process that opens the file shares one broker. The file is in WAL
mode (readers run beside the one writer) and every read-modify-write is a ``BEGIN IMMEDIATE``
transaction, so two members of a subscription never take the same message. A ``send`` that returned
is committed: it survives a kill -9 of any process, and with ``synchronous=full`` a power loss.

A message id is the message's 0-based sequence number in its channel, 8 bytes big-endian. Each
(channel, subscription) has a cursor shared by its members and rows in ``pending``: ranges of sequence
numbers delivered to a member and not acknowledged; a range whose ``member`` is NULL waits for
redelivery and goes first to the next member that receives. A member that closes hands its ranges
back; so does one whose process died, found by process id and start time (all clients of a file run
on one host: SQLite's WAL mode needs shared memory; only members of one's own PID namespace are checked).

Options (``?name=value``), defaults in brackets:

* ``synchronous`` [full]: ``full`` fsyncs the log at every commit; ``normal`` only at checkpoints, so
  a power loss may undo the last commits (a process crash never does).
* ``busy_timeout`` [5]: seconds ack, seek, close and channel operations wait for another connection's
  write lock (send and receive wait at most their own timeout).
* ``max_messages`` [0: none], ``max_age`` [0: none, seconds]: retention per channel, applied by each
  send; ``retention`` [acked]: trim only what every subscription acknowledged, or ``force``.
* ``poll_interval`` [0.001]: seconds between two looks at the file while a receive waits.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from sqlite3 import Connection
from typing import Any

from .backend import CHANNEL_NAME, CLOSED, URL, Backend, Consumer, Features, Producer, RawMessage, SubscriptionPosition
from .errors import (
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

__all__ = ["SQLiteBackend"]

_ID_LEN = 8
_BUSY = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED: another connection held the lock too long
_RETRIABLE = (*_BUSY, 10, 13)  # and SQLITE_IOERR, SQLITE_FULL: trying again may work
_REAP_EVERY = 1.0  # seconds between a receiving member's looks for members whose process died
_VACUUM_PAGES = 1024  # free pages the file may keep; a send gives back up to 4x that many per call
_OPTIONS = {"synchronous", "busy_timeout", "max_messages", "max_age", "retention", "poll_interval"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT UNIQUE NOT NULL,
    metadata BLOB NOT NULL, first INTEGER NOT NULL DEFAULT 0, next INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS messages (chan INTEGER, seq INTEGER, ts REAL NOT NULL, payload BLOB NOT NULL,
    PRIMARY KEY (chan, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscriptions (chan INTEGER, sub TEXT, cursor INTEGER NOT NULL,
    PRIMARY KEY (chan, sub)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (chan INTEGER, sub TEXT, first INTEGER, last INTEGER NOT NULL, member TEXT,
    PRIMARY KEY (chan, sub, first)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_by_member ON pending (member);
CREATE TABLE IF NOT EXISTS members (token TEXT PRIMARY KEY, pid INTEGER NOT NULL, started TEXT NOT NULL,
    ns TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS joined (chan INTEGER, sub TEXT, token TEXT, PRIMARY KEY (chan, sub, token)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS joined_by_token ON joined (token);
"""
_FLOOR = """SELECT MIN(x) FROM (SELECT MIN(cursor) AS x FROM subscriptions WHERE chan = ?1
    UNION ALL SELECT MIN(first) FROM pending WHERE chan = ?1)"""

ErrorClass = type[MsgStreamError]  # what a failed sqlite3 call becomes, by operation


def _msg_id(seq: int) -> bytes:
    return seq.to_bytes(_ID_LEN, "big")


def _seq(msg_id: bytes) -> int | None:
    """The sequence number a message id stands for; None for bytes that are none (SQLite's ints are signed)."""
    return int.from_bytes(msg_id, "big") if len(msg_id) == _ID_LEN and msg_id[0] < 0x80 else None


def _code(exc: BaseException | None) -> int:
    """The primary SQLite result code of a failure (before Python 3.11, from the error's own message):
    SQLITE_BUSY (5) also for a wait for another thread's call; 0 for no SQLite error."""
    if isinstance(exc, TimeoutError):
        return _BUSY[0]
    if not isinstance(exc, sqlite3.Error):
        return 0
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return int(code) & 0xFF
    return next((c for c, word in ((5, "locked"), (10, "I/O"), (13, "full")) if word in str(exc)), 0)


def _process_stamp(pid: int) -> str | None:
    """A live process's start time (field 22 of Linux's /proc/PID/stat), so that a reused pid is not taken
    for the dead process; None if there is no such live process (or no /proc: see docs/backends.md)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _identity(path: str) -> tuple[int, int] | None:
    """The file at ``path`` as (device, inode); None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pid_namespace() -> str:
    """This process's PID namespace (Linux), "" if unknown: pids mean something only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _number(options: Mapping[str, Any], name: str, default: float, url: URL) -> float:
    try:
        value = float(options.get(name, default))
    except (TypeError, ValueError):
        value = -1.0
    if not 0 <= value <= 10**12:
        raise InvalidURLError(f"option {name} must be a non-negative number in {url.redacted()!r}")
    return value


class SQLiteBackend(Backend):
    """A broker in one SQLite file; see the module docstring."""

    features = Features(shared_subscription=True, durable=True, cross_process=True)

    def __init__(self, url: URL, options: Mapping[str, Any]) -> None:
        super().__init__(url, options)
        path = url.path[1:]
        if url.hosts or not path or path == ":memory:" or path.startswith("file:"):
            raise InvalidURLError(
                f"sqlite URLs are sqlite:///relative.db or sqlite:////abs/file.db: {url.redacted()!r}"
            )
        if unknown := sorted(set(self.options) - _OPTIONS):
            raise InvalidURLError(f"unknown sqlite options {unknown} in {url.redacted()!r}")
        self._sync = str(self.options.get("synchronous", "full")).upper()
        self._force = str(self.options.get("retention", "acked"))
        if self._sync not in ("FULL", "NORMAL") or self._force not in ("acked", "force"):
            raise InvalidURLError(f"synchronous is full|normal, retention acked|force: {url.redacted()!r}")
        self._busy = _number(self.options, "busy_timeout", 5.0, url)
        self._max_messages = int(_number(self.options, "max_messages", 0, url))
        self._max_age = _number(self.options, "max_age", 0, url)
        self.poll_interval = _number(self.options, "poll_interval", 0.001, url)
        self._lock = threading.Lock()  # one connection, used by one thread at a time
        self._busy_ms = -1
        self._commits = 0  # our own writes: data_version counts only other connections'
        self._members: set[str] = set()  # tokens of our members not yet handed back: closed with the backend
        self._conn: Connection | None = None
        self._path = os.path.abspath(path)  # where the file was opened, whatever the working directory becomes
        with self.errors("cannot open the file", BrokerUnavailableError):
            conn = sqlite3.connect(path, self._busy, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect only on a new, empty file
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {self._sync}")
                conn.executescript(_SCHEMA)
            except sqlite3.Error:
                conn.close()
                raise
        self._conn = conn
        self._file = _identity(self._path)  # ping tells this file from one made at the same path later

    def classify(self, exc: BaseException) -> tuple[type[MsgStreamError] | None, bool] | None:
        """sqlite3's errors, and the wait for another thread's call (a ``TimeoutError``), retriable by
        their result code."""
        return (None, _code(exc) in _RETRIABLE) if isinstance(exc, (sqlite3.Error, TimeoutError)) else None

    @contextlib.contextmanager
    def _tx(
        self, error: ErrorClass, *, write: bool = True, wait: float | None = None, channel: str | None = None
    ) -> Iterator[Connection]:
        """The connection, inside a ``BEGIN IMMEDIATE`` transaction if ``write``, waiting at most ``wait``
        seconds (default ``busy_timeout``) for another thread's call and for the write lock; sqlite3
        errors become ``error`` (:meth:`Backend.errors`: the sqlite3 error is its ``__context__``),
        ``retriable`` when trying again may work; anything raised rolls back."""
        wait = min(self._busy if wait is None else max(wait, 0.0), threading.TIMEOUT_MAX)
        with self.errors(f"send to {channel!r}" if channel else "sqlite", error, channel):
            if not self._lock.acquire(timeout=wait):
                raise TimeoutError(f"another thread's call on this connection took over {wait:g} s")
            try:
                conn = self._conn
                if conn is None:
                    raise StreamClosedError(f"backend {self.url.redacted()} is closed")
                if write:
                    if (busy_ms := min(max(1, int(wait * 1000)), 2**31 - 1)) != self._busy_ms:  # a C int
                        conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
                        self._busy_ms = busy_ms
                    conn.execute("BEGIN IMMEDIATE")
                changes = conn.total_changes
                yield conn
                if conn.in_transaction:
                    conn.execute("COMMIT")
                self._commits += conn.total_changes != changes
            except BaseException:
                if conn is not None and conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            finally:
                self._lock.release()

    def _version(self, wait: float) -> tuple[int, int]:
        """Changes whenever any connection committed a write to the file."""
        with self._tx(ConsumeError, write=False, wait=wait) as conn:
            return int(conn.execute("PRAGMA data_version").fetchone()[0]), self._commits

    @staticmethod
    def _channel(conn: Connection, name: str) -> tuple[int, int, int]:
        row = conn.execute("SELECT id, first, next FROM channels WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ChannelNotFoundError(name)
        return int(row[0]), int(row[1]), int(row[2])

    def create_channel(self, name: str, metadata: bytes) -> None:
        if not isinstance(name, str) or not CHANNEL_NAME.fullmatch(name):
            raise InvalidArgumentError(f"invalid channel name {name!r}")
        with self._tx(BrokerUnavailableError) as conn:
            if conn.execute("SELECT 1 FROM channels WHERE name = ?", (name,)).fetchone():
                raise ChannelExistsError(f"channel exists: {name!r}")
            conn.execute("INSERT INTO channels (name, metadata) VALUES (?, ?)", (name, bytes(metadata)))

    def channel_metadata(self, name: str) -> bytes:
        with self._tx(BrokerUnavailableError, write=False) as conn:
            row = conn.execute("SELECT metadata FROM channels WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ChannelNotFoundError(name)
        return bytes(row[0])

    def delete_channel(self, name: str) -> None:
        with self._tx(BrokerUnavailableError) as conn:
            chan = self._channel(conn, name)[0]
            for table in ("messages", "subscriptions", "pending", "joined"):
                conn.execute(f"DELETE FROM {table} WHERE chan = ?", (chan,))
            conn.execute("DELETE FROM channels WHERE id = ?", (chan,))

    def create_producer(self, channel: str) -> Producer:
        with self._tx(BrokerUnavailableError, write=False) as conn:
            chan = self._channel(conn, channel)[0]
        return _SQLiteProducer(self, channel, chan)

    def create_consumer(self, subscription: str, channels: Sequence[str], initial: SubscriptionPosition) -> Consumer:
        if not channels:
            raise InvalidArgumentError("a consumer needs at least one channel")
        token = uuid.uuid4().hex
        self._reap(BrokerUnavailableError)
        ids: dict[str, int] = {}
        with self._tx(BrokerUnavailableError) as conn:
            for name in channels:
                chan, first, nxt = self._channel(conn, name)
                ids[name] = chan
                start = first if initial is SubscriptionPosition.EARLIEST else nxt
                conn.execute("INSERT OR IGNORE INTO subscriptions VALUES (?, ?, ?)", (chan, subscription, start))
                conn.execute("INSERT OR IGNORE INTO joined VALUES (?, ?, ?)", (chan, subscription, token))
            member = (token, os.getpid(), _process_stamp(os.getpid()) or "", _pid_namespace())
            conn.execute("INSERT INTO members VALUES (?, ?, ?, ?)", member)
        self._members.add(token)
        return _SQLiteConsumer(self, subscription, ids, token)

    def latest_message_id(self, channel: str) -> bytes | None:
        with self._tx(BrokerUnavailableError, write=False) as conn:
            nxt = self._channel(conn, channel)[2]
        return _msg_id(nxt - 1) if nxt else None

    def ping(self, timeout: float) -> None:
        """The file must still be at its path and answer a read within ``timeout``."""
        if _identity(self._path) != self._file:  # deleted or moved; or replaced, maybe by another client
            raise BrokerUnavailableError(f"{self.url.redacted()}: the file is gone from {self._path!r}")
        with self._tx(BrokerUnavailableError, write=False, wait=timeout) as conn:
            conn.execute("SELECT count(*) FROM channels").fetchone()

    def list_channels(self) -> list[str]:
        with self._tx(BrokerUnavailableError, write=False) as conn:
            return [str(row[0]) for row in conn.execute("SELECT name FROM channels")]

    def list_subscriptions(self, channel: str) -> list[str]:
        with self._tx(BrokerUnavailableError, write=False) as conn:
            chan = self._channel(conn, channel)[0]
            return [str(row[0]) for row in conn.execute("SELECT sub FROM subscriptions WHERE chan = ?", (chan,))]

    def drop_subscription(self, subscription: str, channels: Sequence[str]) -> None:
        self._reap(BrokerUnavailableError)  # members whose process died do not hold it
        with self._tx(BrokerUnavailableError) as conn:  # one transaction: an error drops nothing
            for name in channels:
                chan = self._channel(conn, name)[0]
                live = conn.execute(
                    "SELECT count(*) FROM joined WHERE chan = ? AND sub = ?", (chan, subscription)
                ).fetchone()[0]
                if live:
                    raise SubscriptionInUseError(
                        f"subscription {subscription!r} has {live} open consumer(s) on {name!r}"
                    )
                for table in ("subscriptions", "pending"):
                    conn.execute(f"DELETE FROM {table} WHERE chan = ? AND sub = ?", (chan, subscription))

    def read_message(self, channel: str, msg_id: bytes) -> bytes | None:
        with self._tx(BrokerUnavailableError, write=False) as conn:
            chan = self._channel(conn, channel)[0]
            if (seq := _seq(msg_id)) is None:
                return None
            row = conn.execute("SELECT payload FROM messages WHERE chan = ? AND seq = ?", (chan, seq)).fetchone()
        return None if row is None else bytes(row[0])

    def count_after(self, channel: str, msg_id: bytes | None) -> int | None:
        with self._tx(BrokerUnavailableError, write=False) as conn:
            _, first, nxt = self._channel(conn, channel)
        after = first if msg_id is None else max(first, int.from_bytes(msg_id, "big") + 1)
        return max(0, nxt - after)

    def unacknowledged(self, subscription: str, channel: str) -> tuple[int | None, bytes | None]:
        with self._tx(BrokerUnavailableError, write=False) as conn:
            chan, first, nxt = self._channel(conn, channel)
            row = conn.execute(
                "SELECT cursor FROM subscriptions WHERE chan = ? AND sub = ?", (chan, subscription)
            ).fetchone()
            cursor = max(first, row[0]) if row else first
            ranges = conn.execute(
                "SELECT first, last FROM pending WHERE chan = ? AND sub = ?", (chan, subscription)
            ).fetchall()
        held = [(max(a, first), min(b, nxt - 1)) for a, b in ranges]
        held = [(a, b) for a, b in held if a <= b]
        count = max(0, nxt - cursor) + sum(b - a + 1 for a, b in held)
        if not count:
            return 0, None
        oldest = min([a for a, _ in held] + ([cursor] if cursor < nxt else []))
        return count, _msg_id(oldest - 1 if oldest > first else oldest)

    def _reap(self, error: ErrorClass, wait: float | None = None) -> None:
        """Hand back the ranges of members whose process died; only members of this PID namespace whose
        start time is known (not where there is no /proc) can be told dead."""
        with self._tx(error, write=False, wait=wait) as conn:
            known = "SELECT token, pid, started FROM members WHERE ns = ? AND started != ''"
            rows = conn.execute(known, (_pid_namespace(),)).fetchall()
        if dead := [token for token, pid, started in rows if _process_stamp(pid) != started]:
            self._release(dead, error, wait)

    def _release(self, tokens: Collection[str], error: ErrorClass, wait: float | None = None) -> None:
        """Hand these members' ranges back for redelivery and remove the members."""
        rows = [(token,) for token in tokens]
        with self._tx(error, wait=wait) as conn:
            conn.executemany("UPDATE pending SET member = NULL WHERE member = ?", rows)
            conn.executemany("DELETE FROM members WHERE token = ?", rows)
            conn.executemany("DELETE FROM joined WHERE token = ?", rows)
        self._members.difference_update(tokens)

    def _trim(self, conn: Connection, chan: int, first: int, nxt: int) -> None:
        """Apply the retention limits to one channel, inside the caller's transaction."""
        bound = nxt - self._max_messages if self._max_messages else 0
        if self._max_age:
            young = "SELECT seq FROM messages WHERE chan = ? AND ts >= ? ORDER BY seq LIMIT 1"
            row = conn.execute(young, (chan, time.time() - self._max_age)).fetchone()
            bound = max(bound, nxt if row is None else row[0])
        if self._force == "acked":
            floor = conn.execute(_FLOOR, (chan,)).fetchone()[0]
            bound = bound if floor is None else min(bound, floor)
        if bound > first:
            conn.execute("DELETE FROM messages WHERE chan = ? AND seq < ?", (chan, bound))
            conn.execute("UPDATE channels SET first = ? WHERE id = ?", (bound, chan))
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            if free > _VACUUM_PAGES:  # one page per step of the statement, as Python's execute steps once
                for _ in range(min(free, 4 * _VACUUM_PAGES)):
                    conn.execute("PRAGMA incremental_vacuum(1)")

    def close(self) -> None:
        """Hand back what members not closed (collected ones too) hold, then close the file. If the hand-back
        fails (the write lock held past ``busy_timeout``), nothing is closed and the error is raised:
        close again. (Left undone, those messages would wait for this process to end.)"""
        if self._members:
            self._release(list(self._members), BrokerUnavailableError)
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class _SQLiteProducer(Producer):
    def __init__(self, backend: SQLiteBackend, channel: str, chan: int) -> None:
        super().__init__(channel)
        self._backend = backend
        self._chan = chan

    def send(self, payloads: Sequence[bytes], timeout: float) -> list[bytes]:
        backend, chan, now = self._backend, self._chan, time.time()
        with backend._tx(ProduceError, wait=timeout, channel=self.channel) as conn:
            row = conn.execute("SELECT first, next FROM channels WHERE id = ?", (chan,)).fetchone()
            if row is None:
                raise ProduceError(f"channel {self.channel!r} does not exist (deleted?)", channel=self.channel)
            first, start = row
            end = start + len(payloads)
            rows = [(chan, seq, now, p) for seq, p in zip(range(start, end), payloads, strict=True)]
            conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?)", rows)
            conn.execute("UPDATE channels SET next = ? WHERE id = ?", (end, chan))
            if backend._max_messages or backend._max_age:
                backend._trim(conn, chan, first, end)
        return [_msg_id(seq) for seq in range(start, end)]

    def close(self) -> None:
        self._backend = CLOSED


class _SQLiteConsumer(Consumer):
    def __init__(self, backend: SQLiteBackend, subscription: str, ids: dict[str, int], token: str) -> None:
        super().__init__(subscription, list(ids))
        self._backend = backend
        self._ids = ids
        self._token = token
        self._next_channel = 0
        self._next_reap = 0.0
        self._seen: tuple[int, int] | None = None  # the file's version at the last look
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StreamClosedError("consumer is closed")

    def receive(self, max_messages: int, timeout: float) -> list[RawMessage]:
        """Look at the file whenever it changed, sleeping ``poll_interval`` between two checks of its
        version (``PRAGMA data_version``, a read of shared memory); a lock held past the deadline
        counts as nothing having arrived."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_open()  # closed from another thread meanwhile: nothing more is taken
            now = time.monotonic()
            wait = max(deadline - now, 0.001)
            try:
                if now >= self._next_reap:
                    self._next_reap = now + _REAP_EVERY
                    self._backend._reap(ConsumeError, wait)
                version = self._backend._version(wait)
                if version != self._seen:
                    out = self._take(max_messages, wait)
                    self._seen = version  # only once taken: a take that raised is tried again
                    if out:
                        return out
            except ConsumeError as exc:
                if _code(exc.__context__) not in _BUSY:
                    raise
                self._seen = None  # look again
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            time.sleep(min(self._backend.poll_interval, remaining))

    def _take(self, max_messages: int, wait: float) -> list[RawMessage]:
        """Up to ``max_messages``: an equal share of each channel that has some, visited from a rotating
        start, then the room left; per channel, ranges waiting for redelivery come first, then the cursor
        moves on."""
        out: list[RawMessage] = []
        n, first = len(self.channels), self._next_channel
        self._next_channel = (first + 1) % n
        order = self.channels[first:] + self.channels[:first]
        share = -(-max_messages // n)
        with self._backend._tx(ConsumeError, wait=wait) as conn:
            if conn.execute("SELECT 1 FROM members WHERE token = ?", (self._token,)).fetchone() is None:
                raise StreamClosedError("consumer is closed")  # by another thread: it holds nothing any more
            full = []  # channels that gave their whole share: they may have more
            for name in order:
                taken = self._take_from(conn, name, min(share, max_messages - len(out)))
                out += taken
                if len(taken) == share:
                    full.append(name)
            for name in full:
                if len(out) < max_messages:
                    out += self._take_from(conn, name, max_messages - len(out))
        return out

    def _take_from(self, conn: Connection, name: str, limit: int) -> list[RawMessage]:
        """Up to ``limit`` messages of one channel for this member, inside the caller's transaction."""
        out: list[RawMessage] = []
        chan, sub, me = self._ids[name], self.subscription, self._token
        read = "SELECT seq, payload FROM messages WHERE chan = ? AND seq BETWEEN ? AND ? ORDER BY seq LIMIT ?"
        row = conn.execute("SELECT cursor FROM subscriptions WHERE chan = ? AND sub = ?", (chan, sub)).fetchone()
        if row is None:
            raise ChannelNotFoundError(name)
        ranges = conn.execute(
            "SELECT first, last FROM pending WHERE chan = ? AND sub = ? AND member IS NULL ORDER BY first",
            (chan, sub),
        ).fetchall()
        for first, last, new in [*((a, b, False) for a, b in ranges), (row[0], 2**62, True)]:
            room = limit - len(out)
            if room <= 0:
                break
            rows = conn.execute(read, (chan, first, last, room)).fetchall()
            if not new:
                conn.execute("DELETE FROM pending WHERE chan = ? AND sub = ? AND first = ?", (chan, sub, first))
            if not rows:
                continue
            top = rows[-1][0]
            if new:
                conn.execute("UPDATE subscriptions SET cursor = ? WHERE chan = ? AND sub = ?", (top + 1, chan, sub))
            elif top < last:  # the rest of a redelivered range waits for the next receive
                conn.execute("INSERT INTO pending VALUES (?, ?, ?, ?, NULL)", (chan, sub, top + 1, last))
            conn.execute("INSERT INTO pending VALUES (?, ?, ?, ?, ?)", (chan, sub, rows[0][0], top, me))
            out += [RawMessage(name, _msg_id(seq), payload) for seq, payload in rows]
        return out

    def ack(self, messages: Sequence[RawMessage]) -> None:
        """Per range of this member's that the ids fall in (found in ``pending``, where a seek or a
        redelivery may have changed them): delete its row and insert what is left of it."""
        self._check_open()
        by_channel: dict[str, set[int]] = {}
        for m in messages:
            if (seq := _seq(m.msg_id)) is not None:  # else not held
                by_channel.setdefault(m.channel, set()).add(seq)
        find = "SELECT first, last, member FROM pending WHERE chan = ? AND sub = ? AND first <= ? ORDER BY first DESC"
        with self._backend._tx(ConsumeError) as conn:
            for name, seqs in by_channel.items():
                key = (self._ids.get(name), self.subscription)
                hit: dict[tuple[int, int], list[int]] = {}
                row = None
                for seq in sorted(seqs):
                    if row is None or seq > row[1]:
                        row = conn.execute(find, (*key, seq)).fetchone()  # the nearest: ranges do not overlap
                        if row is None or row[1] < seq or row[2] != self._token:
                            row = None
                            continue
                    hit.setdefault((row[0], row[1]), []).append(seq)
                for (first, last), acked in hit.items():
                    conn.execute("DELETE FROM pending WHERE chan = ? AND sub = ? AND first = ?", (*key, first))
                    cuts = [first - 1, *acked, last + 1]
                    conn.executemany(
                        "INSERT INTO pending VALUES (?, ?, ?, ?, ?)",
                        [(*key, a + 1, b - 1, self._token) for a, b in itertools.pairwise(cuts) if a + 1 < b],
                    )

    def seek(self, targets: Mapping[str, bytes | None], inclusive: Collection[str] = frozenset()) -> None:
        self._check_open()
        with self._backend._tx(ConsumeError) as conn:  # one transaction: all targets or none
            for channel, after in targets.items():
                if (chan := self._ids.get(channel)) is None:
                    raise SeekError(f"channel {channel!r} is not consumed by this consumer")
                row = conn.execute("SELECT first, next FROM channels WHERE id = ?", (chan,)).fetchone()
                if row is None:  # deleted (a channel re-created under its name is another one)
                    raise ChannelNotFoundError(channel)
                first, nxt = row
                if after and len(after) != _ID_LEN:
                    raise SeekError(f"not a sqlite message id: {after.hex()!r} on {channel!r}")
                seq = int.from_bytes(after, "big") if after else first - 1
                cursor = seq if after and channel in inclusive else seq + 1
                if seq >= nxt:
                    raise SeekError(f"message id {seq:016x} is past the end of {channel!r} ({nxt} messages)")
                if cursor < first:
                    raise SeekError(f"seek to {seq:016x} on {channel!r}: messages it needs were trimmed (retention)")
                conn.execute("INSERT OR REPLACE INTO subscriptions VALUES (?, ?, ?)", (chan, self.subscription, cursor))
                conn.execute("DELETE FROM pending WHERE chan = ? AND sub = ?", (chan, self.subscription))

    def close(self) -> None:
        self._closed = True  # first: a receive in another thread takes nothing from now on
        if self._token in self._backend._members:  # else already handed back (by the backend's close)
            self._backend._release([self._token], ConsumeError)  # if this fails, close again to retry
