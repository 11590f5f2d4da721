"""``msgstream.aio``: the API for asyncio programs, name for name the sync one.

    import msgstream.aio as aio
    async with aio.connect("redis://127.0.0.1:6379/0") as client:
        ids = await client.create_channels(req)
        async with client.msg_stream() as out, client.tt_msg_stream() as tt:
            await out.create_producers(ids); out.start()
            await tt.create_consumers("query-node-1", ids)
            await out.produce(pack); await out.broadcast(ticks)
            async for pack in tt: ...

The methods that talk to the broker are coroutines; plain setters and properties stay plain.

How it works (docs/architecture.md, "asyncio"): an async stream wraps a sync :class:`~msgstream.MsgStream`
or :class:`~msgstream.TimeTickStream` and runs its calls on two worker threads of its own, one for
the consuming side (create_consumers, consume, receive, consume_frames, ack, seek, close) and one for
the producing side (create_producers, produce, broadcast, get_latest_positions), as the sync stream
allows one thread of each. Each call is one hop to its thread, per pack, never per message, in a copy of
the caller's context; the event loop never waits on the broker. A backend whose broker is this process
(``Features.nonblocking_send``, e.g. memory://) is produced to on the loop itself, repack function
included, as its send never waits (not while hooks, such as an instrumentation, are installed).

Cancellation loses nothing: when a task awaiting ``consume()`` (or ``receive``, ``consume_frames``) is
cancelled, the call goes on in the worker and its outcome, a pack or an error, is kept; the next call of
the same kind returns it before anything new is read. A kept pack was never handed to the caller, so it
is never acknowledged: ``seek`` and ``close`` leave it to the subscription to deliver again.

Every await is bounded: by the call's own timeout (``consume(timeout)``, the stream's
``produce_timeout`` per channel) plus ``call_timeout`` (default 60 s) for the hop and the calls that have
no timeout of their own; past it, ``OperationTimeoutError`` (the call goes on in its worker; a consume's
outcome is still kept for the next one).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Protocol, TypeVar

from .backend import URL, Backend, RawMessage, load_backend
from .client import ChannelDescriptions, Client, CreateChannelRequest
from .codec import UnmarshalDispatcher
from .errors import (
    InvalidArgumentError,
    MsgStreamError,
    OperationTimeoutError,
    StreamClosedError,
    StreamStateError,
    UnmarshalError,
)
from .frames import FramePack
from .messages import TimeTickMsg, TsMsg
from .pack import MsgPack, Position
from .repack import RepackFunc
from .stream import MsgStream, hooks
from .timestamp import HybridClock, check_interval
from .timetick import TimeTickStream
from .values import ChannelLag, SubscriptionPosition

__all__ = ["AsyncClient", "AsyncMsgStream", "AsyncTimeTickStream", "Ticker", "connect"]

log = logging.getLogger("msgstream.aio")

T = TypeVar("T")
S = TypeVar("S", MsgStream, TimeTickStream)
A = TypeVar("A", bound="_AsyncStream[Any]")
DEFAULT_CALL_TIMEOUT = 60.0
#: how long ``async for`` waits in one consume before it looks whether the stream was closed
ITER_TIMEOUT = 1.0
Sent = dict[str, list[bytes]]  # what produce and broadcast return: {channel: [message ids]}


def _check_bound(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise InvalidArgumentError(f"call_timeout must be a positive number of seconds, got {value!r}")
    return float(value)


def _own_timeout(value: object) -> float:
    """A consume timeout for the await's bound; a bad one is refused by the sync call itself."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        return 0.0
    return float(value)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a discarded outcome as seen (asyncio would log an error never retrieved)."""
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("discarded outcome of a call nobody awaited any more: %r", fut.exception())


def _mark_seen(fut: asyncio.Future[Any]) -> None:
    """Mark an outcome as seen, so that asyncio does not report an error nobody came back for."""
    if not fut.cancelled():
        fut.exception()


def _close_abandoned(made: asyncio.Future[Client]) -> None:
    """Close, in a thread of its own (a close may wait on the broker), a client whose open timed out."""
    if made.cancelled() or made.exception() is not None:
        return
    client = made.result()

    def close() -> None:
        try:
            client.close()
        except MsgStreamError as exc:
            log.warning("closing %r, opened after its connect timed out: %s", client, exc)

    threading.Thread(target=close, name="msgstream-aio-abandoned", daemon=True).start()


class _Worker:
    """One thread of its own running blocking calls in order: one hop per call."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """``fn()`` on the thread, in a copy of the caller's context (as ``asyncio.to_thread``), so what
        it does is seen as the calling task's work, e.g. by OpenTelemetry's current span."""
        return asyncio.get_running_loop().run_in_executor(self._executor, contextvars.copy_context().run, fn)

    async def call(self, fn: Callable[[], T], bound: float, what: str) -> T:
        """``fn()`` on the thread. A caller cancelled before the call started drops it; once started it
        runs to its end (a broker call cannot be interrupted) and its outcome is discarded."""
        fut = self.submit(fn)
        try:
            done, _ = await asyncio.wait((fut,), timeout=bound)
        except asyncio.CancelledError:
            fut.cancel()  # drops a call still queued; a running one goes on
            raise
        if not done:
            fut.add_done_callback(_retrieve)
            raise OperationTimeoutError(f"{what} did not finish within {bound:g}s; it goes on in the background")
        return fut.result()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False)


class _Started:
    """What ``start()`` returns: nothing to wait for, but ``await s.start()`` works as well."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


class _AsyncStream(Generic[S]):
    """What AsyncMsgStream and AsyncTimeTickStream share."""

    _wraps: type  # the sync stream class wrapped

    def __init__(
        self, stream: S, *, produce_timeout: float | None = None, call_timeout: float = DEFAULT_CALL_TIMEOUT
    ) -> None:
        """``produce_timeout``: the per-channel part of a produce's bound (default: the stream's own)."""
        if not isinstance(stream, self._wraps):
            raise InvalidArgumentError(
                f"{type(self).__name__} wraps a {self._wraps.__name__}, got {type(stream).__name__}"
            )
        self._stream: S = stream
        self._produce_timeout = produce_timeout  # None: the wrapped stream's
        self._bound = _check_bound(call_timeout)
        self._consume_worker: _Worker | None = None
        self._produce_worker: _Worker | None = None
        self._lock = asyncio.Lock()  # one consume-side call awaited at a time
        # the consume-side call in flight, whose outcome the next call of its kind takes if this caller is
        # cancelled: (method, future, the loop time by which it should be done)
        self._kept: tuple[str, asyncio.Future[Any], float] | None = None
        self._inline_send = self._inner().backend.features.nonblocking_send

    # -- workers --------------------------------------------------------------------------------
    @property
    def _consuming(self) -> _Worker:
        self._check_open()
        if self._consume_worker is None:
            self._consume_worker = _Worker("msgstream-aio-consume")
        return self._consume_worker

    @property
    def _producing(self) -> _Worker:
        self._check_open()
        if self._produce_worker is None:
            self._produce_worker = _Worker("msgstream-aio-produce")
        return self._produce_worker

    def _check_open(self) -> None:
        if self._stream.closed:
            raise StreamClosedError("stream is closed")

    @property
    def closed(self) -> bool:
        return self._stream.closed

    @property
    def sync(self) -> S:
        """The wrapped sync stream (its calls block: not for use on the event loop)."""
        return self._stream

    # -- set-up ---------------------------------------------------------------------------------
    async def create_producers(self, channels: Sequence[str]) -> None:
        """Add a producer per channel; the channel order fixes the indexes repack routes to."""
        await self._producing.call(lambda: self._stream.create_producers(channels), self._bound, "create_producers")

    async def create_consumers(
        self,
        subscription: str,
        channels: Sequence[str],
        dispatcher: UnmarshalDispatcher | None = None,
        position: SubscriptionPosition = SubscriptionPosition.EARLIEST,
    ) -> None:
        """Join ``subscription`` on ``channels`` (see :meth:`msgstream.MsgStream.create_consumers`)."""
        await self._consuming.call(
            lambda: self._stream.create_consumers(subscription, channels, dispatcher, position),
            self._bound,
            "create_consumers",
        )

    def set_repack_func(self, repack: RepackFunc) -> None:
        """Route produced messages with ``repack`` (see :mod:`msgstream.repack`)."""
        self._stream.set_repack_func(repack)

    def start(self) -> Awaitable[None]:
        """Checks that the stream has producers or a consumer; plain, and awaitable as well."""
        self._stream.start()
        return _Started()

    # -- producing ------------------------------------------------------------------------------
    def _produce_bound(self) -> float:
        inner = self._inner()
        per_channel = inner.produce_timeout if self._produce_timeout is None else self._produce_timeout
        return per_channel * max(1, len(inner.producer_channels)) + self._bound

    def _inner(self) -> MsgStream:
        stream = self._stream
        return stream.inner if isinstance(stream, TimeTickStream) else stream

    async def produce(self, pack: MsgPack) -> dict[str, list[bytes]]:
        """Route and send ``pack``; returns ``{channel: [message ids]}`` once the broker accepted every
        message (see :meth:`msgstream.MsgStream.produce`). A cancelled produce that had started runs to
        its end in the worker; one still queued sends nothing. On a broker in this process
        (``Features.nonblocking_send``, without hooks installed) the routing, encoding and send run on the
        loop: the repack function then runs there too."""
        return await self._send(self._stream.produce, pack, "produce")

    async def broadcast(self, pack: MsgPack) -> dict[str, list[bytes]]:
        """Send every message of ``pack`` to every producer channel (e.g. time ticks)."""
        return await self._send(self._stream.broadcast, pack, "broadcast")

    async def _send(self, send: Callable[[MsgPack], Sent], pack: MsgPack, what: str) -> Sent:
        # a broker in this process (``Features.nonblocking_send``) is sent to on the loop, unless hooks are
        # installed: an instrumentation's span processor may export, i.e. wait on the network
        if self._inline_send and hooks() is None:
            await asyncio.sleep(0)  # let the other tasks run between two sends (a cancel here sends nothing)
            return send(pack)
        return await self._producing.call(lambda: send(pack), self._produce_bound(), what)

    async def get_latest_positions(self) -> list[Position]:
        """The newest message of each consumed channel (else each produced channel)."""
        return await self._producing.call(self._stream.get_latest_positions, self._bound, "get_latest_positions")

    async def lag(self) -> list[ChannelLag]:
        """Per consumed channel, the messages after the last one returned and their age in seconds
        (see ``MsgStream.lag``); on the producing worker, so a waiting consume does not hold it up."""
        return await self._producing.call(self._stream.lag, self._bound, "lag")

    # -- consuming ------------------------------------------------------------------------------
    async def _take(self, kind: str, fn: Callable[[], T], timeout: float) -> T:
        """Run a consume-side call, or take the kept outcome of one whose caller was cancelled."""
        bound = timeout + self._bound
        async with self._lock:
            kept = self._kept
            if kept is None:
                fut: asyncio.Future[T] = self._consuming.submit(fn)
                fut.add_done_callback(_mark_seen)  # a kept error goes to the next call, if one comes
                self._kept = (kind, fut, asyncio.get_running_loop().time() + bound)
            elif kept[0] != kind:
                raise StreamStateError(
                    f"a cancelled {kept[0]}() left its outcome to the next {kept[0]}(): call that before {kind}()"
                )
            else:
                self._check_open()
                fut = kept[1]
            # asyncio.wait neither cancels fut when this task is cancelled nor raises fut's error:
            # on cancellation (even one arriving once fut is done) the outcome stays kept
            done, _ = await asyncio.wait((fut,), timeout=bound)
            if not done:
                raise OperationTimeoutError(f"{kind} did not finish within {bound:g}s; its outcome is kept")
            self._kept = None
            return fut.result()

    async def consume(self, timeout: float = 1.0) -> MsgPack | None:
        """The next pack, or ``None`` if nothing arrived in ``timeout`` seconds (see the sync
        ``consume``). If the awaiting task is cancelled, what the call receives is returned by the next
        ``consume``."""
        return await self._take("consume", lambda: self._stream.consume(timeout), _own_timeout(timeout))

    async def seek(self, positions: Sequence[Position]) -> None:
        """Resume each position's channel right after it. A pack kept from a cancelled consume is
        dropped unacknowledged (the seek decides what comes next)."""
        self._check_open()
        async with self._lock:
            await self._settle_kept()
            await self._consuming.call(lambda: self._stream.seek(positions), self._bound, "seek")

    @staticmethod
    def _behind(deadline: float) -> float:
        """Seconds until a kept call's own bound ends (it runs on the worker ahead of the next call)."""
        return max(0.0, deadline - asyncio.get_running_loop().time())

    async def _settle_kept(self) -> None:
        """Wait for a kept outcome and discard it: a pack (received, never handed over) or a report of a
        bad frame is left unacknowledged, at once, so a later call cancelled before it ran cannot
        acknowledge it. (The consume-side calls that touch what is in hand run under the consume lock,
        which the caller holds.)"""
        kept = self._kept
        if kept is None:
            return
        kind, fut, deadline = kept
        done, _ = await asyncio.wait((fut,), timeout=self._behind(deadline) + ITER_TIMEOUT)
        if not done:
            raise OperationTimeoutError(f"a kept {kind}() did not finish within its timeout and {self._bound:g}s")
        self._kept = None
        if fut.cancelled():
            return
        error = fut.exception()
        if error is None and fut.result() is not None:
            self._stream._drop_in_hand()
        elif isinstance(error, UnmarshalError):
            self._stream._unreport()

    # -- lifecycle ------------------------------------------------------------------------------
    async def close(self, *, acknowledge: bool = True) -> None:
        """Acknowledge what was handed over, close producers and consumer. Idempotent. Waits for a
        consume in flight; a pack kept from a cancelled consume is not acknowledged. If the
        acknowledgement fails, nothing is closed and the error is raised (see the sync ``close``)."""
        await self._close(acknowledge, drop_in_hand=False)

    async def _close(self, acknowledge: bool, drop_in_hand: bool) -> None:
        if self._stream.closed:
            self._shutdown()
            return
        async with self._lock:
            if self._stream.closed:  # by a close that held the lock first
                self._shutdown()
                return
            await self._settle_kept()
            if drop_in_hand:
                self._stream._drop_in_hand()
            if self._produce_worker is not None:  # let a produce in flight finish before its producer closes
                await self._produce_worker.call(lambda: None, self._produce_bound(), "close")
            stream = self._stream

            def close() -> None:
                try:
                    stream.close(acknowledge=acknowledge)
                finally:  # on the worker, so that a caller cancelled meanwhile leaves no thread behind
                    if stream.closed:
                        self._shutdown()

            await self._consuming.call(close, self._bound, "close")

    def _shutdown(self) -> None:
        for worker in (self._consume_worker, self._produce_worker):
            if worker is not None:
                worker.shutdown()

    async def __aenter__(self: A) -> A:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        # as the sync ``with`` (msgstream.stream.end_block): a block that exits on an exception leaves the
        # pack in hand unacknowledged, and a close whose acknowledgement fails then closes without it
        if exc_type is None:
            await self._close(True, drop_in_hand=False)
            return
        try:
            await self._close(True, drop_in_hand=True)
        except MsgStreamError as err:
            log.warning("closing %r after its block failed: %s; closed without acknowledging", self, err)
            await self._close(False, drop_in_hand=False)

    async def __aiter__(self) -> AsyncIterator[MsgPack]:
        while not self._stream.closed:
            try:
                pack = await self.consume(ITER_TIMEOUT)
            except StreamClosedError:
                return
            if pack is not None:
                yield pack


class AsyncMsgStream(_AsyncStream[MsgStream]):
    """:class:`~msgstream.MsgStream` for asyncio (see the module doc); an async context manager, and
    ``async for pack in stream`` yields packs until the stream is closed."""

    _wraps = MsgStream

    @property
    def backend(self) -> Backend:
        """The backend this stream talks to (its calls block: not for use on the event loop)."""
        return self._stream.backend

    @property
    def producer_channels(self) -> list[str]:
        return self._stream.producer_channels

    @property
    def consumer_channels(self) -> list[str]:
        return self._stream.consumer_channels

    @property
    def subscription(self) -> str | None:
        return self._stream.subscription

    @property
    def produce_timeout(self) -> float:
        """The per-channel part of a produce's bound: the one given, else the wrapped stream's."""
        return self._stream.produce_timeout if self._produce_timeout is None else self._produce_timeout

    @property
    def auto_ack(self) -> bool:
        return self._stream.auto_ack

    @auto_ack.setter
    def auto_ack(self, value: bool) -> None:
        self._stream.auto_ack = value

    async def receive(self, timeout: float = 1.0) -> list[TsMsg] | None:
        """The next decoded messages, none acknowledged until :meth:`ack` (see the sync ``receive``);
        kept for the next ``receive`` if the awaiting task is cancelled."""
        return await self._take("receive", lambda: self._stream.receive(timeout), _own_timeout(timeout))

    async def consume_frames(self, timeout: float = 1.0) -> FramePack | None:
        """As :meth:`consume`, the messages left encoded (see the sync ``consume_frames``)."""
        return await self._take("consume_frames", lambda: self._stream.consume_frames(timeout), _own_timeout(timeout))

    async def ack(self, msgs: Sequence[TsMsg] | Sequence[RawMessage]) -> None:
        """Acknowledge consumed messages (only needed with ``auto_ack=False``)."""
        async with self._lock:  # after a consume in flight; behind a kept one on the worker
            behind = self._behind(self._kept[2]) if self._kept is not None else 0.0
            await self._consuming.call(lambda: self._stream.ack(msgs), self._bound + behind, "ack")

    def __repr__(self) -> str:
        return f"AsyncMsgStream({self._stream!r})"


class AsyncTimeTickStream(_AsyncStream[TimeTickStream]):
    """:class:`~msgstream.TimeTickStream` for asyncio: each ``await consume()`` returns one tick's pack."""

    _wraps = TimeTickStream

    @property
    def inner(self) -> MsgStream:
        """The sync MsgStream under the time-tick logic (as ``TimeTickStream.inner``)."""
        return self._stream.inner

    def lagging_channels(self) -> list[str]:
        """Channels with no pending tick while some other channel has one (what holds packs back)."""
        return self._stream.lagging_channels()

    @property
    def buffered(self) -> int:
        """Messages held across channels waiting for a tick."""
        return self._stream.buffered

    def __repr__(self) -> str:
        return f"AsyncTimeTickStream({self._stream!r})"


class AsyncClient:
    """:class:`~msgstream.Client` for asyncio: ``async with aio.connect(url) as client`` (or
    ``client = await aio.connect(url)``) opens the backend in a worker thread; channel calls are
    coroutines; ``msg_stream()`` and ``tt_msg_stream()`` return async streams. Closing the client closes
    the streams opened from it that are still open, then the backend."""

    def __init__(
        self, url: str | URL, options: dict[str, Any] | None = None, *, call_timeout: float = DEFAULT_CALL_TIMEOUT
    ) -> None:
        self._url = url if isinstance(url, URL) else URL(url)  # a malformed URL raises here
        self._options = dict(options or {})
        self._bound = _check_bound(call_timeout)
        self._client: Client | None = None
        self._worker = _Worker("msgstream-aio-client")
        self._streams: weakref.WeakSet[_AsyncStream[Any]] = weakref.WeakSet()
        self._closed = False
        # one open and one close for all callers, each run to its end by a task of its own: a caller
        # cancelled while it waits leaves no backend opened for nobody, and none left open
        self._opening: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._awaited = False  # the first ``await`` is the creator's (see _enter)

    @classmethod
    def from_client(cls, client: Client, *, call_timeout: float = DEFAULT_CALL_TIMEOUT) -> AsyncClient:
        """An AsyncClient over a sync client you opened yourself (it is closed with this one)."""
        made = cls(client.backend.url, call_timeout=call_timeout)
        made._client = client
        return made

    async def open(self) -> AsyncClient:
        """Load and open the backend (in a worker thread). ``async with`` and ``await`` call it."""
        if self._closed:
            raise StreamClosedError("client is closed")
        if self._client is None:
            if self._opening is None or self._opening.done():  # none yet, or one that failed: try again
                self._opening = asyncio.get_running_loop().create_task(self._open())
                self._opening.add_done_callback(_retrieve)
            await asyncio.shield(self._opening)
        return self

    async def _open(self) -> None:
        made = self._worker.submit(lambda: Client(load_backend(self._url, self._options)))
        done, _ = await asyncio.wait((made,), timeout=self._bound)
        if not done:  # what the constructor still opens would belong to nobody: it is closed once made
            made.add_done_callback(_close_abandoned)
            raise OperationTimeoutError(f"connect did not finish within {self._bound:g}s")
        self._client = made.result()

    async def _enter(self, owner: bool) -> AsyncClient:
        """``open()``; ``owner``: the caller holds the client's lifetime (``async with``, or the first
        ``await`` of a client ``connect`` made). If an owner is cancelled while the backend opens,
        what the open opens is closed rather than left to nobody."""
        try:
            return await self.open()
        except asyncio.CancelledError:
            if owner:
                self._begin_close()
            raise

    def __await__(self) -> Generator[Any, None, AsyncClient]:
        first, self._awaited = not self._awaited, True
        return self._enter(owner=first).__await__()

    @property
    def sync(self) -> Client:
        """The wrapped sync client (its calls block: not for use on the event loop)."""
        return self._opened()

    @property
    def backend(self) -> Backend:
        return self._opened().backend

    @property
    def url(self) -> str:
        """The backend URL with credentials masked."""
        return self._url.redacted()

    def _opened(self) -> Client:
        if self._closed:
            raise StreamClosedError("client is closed")
        if self._client is None:
            raise StreamStateError("client not open yet: use `async with aio.connect(url)` or `await aio.connect(url)`")
        return self._client

    async def _call(self, fn: Callable[[Client], T], what: str) -> T:
        await self.open()
        client = self._opened()
        return await self._worker.call(lambda: fn(client), self._bound, what)

    async def create_channels(self, request: CreateChannelRequest) -> list[str]:
        """Create ``request.num_channels`` channels owned by ``request.owner``; returns their names."""
        return await self._call(lambda c: c.create_channels(request), "create_channels")

    async def describe_channels(self, channel_ids: Sequence[str]) -> ChannelDescriptions:
        """Owner of each channel, in order; ``ChannelNotFoundError`` names the first unknown one."""
        return await self._call(lambda c: c.describe_channels(channel_ids), "describe_channels")

    async def destroy_channels(self, channel_ids: Sequence[str]) -> None:
        """Delete the channels with their messages, subscriptions and owner records (all or none)."""
        await self._call(lambda c: c.destroy_channels(channel_ids), "destroy_channels")

    async def ping(self, timeout: float = 5.0) -> None:
        """Return once the broker answers; ``BrokerUnavailableError`` within ``timeout`` otherwise."""
        await self._call(lambda c: c.ping(timeout), "ping")

    async def list_channels(self) -> list[str]:
        """The channels created through msgstream on this broker."""
        return await self._call(lambda c: c.list_channels(), "list_channels")

    async def list_subscriptions(self, channel: str) -> list[str]:
        """The subscriptions on ``channel``."""
        return await self._call(lambda c: c.list_subscriptions(channel), "list_subscriptions")

    async def drop_subscription(self, subscription: str, channels: Sequence[str]) -> None:
        """Remove the subscription's state on ``channels``: joining it again starts afresh."""
        await self._call(lambda c: c.drop_subscription(subscription, channels), "drop_subscription")

    def msg_stream(self, **options: Any) -> AsyncMsgStream:
        """A new :class:`AsyncMsgStream` (options: see :class:`~msgstream.MsgStream`)."""
        return self._track(AsyncMsgStream(self._opened().msg_stream(**options), call_timeout=self._bound))

    def tt_msg_stream(self, **options: Any) -> AsyncTimeTickStream:
        """A new :class:`AsyncTimeTickStream` (options: see :meth:`msgstream.Client.tt_msg_stream`)."""
        return self._track(AsyncTimeTickStream(self._opened().tt_msg_stream(**options), call_timeout=self._bound))

    def _track(self, stream: A) -> A:
        """``stream``, closed with this client if still open then."""
        self._streams.add(stream)
        return stream

    async def close(self) -> None:
        """Close the streams opened from this client that are still open (one whose acknowledgement
        fails is closed without it, and the failure logged), then the backend. Idempotent; once begun,
        the close runs to its end even if the caller is cancelled. If the backend's own close fails, its
        error is raised and calling close again tries that again."""
        closing = self._begin_close()
        if not closing.done():
            await asyncio.shield(closing)

    def _begin_close(self) -> asyncio.Task[None]:
        closing = self._closing
        if closing is None or (closing.done() and not closing.cancelled() and closing.exception() is not None):
            self._closed = True  # none begun yet, or one that failed: begin one
            closing = self._closing = asyncio.get_running_loop().create_task(self._close())
            closing.add_done_callback(_retrieve)
        return closing

    async def _close(self) -> None:
        if self._opening is not None:  # an open in flight: what it opens is closed here
            await asyncio.wait((self._opening,))  # its failure or cancellation is the opener's to see
        for stream in list(self._streams):
            try:
                await stream.close()
            except MsgStreamError as exc:
                log.warning("closing %r with its client: %s; closed without acknowledging", stream, exc)
                with contextlib.suppress(MsgStreamError):
                    await stream.close(acknowledge=False)
        if self._client is not None:  # if this fails, the worker stays for the next close
            await self._worker.call(self._client.close, self._bound, "close")
        self._worker.shutdown()

    async def __aenter__(self) -> AsyncClient:
        return await self._enter(owner=True)

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.url!r})"


def connect(url: str = "memory://", *, call_timeout: float = DEFAULT_CALL_TIMEOUT, **options: Any) -> AsyncClient:
    """An :class:`AsyncClient` on the backend registered for the URL's scheme; ``async with`` or
    ``await`` opens it. ``options`` go to the backend, as with :func:`msgstream.connect`;
    ``call_timeout`` bounds each call beyond its own timeout. A malformed URL raises
    ``InvalidURLError`` here, an unknown scheme ``BackendNotFoundError`` when opened."""
    return AsyncClient(url, options, call_timeout=call_timeout)


class _AsyncBroadcaster(Protocol):
    async def broadcast(self, pack: MsgPack) -> dict[str, list[bytes]]: ...


class Ticker:
    """:class:`msgstream.Ticker` for asyncio: broadcasts a ``TimeTickMsg`` into every producer channel.

    ``await tick(ts)`` sends one now; ``start(interval)`` sends one every ``interval`` seconds from a
    task until ``await stop()``; a failed broadcast ends the task and is raised by ``stop()`` (and kept in
    ``error``)."""

    def __init__(self, stream: _AsyncBroadcaster, *, clock: HybridClock | None = None, source_id: int = 0) -> None:
        self._stream = stream
        self.clock = clock or HybridClock()
        self._source_id = source_id
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    async def tick(self, ts: int | None = None) -> int:
        ts = self.clock.next() if ts is None else ts
        tick = TimeTickMsg(begin_ts=ts, end_ts=ts, source_id=self._source_id)
        await self._stream.broadcast(MsgPack(ts, ts, [tick]))
        return ts

    def start(self, interval: float) -> None:
        interval = check_interval(interval)
        if self._task is not None:
            raise InvalidArgumentError("ticker already started")
        self.error = None  # a failure of an earlier run was raised by its stop()
        self._task = asyncio.get_running_loop().create_task(self._run(interval), name="msgstream-ticker")

    async def _run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.tick()
            except Exception as exc:  # kept for stop()
                self.error = exc
                return

    async def stop(self, timeout: float = 5.0) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            done, _ = await asyncio.wait((task,), timeout=timeout)  # a cancel of the caller propagates
            if not done:
                raise OperationTimeoutError(f"the ticker's task did not end within {timeout:g}s")
        if self.error is not None:
            raise self.error
