"""Typed, timestamped messages (``TsMsg``) and their frame encoding.

Every message is a ``msgspec.Struct``: keyword construction, equality by value, and one C call to
encode or decode. A frame is an 8-byte header (magic ``MS``, version, flags, MsgType) followed by a
MessagePack array of the message's fields in declaration order, the first three always ``begin_ts``,
``end_ts`` and ``hash_values`` (docs/wire-format.md). ``position`` is set on consumed messages; it is
not part of the encoding or of equality.

``properties`` (str -> str) travel outside the body: a frame that has some sets the ``PROPERTIES`` flag
bit and carries them, length-prefixed, between the header and the body, so a frame without properties
has flags 0 and no block, and decoding it does no extra work.
"""

from __future__ import annotations

import enum
import inspect
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, TypeVar

import msgspec

from .errors import InvalidArgumentError, UnknownMsgTypeError, UnmarshalError
from .values import Position, RawMessage

__all__ = [
    "DeleteMsg",
    "InsertMsg",
    "MsgType",
    "SearchMsg",
    "SearchResultMsg",
    "SegStatisticsMsg",
    "SegmentStats",
    "TimeSyncMsg",
    "TimeTickMsg",
    "TsMsg",
]

MAGIC = b"MS"
VERSION = 1
HEADER = struct.Struct(">2sBBI")  # magic, version, flags, msg_type
HEADER_SIZE = HEADER.size


def plain_header(msg_type: int) -> bytes:
    """The frame header of a message of ``msg_type`` without properties (flags 0)."""
    return HEADER.pack(MAGIC, VERSION, 0, msg_type)


#: flag bit: a properties block (uint32 length, then a MessagePack map of str -> str) follows the header
PROPERTIES = 0x01
KNOWN_FLAGS = PROPERTIES
_LENGTH = struct.Struct(">I")
_MAX_PROPERTIES = 2**24 - 1  # the length's first byte is 0: no array to a reader that does not know properties
#: a hybrid timestamp: an unsigned 64-bit int (msgpack carries at most 2**64 - 1)
Timestamp = Annotated[int, msgspec.Meta(ge=0)]
_HEADER_FIELDS = ("begin_ts", "end_ts", "hash_values")

_ENCODER = msgspec.msgpack.Encoder()
_PROPERTIES_DECODER = msgspec.msgpack.Decoder(dict[str, str])
#: ``encode_body_into(msg, buffer)``: the body of a frame (the message's fields, without the header)
#: into a bytearray, for the core's produce path
encode_body_into = _ENCODER.encode_into

T = TypeVar("T", bound="TsMsg")


class MsgType(enum.IntEnum):
    """The stock message types (Milvus's values). User types pick other integers."""

    INSERT = 400
    DELETE = 401
    SEARCH = 500
    SEARCH_RESULT = 1000
    SEG_STATISTICS = 1100
    TIME_TICK = 1200
    TIME_SYNC = 1201


class _Consumed:
    """The slot a consumed message keeps its backend record in (``RawMessage``), for ``position``
    and acknowledgement. A slot, not a field: never encoded, not part of equality, unset on a message
    that was not consumed. A slot rather than an entry in ``__dict__`` because the consuming stream
    sets it on every message, and a ``__dict__`` made per message costs more."""

    __slots__ = ("_raw",)
    if TYPE_CHECKING:  # for type checkers only: msgspec reads the annotations of every base class
        _raw: RawMessage
        _props: dict[str, str] | None  # TsMsg's properties (a class default, see there)


#: ``set_record(msg, raw)``: fill the slot through its descriptor, so a frozen message type, or one with
#: a ``__setattr__`` of its own, is consumed like any other
set_record: Callable[[TsMsg, RawMessage], None] = _Consumed.__dict__["_raw"].__set__


def _get_properties(self: TsMsg) -> dict[str, str]:
    """This message's properties (str -> str); ``{}`` when it has none. The dict may be changed in
    place; marshal and produce check that it still maps str to str."""
    props = self._props
    if props is None:
        self._props = props = {}
    return props


def _set_properties(self: TsMsg, value: dict[str, str]) -> None:
    self._props = checked_properties(value)


_new_struct = msgspec.StructMeta.__call__


class _TsMsgMeta(msgspec.StructMeta):
    """Takes the ``properties`` keyword, which is not a field (fields are the body on the wire)."""

    def __call__(cls, /, *args: Any, **kwargs: Any) -> Any:
        if "properties" not in kwargs:
            return _new_struct(cls, *args, **kwargs)
        properties = kwargs.pop("properties")
        msg = _new_struct(cls, *args, **kwargs)
        if properties:
            msg._props = checked_properties(properties)
        return msg


def checked_properties(properties: object) -> dict[str, str]:
    """A copy of ``properties`` if it is a mapping of str to str, else ``InvalidArgumentError``."""
    if not isinstance(properties, dict):
        raise InvalidArgumentError(f"properties must be a dict of str to str, got {type(properties).__name__}")
    for key, value in properties.items():
        if type(key) is not str or type(value) is not str:
            raise InvalidArgumentError(
                f"properties must map str to str, got {key!r}: {value!r} ({type(key).__name__}: {type(value).__name__})"
            )
    return dict(properties)


class TsMsg(  # noqa: PLW1641 (unhashable, as every mutable Struct)
    msgspec.Struct, _Consumed, array_like=True, kw_only=True, dict=True, metaclass=_TsMsgMeta
):
    """Base of every message: a time range and the hash values the repack function routes by.

    A user type subclasses it with ``kw_only=True`` and a ``msg_type`` class attribute::

        class FlushMsg(ms.TsMsg, kw_only=True):
            msg_type = 2000
            segment_ids: list[int] = []

    and is registered on a dispatcher with ``dispatcher.add_msg_template(2000, FlushMsg)``.

    ``properties`` (keyword ``properties={"tenant": "t1"}``, attribute ``m.properties``, ``{}`` by
    default) are string pairs carried on the wire next to the body, not in it; they take part in
    equality and show in the repr when there are any. ``properties`` is not a field: a subclass
    cannot declare one.
    """

    msg_type: ClassVar[int] = 0
    #: ``isinstance(m, TimeTickMsg)``, read as an attribute: the time-tick stream asks it of every
    #: message, and ``isinstance`` against a Struct class (one with a metaclass) is a slow call
    _is_tick: ClassVar[bool] = False
    if TYPE_CHECKING:  # type checkers see the constructor keyword as a field; it is not one (no body slot)
        properties: dict[str, str] = {}
    _frame_header: ClassVar[bytes] = b""
    _decoder: ClassVar[msgspec.msgpack.Decoder[Any]]

    begin_ts: Timestamp = 0
    end_ts: Timestamp = 0
    hash_values: list[int] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "properties" in inspect.get_annotations(cls):
            raise TypeError(f"{cls.__name__}: the field name properties is taken (TsMsg.properties)")
        cls._frame_header = b""  # each type builds its own on first use (prepare); never inherit one

    @classmethod
    def prepare(cls) -> bytes:
        """Check the class can travel and build its frame header and decoder (done once, lazily).

        msgspec fills in a Struct's fields only after ``__init_subclass__`` has run, so this cannot
        happen at class creation; the dispatcher calls it on registration, :meth:`marshal` on first use.
        """
        header = cls._frame_header
        if header:
            return header
        if "_raw" in cls.__struct_fields__:
            raise TypeError(f"{cls.__name__}: the field name _raw is taken (a consumed message's record)")
        if "properties" in cls.__struct_fields__ or "_props" in cls.__struct_fields__:
            raise TypeError(f"{cls.__name__}: the field name properties is taken (TsMsg.properties)")
        if cls.__struct_fields__[:3] != _HEADER_FIELDS:
            raise TypeError(
                f"{cls.__name__}: declare TsMsg subclasses with kw_only=True so that begin_ts, end_ts and"
                f" hash_values stay the first fields on the wire (got {cls.__struct_fields__[:3]})"
            )
        msg_type = int(cls.msg_type)
        if not 0 < msg_type < 2**32:
            raise TypeError(f"{cls.__name__}.msg_type must be an integer in 1..2**32-1, got {cls.msg_type!r}")
        cls._decoder = msgspec.msgpack.Decoder(cls)
        cls._frame_header = header = plain_header(msg_type)
        return header

    if not TYPE_CHECKING:
        properties = property(_get_properties, _set_properties)

    def __eq__(self, other: object) -> bool:
        same = _struct_eq(self, other)
        if same is True:
            return (self._props or None) == (other._props or None)  # type: ignore[attr-defined]
        return same

    def __ne__(self, other: object) -> bool:
        same = self.__eq__(other)
        return same if same is NotImplemented else not same

    def __repr__(self) -> str:
        text: str = _struct_repr(self)
        if self._props:
            text = f"{text[:-1]}, properties={self._props!r})"
        return text

    # -- Milvus's TsMsg interface -------------------------------------------------------------
    def set_ts(self, ts: int) -> None:
        """Stamp the message: ``begin_ts = end_ts = ts``."""
        self.begin_ts = ts
        self.end_ts = ts

    @property
    def position(self) -> Position | None:
        """Where this message was read from; ``None`` until it is consumed."""
        raw: RawMessage | None = getattr(self, "_raw", None)  # set by the consuming stream
        if raw is None:
            return None
        return Position(raw.channel, raw.msg_id, self.end_ts)

    def marshal(self) -> bytes:
        """The frame bytes of this message (docs/wire-format.md)."""
        frame = (self._frame_header or self.prepare()) + _ENCODER.encode(self)
        if self._props:
            return with_properties(frame, self._props)
        return frame

    @classmethod
    def unmarshal(cls: type[T], data: bytes) -> T:
        """Decode a frame of exactly this type; see :class:`msgstream.UnmarshalDispatcher` for any type."""
        msg_type, flags = read_header(data)
        if msg_type != cls.msg_type:
            raise UnknownMsgTypeError(msg_type, data=bytes(data))
        return decode_frame(cls.decode_body, data, flags)

    @classmethod
    def decode_body(cls: type[T], data: bytes) -> T:
        """Decode the body of a frame without properties (flags 0) whose header was already checked."""
        cls.prepare()
        try:
            msg: T = cls._decoder.decode(memoryview(data)[HEADER_SIZE:])
        except Exception as exc:  # decoding is pure: any failure (incl. bad UTF-8) is bad input
            raise UnmarshalError(f"corrupt {cls.__name__} frame: {exc}", data=bytes(data)) from exc
        return msg


#: the properties, or None for none: an instance attribute only on messages that have some (in their
#: ``__dict__``), so a message without them costs one attribute read on encode and nothing on decode.
#: Set here, not in the class body, where msgspec and type checkers would take it for a field.
TsMsg._props = None

_struct_eq = msgspec.Struct.__eq__
_struct_repr = msgspec.Struct.__repr__


def with_properties(frame: bytes | bytearray, props: dict[str, str]) -> bytes:
    """``frame`` (without properties) with the ``PROPERTIES`` flag set and ``props`` after its header.
    ``InvalidArgumentError`` unless ``props`` maps str to str."""
    for key, value in props.items():
        if type(key) is not str or type(value) is not str:
            checked_properties(props)  # raises, naming the pair
    block = _ENCODER.encode(props)
    if len(block) > _MAX_PROPERTIES:
        raise InvalidArgumentError(f"properties take {len(block)} bytes encoded; at most {_MAX_PROPERTIES}")
    flags = bytes((frame[3] | PROPERTIES,))
    return b"".join((frame[:3], flags, frame[4:HEADER_SIZE], _LENGTH.pack(len(block)), block, frame[HEADER_SIZE:]))


def split_properties(data: bytes | bytearray | memoryview) -> tuple[dict[str, str], bytes]:
    """``(properties, frame without them)`` for a frame with the ``PROPERTIES`` flag set; the frame
    returned has flags 0 and the same body. ``UnmarshalError`` if the block is cut short or not a map
    of str to str."""
    end = HEADER_SIZE + _LENGTH.size
    if len(data) < end:
        raise UnmarshalError("truncated frame: properties flag set but no properties length", data=bytes(data))
    (size,) = _LENGTH.unpack_from(data, HEADER_SIZE)
    if len(data) < end + size:
        raise UnmarshalError(f"truncated frame: properties block of {size} bytes cut short", data=bytes(data))
    try:
        props = _PROPERTIES_DECODER.decode(memoryview(data)[end : end + size])
    except Exception as exc:  # decoding is pure: any failure is bad input
        raise UnmarshalError(f"corrupt frame properties: {exc}", data=bytes(data)) from exc
    head = bytes(data[:HEADER_SIZE])
    plain = b"".join((head[:3], bytes((head[3] & ~PROPERTIES,)), head[4:], data[end + size :]))
    return props, plain


def decode_frame(decode: Callable[[bytes], T], data: bytes, flags: int) -> T:
    """``decode(data)``, ``flags`` read from its header; a frame with properties is decoded without them."""
    if not flags & PROPERTIES:
        return decode(data)
    props, plain = split_properties(data)
    msg = decode(plain)
    msg._props = props
    return msg


def frame_properties(payload: bytes) -> dict[str, str]:
    """The properties of a frame (``{}`` if it has none), without decoding its body; ``UnmarshalError``
    if ``payload`` is not a msgstream frame."""
    read_header(payload)
    if not payload[3] & PROPERTIES:
        return {}
    return split_properties(payload)[0]


def read_header(data: bytes) -> tuple[int, int]:
    """Validate a frame header and return ``(msg_type, flags)``; flag bits this reader does not know
    (any but ``PROPERTIES``) raise ``UnmarshalError``: they would change the layout after the header."""
    msg_type = check_header(data)
    flags = data[3]
    if flags & ~KNOWN_FLAGS:
        raise UnmarshalError(
            f"frame has unknown flag bits {flags:#04x} (this reader knows {KNOWN_FLAGS:#04x})", data=bytes(data)
        )
    return msg_type, flags


def check_header(data: bytes) -> int:
    """Validate a frame header and return its MsgType."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UnmarshalError(f"a frame must be bytes, got {type(data).__name__}")
    if len(data) < HEADER_SIZE:
        raise UnmarshalError(f"truncated frame: {len(data)} bytes, header needs {HEADER_SIZE}", data=bytes(data))
    magic, version, _flags, msg_type = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise UnmarshalError(
            f"not a msgstream frame (magic {magic!r}, version {version}; want {MAGIC!r} v{VERSION})",
            data=bytes(data),
        )
    return int(msg_type)


class InsertMsg(TsMsg, kw_only=True):
    """Rows to insert (Milvus ``InsertRequest``); ``hash_values``, ``row_ids``, ``timestamps`` and
    ``row_data`` run in parallel, one entry per row."""

    msg_type = MsgType.INSERT
    collection_name: str = ""
    partition_name: str = ""
    segment_id: int = 0
    channel_id: str = ""
    row_ids: list[int] = []
    timestamps: list[int] = []
    row_data: list[bytes] = []


class DeleteMsg(TsMsg, kw_only=True):
    """Rows to delete by primary key (Milvus ``DeleteRequest``); one hash value per key."""

    msg_type = MsgType.DELETE
    collection_name: str = ""
    partition_name: str = ""
    primary_keys: list[int | str] = []
    timestamps: list[int] = []


class SearchMsg(TsMsg, kw_only=True):
    """A search request (Milvus ``SearchRequest``): the query, its placeholder vectors and where to answer."""

    msg_type = MsgType.SEARCH
    req_id: int = 0
    db_name: str = ""
    collection_name: str = ""
    partition_names: list[str] = []
    dsl: str = ""
    placeholder_group: bytes = b""
    result_channel_id: str = ""
    travel_timestamp: int = 0
    guarantee_timestamp: int = 0


class SearchResultMsg(TsMsg, kw_only=True):
    """Results of a search (Milvus ``SearchResults``): status, and one serialized hit blob per query."""

    msg_type = MsgType.SEARCH_RESULT
    req_id: int = 0
    status_code: int = 0
    reason: str = ""
    result_channel_id: str = ""
    metric_type: str = ""
    hits: list[bytes] = []


class SegmentStats(msgspec.Struct, array_like=True, kw_only=True):
    """One segment's statistics update (Milvus ``SegmentStatisticsUpdates``)."""

    segment_id: int = 0
    memory_size: int = 0
    num_rows: int = 0
    create_time: int = 0
    end_time: int = 0
    is_new_segment: bool = False


class SegStatisticsMsg(TsMsg, kw_only=True):
    """Segment statistics reported by a data node (Milvus ``SegmentStatistics``)."""

    msg_type = MsgType.SEG_STATISTICS
    seg_stats: list[SegmentStats] = []


class TimeTickMsg(TsMsg, kw_only=True):
    """ "No message with ``end_ts <=`` this tick will follow on this channel." The tick is ``end_ts``."""

    msg_type = MsgType.TIME_TICK
    _is_tick = True
    source_id: int = 0


class TimeSyncMsg(TsMsg, kw_only=True):
    """A peer's time-sync report (Milvus ``TimeSyncMsg``)."""

    msg_type = MsgType.TIME_SYNC
    peer_id: int = 0
    timestamp: int = 0


STOCK_TYPES: tuple[type[TsMsg], ...] = (
    InsertMsg,
    DeleteMsg,
    SearchMsg,
    SearchResultMsg,
    SegStatisticsMsg,
    TimeTickMsg,
    TimeSyncMsg,
)

for _cls in STOCK_TYPES:
    _cls.prepare()
