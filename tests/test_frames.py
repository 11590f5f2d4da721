"""consume_frames / FramePack on the memory backend: decoding on demand, corrupt frames, acknowledgement."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest

import msgstream as ms
from msgstream.errors import InvalidArgumentError, UnmarshalError


def _row(i: int, ts: int) -> ms.InsertMsg:
    return ms.InsertMsg(begin_ts=ts, end_ts=ts, hash_values=[0], row_ids=[i], timestamps=[ts], row_data=[b"r"])


@pytest.fixture
def client() -> Iterator[ms.Client]:
    with ms.connect("memory://") as c:
        yield c


def _channel(client: ms.Client) -> str:
    owner = ms.OwnerDescription(role="test", address="here", description_text="frames")
    return client.create_channels(ms.CreateChannelRequest(owner=owner, num_channels=1))[0]


def test_frame_helpers_read_the_header_only() -> None:
    frame = ms.SearchMsg(begin_ts=5, end_ts=9, dsl="x" * 1000).marshal()
    assert ms.frame_type(frame) == ms.MsgType.SEARCH
    assert ms.frame_timestamps(frame) == (5, 9)
    for bad in (b"", b"not a frame at all", frame[:2] + b"\x09" + frame[3:]):
        with pytest.raises(UnmarshalError):
            ms.frame_type(bad)
    with pytest.raises(UnmarshalError):
        ms.frame_timestamps(frame[:8] + b"\xc1")  # a header, then a byte MessagePack never uses
    for not_bytes in ("a str of more than eight characters", None, 12345678):
        for helper in (ms.frame_type, ms.frame_timestamps):
            with pytest.raises(UnmarshalError):
                helper(not_bytes)  # type: ignore[arg-type]
    negative = frame[:8] + msgspec.msgpack.encode([-5, -1, [0]])  # timestamps are unsigned
    with pytest.raises(UnmarshalError):
        ms.frame_timestamps(negative)
    newer = frame[:3] + b"\x02" + frame[4:]  # a flag bit this reader does not know: the body may differ
    assert ms.frame_type(newer) == ms.MsgType.SEARCH  # the header alone still names the type
    with pytest.raises(UnmarshalError, match="unknown flag bits"):
        ms.frame_timestamps(newer)


def test_pack_time_range_positions_and_unmarshal(client: ms.Client) -> None:
    ch = _channel(client)
    out = client.msg_stream()
    out.create_producers([ch])
    ids = out.produce(ms.MsgPack.of([_row(0, 7), _row(1, 3), _row(2, 11)]))[ch]
    inp = client.msg_stream()
    inp.create_consumers("s", [ch])
    pack = inp.consume_frames(timeout=5)
    assert pack is not None and len(pack) == 3
    assert [f.msg_id for f in pack] == ids
    assert (pack.begin_ts, pack.end_ts) == (3, 11)
    assert pack.start_positions == [ms.Position(ch, ids[0], 7, inclusive=True)]
    assert pack.end_positions == [ms.Position(ch, ids[2], 11)]
    typed = pack.unmarshal()
    assert typed.msgs == [_row(0, 7), _row(1, 3), _row(2, 11)]
    assert typed.end_positions == pack.end_positions and typed.start_positions == pack.start_positions
    assert "3 frames" in repr(pack)


def test_corrupt_frame_raises_only_when_unmarshalled(client: ms.Client) -> None:
    ch = _channel(client)
    raw = client.backend.create_producer(ch)
    good = _row(1, 4).marshal()
    ids = raw.send([_row(0, 2).marshal(), b"garbage", good], 5)
    raw.close()
    inp = client.msg_stream()
    inp.create_consumers("s", [ch])
    pack = inp.consume_frames(timeout=5)
    assert pack is not None and [f.payload for f in pack][1] == b"garbage"
    assert (pack.begin_ts, pack.end_ts) == (2, 4)  # the unreadable frame does not count
    with pytest.raises(UnmarshalError) as info:
        pack.unmarshal()
    assert info.value.position == ms.Position(ch, ids[1], 0)
    reported: list[UnmarshalError] = []
    assert pack.unmarshal(on_error=reported.append).msgs == [_row(0, 2), _row(1, 4)]
    assert [e.position.msg_id for e in reported if e.position] == [ids[1]]
    assert inp.consume_frames(timeout=0.05) is None  # the whole pack was delivered, once


def test_frames_follow_the_acknowledgement_rules(client: ms.Client) -> None:
    ch = _channel(client)
    out = client.msg_stream()
    out.create_producers([ch])
    out.produce(ms.MsgPack.of([_row(i, i + 1) for i in range(4)]))
    manual = client.msg_stream(auto_ack=False, receive_batch=2)
    manual.create_consumers("s", [ch])
    first = manual.consume_frames(timeout=5)
    second = manual.consume_frames(timeout=5)
    assert first is not None and second is not None
    manual.ack(first.frames)  # only the first pack
    with pytest.raises(InvalidArgumentError):
        manual.ack(first.frames[0])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        manual.ack([b"not a frame"])  # type: ignore[list-item]
    manual.close()
    nxt = client.msg_stream()
    nxt.create_consumers("s", [ch])
    pack = nxt.consume(timeout=5)
    assert pack is not None and [m.row_ids[0] for m in pack.msgs] == [2, 3]  # the unacknowledged pack again
    nxt.close()
