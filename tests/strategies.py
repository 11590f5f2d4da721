"""Hypothesis strategies for every message type, derived from the Struct field types."""

from __future__ import annotations

import typing
from typing import Any

import msgspec
from hypothesis import strategies as st

import msgstream as ms
from msgstream.messages import STOCK_TYPES

INT64 = st.integers(-(2**63), 2**64 - 1)  # MessagePack's integer range
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)  # hybrid timestamps


def for_type(tp: Any) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return st.lists(for_type(item), max_size=5)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return st.one_of(*[for_type(a) for a in typing.get_args(tp)])
    if tp is bool:
        return st.booleans()
    if tp is int:
        return INT64
    if tp is str:
        return st.text(max_size=20)
    if tp is bytes:
        return st.binary(max_size=64)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return struct_of(tp)
    raise NotImplementedError(tp)


def struct_of(cls: type[Any]) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    kwargs = {f.name: for_type(hints[f.name]) for f in msgspec.structs.fields(cls)}
    if "hash_values" in kwargs:
        kwargs["hash_values"] = st.lists(U32, max_size=5)
    for name in ("begin_ts", "end_ts"):
        if name in kwargs:
            kwargs[name] = U64
    return st.builds(cls, **kwargs)


any_message: st.SearchStrategy[ms.TsMsg] = st.one_of(*[struct_of(cls) for cls in STOCK_TYPES])
