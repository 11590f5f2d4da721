"""Repack functions: how :meth:`MsgStream.produce` routes messages to channels.

A repack function is ``f(msgs, hash_keys) -> dict[int, MsgPack]``: ``hash_keys[i]`` lists the channel
indexes of ``msgs[i]`` (each of its ``hash_values`` modulo the number of channels); the result maps a
channel index to the pack sent there. The stream checks the result before anything is sent.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from .errors import RepackError
from .messages import DeleteMsg, InsertMsg, TsMsg
from .pack import MsgPack

__all__ = ["RepackFunc", "all_keys", "default", "hash_primary_key", "insert_delete"]

RepackFunc = Callable[[Sequence[TsMsg], Sequence[Sequence[int]]], dict[int, MsgPack]]


def default(msgs: Sequence[TsMsg], hash_keys: Sequence[Sequence[int]]) -> dict[int, MsgPack]:
    """Message ``i`` goes whole to channel ``hash_keys[i][0]`` (its first hash value)."""
    buckets: dict[int, list[TsMsg]] = {}
    for i, keys in enumerate(hash_keys):
        if not keys:
            raise RepackError(f"message {i} ({type(msgs[i]).__name__}) has no hash_values to route by")
        bucket = buckets.get(keys[0])
        if bucket is None:
            buckets[keys[0]] = [msgs[i]]
        else:
            bucket.append(msgs[i])
    return {key: MsgPack.of(bucket) for key, bucket in buckets.items()}


def all_keys(msgs: Sequence[TsMsg], hash_keys: Sequence[Sequence[int]]) -> dict[int, MsgPack]:
    """Message ``i`` goes whole to every channel among ``hash_keys[i]`` (each once). To reach every
    channel of the stream regardless of hash values, use :meth:`MsgStream.broadcast`."""
    buckets: dict[int, list[TsMsg]] = {}
    for i, keys in enumerate(hash_keys):
        if not keys:
            raise RepackError(f"message {i} ({type(msgs[i]).__name__}) has no hash_values to route by")
        for key in dict.fromkeys(keys):
            buckets.setdefault(key, []).append(msgs[i])
    return {key: MsgPack.of(bucket) for key, bucket in buckets.items()}


def insert_delete(msgs: Sequence[TsMsg], hash_keys: Sequence[Sequence[int]]) -> dict[int, MsgPack]:
    """Milvus's insert/delete routing: each *row* goes to the channel of its own hash value.

    An ``InsertMsg`` is split by row (``hash_values``, ``row_ids``, ``timestamps`` and ``row_data``
    must be parallel), a ``DeleteMsg`` by primary key (``hash_values``, ``primary_keys``,
    ``timestamps``); each channel gets one message holding its rows in their original order, with
    ``begin_ts``/``end_ts`` spanning its rows' timestamps. Other messages are routed as :func:`default`.
    Compute row hash values with :func:`hash_primary_key` so every producer agrees.
    """
    buckets: dict[int, list[TsMsg]] = {}
    for i, (msg, keys) in enumerate(zip(msgs, hash_keys, strict=True)):
        if isinstance(msg, (InsertMsg, DeleteMsg)):
            for key, part in _split_rows(i, msg, keys):
                buckets.setdefault(key, []).append(part)
        else:
            if not keys:
                raise RepackError(f"message {i} ({type(msg).__name__}) has no hash_values to route by")
            buckets.setdefault(keys[0], []).append(msg)
    return {key: MsgPack.of(bucket) for key, bucket in buckets.items()}


def _split_rows(i: int, msg: InsertMsg | DeleteMsg, keys: Sequence[int]) -> list[tuple[int, TsMsg]]:
    if isinstance(msg, InsertMsg):
        columns: dict[str, list[object]] = {"row_ids": list(msg.row_ids), "timestamps": list(msg.timestamps)}
        if msg.row_data:
            columns["row_data"] = list(msg.row_data)
    else:
        columns = {"primary_keys": list(msg.primary_keys), "timestamps": list(msg.timestamps)}
    rows = len(keys)
    bad = {name: len(col) for name, col in columns.items() if len(col) != rows}
    if rows == 0 or bad:
        raise RepackError(
            f"message {i} ({type(msg).__name__}): {rows} hash_values but column lengths {bad or 'all 0'};"
            " row-wise routing needs one hash value per row"
        )
    by_key: dict[int, list[int]] = {}
    for row, key in enumerate(keys):
        by_key.setdefault(key, []).append(row)
    parts: list[tuple[int, TsMsg]] = []
    for key, row_idx in by_key.items():
        fields: dict[str, list[Any]] = {name: [col[r] for r in row_idx] for name, col in columns.items()}
        ts = fields["timestamps"]  # one per row: never empty
        part = _copy_with(
            msg, hash_values=[msg.hash_values[r] for r in row_idx], begin_ts=min(ts), end_ts=max(ts), **fields
        )
        parts.append((key, part))
    return parts


def _copy_with(msg: TsMsg, **changes: object) -> TsMsg:
    """``msg`` with ``changes``, its properties kept (they are not a field: ``replace`` drops them)."""
    part = msgspec.structs.replace(msg, **changes)
    if msg._props:
        part._props = dict(msg._props)
    return part


def hash_primary_key(pk: int | str) -> int:
    """A stable 32-bit hash of a primary key (CRC-32 of its 8-byte little-endian two's complement for an
    int, of its UTF-8 bytes for a str): the same in every process, unlike ``hash()``."""
    if isinstance(pk, bool) or not isinstance(pk, (int, str)):
        raise RepackError(f"primary keys are int or str, got {type(pk).__name__}")
    try:
        return zlib.crc32(pk.to_bytes(8, "little", signed=True) if isinstance(pk, int) else pk.encode("utf-8"))
    except (OverflowError, UnicodeEncodeError) as exc:  # beyond 64 bits; a lone surrogate
        raise RepackError(f"primary key {pk!r} cannot be hashed: {exc}") from None
