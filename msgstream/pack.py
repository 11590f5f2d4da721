"""Packs of messages: :class:`MsgPack` (``Position`` lives in :mod:`msgstream.values`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import msgspec

from .values import Position

if TYPE_CHECKING:
    from .messages import TsMsg

__all__ = ["MsgPack", "Position"]


class MsgPack(msgspec.Struct):
    """A batch of messages with its time range and, once consumed, its positions.

    ``start_positions`` / ``end_positions`` hold one position per channel the pack touched: the first
    (inclusive) and the last message of that channel in the pack. ``stream.seek(pack.end_positions)``
    resumes right after this pack; ``stream.seek(pack.start_positions)`` replays it.
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
    return MsgPack(begin, end, msgs, _positions(firsts, True), _positions(lasts, False))


def _positions(msgs: Iterable[TsMsg], inclusive: bool) -> list[Position]:
    return [Position(m._raw.channel, m._raw.msg_id, m.end_ts, inclusive) for m in msgs]
