"""Message properties: the API, the wire layout (golden bytes), and what readers do with such frames."""

from __future__ import annotations

import msgspec
import pytest

import msgstream as ms
from msgstream.errors import InvalidArgumentError, UnmarshalError

PLAIN = bytes.fromhex("4d53010000000190 9a030491 07a0a000a0 910191039 1c4026162".replace(" ", ""))
WITH_TENANT = bytes.fromhex(
    "4d53010100000190 0000000b 81a674656e616e74a27431 9a03049107a0a000a0910191039 1c4026162".replace(" ", "")
)


def _insert(**kw: object) -> ms.InsertMsg:
    return ms.InsertMsg(begin_ts=3, end_ts=4, hash_values=[7], row_ids=[1], timestamps=[3], row_data=[b"ab"], **kw)  # type: ignore[arg-type]


def test_golden_bytes_without_and_with_properties() -> None:
    assert _insert().marshal() == PLAIN  # unchanged by properties support
    assert _insert(properties={}).marshal() == PLAIN  # empty properties: no flag, no block
    assert _insert(properties={"tenant": "t1"}).marshal() == WITH_TENANT
    msg = ms.UnmarshalDispatcher().unmarshal(WITH_TENANT)
    assert msg == _insert(properties={"tenant": "t1"}) and msg.properties == {"tenant": "t1"}
    assert ms.InsertMsg.unmarshal(WITH_TENANT).properties == {"tenant": "t1"}


def test_produce_path_frames_match_marshal() -> None:
    with ms.connect("memory://") as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="t"), num_channels=1))
        with client.msg_stream() as out, client.msg_stream(validate=False) as fast, client.msg_stream() as inp:
            inp.create_consumers("s", chans)
            out.create_producers(chans)
            fast.create_producers(chans)
            out.produce(ms.MsgPack.of([_insert(properties={"tenant": "t1"}), _insert()]))
            fast.produce(ms.MsgPack.of([_insert(properties={"tenant": "t1"})]))
            frames = inp.consume_frames(timeout=5.0)
            assert frames is not None
            assert [f.payload for f in frames] == [WITH_TENANT, PLAIN, WITH_TENANT]


def test_frame_readers_without_decoding_the_body() -> None:
    assert ms.frame_properties(WITH_TENANT) == {"tenant": "t1"}
    assert ms.frame_properties(PLAIN) == {}
    assert ms.frame_type(WITH_TENANT) == ms.MsgType.INSERT
    assert ms.frame_timestamps(WITH_TENANT) == (3, 4) == ms.frame_timestamps(PLAIN)
    with pytest.raises(UnmarshalError):
        ms.frame_properties(b"not a frame")


def test_a_reader_without_properties_support_raises_unmarshal_error() -> None:
    """Readers that do not know properties ignore the flags byte and decode the body right after the
    header: they meet the length prefix (an int), not the body array, and fail cleanly."""
    old_decode = msgspec.msgpack.Decoder(ms.InsertMsg).decode
    assert old_decode(PLAIN[8:]) == _insert()
    with pytest.raises(msgspec.DecodeError):  # a properties-unaware dispatcher wraps it into UnmarshalError
        old_decode(WITH_TENANT[8:])
    for size in (0, 0x7F, 0x80, 0xFFFF, 0x10000):  # whatever the length, the first byte is never an array
        prefix = size.to_bytes(4, "big")
        with pytest.raises(msgspec.DecodeError):
            old_decode(prefix + b"\x81\xa1k\xa1v" + PLAIN[8:])


@pytest.mark.parametrize(
    "frame",
    [
        WITH_TENANT[:10],  # length cut short
        WITH_TENANT[:14],  # block cut short
        WITH_TENANT[:8] + b"\x00\x00\x00\x03\x81\xa1k" + PLAIN[8:],  # map cut short inside its length
        WITH_TENANT[:8] + b"\x00\x00\x00\x03\x81\xa1\x01" + PLAIN[8:],  # value not a str
        WITH_TENANT[:8] + b"\x00\x00\x00\x01\x90" + PLAIN[8:],  # an array, not a map
        WITH_TENANT[:12] + WITH_TENANT[12:23] + b"\xff",  # body corrupt
        PLAIN[:3] + b"\x02" + PLAIN[4:],  # an unknown flag bit
    ],
)
def test_corrupt_properties_raise_unmarshal_error(frame: bytes) -> None:
    with pytest.raises(UnmarshalError):
        ms.UnmarshalDispatcher().unmarshal(frame)
    with pytest.raises(UnmarshalError):
        ms.InsertMsg.unmarshal(frame)


def test_properties_are_checked_str_to_str() -> None:
    for bad in ({"n": 1}, {1: "v"}, {"b": b"x"}, [("k", "v")], "k=v"):
        with pytest.raises(InvalidArgumentError):
            _insert(properties=bad)
        with pytest.raises(InvalidArgumentError):
            _insert().properties = bad  # type: ignore[assignment]
    msg = _insert()
    msg.properties["n"] = 1  # type: ignore[assignment]
    with pytest.raises(InvalidArgumentError):
        msg.marshal()


def test_equality_repr_and_copy_of_the_callers_dict() -> None:
    given = {"tenant": "t1"}
    msg = _insert(properties=given)
    given["tenant"] = "changed"
    assert msg.properties == {"tenant": "t1"}
    assert msg == _insert(properties={"tenant": "t1"})
    assert msg != _insert(properties={"tenant": "t2"}) and msg != _insert()
    assert _insert() == _insert(properties={}) and not _insert().__ne__(_insert(properties={}))
    assert repr(msg).endswith("row_data=[b'ab'], properties={'tenant': 't1'})")
    assert "properties" not in repr(_insert())
    assert _insert().properties == {}
    assert msg != _insert(properties={"tenant": "t1"}).marshal()


def test_a_field_named_properties_is_refused() -> None:
    with pytest.raises(TypeError, match="properties"):

        class Bad(ms.TsMsg, kw_only=True):
            msg_type = 6000
            properties: dict[str, str] = {}


def test_properties_are_limited_so_an_older_reader_never_sees_an_array() -> None:
    with pytest.raises(InvalidArgumentError):
        _insert(properties={"k": "v" * 2**24}).marshal()
