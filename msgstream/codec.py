"""Frame decoding by MsgType: :class:`UnmarshalDispatcher` (Milvus's ``UnmarshalDispatcher``).

The frame format itself is defined with the messages (:mod:`msgstream.messages`) and documented in
docs/wire-format.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

from .errors import InvalidArgumentError, MsgStreamError, UnknownMsgTypeError, UnmarshalError
from .messages import HEADER_SIZE, STOCK_TYPES, TsMsg, decode_frame, plain_header, read_header

__all__ = ["Decode", "UnmarshalDispatcher"]

#: A decoder takes the whole frame (header included) and returns the message.
Decode = Callable[[bytes], TsMsg]


class UnmarshalDispatcher:
    """Turns frames into messages by their MsgType; starts with the seven stock types.

    It only reads after set-up, so one instance can be shared by any number of streams and threads.
    """

    def __init__(self) -> None:
        self._decoders: dict[int, Decode] = {}
        # fast path: the exact 8-byte header of a Struct type -> its msgspec decode (body only)
        self._by_header: dict[bytes, Callable[[Any], TsMsg]] = {}
        self._names: dict[bytes, str] = {}  # header -> class name, for error texts
        for cls in STOCK_TYPES:
            self.add_msg_template(cls.msg_type, cls)

    def add_msg_template(self, msg_type: int, decode: Union[type[TsMsg], Decode]) -> None:
        """Register how to decode ``msg_type``: a ``TsMsg`` subclass (decoded by the standard codec) or a
        function ``(frame: bytes) -> TsMsg``. A later registration for the same type replaces the
        earlier one. Exceptions a decode function raises reach callers as ``UnmarshalError``."""
        if isinstance(msg_type, bool) or not isinstance(msg_type, int) or not 0 < msg_type < 2**32:
            raise InvalidArgumentError(f"msg_type must be an int in 1..2**32-1, got {msg_type!r}")
        if isinstance(decode, type) and issubclass(decode, TsMsg):
            header = decode.prepare()  # the fast path's key: the only header of msg_type without flags
            if int(decode.msg_type) != int(msg_type):
                raise InvalidArgumentError(
                    f"{decode.__name__}.msg_type is {int(decode.msg_type)}, registered as {msg_type}"
                )
            self._decoders[int(msg_type)] = decode.decode_body
            self._by_header[header] = decode._decoder.decode
            self._names[header] = decode.__name__
        elif callable(decode) and not isinstance(decode, type):
            self._decoders[int(msg_type)] = _guarded(decode)
            self._by_header.pop(plain_header(int(msg_type)), None)
        else:
            raise InvalidArgumentError(f"decode must be a TsMsg subclass or a callable, got {decode!r}")

    def msg_types(self) -> list[int]:
        """The registered MsgType values."""
        return sorted(self._decoders)

    def unmarshal(self, data: bytes) -> TsMsg:
        """Decode one frame (one with properties takes the careful path). Raises ``UnmarshalError``
        for anything that is not a valid frame of a registered type (``UnknownMsgTypeError`` when only
        the type is unknown); never anything else."""
        try:
            decode = self._by_header.get(data[:HEADER_SIZE])
        except TypeError:  # not bytes (a memoryview slice is unhashable): the careful path decides
            decode = None
        if decode is None:
            return self._unmarshal_slow(data)
        try:  # small frames: copying the body is cheaper than a memoryview
            return decode(data[HEADER_SIZE:] if len(data) < 2048 else memoryview(data)[HEADER_SIZE:])
        except Exception as exc:  # decoding is pure: any failure (incl. bad UTF-8) is bad input
            name = self._names.get(data[:HEADER_SIZE], "?")
            raise UnmarshalError(f"corrupt {name} frame: {exc}", data=bytes(data)) from exc

    def _unmarshal_slow(self, data: bytes) -> TsMsg:
        msg_type, flags = read_header(data)  # raises UnmarshalError for anything that is not a v1 frame
        decode = self._decoders.get(msg_type)
        if decode is None:
            raise UnknownMsgTypeError(msg_type, data=bytes(data))
        return decode_frame(decode, data, flags)


def _guarded(decode: Decode) -> Decode:
    def decode_user(data: bytes) -> TsMsg:
        try:
            msg = decode(data)
        except MsgStreamError:
            raise
        except Exception as exc:  # a user decoder's failure is a bad frame, not a crash
            raise UnmarshalError(f"decoder {decode!r} failed: {exc!r}", data=bytes(data)) from exc
        if not isinstance(msg, TsMsg):
            raise UnmarshalError(f"decoder {decode!r} returned {type(msg).__name__}, not a TsMsg", data=bytes(data))
        return msg

    return decode_user
