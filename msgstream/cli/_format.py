"""What the CLI prints and reads: aligned tables, and messages as JSON lines (docs/cli.md).

A message is ``{"channel", "msg_id", "msg_type", "type", "begin_ts", "end_ts", "hash_values",
"properties", "body"}``. ``body`` holds the fields after the common header, which on the wire is
``begin_ts, end_ts, hash_values`` (docs/wire-format.md); the three header fields are top-level keys.
Values are ``msgspec.to_builtins`` of the fields: bytes as base64 strings, a nested struct declared
``array_like`` (``SegmentStats``) as an array of its fields in order, as on the wire. Reading a line
back, the message class (found by ``msg_type``) says which strings are bytes: ``msgspec.convert``
decodes them by the field annotations.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from ..errors import InvalidArgumentError
from ..messages import STOCK_TYPES, TsMsg
from ..values import Position

_HEADER = ("begin_ts", "end_ts", "hash_values")
_JSON = msgspec.json.Encoder()


def json_line(value: Any) -> str:
    """One JSON line (with its newline)."""
    return _JSON.encode(value).decode() + "\n"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Rows under ``headers``, columns padded to their widest cell; ``None`` shows as ``-``."""
    cells = [[str(h).upper() for h in headers]]
    cells += [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n" for row in cells)


def message_record(msg: TsMsg) -> dict[str, Any]:
    """A consumed message as tail --json prints it."""
    fields = msgspec.to_builtins(msgspec.structs.asdict(msg))
    pos = msg.position
    return {
        "channel": pos.channel if pos else "",
        "msg_id": pos.msg_id.hex() if pos else "",
        "msg_type": int(msg.msg_type),
        "type": type(msg).__name__,
        "begin_ts": fields["begin_ts"],
        "end_ts": fields["end_ts"],
        "hash_values": fields["hash_values"],
        "properties": dict(msg.properties),
        "body": {k: v for k, v in fields.items() if k not in _HEADER},
    }


def message_from_record(record: Any, types: dict[int, type[TsMsg]]) -> TsMsg:
    """The message a tail --json line describes; ``InvalidArgumentError`` saying what is wrong."""
    if not isinstance(record, dict):
        raise InvalidArgumentError(f"expected a JSON object, got {type(record).__name__}")
    msg_type = record.get("msg_type")
    if isinstance(msg_type, bool) or not isinstance(msg_type, int):
        raise InvalidArgumentError(f"msg_type must be an int, got {msg_type!r}")
    cls = types.get(msg_type)
    if cls is None:
        raise InvalidArgumentError(f"unknown msg_type {msg_type} (register user types with --dispatcher)")
    body = record.get("body", {})
    if not isinstance(body, dict):
        raise InvalidArgumentError(f"body must be a JSON object, got {type(body).__name__}")
    fields = msgspec.structs.fields(cls)
    known = {f.name for f in fields}
    extra = sorted(set(body) - known)
    if extra:
        raise InvalidArgumentError(f"{cls.__name__} has no field {extra[0]!r}")
    values: list[Any] = []  # array_like: the fields in order, as on the wire
    for f in fields:
        source = record if f.name in _HEADER else body
        if f.name in source:
            values.append(source[f.name])
        elif f.default is not msgspec.NODEFAULT:
            values.append(f.default)
        elif f.default_factory is not msgspec.NODEFAULT:
            values.append(f.default_factory())
        else:
            raise InvalidArgumentError(f"{cls.__name__} needs the field {f.name!r}")
    try:
        msg = msgspec.convert(values, cls)
    except msgspec.ValidationError as exc:
        raise InvalidArgumentError(f"{cls.__name__}: {exc}") from None
    properties = record.get("properties") or {}
    if properties:
        msg.properties = properties  # checked: str -> str
    try:  # what JSON holds and the wire cannot (an int beyond 64 bits) is refused here, with its line
        msg.marshal()
    except (OverflowError, msgspec.EncodeError) as exc:
        raise InvalidArgumentError(f"{cls.__name__}: {exc}") from None
    return msg


def message_types(extra: Iterable[type[TsMsg]] = ()) -> dict[int, type[TsMsg]]:
    """MsgType -> class for every ``TsMsg`` subclass defined so far (stock types, and user types the
    ``--dispatcher`` module imported); ``extra`` wins over them."""
    found: dict[int, type[TsMsg]] = {int(c.msg_type): c for c in STOCK_TYPES}
    todo = list(TsMsg.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if "msg_type" in cls.__dict__:  # a type of its own, not a subclass inheriting its parent's
            found.setdefault(int(cls.msg_type), cls)
    found.update({int(c.msg_type): c for c in extra})
    return found


def position_record(pos: Position) -> dict[str, Any]:
    """A latest position as positions --json prints it: the checkpoint is ``Position.to_bytes()``."""
    return {
        "channel": pos.channel,
        "msg_id": pos.msg_id.hex(),
        "checkpoint": base64.b64encode(pos.to_bytes()).decode(),
    }
