"""Wire format: every type round-trips; anything else is an UnmarshalError, never another exception."""

from __future__ import annotations

import contextlib
import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import msgstream as ms
from msgstream.errors import InvalidArgumentError, UnknownMsgTypeError, UnmarshalError
from msgstream.messages import HEADER_SIZE, STOCK_TYPES
from msgstream.testing import FlushMsg, every_message_type

from .strategies import any_message

DISPATCHER = ms.UnmarshalDispatcher()


@settings(max_examples=500)
@given(any_message)
def test_every_type_round_trips(msg: ms.TsMsg) -> None:
    frame = msg.marshal()
    back = DISPATCHER.unmarshal(frame)
    assert back == msg and type(back) is type(msg)
    assert type(msg).unmarshal(frame) == msg


def test_header_layout_is_as_documented() -> None:
    msg = ms.InsertMsg(begin_ts=3, end_ts=4, hash_values=[7], row_ids=[1], timestamps=[3], row_data=[b"ab"])
    frame = msg.marshal()
    assert frame[:HEADER_SIZE] == b"MS\x01\x00" + struct.pack(">I", 400)
    # docs/wire-format.md: a MessagePack array, begin_ts, end_ts, hash_values first, then the body in order
    import msgspec

    body = msgspec.msgpack.decode(frame[HEADER_SIZE:])
    assert body == [3, 4, [7], "", "", 0, "", [1], [3], [b"ab"]]


def test_stock_types_and_values() -> None:
    assert {int(c.msg_type) for c in STOCK_TYPES} == {400, 401, 500, 1000, 1100, 1200, 1201}
    assert ms.MsgType.TIME_SYNC == 1201 and DISPATCHER.msg_types() == [400, 401, 500, 1000, 1100, 1200, 1201]
    for msg in every_message_type():
        assert msg.msg_type == type(msg).msg_type


@settings(max_examples=2000)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_unmarshal_error(data: bytes) -> None:
    with contextlib.suppress(UnmarshalError):
        DISPATCHER.unmarshal(data)


@settings(max_examples=2000)
@given(any_message, st.data())
def test_mutated_frames_raise_only_unmarshal_error(msg: ms.TsMsg, data: st.DataObject) -> None:
    frame = bytearray(msg.marshal())
    how = data.draw(st.sampled_from(["truncate", "flip", "insert", "body"]))
    if how == "truncate":
        del frame[data.draw(st.integers(0, len(frame) - 1)) :]
    elif how == "flip":
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "insert":
        frame.insert(data.draw(st.integers(0, len(frame))), data.draw(st.integers(0, 255)))
    else:
        frame[HEADER_SIZE:] = data.draw(st.binary(max_size=40))
    try:
        out = DISPATCHER.unmarshal(bytes(frame))
    except UnmarshalError as exc:
        assert exc.data == bytes(frame)
    else:
        assert isinstance(out, ms.TsMsg)


def test_specific_corruptions() -> None:
    good = ms.TimeTickMsg(begin_ts=1, end_ts=1).marshal()
    with pytest.raises(UnmarshalError, match="truncated"):
        DISPATCHER.unmarshal(good[:5])
    with pytest.raises(UnmarshalError, match="not a msgstream frame"):
        DISPATCHER.unmarshal(b"XX" + good[2:])
    with pytest.raises(UnmarshalError, match="corrupt TimeTickMsg"):
        DISPATCHER.unmarshal(good[:-1])
    with pytest.raises(UnknownMsgTypeError) as err:
        DISPATCHER.unmarshal(good[:4] + struct.pack(">I", 4242) + good[8:])
    assert err.value.msg_type == 4242
    with pytest.raises(UnmarshalError):
        DISPATCHER.unmarshal("a str")  # type: ignore[arg-type]


def test_timestamps_are_unsigned_64_bit_on_produce_and_on_read() -> None:
    """docs/wire-format.md: begin_ts and end_ts are unsigned; a negative one is refused where a message is
    produced (the validating decode) and where a frame written by anything else is read."""
    with ms.connect("memory://") as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="t"), num_channels=1))
        with client.msg_stream() as out:
            out.create_producers(chans)
            for begin, end in ((-1, 1), (1, -1)):
                with pytest.raises(InvalidArgumentError, match=">= 0"):
                    out.produce(ms.MsgPack(1, 1, [ms.InsertMsg(begin_ts=begin, end_ts=end, hash_values=[0])]))
            assert out.produce(ms.MsgPack.of([ms.InsertMsg(begin_ts=0, end_ts=2**64 - 1, hash_values=[0])]))
    header = ms.InsertMsg().marshal()[:8]
    with pytest.raises(UnmarshalError, match="corrupt InsertMsg"):
        DISPATCHER.unmarshal(header + msgspec.msgpack.encode([-1, 1, [0]]))


def test_user_types_register_and_round_trip() -> None:
    d = ms.UnmarshalDispatcher()
    msg = FlushMsg(begin_ts=1, end_ts=2, hash_values=[3], collection_name="c", segment_ids=[4])
    with pytest.raises(UnknownMsgTypeError):
        d.unmarshal(msg.marshal())
    d.add_msg_template(5000, FlushMsg)
    assert d.unmarshal(msg.marshal()) == msg
    with pytest.raises(InvalidArgumentError, match="registered as 5001"):
        d.add_msg_template(5001, FlushMsg)
    with pytest.raises(InvalidArgumentError):
        d.add_msg_template(0, FlushMsg)

    def broken(_data: bytes) -> ms.TsMsg:
        raise KeyError("oops")

    d.add_msg_template(5000, broken)
    with pytest.raises(UnmarshalError, match="oops"):
        d.unmarshal(msg.marshal())
    d.add_msg_template(5000, lambda data: "not a message")  # type: ignore[arg-type,return-value]
    with pytest.raises(UnmarshalError, match="not a TsMsg"):
        d.unmarshal(msg.marshal())


def test_subclass_must_keep_header_fields_first() -> None:
    class Wrong(ms.TsMsg):  # forgot kw_only=True: body fields would come first on the wire
        msg_type = 6000
        extra: int = 0

    with pytest.raises(TypeError, match="kw_only=True"):
        Wrong(extra=1).marshal()


def test_messages_behave_as_values() -> None:
    a = ms.SearchMsg(begin_ts=1, end_ts=1, hash_values=[0])
    assert a == ms.SearchMsg(begin_ts=1, end_ts=1, hash_values=[0]) and a.position is None
    a.set_ts(9)
    assert (a.begin_ts, a.end_ts) == (9, 9)
    assert ms.InsertMsg().row_ids == [] and ms.InsertMsg().row_ids is not ms.InsertMsg().row_ids


def test_consumed_record_is_no_field() -> None:
    """The backend record a consumed message carries gives its position and nothing else: not
    encoded, not in equality or repr, and user attributes still work beside it."""
    frame = ms.InsertMsg(begin_ts=3, end_ts=4, row_ids=[7]).marshal()
    consumed = ms.UnmarshalDispatcher().unmarshal(frame)
    consumed._raw = ms.RawMessage("chan-z", b"\x00\x01", frame)
    assert consumed.position == ms.Position("chan-z", b"\x00\x01", 4)
    assert consumed == ms.InsertMsg(begin_ts=3, end_ts=4, row_ids=[7]) and "chan-z" not in repr(consumed)
    assert consumed.marshal() == frame
    consumed.note = "mine"  # type: ignore[attr-defined]
    assert consumed.note == "mine" and consumed.position is not None  # type: ignore[attr-defined]
    assert "_raw" not in ms.InsertMsg.__struct_fields__


@given(st.text(), st.binary(max_size=40), st.integers(0, 2**64 - 1), st.booleans())
def test_position_round_trips(channel: str, msg_id: bytes, ts: int, inclusive: bool) -> None:
    pos = ms.Position(channel, msg_id, ts, inclusive)
    assert ms.Position.from_bytes(pos.to_bytes()) == pos


def test_position_golden_bytes_and_older_checkpoints() -> None:
    pos = ms.Position("c", b"\x01", 5, True)
    assert pos.to_bytes() == b"MSP\x01\x94\xa1c\xc4\x01\x01\x05\xc3"
    # a position encoded without the inclusive element: three elements, resume after the message
    assert ms.Position.from_bytes(b"MSP\x01\x93\xa1c\xc4\x01\x01\x05") == ms.Position("c", b"\x01", 5)


@given(st.binary(max_size=60))
def test_position_rejects_garbage(data: bytes) -> None:
    with contextlib.suppress(UnmarshalError):
        ms.Position.from_bytes(data)


class _EventV1(ms.TsMsg, kw_only=True):
    msg_type = 6100
    name: str = ""


class _EventV2(ms.TsMsg, kw_only=True):  # the same type, a field appended (with a default)
    msg_type = 6100
    name: str = ""
    weight: int = 7


def test_appending_a_field_with_a_default_is_read_both_ways() -> None:
    """docs/wire-format.md's evolution rule: a reader ignores trailing elements it does not know, and
    gives fields missing at the end their defaults, so a field appended with a default needs no
    version bump. Frames written by the other version of the type, and by a generic MessagePack
    encoder (as another language would), decode."""
    old, new = ms.UnmarshalDispatcher(), ms.UnmarshalDispatcher()
    old.add_msg_template(6100, _EventV1)
    new.add_msg_template(6100, _EventV2)
    written_new = _EventV2(begin_ts=1, end_ts=2, hash_values=[3], name="n", weight=9).marshal()
    assert old.unmarshal(written_new) == _EventV1(begin_ts=1, end_ts=2, hash_values=[3], name="n")
    written_old = _EventV1(begin_ts=1, end_ts=2, hash_values=[3], name="n").marshal()
    assert new.unmarshal(written_old) == _EventV2(begin_ts=1, end_ts=2, hash_values=[3], name="n", weight=7)
    insert = ms.InsertMsg(begin_ts=3, end_ts=4, hash_values=[7], row_ids=[1], timestamps=[3], row_data=[b"ab"])
    head, body = insert.marshal()[:HEADER_SIZE], msgspec.msgpack.decode(insert.marshal()[HEADER_SIZE:])
    assert DISPATCHER.unmarshal(head + msgspec.msgpack.encode([*body, "a later field", 1])) == insert
    assert DISPATCHER.unmarshal(head + msgspec.msgpack.encode(body[:3])) == ms.InsertMsg(
        begin_ts=3, end_ts=4, hash_values=[7]
    )
    with pytest.raises(UnmarshalError):  # a known field of the wrong type is still refused
        DISPATCHER.unmarshal(head + msgspec.msgpack.encode([3, 4, [7], 5]))
