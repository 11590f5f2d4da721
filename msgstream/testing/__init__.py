"""The conformance suite: every backend, ours or a third party's, must pass it.

Subclass :class:`ConformanceSuite` in a test module and give it a ``url`` fixture::

    import pytest
    from msgstream.testing import ConformanceSuite

    class TestMyBroker(ConformanceSuite):
        @pytest.fixture
        def url(self) -> str:
            return "mybroker://127.0.0.1:1234"

pytest then runs every test below against that URL. Features come from the backend class's
``features`` (set ``features = Features(...)`` on the subclass to override); a test that needs a
feature the backend declares missing is skipped with the reason, and pytest's ``-rs`` summary lists
them. Each test creates its own channels (unique names) and subscriptions, so tests may share one
broker and run in parallel. Waits are bounded by ``timeout`` (seconds, default 30); "nothing more
arrives" checks wait ``quiet_period`` (default 0.5 s). See docs/plugins.md.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import pytest

import msgstream as ms
from msgstream.backend import Features
from msgstream.errors import (
    ChannelNotFoundError,
    InvalidArgumentError,
    ProduceError,
    RepackError,
    SeekError,
    StreamClosedError,
    SubscriptionInUseError,
    TimeTickError,
    UnknownMsgTypeError,
    UnmarshalError,
)

__all__ = ["ConformanceSuite", "FlushMsg", "consume_n", "consume_packs", "every_message_type", "expect_quiet"]


class _Consuming(Protocol):
    def consume(self, timeout: float = ...) -> ms.MsgPack | None: ...


class FlushMsg(ms.TsMsg, kw_only=True):
    """A user-registered message type (MsgType 5000) used by the suite."""

    msg_type = 5000
    collection_name: str = ""
    segment_ids: list[int] = []


def every_message_type(ts: int = 10, hash_value: int = 0) -> list[ms.TsMsg]:
    """One message of each stock type with every body field set."""
    h = [hash_value]
    return [
        ms.InsertMsg(
            begin_ts=ts,
            end_ts=ts,
            hash_values=h,
            collection_name="c",
            partition_name="p",
            segment_id=7,
            channel_id="ch",
            row_ids=[1],
            timestamps=[ts],
            row_data=[b"\x00\xffrow"],
        ),
        ms.DeleteMsg(
            begin_ts=ts,
            end_ts=ts,
            hash_values=h,
            collection_name="c",
            partition_name="p",
            primary_keys=[42],
            timestamps=[ts],
        ),
        ms.SearchMsg(
            begin_ts=ts,
            end_ts=ts,
            hash_values=h,
            req_id=9,
            db_name="db",
            collection_name="c",
            partition_names=["p1", "p2"],
            dsl="x > 1",
            placeholder_group=b"\x01\x02",
            result_channel_id="r",
            travel_timestamp=ts,
            guarantee_timestamp=ts,
        ),
        ms.SearchResultMsg(
            begin_ts=ts,
            end_ts=ts,
            hash_values=h,
            req_id=9,
            status_code=1,
            reason="partial",
            result_channel_id="r",
            metric_type="L2",
            hits=[b"hit1", b""],
        ),
        ms.SegStatisticsMsg(
            begin_ts=ts,
            end_ts=ts,
            hash_values=h,
            seg_stats=[
                ms.SegmentStats(segment_id=1, memory_size=2, num_rows=3, create_time=4, end_time=5, is_new_segment=True)
            ],
        ),
        ms.TimeTickMsg(begin_ts=ts, end_ts=ts, hash_values=h, source_id=3),
        ms.TimeSyncMsg(begin_ts=ts, end_ts=ts, hash_values=h, peer_id=5, timestamp=ts),
    ]


def consume_n(stream: _Consuming, n: int, timeout: float = 30.0) -> list[ms.TsMsg]:
    """Consume until ``n`` messages arrived; fail (naming how many came) once ``timeout`` passed.
    Fails as well if the pack that completes ``n`` holds more (later extras: :func:`expect_quiet`)."""
    deadline = time.monotonic() + timeout
    out: list[ms.TsMsg] = []
    while len(out) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"received {len(out)} of {n} messages within {timeout}s")
        pack = stream.consume(timeout=min(remaining, 1.0))
        if pack is not None:
            out.extend(pack.msgs)
    assert len(out) == n, f"expected {n} messages, received {len(out)}"
    return out


def consume_packs(stream: _Consuming, n: int, timeout: float = 30.0) -> list[list[ms.TsMsg]]:
    """Consume packs until they hold at least ``n`` messages (a broker may hand them over in any split);
    fail once ``timeout`` passed. Returns each pack's messages."""
    deadline = time.monotonic() + timeout
    packs: list[list[ms.TsMsg]] = []
    while sum(map(len, packs)) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"received {sum(map(len, packs))} of {n} messages within {timeout}s")
        pack = stream.consume(timeout=min(remaining, 1.0))
        if pack is not None:
            packs.append(list(pack.msgs))
    return packs


def expect_quiet(stream: _Consuming, period: float) -> None:
    """Assert that nothing more arrives within ``period`` seconds."""
    pack = stream.consume(timeout=period)
    assert pack is None, f"expected no more messages, got {len(pack.msgs)}: {pack.msgs[:3]}"


def _data(i: int, hash_value: int, ts: int | None = None) -> ms.InsertMsg:
    t = i + 1 if ts is None else ts
    return ms.InsertMsg(
        begin_ts=t, end_ts=t, hash_values=[hash_value], row_ids=[i], timestamps=[t], row_data=[i.to_bytes(4, "big")]
    )


def _tick(ts: int) -> ms.MsgPack:
    return ms.MsgPack(ts, ts, [ms.TimeTickMsg(begin_ts=ts, end_ts=ts)])


class ConformanceSuite:
    """The stream semantics of docs/architecture.md, against the backend at the ``url`` fixture (see
    module doc)."""

    features: Features | None = None
    timeout: float = 30.0
    quiet_period: float = 0.5

    # -- fixtures -------------------------------------------------------------------------------
    @pytest.fixture
    def url(self) -> str:
        pytest.fail("a ConformanceSuite subclass must define a `url` fixture returning the backend URL")

    def connect(self, url: str) -> ms.Client:
        """Every client the suite opens comes from here; override it to run the suite through another
        API with the same names (msgstream's tests run it through ``msgstream.aio`` this way)."""
        return ms.connect(url)

    @pytest.fixture
    def client(self, url: str) -> Iterator[ms.Client]:
        client = self.connect(url)
        try:
            yield client
        finally:
            client.close()

    @pytest.fixture
    def feats(self, client: ms.Client) -> Features:
        return self.features or type(client.backend).features

    @pytest.fixture
    def streams(self, client: ms.Client) -> Iterator[Any]:
        opened: list[ms.MsgStream | ms.TimeTickStream] = []

        def make(tt: bool = False, **options: Any) -> Any:
            stream = client.tt_msg_stream(**options) if tt else client.msg_stream(**options)
            opened.append(stream)
            return stream

        yield make
        for s in opened:
            s.close()

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def channels(client: ms.Client, n: int, role: str = "proxy") -> list[str]:
        owner = ms.OwnerDescription(role=role, address="127.0.0.1:19530", description_text="conformance")
        return client.create_channels(ms.CreateChannelRequest(owner=owner, num_channels=n))

    @staticmethod
    def sub() -> str:
        return f"sub-{uuid.uuid4().hex[:10]}"

    def producer(self, make: Any, chans: Sequence[str]) -> ms.MsgStream:
        out: ms.MsgStream = make()
        out.create_producers(chans)
        out.start()
        return out

    def consumer(self, make: Any, chans: Sequence[str], sub: str | None = None, tt: bool = False, **kw: Any) -> Any:
        inp = make(tt=tt)
        inp.create_consumers(sub or self.sub(), chans, **kw)
        inp.start()
        return inp

    # -- channels -------------------------------------------------------------------------------
    def test_create_describe_destroy(self, client: ms.Client, url: str) -> None:
        owner = ms.OwnerDescription(role="proxy", address="10.0.0.7:19530", description_text="dml")
        ids = client.create_channels(ms.CreateChannelRequest(owner=owner, num_channels=3))
        assert len(ids) == 3 and len(set(ids)) == 3
        assert client.describe_channels(ids) == ms.ChannelDescriptions(
            descriptions=[ms.ChannelDescription(owner=owner)] * 3
        )
        with self.connect(url) as other:  # owner records live on the broker, not in this client
            assert other.describe_channels(ids[1:2]).descriptions[0].owner == owner
        client.destroy_channels(ids[:2])
        for gone in ids[:2]:
            with pytest.raises(ChannelNotFoundError):
                client.describe_channels([gone])
            with pytest.raises(ChannelNotFoundError):
                client.msg_stream().create_producers([gone])
        assert client.describe_channels(ids[2:]).descriptions[0].owner == owner

    def test_destroy_unknown_deletes_nothing(self, client: ms.Client) -> None:
        ids = self.channels(client, 2)
        with pytest.raises(ChannelNotFoundError):
            client.destroy_channels([ids[0], "no-such-channel-" + uuid.uuid4().hex])
        assert len(client.describe_channels(ids).descriptions) == 2

    def test_create_channels_rejects_bad_requests(self, client: ms.Client) -> None:
        owner = ms.OwnerDescription(role="proxy")
        for bad in (0, -1, "2", True):
            with pytest.raises(InvalidArgumentError):
                client.create_channels(ms.CreateChannelRequest(owner=owner, num_channels=bad))  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            client.create_channels("proxy")  # type: ignore[arg-type]

    # -- produce / consume ----------------------------------------------------------------------
    def test_roundtrip_every_message_type(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        dispatcher = ms.UnmarshalDispatcher()
        dispatcher.add_msg_template(FlushMsg.msg_type, FlushMsg)
        inp = self.consumer(streams, chans, dispatcher=dispatcher)
        out = self.producer(streams, chans)
        msgs = [
            *every_message_type(),
            FlushMsg(begin_ts=10, end_ts=10, hash_values=[0], collection_name="c", segment_ids=[1, 2]),
        ]
        ids = out.produce(ms.MsgPack(10, 10, msgs))
        got = consume_n(inp, len(msgs), self.timeout)
        assert got == msgs
        assert [type(m) for m in got] == [type(m) for m in msgs]
        assert [m.position.msg_id for m in got if m.position] == ids[chans[0]]
        assert all(m.position == ms.Position(chans[0], m.position.msg_id, m.end_ts) for m in got if m.position)

    def test_properties_roundtrip(self, client: ms.Client, streams: Any) -> None:
        """Properties travel with each message, on consume, consume_frames (read without decoding the
        body) and through a time-tick stream; messages without them arrive with ``{}``."""
        chans = self.channels(client, 1)
        dispatcher = ms.UnmarshalDispatcher()
        dispatcher.add_msg_template(FlushMsg.msg_type, FlushMsg)
        inp = self.consumer(streams, chans, dispatcher=dispatcher)
        frames = self.consumer(streams, chans, dispatcher=dispatcher)
        tt = self.consumer(streams, chans, tt=True, dispatcher=dispatcher)
        out = self.producer(streams, chans)
        props = [{"tenant": "t1"}, {}, {"k": "v", "\u00e9t\u00e9": "", "": "empty key"}, {"x" * 300: "y" * 3000}]
        msgs: list[ms.TsMsg] = []
        data = [m for m in every_message_type() if not isinstance(m, ms.TimeTickMsg)]
        for i, m in enumerate([*data, FlushMsg(begin_ts=10, end_ts=10, hash_values=[0])]):
            m.properties = props[i % len(props)]
            msgs.append(m)
        out.produce(ms.MsgPack(10, 10, msgs))
        out.broadcast(ms.MsgPack(11, 11, [ms.TimeTickMsg(begin_ts=11, end_ts=11, properties={"tick": "11"})]))
        got = consume_n(inp, len(msgs) + 1, self.timeout)
        assert got[:-1] == msgs
        assert [m.properties for m in got] == [m.properties for m in msgs] + [{"tick": "11"}]
        seen: list[dict[str, str]] = []
        deadline = time.monotonic() + self.timeout
        while len(seen) < len(msgs) + 1:
            assert time.monotonic() < deadline, f"received {len(seen)} frames of {len(msgs) + 1}"
            pack = frames.consume_frames(timeout=1.0)
            if pack is not None:
                seen += [ms.frame_properties(f.payload) for f in pack]
                assert [m.properties for m in pack.unmarshal().msgs] == seen[-len(pack) :]
        assert seen == [m.properties for m in got]
        ticked = [m for pack in consume_packs(tt, len(msgs), self.timeout) for m in pack]
        assert ticked == msgs and [m.properties for m in ticked] == [m.properties for m in msgs]
        with pytest.raises(InvalidArgumentError):
            ms.InsertMsg(hash_values=[0], properties={"n": 1})  # type: ignore[dict-item]
        bad = ms.InsertMsg(hash_values=[0])
        bad.properties["n"] = 1  # type: ignore[assignment]
        with pytest.raises(InvalidArgumentError):
            out.produce(ms.MsgPack(12, 12, [bad]))

    def test_unregistered_type_is_reported(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        inp = self.consumer(streams, chans)  # stock dispatcher: FlushMsg unknown
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack(1, 2, [FlushMsg(begin_ts=1, end_ts=1, hash_values=[0]), _data(1, 0)]))
        with pytest.raises(UnknownMsgTypeError) as err:
            consume_n(inp, 1, self.timeout)
        assert err.value.msg_type == FlushMsg.msg_type and err.value.position is not None
        assert err.value.position.channel == chans[0]
        assert consume_n(inp, 1, self.timeout) == [_data(1, 0)]

    def test_order_kept_per_channel(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 3)
        inp = self.consumer(streams, chans)
        out = self.producer(streams, chans)
        sent = [_data(i, hash_value=i * 7) for i in range(300)]
        for k in range(0, 300, 50):
            out.produce(ms.MsgPack.of(sent[k : k + 50]))
        got = consume_n(inp, 300, self.timeout)
        for idx, ch in enumerate(chans):
            want = [m for m in sent if m.hash_values[0] % 3 == idx]
            assert [m for m in got if m.position and m.position.channel == ch] == want

    def test_default_repack_routes_by_first_hash_value(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 4)
        inp = self.consumer(streams, chans)
        out = self.producer(streams, chans)
        msgs = [_data(i, hash_value=h) for i, h in enumerate([0, 5, 10, 7, 4])]
        out.produce(ms.MsgPack.of(msgs))
        got = consume_n(inp, 5, self.timeout)
        where = {m.row_ids[0]: m.position.channel for m in got if isinstance(m, ms.InsertMsg) and m.position}
        assert where == {i: chans[h % 4] for i, h in enumerate([0, 5, 10, 7, 4])}

    def test_insert_delete_repack_splits_rows(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 2)
        inp = self.consumer(streams, chans)
        out = self.producer(streams, chans)
        out.set_repack_func(ms.repack.insert_delete)
        pks = list(range(20))
        hashes = [ms.repack.hash_primary_key(pk) for pk in pks]
        ins = ms.InsertMsg(
            begin_ts=1,
            end_ts=20,
            hash_values=hashes,
            row_ids=pks,
            timestamps=[pk + 1 for pk in pks],
            row_data=[bytes([pk]) for pk in pks],
        )
        dele = ms.DeleteMsg(
            begin_ts=30, end_ts=30, hash_values=hashes[:4], primary_keys=list[int | str](pks[:4]), timestamps=[30] * 4
        )
        out.produce(ms.MsgPack(1, 30, [ins, dele]))
        got = [m for m in consume_n(inp, 4, self.timeout)]  # one insert and one delete per channel
        rows: dict[int, str] = {}
        for m in got:
            assert m.position is not None
            if isinstance(m, ms.InsertMsg):
                assert m.row_data == [bytes([pk]) for pk in m.row_ids]
                assert (m.begin_ts, m.end_ts) == (min(m.timestamps), max(m.timestamps))
                rows.update(dict.fromkeys(m.row_ids, m.position.channel))
            else:
                assert isinstance(m, ms.DeleteMsg)
                assert all(chans[ms.repack.hash_primary_key(pk) % 2] == m.position.channel for pk in m.primary_keys)
        assert rows == {pk: chans[h % 2] for pk, h in zip(pks, hashes, strict=True)}

    def test_bad_repack_sends_nothing(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 2)
        out = self.producer(streams, chans)
        before = out.get_latest_positions()
        out.set_repack_func(lambda msgs, keys: {0: ms.MsgPack.of(list(msgs)), 2: ms.MsgPack.of(list(msgs))})
        with pytest.raises(RepackError, match="index 2"):
            out.produce(ms.MsgPack.of([_data(1, 0)]))
        out.set_repack_func(ms.repack.default)
        with pytest.raises(RepackError, match="no hash_values"):
            out.produce(ms.MsgPack.of([_data(1, 0), ms.SearchMsg(begin_ts=1, end_ts=1)]))
        assert out.get_latest_positions() == before

    def test_broadcast_reaches_every_channel(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 3)
        inp = self.consumer(streams, chans)
        out = self.producer(streams, chans)
        ids = out.broadcast(_tick(5))
        assert sorted(ids) == sorted(chans) and all(len(v) == 1 for v in ids.values())
        got = consume_n(inp, 3, self.timeout)
        assert sorted(m.position.channel for m in got if m.position) == sorted(chans)
        assert all(m == ms.TimeTickMsg(begin_ts=5, end_ts=5) for m in got)

    def test_pack_positions(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 2)
        inp = self.consumer(streams, chans)
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([_data(i, i) for i in range(10)]))
        got: list[ms.TsMsg] = []
        deadline = time.monotonic() + self.timeout
        while len(got) < 10 and time.monotonic() < deadline:
            pack = inp.consume(timeout=1.0)
            if pack is None:
                continue
            got.extend(pack.msgs)
            for ch in {m.position.channel for m in pack.msgs if m.position}:
                mine = [m.position for m in pack.msgs if m.position and m.position.channel == ch]
                first = ms.Position(mine[0].channel, mine[0].msg_id, mine[0].timestamp, inclusive=True)
                assert first in pack.start_positions and mine[-1] in pack.end_positions
            assert len(pack.end_positions) == len({p.channel for p in pack.end_positions})
            assert pack.begin_ts == min(m.begin_ts for m in pack.msgs)
            assert pack.end_ts == max(m.end_ts for m in pack.msgs)
        assert len(got) == 10

    # -- subscriptions --------------------------------------------------------------------------
    def test_two_subscriptions_each_see_everything(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 2)
        a = self.consumer(streams, chans)
        b = self.consumer(streams, chans)
        out = self.producer(streams, chans)
        sent = [_data(i, i) for i in range(40)]
        out.produce(ms.MsgPack.of(sent))
        for inp in (a, b):
            got = consume_n(inp, 40, self.timeout)
            assert sorted(got, key=lambda m: m.row_ids if isinstance(m, ms.InsertMsg) else []) == sent

    def test_another_process_sees_channels_and_messages(self, client: ms.Client, url: str, feats: Features) -> None:
        """``cross_process``: a channel created here is described, and its messages consumed, by a client
        in another process on the same URL."""
        if not feats.cross_process:
            pytest.skip("backend declares cross_process=False")
        chans = self.channels(client, 2)
        with client.msg_stream() as out:
            out.create_producers(chans)
            out.produce(ms.MsgPack.of([_data(i, i) for i in range(6)]))
        reader = textwrap.dedent("""
            import sys, msgstream as ms
            with ms.connect(sys.argv[1]) as client, client.msg_stream() as inp:
                chans = sys.argv[2].split(",")
                roles = {d.owner.role for d in client.describe_channels(chans).descriptions}
                inp.create_consumers("other-process", chans)
                rows = []
                while len(rows) < 6:
                    pack = inp.consume(timeout=float(sys.argv[3]))
                    assert pack is not None, rows
                    rows += [m.row_ids[0] for m in pack.msgs]
                print(sorted(roles), sorted(rows))
        """)
        done = subprocess.run(
            [sys.executable, "-c", reader, url, ",".join(chans), str(self.timeout)],
            capture_output=True,
            text=True,
            timeout=self.timeout * 2,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split("\n")[0] == "['proxy'] [0, 1, 2, 3, 4, 5]", done.stdout

    def test_one_subscription_shares_without_duplicates(self, client: ms.Client, streams: Any, feats: Features) -> None:
        if not feats.shared_subscription:
            pytest.skip("backend declares shared_subscription=False")
        chans = self.channels(client, 4)
        sub = self.sub()
        members = [streams(receive_batch=5) for _ in range(2)]  # small packs: neither takes all at once
        for inp in members:
            inp.create_consumers(sub, chans)
            inp.start()
        out = self.producer(streams, chans)
        sent = [_data(i, i) for i in range(200)]
        for k in range(0, 200, 20):
            out.produce(ms.MsgPack.of(sent[k : k + 20]))
        got: dict[int, list[int]] = {0: [], 1: []}
        deadline = time.monotonic() + self.timeout
        while len(got[0]) + len(got[1]) < 200:
            assert time.monotonic() < deadline, f"received {len(got[0]) + len(got[1])} of 200"
            for i, inp in enumerate(members):
                pack = inp.consume(timeout=0.2)
                if pack is not None:
                    got[i].extend(r for m in pack.msgs if isinstance(m, ms.InsertMsg) for r in m.row_ids)
        everything = got[0] + got[1]
        assert sorted(everything) == list(range(200)), "a message was lost or delivered twice"
        if feats.balanced_members:
            assert got[0] and got[1], f"one member took everything: {len(got[0])} and {len(got[1])} messages"
        for inp in members:
            expect_quiet(inp, self.quiet_period)

    def test_existing_subscription_resumes_after_acknowledged(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        sub = self.sub()
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([_data(i, 0) for i in range(10)]))
        with client.msg_stream(receive_batch=4) as first:
            first.create_consumers(sub, chans)
            got = [m for pack in consume_packs(first, 4, self.timeout) for m in pack]  # acknowledged on close
        # position=LATEST is ignored for an existing subscription: it resumes where it was
        second = self.consumer(streams, chans, sub=sub, position=ms.SubscriptionPosition.LATEST)
        out.produce(ms.MsgPack.of([_data(i, 0) for i in range(10, 12)]))
        rest = consume_n(second, 12 - len(got), self.timeout)
        assert [m.row_ids[0] for m in got + rest if isinstance(m, ms.InsertMsg)] == list(range(12))

    def test_unacknowledged_messages_go_to_the_next_member(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 2)
        sub = self.sub()
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([_data(i, i) for i in range(10)]))
        first = streams(auto_ack=False)
        first.create_consumers(sub, chans)
        got = consume_n(first, 10, self.timeout)
        first.ack([m for m in got if isinstance(m, ms.InsertMsg) and m.row_ids[0] < 4])
        first.close()  # leaves 4..9 delivered but not acknowledged: they must not be lost
        second = self.consumer(streams, chans, sub=sub)
        again = consume_n(second, 6, self.timeout)
        assert sorted(m.row_ids[0] for m in again if isinstance(m, ms.InsertMsg)) == [4, 5, 6, 7, 8, 9]
        for ch in chans:  # and in channel order
            mine = [m for m in again if m.position and m.position.channel == ch]
            assert mine == [m for m in got if m.position and m.position.channel == ch and m in mine]
        expect_quiet(second, self.quiet_period)

    def test_a_member_joining_on_another_channel_does_not_hand_held_messages_back(
        self, client: ms.Client, streams: Any
    ) -> None:
        """A member holds messages unacknowledged (a time-tick stream waiting for their tick does) while
        another member of the subscription joins on another channel. The holder keeps its channel and
        must not receive what it holds a second time (on Kafka the join rebalances the group, and every
        partition restarts from the committed offset); acknowledged afterwards, they are not handed over."""
        mine, other = self.channels(client, 2)
        sub = self.sub()
        out = self.producer(streams, [mine, other])
        out.produce(ms.MsgPack.of([_data(i, 0) for i in range(3)]))
        holder = streams(auto_ack=False)
        holder.create_consumers(sub, [mine])
        held = consume_n(holder, 3, self.timeout)
        joiner = self.consumer(streams, [other], sub=sub)
        out.produce(ms.MsgPack.of([_data(9, 1)]))  # on other: the joiner has it once it took part
        deadline = time.monotonic() + self.timeout
        while (pack := joiner.consume(timeout=0.2)) is None:
            assert time.monotonic() < deadline, "the joining member received nothing"
            again = holder.consume(timeout=0.2)  # the holder takes part in the rebalance
            assert again is None, f"held messages delivered again: {again.msgs}"
        assert [m.row_ids for m in pack.msgs if isinstance(m, ms.InsertMsg)] == [[9]]
        expect_quiet(holder, self.quiet_period)
        holder.ack(held)
        holder.close()
        expect_quiet(self.consumer(streams, [mine], sub=sub), self.quiet_period)

    def test_acks_out_of_order_keep_every_unacknowledged_message(
        self, client: ms.Client, streams: Any, feats: Features
    ) -> None:
        """Acks in any order, twice, or ahead of older messages: whatever is not acknowledged reaches the
        next member, and nothing acknowledged does (without ``exact_acks``: an acknowledged prefix does
        not; what was acknowledged after an unacknowledged message may come again)."""
        chans = self.channels(client, 1)
        sub = self.sub()
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([_data(i, 0) for i in range(10)]))
        first = streams(auto_ack=False)
        first.create_consumers(sub, chans)
        got = {m.row_ids[0]: m for m in consume_n(first, 10, self.timeout) if isinstance(m, ms.InsertMsg)}
        assert sorted(got) == list(range(10))
        first.ack([got[i] for i in (9, 6, 8, 7)])  # ahead of 0..5
        first.ack([got[i] for i in (2, 0, 1)])  # the prefix 0..2, out of order
        first.ack([got[0], got[9]])  # again
        first.close()
        second = self.consumer(streams, chans, sub=sub)
        again: list[int] = []
        deadline = time.monotonic() + self.timeout
        quiet_from = None
        while quiet_from is None or time.monotonic() < quiet_from + self.quiet_period:
            assert time.monotonic() < deadline, f"received {again} within {self.timeout}s, expected 3..5 first"
            pack = second.consume(timeout=0.2)
            if pack is not None:
                again += [m.row_ids[0] for m in pack.msgs if isinstance(m, ms.InsertMsg)]
                quiet_from = time.monotonic() if len(again) >= 3 else None
        assert again[:3] == [3, 4, 5], f"unacknowledged 3..5 not handed over in order: {again}"
        if feats.exact_acks:
            assert again == [3, 4, 5], f"acknowledged messages handed over: {again}"
        else:  # one offset per channel: 6..9 come again, as a whole, and nothing else
            assert again[3:] in ([], [6, 7, 8, 9]), f"acknowledged messages handed over: {again}"

    def test_destroyed_channel_fails_open_streams(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        out = self.producer(streams, chans)
        inp = self.consumer(streams, chans)
        out.produce(ms.MsgPack.of([_data(0, 0)]))
        consume_n(inp, 1, self.timeout)
        client.destroy_channels(chans)
        with pytest.raises(ProduceError):
            out.produce(ms.MsgPack.of([_data(1, 0)]))
        with pytest.raises(ChannelNotFoundError):
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                inp.consume(timeout=0.5)

    def test_channel_destroyed_by_another_client(self, client: ms.Client, url: str) -> None:
        """Client B holds a producer and a consumer of a channel that client A destroys: every later
        produce of B fails within its timeout claiming nothing sent, B's consumer gets
        ChannelNotFoundError, and the channel does not come back (no late produce re-creates it)."""
        produce_timeout = 5.0
        chans = self.channels(client, 1)
        with self.connect(url) as other:
            out = other.msg_stream(produce_timeout=produce_timeout)
            out.create_producers(chans)
            inp = other.msg_stream()
            inp.create_consumers(self.sub(), chans)
            out.produce(ms.MsgPack.of([_data(0, 0)]))
            consume_n(inp, 1, self.timeout)
            out.produce(ms.MsgPack.of([_data(0, 0)]))  # whatever B caches about the channel is fresh now
            client.destroy_channels(chans)
            for i in range(3):  # at once, and again once a client's caches have had time to go stale
                start = time.monotonic()
                with pytest.raises((ProduceError, ChannelNotFoundError)) as err:
                    out.produce(ms.MsgPack.of([_data(i + 1, 0)]))
                assert time.monotonic() - start < produce_timeout + 5, "produce outlived its timeout"
                if isinstance(err.value, ProduceError):
                    assert not any(err.value.sent.values()), f"claimed as sent: {err.value.sent}"
                time.sleep(i)
            with pytest.raises(ChannelNotFoundError):
                deadline = time.monotonic() + self.timeout
                while time.monotonic() < deadline:
                    inp.consume(timeout=0.5)
            with pytest.raises(ChannelNotFoundError):  # and again: the consumer does not fall silent
                inp.consume(timeout=0.5)
            out.close()
            inp.close()
        with self.connect(url) as third, pytest.raises(ChannelNotFoundError):
            third.describe_channels(chans)
        with pytest.raises(ChannelNotFoundError):
            client.describe_channels(chans)

    def test_a_join_refused_for_a_missing_channel_subscribes_to_none(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        sub = self.sub()
        stream = streams()
        with pytest.raises(ChannelNotFoundError):
            stream.create_consumers(sub, [*chans, "no-such-channel-" + uuid.uuid4().hex[:8]])
        assert sub not in client.list_subscriptions(chans[0])

    def test_latest_subscription_starts_after_existing_messages(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 2)
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([_data(i, i) for i in range(6)]))
        inp = self.consumer(streams, chans, position=ms.SubscriptionPosition.LATEST)
        out.produce(ms.MsgPack.of([_data(i, i) for i in range(6, 9)]))
        got = consume_n(inp, 3, self.timeout)
        assert sorted(m.row_ids[0] for m in got if isinstance(m, ms.InsertMsg)) == [6, 7, 8]
        expect_quiet(inp, self.quiet_period)

    # -- positions and seek ---------------------------------------------------------------------
    def test_seek_to_checkpoint_loses_and_repeats_nothing(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 3)
        out = self.producer(streams, chans)
        sent = [_data(i, i) for i in range(90)]
        out.produce(ms.MsgPack.of(sent[:60]))
        first = self.consumer(streams, chans, sub=self.sub())
        seen: list[ms.TsMsg] = []
        checkpoint: dict[str, bytes] = {}
        while len(seen) < 30:
            pack = first.consume(timeout=self.timeout)
            assert pack is not None, "no messages"
            seen.extend(pack.msgs)
            checkpoint.update({p.channel: p.to_bytes() for p in pack.end_positions})
        out.produce(ms.MsgPack.of(sent[60:]))
        # a new process: fresh stream, its own subscription, positions restored from bytes
        resumed = streams()
        resumed.create_consumers(self.sub(), chans)
        resumed.seek([ms.Position.from_bytes(b) for b in checkpoint.values()])
        resumed.start()
        touched = [m for m in sent if chans[m.hash_values[0] % 3] in checkpoint]
        # channels without a checkpoint start from their first message (EARLIEST): everything unseen comes
        rest = consume_n(resumed, 90 - len(seen), self.timeout)
        again = [m.row_ids[0] for m in [*seen, *rest] if isinstance(m, ms.InsertMsg) and m in touched]
        assert sorted(again) == sorted(m.row_ids[0] for m in touched)
        assert len({m.row_ids[0] for m in rest if isinstance(m, ms.InsertMsg)}) == len(rest), "repeated"
        expect_quiet(resumed, self.quiet_period)

    def test_seek_of_one_channel_leaves_the_others_alone(self, client: ms.Client, streams: Any) -> None:
        """Messages of a channel that was not a seek target, held unacknowledged across the seek, are
        neither delivered again nor lost: the caller's later ack of them counts."""
        chans = self.channels(client, 2)
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([_data(i, i) for i in range(20)]))  # even rows -> chans[0], odd -> chans[1]
        inp = streams(auto_ack=False)
        inp.create_consumers(self.sub(), chans)
        got = consume_n(inp, 20, self.timeout)
        mark = next(m for m in got if isinstance(m, ms.InsertMsg) and m.row_ids == [8])
        assert mark.position is not None and mark.position.channel == chans[0]
        inp.seek([mark.position])
        inp.ack([m for m in got if m.position and m.position.channel == chans[1]])  # held across the seek
        again = consume_n(inp, 5, self.timeout)
        assert sorted(m.row_ids[0] for m in again if isinstance(m, ms.InsertMsg)) == [10, 12, 14, 16, 18]
        inp.ack(again)
        expect_quiet(inp, self.quiet_period)

    def test_seek_to_start_positions_replays_the_pack(self, client: ms.Client, streams: Any) -> None:
        """A plain pack's start positions are inclusive: seeking to them (through bytes, as a checkpoint
        would) delivers the pack again from its first message, on every channel it touched."""
        chans = self.channels(client, 2)
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([_data(i, i) for i in range(4)]))
        inp = self.consumer(streams, chans)
        consume_n(inp, 4, self.timeout)  # the replayed pack does not start at the channels' first messages
        out.produce(ms.MsgPack.of([_data(i, i) for i in range(4, 12)]))
        pack = inp.consume(timeout=self.timeout)
        assert pack is not None and pack.start_positions
        inp.seek([ms.Position.from_bytes(p.to_bytes()) for p in pack.start_positions])
        again = consume_n(inp, 8, self.timeout)  # the pack again, and what came after it
        assert sorted(m.row_ids[0] for m in again if isinstance(m, ms.InsertMsg)) == list(range(4, 12))
        frames = streams()
        frames.create_consumers(self.sub(), chans)
        first = frames.consume_frames(timeout=self.timeout)
        assert first is not None
        frames.seek(first.start_positions)
        want = {(f.channel, f.msg_id) for f in first.frames}
        replayed: set[tuple[str, bytes]] = set()
        deadline = time.monotonic() + self.timeout
        while not want <= replayed and time.monotonic() < deadline:
            replay = frames.consume_frames(timeout=0.5)
            replayed.update((f.channel, f.msg_id) for f in replay or [])
        assert want <= replayed, "seeking to a frame pack's start positions did not replay it"

    def test_seek_to_empty_position_starts_from_first(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        inp = self.consumer(streams, chans, position=ms.SubscriptionPosition.LATEST)
        empty = inp.get_latest_positions()
        assert empty == [ms.Position(chans[0], b"", 0)]
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([_data(i, 0) for i in range(5)]))
        got = consume_n(inp, 5, self.timeout)
        inp.seek(empty)
        assert consume_n(inp, 5, self.timeout) == got

    def test_latest_positions(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 2)
        out = self.producer(streams, chans)
        ids = out.produce(ms.MsgPack.of([_data(i, 0) for i in range(5)]))
        latest = out.get_latest_positions()
        assert latest[0] == ms.Position(chans[0], ids[chans[0]][-1], 0)
        assert latest[1] == ms.Position(chans[1], b"", 0)
        inp = streams()
        inp.create_consumers(self.sub(), chans)
        inp.seek(latest)  # resume after the newest message: only what comes next
        out.produce(ms.MsgPack.of([_data(i, i) for i in range(5, 7)]))
        got = consume_n(inp, 2, self.timeout)
        assert sorted(m.row_ids[0] for m in got if isinstance(m, ms.InsertMsg)) == [5, 6]
        assert {m.position.msg_id for m in got if m.position and m.position.channel == chans[0]} == {
            out.get_latest_positions()[0].msg_id
        }

    def test_seek_rejects_invalid_positions(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        other = self.channels(client, 1)
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([_data(i, 0) for i in range(3)]))
        inp = streams()
        inp.create_consumers(self.sub(), chans)
        with pytest.raises(SeekError):
            inp.seek([ms.Position(other[0], b"", 0)])
        with pytest.raises(SeekError):
            inp.seek([ms.Position(chans[0], b"\xff" * 8, 0)])
        with pytest.raises(InvalidArgumentError):
            inp.seek(ms.Position(chans[0], b"", 0))
        for bad_id in ("00000000", 0):  # a Struct does not check its field types: seek does
            with pytest.raises(InvalidArgumentError):
                inp.seek([ms.Position(chans[0], bad_id, 0)])  # type: ignore[arg-type]
        for bad_ts in (None, "5", -1, True):
            with pytest.raises(InvalidArgumentError):
                inp.seek([ms.Position(chans[0], b"", bad_ts)])  # type: ignore[arg-type]
        tt = streams(tt=True)  # a time-tick stream keeps the timestamp: a bad one failed its next consume
        tt.create_consumers(self.sub(), chans)
        with pytest.raises(InvalidArgumentError):
            tt.seek([ms.Position(chans[0], b"", None)])  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            tt.seek([ms.Position(chans[0], b"", 0, inclusive=1)])  # type: ignore[arg-type]

    def test_ack_of_another_channels_message_is_refused_and_acknowledges_nothing(
        self, client: ms.Client, streams: Any
    ) -> None:
        mine, other = self.channels(client, 1), self.channels(client, 1)
        for chans in (mine, other):
            self.producer(streams, chans).produce(ms.MsgPack.of([_data(i, 0) for i in range(3)]))
        sub = self.sub()
        inp, theirs = streams(auto_ack=False), streams()
        inp.create_consumers(sub, mine)
        theirs.create_consumers(self.sub(), other)
        assert len(consume_n(inp, 3)) == 3
        foreign = consume_n(theirs, 3)
        with pytest.raises(InvalidArgumentError):  # same ids, another channel: acknowledging would skip mine
            inp.ack(foreign[:1])
        inp.close()
        again = streams()
        again.create_consumers(sub, mine)
        assert sorted(m.row_ids[0] for m in consume_n(again, 3)) == [0, 1, 2]  # type: ignore[attr-defined]

    def test_ack_of_records_never_delivered_is_ignored_or_a_typed_error(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([_data(i, 0) for i in range(3)]))
        inp = streams()
        inp.create_consumers(self.sub(), chans, position=ms.SubscriptionPosition.EARLIEST)
        for foreign in (b"\xff" * 8, b"\x01" * 9, b""):
            with contextlib.suppress(ms.errors.MsgStreamError):  # a broker may refuse an id it cannot parse
                inp.ack([ms.RawMessage(chans[0], foreign, b"")])
        assert sorted(m.row_ids[0] for m in consume_n(inp, 3)) == [0, 1, 2]  # type: ignore[attr-defined]

    # -- errors ---------------------------------------------------------------------------------
    def test_unknown_channels_raise(self, client: ms.Client) -> None:
        missing = "missing-" + uuid.uuid4().hex
        with pytest.raises(ChannelNotFoundError), client.msg_stream() as s:
            s.create_producers([missing])
        with pytest.raises(ChannelNotFoundError), client.msg_stream() as s:
            s.create_consumers(self.sub(), [missing])
        with pytest.raises(ChannelNotFoundError):
            client.describe_channels([missing])

    def test_closed_stream_raises(self, client: ms.Client) -> None:
        chans = self.channels(client, 1)
        s = client.msg_stream()
        s.create_producers(chans)
        s.create_consumers(self.sub(), chans)
        s.close()
        s.close()  # idempotent
        with pytest.raises(StreamClosedError):
            s.produce(ms.MsgPack.of([_data(1, 0)]))
        with pytest.raises(StreamClosedError):
            s.consume(timeout=0.1)
        with pytest.raises(StreamClosedError):
            s.seek([])

    def test_bad_arguments_raise_typed_errors(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        s = self.producer(streams, chans)
        s.create_consumers(self.sub(), chans)
        bad_packs: list[Any] = [[_data(1, 0)], None, ms.MsgPack(1, 1, [b"raw"])]  # type: ignore[list-item]
        for bad in bad_packs:
            with pytest.raises(InvalidArgumentError):
                s.produce(bad)
        bad_timeouts: list[Any] = [-1, float("nan"), "1", None]
        for timeout in bad_timeouts:
            with pytest.raises(InvalidArgumentError):
                s.consume(timeout=timeout)
        with pytest.raises(InvalidArgumentError):
            s.create_producers(chans[0])  # a str, not a list
        assert s.produce(ms.MsgPack(0, 0, [])) == {}

    def test_consume_timeout_is_kept(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 2)
        inp = self.consumer(streams, chans)
        for timeout in (0.0, 0.3):
            start = time.monotonic()
            assert inp.consume(timeout=timeout) is None
            took = time.monotonic() - start
            assert took < timeout + 2.0, f"consume(timeout={timeout}) took {took:.2f} s"
            # and it waits that long for a message: every quiet check in this suite counts on it
            assert took >= timeout - 0.01, f"consume(timeout={timeout}) gave up after {took:.3f} s"

    def test_corrupt_frame_is_reported_and_stream_goes_on(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        inp = self.consumer(streams, chans)
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([_data(0, 0)]))
        raw = client.backend.create_producer(chans[0])
        try:
            bad_ids = raw.send([b"not a frame", _data(1, 0).marshal()[:-3]], self.timeout)
        finally:
            raw.close()
        out.produce(ms.MsgPack.of([_data(2, 0)]))
        good: list[ms.TsMsg] = []
        errors: list[UnmarshalError] = []
        deadline = time.monotonic() + self.timeout
        while len(good) < 2 or len(errors) < 2:
            assert time.monotonic() < deadline, f"good={len(good)} errors={len(errors)}"
            try:
                pack = inp.consume(timeout=1.0)
            except UnmarshalError as exc:
                errors.append(exc)
                continue
            if pack is not None:
                good.extend(pack.msgs)
        assert good == [_data(0, 0), _data(2, 0)]
        assert [e.position.msg_id for e in errors if e.position] == bad_ids
        assert all(e.position and e.position.channel == chans[0] for e in errors)

    def test_frames_consume_once_and_resume_after_their_positions(self, client: ms.Client, streams: Any) -> None:
        """consume_frames: the same delivery as consume (each message once, per-channel order, acknowledged
        with the next call), decoded on demand, and its end_positions resume a fresh stream after it."""
        chans = self.channels(client, 2)
        self.producer(streams, chans).produce(ms.MsgPack.of([_data(i, i % 2) for i in range(40)]))
        sub = self.sub()
        inp = streams(receive_batch=7)
        inp.create_consumers(sub, chans)
        got: list[ms.TsMsg] = []
        checkpoint: dict[str, ms.Position] = {}
        deadline = time.monotonic() + self.timeout
        while len(got) < 20:
            assert time.monotonic() < deadline, f"received {len(got)} of 20 within {self.timeout}s"
            pack = inp.consume_frames(timeout=1.0)
            if pack is None:
                continue
            assert 1 <= len(pack) <= 7
            assert all(ms.frame_type(f.payload) == ms.MsgType.INSERT for f in pack)
            msgs = pack.unmarshal().msgs
            assert [(f.channel, f.msg_id) for f in pack] == [(m.position.channel, m.position.msg_id) for m in msgs]
            got.extend(msgs)
            checkpoint.update((p.channel, p) for p in pack.end_positions)
        rows = [m.row_ids[0] for m in got if isinstance(m, ms.InsertMsg)]
        assert len(rows) == len(got) == len(set(rows)), "a message came twice"
        for c in range(2):
            mine = [r for r in rows if r % 2 == c]
            assert mine == sorted(mine), f"channel {c} out of order"
        inp.close()  # acknowledges the last pack
        left = set(range(40)) - set(rows)
        resumed = self.consumer(streams, chans, self.sub())  # a new subscription, from the checkpoint
        resumed.seek(list(checkpoint.values()))
        rest = consume_n(resumed, len(left), self.timeout)
        assert {m.row_ids[0] for m in rest if isinstance(m, ms.InsertMsg)} == left
        again = self.consumer(streams, chans, sub)  # the old one resumes after what it was given
        rest = consume_n(again, len(left), self.timeout)
        assert {m.row_ids[0] for m in rest if isinstance(m, ms.InsertMsg)} == left

    def test_on_error_hook_gets_bad_frames(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        reported: list[UnmarshalError] = []
        inp = streams(on_error=reported.append)
        inp.create_consumers(self.sub(), chans)
        raw = client.backend.create_producer(chans[0])
        try:  # a batch that starts with many bad frames (no recursion limit may bite), then good ones
            raw.send([b"\x00" * 3] * 1100, self.timeout)
        finally:
            raw.close()
        good = [_data(i, 0) for i in range(3)]
        self.producer(streams, chans).produce(ms.MsgPack.of(good))
        assert consume_n(inp, 3, self.timeout) == good
        expect_quiet(inp, self.quiet_period)  # and nothing twice
        assert len(reported) == 1100 and all(e.position is not None for e in reported)

    def test_exception_in_with_block_leaves_pack_for_redelivery(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        sub = self.sub()
        self.producer(streams, chans).produce(ms.MsgPack.of([_data(i, 0) for i in range(5)]))
        with pytest.raises(ZeroDivisionError), client.msg_stream() as failing:
            failing.create_consumers(sub, chans)
            packs = consume_packs(failing, 5, self.timeout)  # every pack but the last is acknowledged
            raise ZeroDivisionError("the handler failed")
        in_hand = len(packs[-1])
        again = self.consumer(streams, chans, sub=sub)
        rows = [m.row_ids[0] for m in consume_n(again, in_hand, self.timeout) if isinstance(m, ms.InsertMsg)]
        assert rows == list(range(5 - in_hand, 5))

    def test_seek_is_all_or_nothing(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 2)
        out = self.producer(streams, chans)
        ids = out.produce(ms.MsgPack.of([_data(i, i) for i in range(6)]))
        inp = streams()
        inp.create_consumers(self.sub(), chans)
        first = ms.Position(chans[0], ids[chans[0]][-1], 0)  # valid: would skip all of channel 0
        with pytest.raises(SeekError):
            inp.seek([first, ms.Position(chans[1], b"\xff" * 8, 0)])
        got = consume_n(inp, 6, self.timeout)  # nothing moved: everything still comes
        assert sorted(m.row_ids[0] for m in got if isinstance(m, ms.InsertMsg)) == list(range(6))
        for bad in (None, first, [first, first]):
            with pytest.raises((InvalidArgumentError, SeekError)):
                inp.seek(bad)

    def test_messages_no_consumer_could_read_are_refused(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        out = self.producer(streams, chans)
        before = out.get_latest_positions()
        bad_msgs: list[Any] = [
            ms.InsertMsg(hash_values=[0], row_ids=[1.5]),  # type: ignore[list-item]
            ms.InsertMsg(hash_values=[0], row_data=["text"]),  # type: ignore[list-item]
            ms.InsertMsg(hash_values=["a"]),  # type: ignore[list-item]
            ms.InsertMsg(hash_values=None),  # type: ignore[arg-type]
        ]
        for bad in bad_msgs:
            with pytest.raises(InvalidArgumentError):
                out.produce(ms.MsgPack.of([_data(0, 0), bad]))
        assert out.get_latest_positions() == before
        inp = self.consumer(streams, chans)
        with pytest.raises(InvalidArgumentError):
            inp.ack([ms.MsgPack(0, 0, [])])

    # -- time-tick stream -----------------------------------------------------------------------
    def test_tt_one_pack_per_tick_in_timestamp_order(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 3)
        tt = self.consumer(streams, chans, tt=True)
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([_data(i, i, ts=ts) for i, ts in enumerate([5, 3, 9, 12, 1, 8])]))
        out.broadcast(_tick(10))
        out.broadcast(_tick(20))
        first = tt.consume(timeout=self.timeout)
        assert first is not None and (first.begin_ts, first.end_ts) == (0, 10)
        assert [m.end_ts for m in first.msgs] == [1, 3, 5, 8, 9]
        assert all(not isinstance(m, ms.TimeTickMsg) for m in first.msgs)
        second = tt.consume(timeout=self.timeout)
        assert second is not None and (second.begin_ts, second.end_ts) == (10, 20)
        assert [m.end_ts for m in second.msgs] == [12]
        assert tt.consume(timeout=self.quiet_period) is None
        out.broadcast(_tick(30))
        empty = tt.consume(timeout=self.timeout)
        assert empty is not None and (empty.begin_ts, empty.end_ts, empty.msgs) == (20, 30, [])

    def test_tt_waits_for_every_channel(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 2)
        tt = self.consumer(streams, chans, tt=True)
        only_first = self.producer(streams, chans[:1])
        only_first.produce(ms.MsgPack.of([_data(1, 0, ts=4)]))
        only_first.broadcast(_tick(10))
        deadline = time.monotonic() + self.timeout
        while tt.lagging_channels() != chans[1:]:  # until the first channel's tick has arrived
            assert time.monotonic() < deadline, "the first channel's tick never arrived"
            assert tt.consume(timeout=0.2) is None  # the second channel has not ticked: no pack
        assert tt.consume(timeout=self.quiet_period) is None
        second = self.producer(streams, chans[1:])
        second.broadcast(_tick(10))
        pack = tt.consume(timeout=self.timeout)
        assert pack is not None and [m.end_ts for m in pack.msgs] == [4]

    def test_tt_seek_resumes_after_tick(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 2)
        sent = [_data(0, 0, ts=3), _data(1, 1, ts=7), _data(2, 0, ts=15), _data(3, 1, ts=12)]
        out = self.producer(streams, chans)
        # channel 0 ticks 10 then 20; channel 1 goes ahead: tick 20 arrives before 10's pack is taken
        out.produce(ms.MsgPack.of(sent))
        out.broadcast(_tick(10))
        out.produce(ms.MsgPack.of([_data(4, 1, ts=25)]))
        out.broadcast(_tick(20))
        tt = self.consumer(streams, chans, tt=True)
        pack = tt.consume(timeout=self.timeout)
        assert pack is not None and pack.end_ts == 10
        assert [m.end_ts for m in pack.msgs] == [3, 7]
        saved = [p.to_bytes() for p in pack.end_positions]
        tt.close()
        resumed = self.consumer(streams, chans, tt=True)
        resumed.seek([ms.Position.from_bytes(b) for b in saved])
        nxt = resumed.consume(timeout=self.timeout)
        assert nxt is not None and (nxt.begin_ts, nxt.end_ts) == (10, 20)
        assert [m.end_ts for m in nxt.msgs] == [12, 15]
        out.broadcast(_tick(30))
        last = resumed.consume(timeout=self.timeout)
        assert last is not None and [m.end_ts for m in last.msgs] == [25]

    def test_tt_backwards_tick_raises(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        tt = self.consumer(streams, chans, tt=True)
        out = self.producer(streams, chans)
        out.broadcast(_tick(10))
        assert tt.consume(timeout=self.timeout) is not None
        out.broadcast(_tick(5))
        with pytest.raises(TimeTickError, match=chans[0]):
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                tt.consume(timeout=1.0)
        out.produce(ms.MsgPack.of([_data(0, 0, ts=8)]))
        with pytest.raises(TimeTickError, match="at or below the tick 10"):
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                tt.consume(timeout=1.0)

    def test_tt_passes_user_types(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 2)
        dispatcher = ms.UnmarshalDispatcher()
        dispatcher.add_msg_template(FlushMsg.msg_type, FlushMsg)
        tt = self.consumer(streams, chans, tt=True, dispatcher=dispatcher)
        out = self.producer(streams, chans)
        flush = FlushMsg(begin_ts=4, end_ts=4, hash_values=[1], segment_ids=[9])
        out.produce(ms.MsgPack.of([flush, _data(0, 0, ts=2)]))
        out.broadcast(_tick(5))
        pack = tt.consume(timeout=self.timeout)
        assert pack is not None and pack.msgs == [_data(0, 0, ts=2), flush]

    # -- operations: health, subscriptions, lag -------------------------------------------------
    @staticmethod
    def _timed(i: int, hash_value: int = 0, base_ms: int = 1_700_000_000_000) -> ms.InsertMsg:
        """Row ``i`` whose end_ts is ``i`` seconds after ``base_ms`` (a hybrid timestamp)."""
        ts = ms.timestamp.compose(base_ms + 1000 * i)
        return ms.InsertMsg(begin_ts=ts, end_ts=ts, hash_values=[hash_value], row_ids=[i], row_data=[b"r"])

    def _lag_becomes(self, stream: Any, want: list[ms.ChannelLag]) -> None:
        """Wait (bounded) until ``stream.lag()`` equals ``want``: some brokers apply acknowledgements
        asynchronously."""
        deadline = time.monotonic() + self.timeout
        while (got := stream.lag()) != want:
            assert time.monotonic() < deadline, f"lag is {got}, expected {want}"
            time.sleep(0.05)

    def test_ping_answers(self, client: ms.Client) -> None:
        client.ping(timeout=5.0)  # returns (None) once the broker answered, raises otherwise
        with pytest.raises(InvalidArgumentError):
            client.ping(timeout=-1)

    def test_list_channels_shows_created_and_not_destroyed(self, client: ms.Client, url: str) -> None:
        chans = self.channels(client, 3)
        assert set(chans) <= set(client.list_channels())
        client.destroy_channels(chans[2:])
        with self.connect(url) as other:  # another client of the same broker sees the same list
            listed = set(other.list_channels())
        assert set(chans[:2]) <= listed and chans[2] not in listed

    def test_list_and_drop_subscriptions(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 2)
        sub, other = self.sub(), self.sub()
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([_data(i, i) for i in range(10)]))
        for name in (sub, other):
            with client.msg_stream() as inp:
                inp.create_consumers(name, chans)
                consume_n(inp, 10, self.timeout)  # acknowledged on close
        for ch in chans:
            assert {sub, other} <= set(client.list_subscriptions(ch))
        client.drop_subscription(sub, chans)
        for ch in chans:
            listed = client.list_subscriptions(ch)
            assert sub not in listed and other in listed
        again = self.consumer(streams, chans, sub=sub)  # starts afresh: everything again
        assert sorted(m.row_ids[0] for m in consume_n(again, 10, self.timeout) if isinstance(m, ms.InsertMsg)) == list(
            range(10)
        )
        client.drop_subscription(self.sub(), chans)  # one the channels never had: nothing happens
        with pytest.raises(ChannelNotFoundError):
            client.list_subscriptions(f"missing-{uuid.uuid4().hex[:8]}")
        with pytest.raises(ChannelNotFoundError):
            client.drop_subscription(other, [chans[0], f"missing-{uuid.uuid4().hex[:8]}"])
        assert other in client.list_subscriptions(chans[0])  # checked first: nothing dropped

    def test_drop_subscription_with_live_member_is_refused(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        sub = self.sub()
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([_data(i, 0) for i in range(4)]))
        inp = self.consumer(streams, chans, sub=sub)
        got = consume_packs(inp, 1, self.timeout)
        with pytest.raises(SubscriptionInUseError):
            client.drop_subscription(sub, chans)
        out.produce(ms.MsgPack.of([_data(i, 0) for i in range(4, 8)]))  # the member goes on undisturbed
        rows = [m.row_ids[0] for pack in got for m in pack if isinstance(m, ms.InsertMsg)]
        rows += [m.row_ids[0] for m in consume_n(inp, 8 - len(rows), self.timeout) if isinstance(m, ms.InsertMsg)]
        assert rows == list(range(8))
        inp.close()
        client.drop_subscription(sub, chans)
        assert sub not in client.list_subscriptions(chans[0])

    def test_a_consume_returns_at_most_receive_batch(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 4)
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([_data(i, i % 4) for i in range(40)]))
        inp = streams(receive_batch=3)
        inp.create_consumers(self.sub(), chans)
        rows: list[int] = []
        deadline = time.monotonic() + self.timeout
        while len(rows) < 40:
            assert time.monotonic() < deadline, f"received {len(rows)} of 40"
            pack = inp.consume(timeout=0.5)
            if pack is not None:
                assert len(pack.msgs) <= 3, f"a batch of {len(pack.msgs)} with receive_batch=3"
                rows += [m.row_ids[0] for m in pack.msgs if isinstance(m, ms.InsertMsg)]
        assert sorted(rows) == list(range(40))

    def test_drop_subscription_is_refused_for_a_member_that_has_not_received(
        self, client: ms.Client, streams: Any, url: str, feats: Features
    ) -> None:
        chans = self.channels(client, 1)
        sub = self.sub()
        inp = self.consumer(streams, chans, sub=sub, position=ms.SubscriptionPosition.LATEST)
        with pytest.raises(SubscriptionInUseError):  # its own client knows the member
            client.drop_subscription(sub, chans)
        if feats.members_before_receive:
            with self.connect(url) as other, pytest.raises(SubscriptionInUseError):  # and so does the broker
                other.drop_subscription(sub, chans)
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([_data(i, 0) for i in range(4)]))  # after its start: all its own
        assert [m.row_ids[0] for m in consume_n(inp, 4, self.timeout) if isinstance(m, ms.InsertMsg)] == [0, 1, 2, 3]

    def test_lag_counts_after_the_last_returned_message(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 2)
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([self._timed(i, 0) for i in range(10)] + [self._timed(i, 1) for i in range(4)]))
        inp = streams(receive_batch=3)
        inp.create_consumers(self.sub(), chans)
        # nothing returned or acknowledged yet: everything counts, from the first message
        assert inp.lag() == [ms.ChannelLag(chans[0], 10, 9.0), ms.ChannelLag(chans[1], 4, 3.0)]
        last: dict[str, int] = {}
        while chans[0] not in last:
            for m in consume_packs(inp, 1, self.timeout)[0]:
                assert isinstance(m, ms.InsertMsg) and m.position is not None
                last[m.position.channel] = m.row_ids[0]
        want = [
            ms.ChannelLag(ch, total - 1 - last[ch], float(total - 1 - last[ch]))
            if ch in last
            else ms.ChannelLag(ch, total, float(total - 1))
            for ch, total in zip(chans, (10, 4), strict=True)
        ]
        assert last[chans[0]] < 9 and inp.lag() == want
        consume_n(inp, 14 - sum(r + 1 for r in last.values()), self.timeout)
        assert inp.lag() == [ms.ChannelLag(chans[0], 0, 0.0), ms.ChannelLag(chans[1], 0, 0.0)]
        out.produce(ms.MsgPack.of([self._timed(12, 0)]))
        assert inp.lag()[0] == ms.ChannelLag(chans[0], 1, 3.0)

    def test_lag_is_right_across_a_consumer_restart(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        sub = self.sub()
        out = self.producer(streams, chans)
        out.produce(ms.MsgPack.of([self._timed(i) for i in range(10)]))
        with client.msg_stream(receive_batch=4) as first:
            first.create_consumers(sub, chans)
            got = [m for pack in consume_packs(first, 4, self.timeout) for m in pack]
            before = first.lag()
            assert before == [ms.ChannelLag(chans[0], 10 - len(got), float(10 - len(got)))]
        # a new member of the subscription, nothing returned yet: counted from the acknowledged position
        second = self.consumer(streams, chans, sub=sub)
        self._lag_becomes(second, before)
        rest = consume_n(second, 10 - len(got), self.timeout)
        assert [m.row_ids[0] for m in got + rest if isinstance(m, ms.InsertMsg)] == list(range(10))
        assert second.lag() == [ms.ChannelLag(chans[0], 0, 0.0)]

    def test_tt_lag_counts_what_packs_did_not_cover(self, client: ms.Client, streams: Any) -> None:
        chans = self.channels(client, 1)
        tt = self.consumer(streams, chans, tt=True)
        out = self.producer(streams, chans)
        tick = ms.timestamp.compose(1_700_000_000_000 + 1500)
        out.produce(ms.MsgPack.of([self._timed(0), self._timed(1)]))
        out.broadcast(ms.MsgPack(tick, tick, [ms.TimeTickMsg(begin_ts=tick, end_ts=tick)]))
        out.produce(ms.MsgPack.of([self._timed(2), self._timed(4)]))
        pack = tt.consume(timeout=self.timeout)
        assert pack is not None and [m.row_ids[0] for m in pack.msgs if isinstance(m, ms.InsertMsg)] == [0, 1]
        # the pack covered rows 0, 1 and the tick; rows 2 and 4 wait for the next tick
        self._lag_becomes(tt, [ms.ChannelLag(chans[0], 2, 4.0 - 1.5)])
