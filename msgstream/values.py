"""The value types every layer shares: :class:`Position` (where a message sits on its channel),
:class:`RawMessage` (a message as a backend delivers it), :class:`SubscriptionPosition` and
:class:`ChannelLag`. This module imports nothing of msgstream but its errors."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import Any

import msgspec

from .errors import UnmarshalError

__all__ = ["ChannelLag", "Position", "RawMessage", "SubscriptionPosition"]

_POSITION_MAGIC = b"MSP\x01"


class Position(msgspec.Struct, frozen=True, array_like=True):
    """Where a message sits on its channel.

    ``msg_id`` is the backend's message id (opaque bytes); ``b""`` means "before the first message"
    (an empty channel's latest position), so seeking to it resumes from the channel's start.
    ``timestamp`` is the message's ``end_ts`` (for a time-tick pack: the tick); 0 when unknown.
    ``inclusive``: seeking to this position resumes *at* its message (delivered again) rather than
    right after it; a plain pack's ``start_positions`` are inclusive, so seeking to them replays the pack.
    """

    channel: str
    msg_id: bytes
    timestamp: int = 0
    inclusive: bool = False

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
        at = ", inclusive=True" if self.inclusive else ""
        return f"Position(channel={self.channel!r}, msg_id={self.msg_id.hex()!r}, timestamp={self.timestamp}{at})"


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Position)


class SubscriptionPosition(enum.Enum):
    """Where a subscription seen for the first time starts; an existing one resumes where it was."""

    EARLIEST = "earliest"
    LATEST = "latest"


class RawMessage(msgspec.Struct, frozen=True, gc=False):
    """One message as a backend delivers it: ``RawMessage(channel, msg_id, payload)``.

    Immutable, hashable, compared field by field, and unpacked like the 3-tuple it stands for
    (``channel, msg_id, payload = raw``; ``raw[2]``). It is a C-level struct, not a NamedTuple, because
    a backend builds one per message on the consume hot path: it is cheaper to build than a NamedTuple
    and not tracked by the garbage collector (it holds only a str and two bytes, so it can be in no
    reference cycle). In hot loops read the attributes: unpacking goes through a Python-level
    ``__iter__``. It is not a ``tuple`` instance and does not equal one.
    """

    channel: str
    msg_id: bytes
    payload: bytes

    def __iter__(self) -> Iterator[Any]:
        return iter((self.channel, self.msg_id, self.payload))

    def __getitem__(self, index: int) -> Any:
        return (self.channel, self.msg_id, self.payload)[index]

    def __len__(self) -> int:
        return 3


class ChannelLag(msgspec.Struct, frozen=True, array_like=True):
    """How far a consumer is behind on one channel: ``ChannelLag(channel, messages, seconds)``.

    ``messages``: the messages on the channel after the last one the stream returned (before it returned
    any: after the subscription's acknowledged position); ``None`` where the broker cannot count them.
    ``seconds``: the physical time between the newest message's ``end_ts`` and the ``end_ts`` of the last
    message returned (before any: of the last one acknowledged, else of the oldest not acknowledged); 0.0
    when nothing is behind, ``None`` where the messages cannot be read back. docs/operations.md has the
    rules per backend.
    """

    channel: str
    messages: int | None
    seconds: float | None
