"""``TimeTickStream``: a decorator over any :class:`MsgStream` whose ``consume()`` returns the messages
of exactly one time tick, across all channels, in timestamp order. It imports no backend.

How it works (docs/architecture.md has the long form). Producers broadcast ``TimeTickMsg`` into every
channel; a tick ``t`` on a channel promises that no data message with ``end_ts <= t`` follows there.
Per channel the stream keeps, in arrival order, every message since that channel's checkpoint
(``log``) and the ticks above the last emitted one (``ticks``). Once every channel has a pending tick,
the smallest of them, ``T``, is complete: every data message with ``end_ts <= T`` on every channel has
arrived. The pack for ``T`` holds those not emitted yet (``end_ts`` above the previous tick), sorted by
``end_ts`` (stable, so channel order breaks ties).

Because of the promise above, a buffered message has been fully handled exactly when its ``end_ts`` is
at or below the last emitted tick. After a pack, each channel's log is popped while its head is such
a message; the last one popped is the channel's ``end_position`` (timestamp ``T``); what was popped is
acknowledged when the next ``consume``, ``seek`` or ``close`` runs.
``seek(end_positions)`` replays each channel from just after it and drops what is ``<= T`` until the
channel shows a tick above ``T`` — the replayed messages that were already emitted — so nothing is lost
or repeated even when a channel had delivered messages beyond the tick before the crash.
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

from .codec import UnmarshalDispatcher
from .errors import InvalidArgumentError, StreamClosedError, StreamStateError, TimeTickError
from .messages import TsMsg
from .pack import MsgPack, Position
from .repack import RepackFunc
from .stream import MsgStream, check_timeout, end_block, seek_targets
from .values import ChannelLag, SubscriptionPosition

__all__ = ["TimeTickStream"]

log = logging.getLogger("msgstream.timetick")
_END_TS = attrgetter("end_ts")


class _Channel:
    __slots__ = ("in_order", "last_tick", "log", "max_ts", "name", "position", "skip_upto", "ticks")

    def __init__(self, name: str) -> None:
        self.name = name
        self.log: list[TsMsg] = []  # every message since the checkpoint, in arrival order
        self.ticks: deque[int] = deque()  # pending tick values above the last emitted tick
        self.last_tick = 0  # highest tick seen on this channel
        self.position = Position(name, b"", 0)  # checkpoint: resume after this
        self.skip_upto: int | None = None  # after a seek: drop replayed messages <= this
        # whether the log's end_ts never decrease (the usual case): then what a tick covers is a prefix
        self.in_order = True
        self.max_ts = 0


def _broken_promise(m: TsMsg, ch: _Channel) -> TimeTickError:
    if m._is_tick:
        return TimeTickError(f"time tick went backwards on channel {ch.name!r}: {m.end_ts} after {ch.last_tick}")
    return TimeTickError(
        f"{type(m).__name__} with end_ts {m.end_ts} on channel {ch.name!r} is at or below the tick"
        f" {ch.last_tick} already passed there"
    )


class TimeTickStream:
    """Wraps a :class:`MsgStream`; each :meth:`consume` returns one tick's pack (see module doc).

    ``max_buffered``: most messages held across channels while waiting for a tick; past it
    ``consume`` raises ``TimeTickError`` naming the channels that have not ticked (instead of growing
    without bound behind a stalled channel). It must exceed the messages of one tick interval across
    all channels: a stream that reaches it stays at it (the tick it waits for is behind the messages it
    cannot take), so the remedy is a stream with a larger bound, or a seek. ``lag_warning_after``:
    seconds after which a channel that has not ticked while others have is named in a log warning
    (repeated at that interval).

    The wrapped stream's acknowledgements are taken over: the messages a returned pack covers are
    acknowledged when the next ``consume``, ``seek`` or ``close`` runs (not when a ``with`` block exits on
    an exception), so the subscription never skips a buffered message. An acknowledgement that fails is
    raised from that call and kept for the next one; the pack's data was delivered already.
    """

    def __init__(self, stream: MsgStream, *, max_buffered: int = 1_000_000, lag_warning_after: float = 10.0) -> None:
        if not isinstance(stream, MsgStream):
            raise InvalidArgumentError(f"TimeTickStream wraps a MsgStream, got {type(stream).__name__}")
        if isinstance(max_buffered, bool) or not isinstance(max_buffered, int) or max_buffered < 1:
            raise InvalidArgumentError(f"max_buffered must be a positive int, got {max_buffered!r}")
        if not isinstance(lag_warning_after, (int, float)) or not 0 < lag_warning_after < math.inf:
            raise InvalidArgumentError(f"lag_warning_after must be a positive number, got {lag_warning_after!r}")
        self._stream = stream
        self._max_buffered = max_buffered
        self._lag_after = float(lag_warning_after)
        self._channels: dict[str, _Channel] = {}
        self._order: list[_Channel] = []
        self._last_tick = 0
        self._buffered = 0
        self._lag_since: float | None = None
        self._lag_warned_at = 0.0
        # backend records of what returned packs covered, and of messages dropped, not yet acknowledged
        self._done: list[Any] = []
        self._in_hand = 0  # how many of _done (its end) the pack last returned covered

    @property
    def inner(self) -> MsgStream:
        return self._stream

    @property
    def buffered(self) -> int:
        """Messages held across channels waiting for a tick."""
        return self._buffered

    # -- set-up (delegated) ---------------------------------------------------------------------
    def create_consumers(
        self,
        subscription: str,
        channels: Sequence[str],
        dispatcher: UnmarshalDispatcher | None = None,
        position: SubscriptionPosition = SubscriptionPosition.EARLIEST,
    ) -> None:
        self._stream.create_consumers(subscription, channels, dispatcher, position)
        self._order = [_Channel(c) for c in self._stream.consumer_channels]
        self._channels = {c.name: c for c in self._order}

    def create_producers(self, channels: Sequence[str]) -> None:
        self._stream.create_producers(channels)

    def set_repack_func(self, repack: RepackFunc) -> None:
        self._stream.set_repack_func(repack)

    def start(self) -> None:
        self._stream.start()

    def produce(self, pack: MsgPack) -> dict[str, list[bytes]]:
        return self._stream.produce(pack)

    def broadcast(self, pack: MsgPack) -> dict[str, list[bytes]]:
        return self._stream.broadcast(pack)

    def get_latest_positions(self) -> list[Position]:
        return self._stream.get_latest_positions()

    # -- consuming ------------------------------------------------------------------------------
    def consume(self, timeout: float = 1.0) -> MsgPack | None:
        """The pack of the next complete tick, or ``None`` if none completed within ``timeout``.
        ``timeout=0`` still takes what the broker has ready. Raises ``TimeTickError`` instead of
        reading on once ``max_buffered`` messages are held (the rest stays on the broker). Messages that
        keep arriving without completing a tick do not hold it past ``timeout``: they stay buffered for
        the next call."""
        self._require_consumer()
        deadline = time.monotonic() + check_timeout(timeout, "timeout")
        self._ack_done()
        asked = False  # the stream was asked once: timeout=0 still takes one batch
        while True:
            pack = self._emit()
            if pack is not None:
                return pack
            if self._buffered >= self._max_buffered:
                raise TimeTickError(
                    f"{self._buffered} messages buffered (max_buffered={self._max_buffered}) waiting for a tick"
                    f" on {[ch.name for ch in self._order if not ch.ticks]}: those channels stalled, or one tick"
                    " interval holds more messages than max_buffered"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0 and asked:
                self._check_lag()
                return None
            asked = True
            got = self._stream.receive(max(0.0, remaining))  # no pack: this stream makes its own
            if got is not None:
                self._ingest(got)

    def _ingest(self, msgs: list[TsMsg]) -> None:
        """Buffer a batch. A message that breaks a tick invariant is acknowledged and dropped, the
        rest of the batch is kept, and the first such error is raised at the end."""
        channels = self._channels
        only = self._order[0] if len(self._order) == 1 else None  # a stream of one channel
        dropped: list[TsMsg] = []
        error: TimeTickError | None = None
        for m in msgs:
            ch = only or channels[m._raw.channel]
            ts = m.end_ts
            if ch.skip_upto is not None:
                if ts <= ch.skip_upto:  # replay of what the checkpoint already covers
                    dropped.append(m)
                    continue
                if m._is_tick:
                    ch.skip_upto = None
            if ts > ch.last_tick:
                if m._is_tick:
                    ch.last_tick = ts
                    ch.ticks.append(ts)
            elif ts < ch.last_tick or not m._is_tick:  # a repeated tick is kept, anything else dropped
                dropped.append(m)
                error = error or _broken_promise(m, ch)
                continue
            ch.log.append(m)
            if ts < ch.max_ts:
                ch.in_order = False
            else:
                ch.max_ts = ts
        self._buffered += len(msgs) - len(dropped)
        if dropped:  # acknowledged with the next pack's records
            self._done += [m._raw for m in dropped]
        if error is not None:
            raise error

    def _emit(self) -> MsgPack | None:
        order = self._order
        if not all(ch.ticks for ch in order):
            return None
        tick = min(ch.ticks[0] for ch in order)
        prev = self._last_tick
        data: list[TsMsg] = []
        done: list[Any] = []  # the backend records of what the pack covers, to acknowledge
        starts: list[Position] = []
        ends: list[Position] = []
        for ch in order:
            chlog = ch.log
            ticks = ch.ticks
            while ticks and ticks[0] <= tick:
                ticks.popleft()
            starts.append(ch.position)
            # the log's prefix at or below ``tick`` is handled now; in order, it holds the pack's data
            if ch.in_order:
                k = bisect_right(chlog, tick, key=_END_TS)
                covered = chlog[:k]
                data += [m for m in covered if m.end_ts > prev and not m._is_tick]
            else:  # data of (prev, tick] may sit behind a later message: scan up to the first tick
                for m in chlog:  # above ``tick`` (no data <= tick follows a tick > tick)
                    ts = m.end_ts
                    if ts > tick:
                        if m._is_tick:
                            break
                    elif ts > prev and not m._is_tick:
                        data.append(m)
                k = next((i for i, m in enumerate(chlog) if m.end_ts > tick), len(chlog))
                covered = chlog[:k]
            if k:
                del chlog[:k]
                done += [m._raw for m in covered]
                ch.position = Position(ch.name, covered[-1]._raw.msg_id, tick)
            elif ch.position.timestamp != tick:
                ch.position = Position(ch.name, ch.position.msg_id, tick)
            if not chlog:  # nothing left to be out of order with
                ch.in_order, ch.max_ts = True, 0
            ends.append(ch.position)
        self._buffered -= len(done)
        data.sort(key=_END_TS)
        self._last_tick = tick
        self._lag_since = None
        self._done += done
        self._in_hand = len(done)
        return MsgPack(prev, tick, data, starts, ends)

    def _ack_done(self) -> None:
        self._in_hand = 0  # the caller moved on: the pack it held is handled, whether or not this ack works
        if self._done:
            self._stream.ack(self._done)  # on failure they stay, and the next call tries again
            self._done = []

    def _require_consumer(self) -> None:
        if self._stream.closed:
            raise StreamClosedError("stream is closed")
        if not self._order:
            raise StreamStateError("no consumer: call create_consumers() first")

    def lagging_channels(self) -> list[str]:
        """Channels with no pending tick while some other channel has one (what holds packs back)."""
        waiting = [ch.name for ch in self._order if not ch.ticks]
        return waiting if len(waiting) < len(self._order) else []

    def _check_lag(self) -> None:
        lagging = self.lagging_channels()
        now = time.monotonic()
        if not lagging:
            self._lag_since = None
            return
        if self._lag_since is None:
            self._lag_since = now
        elif now - self._lag_since >= self._lag_after and now - self._lag_warned_at >= self._lag_after:
            self._lag_warned_at = now
            log.warning(
                "time-tick stream stalled for %.1fs: channel(s) %s have not ticked past %d while others have"
                " (%d messages buffered)",
                now - self._lag_since,
                ", ".join(lagging),
                self._last_tick,
                self._buffered,
            )

    def seek(self, positions: Sequence[Position]) -> None:
        """Resume after the pack whose ``end_positions`` these are: the next consume returns the next
        tick's messages. Pass every channel's position, as a pack's ``end_positions`` has them."""
        self._require_consumer()
        seek_targets(positions, list(self._channels))  # checked before anything moves
        self._ack_done()
        self._stream.seek(positions)
        for p in positions:
            ch = self._channels[p.channel]
            self._buffered -= len(ch.log)
            ch.log.clear()
            ch.ticks.clear()
            ch.position = p
            ch.last_tick = p.timestamp
            ch.skip_upto = p.timestamp
        self._last_tick = min(p.timestamp for p in positions) if positions else self._last_tick

    def lag(self) -> list[ChannelLag]:
        """As :meth:`MsgStream.lag`, counted from the last message each channel's packs covered (a
        message buffered here, waiting for its tick, is still behind)."""
        self._require_consumer()
        return self._stream.lag(after={ch.name: ch.position.msg_id for ch in self._order if ch.position.msg_id})

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self, *, acknowledge: bool = True) -> None:
        """Acknowledge what returned packs covered and close the wrapped stream. Messages buffered and
        not yet returned stay unacknowledged. If the acknowledgement fails, nothing is closed and the
        error is raised: call ``close()`` again, or ``close(acknowledge=False)`` to close without it."""
        if self._stream.closed:
            return
        if acknowledge:
            self._ack_done()
        self._stream.close(acknowledge=acknowledge)

    @property
    def closed(self) -> bool:
        return self._stream.closed

    def __enter__(self) -> TimeTickStream:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        end_block(self, failed=exc_type is not None)

    def _drop_in_hand(self) -> None:
        """Leave what the pack last returned covered (or the pack received and not handed over:
        msgstream.aio after a cancelled consume) unacknowledged, so the subscription delivers it again.
        Acknowledgements due from before it (a failed one, messages dropped as late) stay due."""
        del self._done[len(self._done) - self._in_hand :]
        self._in_hand = 0

    def _unreport(self) -> None:
        """See :meth:`MsgStream._unreport`: bad frames are reported by the inner stream."""
        self._stream._unreport()

    def __repr__(self) -> str:
        return f"TimeTickStream({self._stream!r}, last_tick={self._last_tick}, buffered={self._buffered})"
