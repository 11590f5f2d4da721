"""``FramePack``: what :meth:`MsgStream.consume_frames` returns: consumed messages still encoded.

Milvus made the same move (``ConsumeMsgPack`` of ``PackMsg``, unmarshalled on demand): a consumer that
routes, filters by type, forwards or counts messages should not pay for decoding every field of every
message. Decoding is the largest per-message cost of ``consume`` (docs/performance.md), so this is the
path to use when throughput matters and not every message is read; ``pack.unmarshal()`` gives the
ordinary ``MsgPack`` of typed messages when they are.

A pack is acknowledged exactly like a ``consume`` pack (``auto_ack``), whether or not it is unmarshalled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import msgspec

from .backend import RawMessage
from .codec import UnmarshalDispatcher
from .errors import UnmarshalError
from .messages import (
    HEADER_SIZE,
    PROPERTIES,
    Timestamp,
    TsMsg,
    check_header,
    frame_properties,
    read_header,
    set_record,
)
from .pack import MsgPack, Position, consumed_pack

__all__ = ["FramePack", "frame_properties", "frame_timestamps", "frame_type"]


class _Head(msgspec.Struct, array_like=True):
    """The common first fields of every frame body (docs/wire-format.md); the rest is skipped."""

    begin_ts: Timestamp = 0
    end_ts: Timestamp = 0


_HEAD = msgspec.msgpack.Decoder(_Head)


def frame_type(payload: bytes) -> int:
    """The MsgType in a frame's header, without decoding the body; ``UnmarshalError`` if ``payload``
    is not a msgstream frame. Only the header is read, so flag bits this reader does not know (which
    change what follows the header) do not matter here: a router can forward such frames."""
    return check_header(payload)


def frame_timestamps(payload: bytes) -> tuple[int, int]:
    """``(begin_ts, end_ts)`` of a frame, reading only the start of its body; ``UnmarshalError`` if the
    frame is not one, or has flag bits this reader does not know."""
    read_header(payload)
    start = HEADER_SIZE
    if payload[3] & PROPERTIES:  # skip the properties block
        start += 4 + int.from_bytes(payload[HEADER_SIZE : HEADER_SIZE + 4], "big")
    try:
        head = _HEAD.decode(memoryview(payload)[start:])
    except Exception as exc:  # decoding is pure: any failure is bad input
        raise UnmarshalError(f"corrupt frame header fields: {exc}", data=bytes(payload)) from exc
    return head.begin_ts, head.end_ts


def _timestamps(payload: bytes) -> tuple[int, int] | None:
    """:func:`frame_timestamps`, or ``None`` for a frame that cannot be read."""
    try:
        return frame_timestamps(payload)
    except UnmarshalError:
        return None


def _end_ts(payload: bytes) -> int:
    return (_timestamps(payload) or (0, 0))[1]


class FramePack:
    """Consumed messages as frames: ``frames`` is a list of :class:`~msgstream.RawMessage`
    ``(channel, msg_id, payload)``, in delivery order (per channel: channel order).

    Everything beyond the frames is computed when first asked for: ``start_positions`` /
    ``end_positions`` (as on a ``MsgPack``: seek to ``end_positions`` to resume after this pack),
    ``begin_ts`` / ``end_ts`` (from the frames' first fields; frames that cannot be read count as 0),
    and :meth:`unmarshal`.
    """

    __slots__ = ("_begin_end", "_dispatcher", "_positions", "frames")

    def __init__(self, frames: list[RawMessage], dispatcher: UnmarshalDispatcher) -> None:
        self.frames = frames
        self._dispatcher = dispatcher
        self._positions: tuple[list[Position], list[Position]] | None = None
        self._begin_end: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[RawMessage]:
        return iter(self.frames)

    @property
    def start_positions(self) -> list[Position]:
        """The first frame of each channel in this pack (inclusive: seeking to them replays the pack)."""
        return self._edges()[0]

    @property
    def end_positions(self) -> list[Position]:
        """The last frame of each channel in this pack: ``stream.seek(pack.end_positions)`` resumes after it."""
        return self._edges()[1]

    def _edges(self) -> tuple[list[Position], list[Position]]:
        if self._positions is None:
            first: dict[str, RawMessage] = {}
            last: dict[str, RawMessage] = {}
            for raw in self.frames:
                first.setdefault(raw.channel, raw)
                last[raw.channel] = raw
            self._positions = (
                [Position(r.channel, r.msg_id, _end_ts(r.payload), True) for r in first.values()],
                [Position(r.channel, r.msg_id, _end_ts(r.payload)) for r in last.values()],
            )
        return self._positions

    @property
    def begin_ts(self) -> int:
        return self._time_range()[0]

    @property
    def end_ts(self) -> int:
        return self._time_range()[1]

    def _time_range(self) -> tuple[int, int]:
        if self._begin_end is None:
            ranges = [r for raw in self.frames if (r := _timestamps(raw.payload)) is not None]
            self._begin_end = (min(b for b, _ in ranges), max(e for _, e in ranges)) if ranges else (0, 0)
        return self._begin_end

    def unmarshal(self, on_error: Callable[[UnmarshalError], None] | None = None) -> MsgPack:
        """Decode every frame with the stream's dispatcher into a ``MsgPack`` whose messages carry
        their ``position``. A frame that cannot be decoded raises ``UnmarshalError`` with its position,
        or, with ``on_error``, is handed to it and left out of the pack."""
        unmarshal = self._dispatcher.unmarshal
        msgs: list[TsMsg] = []
        for raw in self.frames:
            try:
                msg = unmarshal(raw.payload)
            except UnmarshalError as exc:
                exc.with_position(Position(raw.channel, raw.msg_id, 0))
                if on_error is None:
                    raise
                on_error(exc)
                continue
            set_record(msg, raw)
            msgs.append(msg)
        return consumed_pack(msgs) if msgs else MsgPack(0, 0, [])

    def __repr__(self) -> str:
        channels = sorted({r.channel for r in self.frames})
        return f"FramePack({len(self.frames)} frames, channels={channels})"
