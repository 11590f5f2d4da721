"""``SubclassOf``: ``isinstance`` for hot loops over messages and records."""

from __future__ import annotations


class SubclassOf(dict[type, bool]):
    """``kinds[type(x)]`` is ``isinstance(x, base)``, worked out once per type.

    msgspec Struct classes (every message type, ``RawMessage``) have a metaclass, so ``isinstance``
    against one goes through the generic ``type.__instancecheck__``, several times the cost of a dict
    hit. Loops that ask it once or twice a message (the time-tick stream's buffering and emitting,
    ``MsgStream.ack``) use this instead. It holds the types it has seen.
    """

    __slots__ = ("base",)

    def __init__(self, base: type) -> None:
        super().__init__()
        self.base = base

    def __missing__(self, cls: type) -> bool:
        answer = self[cls] = issubclass(cls, self.base)
        return answer
