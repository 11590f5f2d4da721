"""Time-tick stream behaviours beyond the conformance suite: lag reporting, the buffer limit, idle CPU,
and the producer-side helpers (hybrid timestamps, Ticker)."""

from __future__ import annotations

import logging
import resource
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import msgstream as ms
from msgstream import timestamp
from msgstream.errors import ConsumeError, InvalidArgumentError, StreamClosedError, StreamStateError, TimeTickError


@pytest.fixture
def client() -> Iterator[ms.Client]:
    with ms.connect(f"memory://tt-{uuid.uuid4().hex[:8]}") as c:
        yield c


def _chans(client: ms.Client, n: int) -> list[str]:
    return client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="dml"), num_channels=n))


def _data(ts: int, ch: int) -> ms.InsertMsg:
    return ms.InsertMsg(begin_ts=ts, end_ts=ts, hash_values=[ch], row_ids=[ts])


def test_lagging_channel_is_named_in_a_warning(client: ms.Client, caplog: pytest.LogCaptureFixture) -> None:
    chans = _chans(client, 3)
    with client.msg_stream() as out, client.tt_msg_stream(lag_warning_after=0.2) as tt:
        out.create_producers(chans[:2])  # the third channel never ticks
        tt.create_consumers("qn", chans)
        out.broadcast(ms.MsgPack(5, 5, [ms.TimeTickMsg(begin_ts=5, end_ts=5)]))
        deadline = time.monotonic() + 5
        with caplog.at_level(logging.WARNING, logger="msgstream.timetick"):
            while "stalled" not in caplog.text and time.monotonic() < deadline:
                assert tt.consume(timeout=0.1) is None
        assert f"channel(s) {chans[2]} have not ticked" in caplog.text
        assert tt.lagging_channels() == [chans[2]]


def test_a_backlog_without_a_tick_does_not_hold_consume_past_its_timeout(client: ms.Client) -> None:
    chans = _chans(client, 2)
    with client.msg_stream() as out, client.tt_msg_stream(receive_batch=10) as tt:
        out.create_producers(chans[:1])  # the second channel has not ticked yet
        tt.create_consumers("qn", chans)
        out.produce(ms.MsgPack.of([_data(i + 1, 0) for i in range(100)]))
        assert tt.consume(timeout=0) is None
        assert tt.buffered == 10  # one batch, not the whole backlog
        for _ in range(9):
            assert tt.consume(timeout=0) is None
        assert tt.buffered == 100
        out.create_producers(chans[1:])
        out.broadcast(ms.MsgPack(200, 200, [ms.TimeTickMsg(begin_ts=200, end_ts=200)]))
        pack = tt.consume(timeout=5.0)
        assert pack is not None
        assert [m.end_ts for m in pack.msgs] == list(range(1, 101))


def test_buffer_limit_raises_instead_of_growing(client: ms.Client) -> None:
    chans = _chans(client, 2)
    with client.msg_stream() as out, client.tt_msg_stream(max_buffered=50, receive_batch=10) as tt:
        out.create_producers(chans[:1])  # the second channel never ticks
        tt.create_consumers("qn", chans)
        for k in range(0, 200, 20):
            out.produce(ms.MsgPack.of([_data(i + 1, 0) for i in range(k, k + 20)]))
        out.broadcast(ms.MsgPack(1000, 1000, [ms.TimeTickMsg(begin_ts=1000, end_ts=1000)]))
        with pytest.raises(TimeTickError, match=f"max_buffered=50.*{chans[1]}"):
            for _ in range(100):
                tt.consume(timeout=0.1)
        for _ in range(3):  # a caller that catches and goes on does not make the buffer grow
            with pytest.raises(TimeTickError):
                tt.consume(timeout=0.1)
        assert "buffered=5" in repr(tt) and 50 <= tt._buffered < 60  # one batch past the limit at most


def test_zero_timeout_still_reads(client: ms.Client) -> None:
    chans = _chans(client, 1)
    with client.msg_stream() as out, client.tt_msg_stream() as tt:
        out.create_producers(chans)
        tt.create_consumers("qn", chans)
        out.produce(ms.MsgPack.of([_data(3, 0)]))
        out.broadcast(ms.MsgPack(10, 10, [ms.TimeTickMsg(begin_ts=10, end_ts=10)]))
        pack = tt.consume(timeout=0)
        assert pack is not None and [m.end_ts for m in pack.msgs] == [3]
        for bad in (-1, None, "1"):
            with pytest.raises(InvalidArgumentError):
                tt.consume(timeout=bad)  # type: ignore[arg-type]


def test_many_bad_messages_in_one_batch_are_all_reported_and_dropped(client: ms.Client) -> None:
    chans = _chans(client, 1)
    with client.msg_stream() as out, client.tt_msg_stream() as tt:
        out.create_producers(chans)
        tt.create_consumers("qn", chans)
        out.broadcast(ms.MsgPack(100, 100, [ms.TimeTickMsg(begin_ts=100, end_ts=100)]))
        assert tt.consume(timeout=5) is not None
        out.produce(ms.MsgPack.of([_data(5, 0) for _ in range(3000)]))  # all below the passed tick
        out.produce(ms.MsgPack.of([_data(150, 0)]))
        out.broadcast(ms.MsgPack(200, 200, [ms.TimeTickMsg(begin_ts=200, end_ts=200)]))
        errors = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                pack = tt.consume(timeout=0.5)
            except TimeTickError:
                errors += 1
                continue
            assert pack is not None and [m.end_ts for m in pack.msgs] == [150]
            break
        else:
            pytest.fail("no pack after the bad messages")
        assert errors >= 1


def test_waiting_consume_does_not_spin(client: ms.Client) -> None:
    chans = _chans(client, 2)
    with client.tt_msg_stream() as tt:
        tt.create_consumers("qn", chans)
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        assert tt.consume(timeout=1.0) is None
        wall = time.monotonic() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert wall >= 0.99
    assert cpu < 0.1, f"an idle consume used {cpu:.3f}s of CPU in {wall:.2f}s"


def test_empty_ticks_give_empty_packs_and_positions_advance(client: ms.Client) -> None:
    chans = _chans(client, 2)
    with client.msg_stream() as out, client.tt_msg_stream() as tt:
        out.create_producers(chans)
        tt.create_consumers("qn", chans)
        ticker = ms.Ticker(out)
        t1, t2 = ticker.tick(10), ticker.tick(20)
        p1, p2 = tt.consume(timeout=5), tt.consume(timeout=5)
        assert p1 is not None and p2 is not None
        assert (p1.begin_ts, p1.end_ts, p1.msgs) == (0, t1, []) and (p2.begin_ts, p2.end_ts, p2.msgs) == (t1, t2, [])
        assert p2.start_positions == p1.end_positions
        assert all(p.msg_id for p in p2.end_positions) and p2.end_positions != p1.end_positions


class RegionTick(ms.TimeTickMsg, kw_only=True):
    """A user's tick type: a subclass of TimeTickMsg with a MsgType of its own."""

    msg_type = 2300
    region: str = ""


def test_a_subclass_of_time_tick_msg_is_a_tick(client: ms.Client) -> None:
    # the stream tells ticks by their class (cached per type): a subclass ticks, and is not returned as data
    chans = _chans(client, 2)
    dispatcher = ms.UnmarshalDispatcher()
    dispatcher.add_msg_template(RegionTick.msg_type, RegionTick)
    with client.msg_stream() as out, client.tt_msg_stream() as tt:
        out.create_producers(chans)
        tt.create_consumers("qn", chans, dispatcher)
        out.produce(ms.MsgPack.of([_data(3, 0), _data(4, 1), _data(6, 0)]))
        out.broadcast(ms.MsgPack(5, 5, [RegionTick(begin_ts=5, end_ts=5, region="eu")]))
        out.broadcast(ms.MsgPack(9, 9, [ms.TimeTickMsg(begin_ts=9, end_ts=9)]))
        first, second = tt.consume(timeout=5), tt.consume(timeout=5)
        assert first is not None and second is not None
        assert (first.end_ts, [m.end_ts for m in first.msgs]) == (5, [3, 4])
        assert (second.end_ts, [m.end_ts for m in second.msgs]) == (9, [6])
        assert not any(isinstance(m, ms.TimeTickMsg) for m in first.msgs + second.msgs)


def test_options_are_validated(client: ms.Client) -> None:
    for bad in ({"max_buffered": 0}, {"lag_warning_after": 0}, {"lag_warning_after": float("inf")}):
        with pytest.raises(InvalidArgumentError):
            client.tt_msg_stream(**bad)
    with pytest.raises(InvalidArgumentError):
        ms.TimeTickStream("stream")  # type: ignore[arg-type]


def test_hybrid_timestamps() -> None:
    ts = timestamp.compose(1_700_000_000_123, 5)
    assert timestamp.parse(ts) == (1_700_000_000_123, 5) and ts == (1_700_000_000_123 << 18) | 5
    assert abs(timestamp.parse(timestamp.now())[0] - time.time() * 1000) < 5_000
    with pytest.raises(InvalidArgumentError):
        timestamp.compose(1, 1 << 18)
    frozen = timestamp.HybridClock(clock_ms=lambda: 1000)
    stamps = [frozen.next() for _ in range(3)]
    assert stamps == [1000 << 18, (1000 << 18) + 1, (1000 << 18) + 2]


def test_ticker_interval_and_errors(client: ms.Client) -> None:
    chans = _chans(client, 2)
    out = client.msg_stream()
    out.create_producers(chans)
    with client.tt_msg_stream() as tt:
        tt.create_consumers("qn", chans)
        ticker = ms.Ticker(out, source_id=7)
        ticker.start(0.02)
        packs = [tt.consume(timeout=5) for _ in range(3)]
        ticker.stop()
        assert all(p is not None for p in packs)
        ends = [p.end_ts for p in packs if p is not None]
        assert ends == sorted(set(ends))
    out.close()
    broken = ms.Ticker(out)
    broken.start(0.01)
    deadline = time.monotonic() + 5
    while broken.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(ms.errors.StreamClosedError):
        broken.stop()


def test_a_failed_acknowledgement_loses_no_pack(client: ms.Client) -> None:
    """The broker refuses one acknowledgement (away for a moment): the error reaches the caller, the
    acknowledgement is made again on the next call, and every tick's pack is returned exactly once."""
    chans = _chans(client, 2)
    with client.msg_stream() as out, client.tt_msg_stream() as tt:
        out.create_producers(chans)
        tt.create_consumers("qn", chans)
        for t in (10, 20, 30):
            out.produce(ms.MsgPack(t - 5, t - 5, [_data(t - 5, 0), _data(t - 4, 1)]))
            out.broadcast(ms.MsgPack(t, t, [ms.TimeTickMsg(begin_ts=t, end_ts=t)]))
        consumer = tt.inner._consumer
        assert consumer is not None
        real_ack = consumer.ack
        refused: list[int] = []

        def ack_refused_once(records: Any) -> None:
            if not refused:
                refused.append(len(records))
                raise ConsumeError("the broker is away")
            real_ack(records)

        consumer.ack = ack_refused_once  # type: ignore[method-assign]
        packs: list[ms.MsgPack] = []
        errors = 0
        deadline = time.monotonic() + 10
        while len(packs) < 3:
            assert time.monotonic() < deadline, f"packs {[p.end_ts for p in packs]} after {errors} errors"
            try:
                pack = tt.consume(timeout=0.5)
            except ConsumeError:
                errors += 1
                continue
            if pack is not None:
                packs.append(pack)
        assert errors == 1 and refused
        assert [p.end_ts for p in packs] == [10, 20, 30]
        assert [[m.row_ids[0] for m in p.msgs] for p in packs] == [[5, 6], [15, 16], [25, 26]]
    with client.tt_msg_stream() as again:  # every pack was acknowledged in the end
        again.create_consumers("qn", chans)
        assert again.consume(timeout=0.3) is None


def test_consume_without_its_own_consumer_takes_nothing_from_the_inner_stream(client: ms.Client) -> None:
    """A time-tick stream whose consumer was made on the inner stream, not through it, refuses to
    consume and to report lag, and leaves what the inner stream could deliver where it is."""
    chans = _chans(client, 1)
    with client.msg_stream() as out, client.tt_msg_stream() as tt:
        out.create_producers(chans)
        out.produce(ms.MsgPack(5, 5, [_data(5, 0)]))
        tt.inner.create_consumers("qn", chans)
        with pytest.raises(StreamStateError):
            tt.consume(timeout=0.5)
        with pytest.raises(StreamStateError):  # nor does it report a lag of packs it cannot make
            tt.lag()
        pack = tt.inner.consume(timeout=5)
        assert pack is not None and [m.row_ids for m in pack.msgs] == [[5]]
    with pytest.raises(StreamClosedError):
        tt.consume(timeout=0.1)


def test_wrapping_a_stream_leaves_its_settings_and_acknowledges_only_what_packs_cover(client: ms.Client) -> None:
    """``ms.TimeTickStream(client.msg_stream())``: the inner stream keeps ``auto_ack``; what the
    time-tick stream holds for a tick that never completed is not acknowledged, so a new member of the
    subscription gets it."""
    chans = _chans(client, 2)
    with client.msg_stream() as out:
        out.create_producers(chans)
        inner = client.msg_stream()
        tt = ms.TimeTickStream(inner)
        assert inner.auto_ack
        tt.create_consumers("qn", chans)
        out.produce(ms.MsgPack(5, 5, [_data(5, 0), _data(6, 1)]))
        out.broadcast(ms.MsgPack(10, 10, [ms.TimeTickMsg(begin_ts=10, end_ts=10)]))
        out.produce(ms.MsgPack(15, 15, [_data(15, 0)]))  # its tick (20) never comes
        pack = tt.consume(timeout=5)
        assert pack is not None and [m.row_ids for m in pack.msgs] == [[5], [6]]
        assert tt.consume(timeout=0.3) is None  # row 15 is buffered, waiting for a tick
        tt.close()
        assert inner.auto_ack
    with client.msg_stream() as again:
        again.create_consumers("qn", chans)
        got = again.consume(timeout=5)
        assert got is not None and [m.row_ids for m in got.msgs] == [[15]]


def test_closing_the_client_acknowledges_what_the_packs_covered() -> None:
    """A time-tick stream closed with its client (not by the caller) acknowledges what its returned
    packs covered first: the next member of the subscription does not get those packs again."""
    url = f"memory://tt-close-{uuid.uuid4().hex[:8]}"
    with ms.connect(url) as keeper:  # keeps the in-process broker alive across the clients below
        chans = _chans(keeper, 2)
        with keeper.msg_stream() as out:
            out.create_producers(chans)
            out.produce(ms.MsgPack(5, 5, [_data(5, 0), _data(6, 1)]))
            out.broadcast(ms.MsgPack(10, 10, [ms.TimeTickMsg(begin_ts=10, end_ts=10)]))
        client = ms.connect(url)
        tt = client.tt_msg_stream()
        tt.create_consumers("qn", chans)
        pack = tt.consume(timeout=5)
        assert pack is not None and len(pack.msgs) == 2
        client.close()
        assert tt.closed
        with keeper.tt_msg_stream() as again:
            again.create_consumers("qn", chans)
            assert again.consume(timeout=0.3) is None


def test_close_without_acknowledging_leaves_the_pack_to_the_subscription(client: ms.Client) -> None:
    """``close()`` whose acknowledgement fails raises and closes nothing; ``close(acknowledge=False)``
    closes, and the subscription delivers the pack again."""
    chans = _chans(client, 1)
    with client.msg_stream() as out:
        out.create_producers(chans)
        out.produce(ms.MsgPack(5, 5, [_data(5, 0)]))
    inp = client.msg_stream()
    inp.create_consumers("qn", chans)
    assert inp.consume(timeout=5) is not None
    consumer = inp._consumer
    assert consumer is not None

    def refuse(records: Any) -> None:
        raise ConsumeError("the broker is away")

    consumer.ack = refuse  # type: ignore[method-assign]
    with pytest.raises(ConsumeError):
        inp.close()
    assert not inp.closed
    inp.close(acknowledge=False)
    assert inp.closed
    with client.msg_stream() as again:
        again.create_consumers("qn", chans)
        pack = again.consume(timeout=5)
        assert pack is not None and [m.row_ids for m in pack.msgs] == [[5]]
