"""Value types that travel with messages: :class:`Position` and :class:`MsgPack`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import msgspec

from .errors import UnmarshalError

if TYPE_CHECKING:
    from .messages import TsMsg

__all__ = ["MsgPack", "Position"]

_POSITION_MAGIC = b"MSP\x01"


class Position(msgspec.Struct, frozen=True, array_like=True):
    """Where a message sits on its channel.

    ``msg_id`` is the backend's message id (opaque bytes); ``b""`` means "before the first message"
    (an empty channel's latest position), so seeking to it resumes from the channel's start.
    ``timestamp`` is the message's ``end_ts`` (for a time-tick pack: the tick); 0 when unknown.
    """

    channel: str
    msg_id: bytes
    timestamp: int = 0

    def to_bytes(self) -> bytes:
        """Serialise for a checkpoint; :meth:`from_bytes` reads it back (format in docs/wire-format.md)."""
        return _POSITION_MAGIC + _ENCODER.encode(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> Position:
        """Parse :meth:`to_bytes` output; anything else raises :class:`~msgstream.errors.UnmarshalError`."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UnmarshalError(f"Position.from_bytes needs bytes, got {type(data).__name__}")
        if bytes(data[:4]) != _POSITION_MAGIC:
            raise UnmarshalError("not a msgstream position (bad magic or version)", data=bytes(data))
        try:
            return _DECODER.decode(memoryview(data)[4:])
        except Exception as exc:  # decoding is pure: any failure (incl. bad UTF-8) is bad input
            raise UnmarshalError(f"corrupt position: {exc}", data=bytes(data)) from exc

    def __repr__(self) -> str:
        return f"Position(channel={self.channel!r}, msg_id={self.msg_id.hex()!r}, timestamp={self.timestamp})"


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Position)


class MsgPack(msgspec.Struct):
    """A batch of messages with its time range and, once consumed, its positions.

    ``start_positions`` / ``end_positions`` hold one position per channel the pack touched: the first
    and the last message of that channel in the pack. ``stream.seek(pack.end_positions)`` on a fresh
    stream resumes right after this pack.
    """

    begin_ts: int
    end_ts: int
    msgs: list[TsMsg]
    start_positions: list[Position] = []
    end_positions: list[Position] = []

    @classmethod
    def of(cls, msgs: Sequence[TsMsg]) -> MsgPack:
        """A pack whose time range spans its messages (``0, 0`` when empty)."""
        msgs = list(msgs)
        if not msgs:
            return cls(0, 0, msgs)
        return cls(min(m.begin_ts for m in msgs), max(m.end_ts for m in msgs), msgs)


def consumed_pack(msgs: list[TsMsg], one_channel: bool = False) -> MsgPack:
    """The pack of consumed messages (each carrying its backend record): time range, first and last
    position per channel. ``one_channel``: the messages all come from one channel (a consumer of one),
    so the first and the last message are the positions, without a look at each message."""
    firsts: Iterable[TsMsg] = [msgs[0]]
    lasts: Iterable[TsMsg] = [msgs[-1]]
    if not one_channel:
        first: dict[str, TsMsg] = {}
        last: dict[str, TsMsg] = {}
        for m in msgs:
            ch = m._raw.channel
            if ch not in first:
                first[ch] = m
            last[ch] = m
        firsts, lasts = first.values(), last.values()
    begin = min([m.begin_ts for m in msgs])
    end = max([m.end_ts for m in msgs])
    return MsgPack(begin, end, msgs, _positions(firsts), _positions(lasts))


def _positions(msgs: Iterable[TsMsg]) -> list[Position]:
    out = []
    for m in msgs:
        raw = m._raw
        out.append(Position(raw.channel, raw.msg_id, m.end_ts))
    return out
