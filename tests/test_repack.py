from __future__ import annotations

import threading
from typing import ClassVar

import pytest

import msgstream as ms
from msgstream.errors import RepackError


def _ins(rows: list[int], hashes: list[int]) -> ms.InsertMsg:
    return ms.InsertMsg(
        begin_ts=1,
        end_ts=9,
        hash_values=hashes,
        row_ids=rows,
        timestamps=[r + 1 for r in rows],
        row_data=[bytes([r]) for r in rows],
    )


def test_default_takes_first_key() -> None:
    a, b = _ins([1], [5]), _ins([2], [6])
    out = ms.repack.default([a, b], [[1, 0], [0]])
    assert out == {1: ms.MsgPack(1, 9, [a]), 0: ms.MsgPack(1, 9, [b])}


def test_all_keys_sends_to_each_key_once() -> None:
    a = _ins([1], [5])
    out = ms.repack.all_keys([a], [[1, 0, 1]])
    assert sorted(out) == [0, 1] and out[0].msgs == [a] and out[1].msgs == [a]
    with pytest.raises(RepackError):
        ms.repack.all_keys([a], [[]])


def test_insert_delete_splits_rows_and_keeps_their_order() -> None:
    msg = _ins([10, 11, 12, 13], [0, 1, 0, 1])
    out = ms.repack.insert_delete([msg], [[0, 1, 0, 1]])
    zero, one = out[0].msgs[0], out[1].msgs[0]
    assert isinstance(zero, ms.InsertMsg) and isinstance(one, ms.InsertMsg)
    assert (zero.row_ids, zero.timestamps, zero.row_data, zero.hash_values) == (
        [10, 12],
        [11, 13],
        [b"\n", b"\x0c"],
        [0, 0],
    )
    assert (one.begin_ts, one.end_ts) == (12, 14)
    dele = ms.DeleteMsg(begin_ts=5, end_ts=5, hash_values=[3, 4], primary_keys=["a", 7], timestamps=[5, 5])
    out = ms.repack.insert_delete([dele], [[1, 0]])
    assert out[1].msgs[0].primary_keys == ["a"] and out[0].msgs[0].primary_keys == [7]  # type: ignore[attr-defined]


def test_insert_delete_parts_keep_the_messages_properties() -> None:
    msg = _ins([10, 11], [0, 1])
    msg.properties = {"tenant": "t1"}
    out = ms.repack.insert_delete([msg], [[0, 1]])
    assert [out[k].msgs[0].properties for k in (0, 1)] == [{"tenant": "t1"}] * 2
    out[0].msgs[0].properties["x"] = "y"  # each part its own copy
    assert msg.properties == {"tenant": "t1"} and out[1].msgs[0].properties == {"tenant": "t1"}


def test_insert_delete_rejects_ragged_rows() -> None:
    with pytest.raises(RepackError, match="one hash value per row"):
        ms.repack.insert_delete([_ins([1, 2], [0])], [[0]])
    with pytest.raises(RepackError):
        ms.repack.insert_delete([ms.InsertMsg(hash_values=[])], [[]])


def test_hash_primary_key_is_stable() -> None:
    assert ms.repack.hash_primary_key(1) == 0xA988DFF7  # CRC-32 of 01 00 00 00 00 00 00 00
    assert ms.repack.hash_primary_key("a") == 0xE8B7BE43  # CRC-32 of b"a"
    assert ms.repack.hash_primary_key(-1) == 0x2144DF1C  # CRC-32 of ff ff ff ff ff ff ff ff
    with pytest.raises(RepackError):
        ms.repack.hash_primary_key(1.5)  # type: ignore[arg-type]


def test_repack_exceptions_become_repack_errors() -> None:
    with ms.connect("memory://repack-x") as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="p"), num_channels=2))
        with client.msg_stream() as out:
            out.create_producers(chans)

            def boom(msgs: object, keys: object) -> dict[int, ms.MsgPack]:
                raise ZeroDivisionError("bad")

            out.set_repack_func(boom)
            with pytest.raises(RepackError, match="ZeroDivisionError"):
                out.produce(ms.MsgPack.of([_ins([1], [0])]))
            out.set_repack_func(lambda m, k: {0: ms.MsgPack(0, 0, ["junk"])})  # type: ignore[list-item]
            with pytest.raises(RepackError, match="str"):
                out.produce(ms.MsgPack.of([_ins([1], [0])]))
            with pytest.raises(ms.errors.InvalidArgumentError):
                out.set_repack_func("default")  # type: ignore[arg-type]


def test_a_stream_closed_by_another_thread_during_a_produce_fails_it_with_a_typed_error() -> None:
    # the repack runs between the stream's checks and the sends: a close from another thread lands there
    with ms.connect("memory://repack-close") as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="p"), num_channels=2))
        out = client.msg_stream()
        out.create_producers(chans)

        closed: list[bool] = []

        def closing(msgs: list[ms.TsMsg], keys: list[list[int]]) -> dict[int, ms.MsgPack]:
            closer = threading.Thread(target=out.close)
            closer.start()
            closer.join(timeout=10)
            closed.append(not closer.is_alive())
            return ms.repack.default(msgs, keys)

        out.set_repack_func(closing)
        with pytest.raises(ms.errors.ProduceError, match="closed"):  # not an IndexError from the emptied list
            out.produce(ms.MsgPack.of([_ins([1], [1])]))
        assert closed == [True]


class _ClosingOnMarshal(ms.TsMsg, kw_only=True):
    """A user type whose framing lets another thread close ``stream`` first."""

    msg_type = 7301
    stream: ClassVar[ms.MsgStream | None] = None
    closed: ClassVar[list[bool]] = []

    def marshal(self) -> bytes:
        stream = type(self).stream
        if stream is not None:
            closer = threading.Thread(target=stream.close)
            closer.start()
            closer.join(timeout=10)
            type(self).closed.append(not closer.is_alive())
        return super().marshal()


def test_a_broadcast_whose_stream_is_closed_meanwhile_fails_and_never_reports_nothing_sent() -> None:
    with ms.connect("memory://broadcast-close") as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="p"), num_channels=2))
        out = client.msg_stream()
        out.create_producers(chans)
        _ClosingOnMarshal.stream = out
        _ClosingOnMarshal.closed = []
        try:
            with pytest.raises(ms.errors.ProduceError, match="closed"):  # not {} for a broadcast that sent nothing
                out.broadcast(ms.MsgPack.of([_ClosingOnMarshal(begin_ts=1, end_ts=1)]))
        finally:
            _ClosingOnMarshal.stream = None
        assert _ClosingOnMarshal.closed and all(_ClosingOnMarshal.closed)
