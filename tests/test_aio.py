"""msgstream.aio on its own terms: the names mirror the sync API, ``async for``, cancellation that loses
nothing, and an event loop that keeps running while a consume waits. (The whole ConformanceSuite also
runs through msgstream.aio: tests/aio_sync.py.)"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import msgstream as ms
from msgstream import aio
from msgstream import stream as stream_module
from msgstream.errors import BackendNotFoundError, InvalidURLError, OperationTimeoutError, StreamClosedError

COROUTINES = {
    "create_channels",
    "describe_channels",
    "destroy_channels",
    "close",
    "create_producers",
    "create_consumers",
    "produce",
    "broadcast",
    "consume",
    "receive",
    "consume_frames",
    "ack",
    "seek",
    "get_latest_positions",
    "tick",
    "stop",
    "ping",
    "list_channels",
    "list_subscriptions",
    "drop_subscription",
    "lag",
}


def _public(cls: type, instance: object | None = None) -> set[str]:
    names = {n for n in dir(cls) if not n.startswith("_")}
    return names | {n for n in vars(instance) if not n.startswith("_")} if instance is not None else names


def _row(i: int, channel_hash: int = 0) -> ms.InsertMsg:
    return ms.InsertMsg(begin_ts=i + 1, end_ts=i + 1, hash_values=[channel_hash], row_ids=[i], timestamps=[i + 1])


def _rows(pack: ms.MsgPack | None) -> list[int]:
    return [m.row_ids[0] for m in pack.msgs if isinstance(m, ms.InsertMsg)] if pack is not None else []


def _owner() -> ms.OwnerDescription:
    return ms.OwnerDescription(role="aio", address="127.0.0.1:1", description_text="test")


def _url() -> str:
    return f"memory://aio-{uuid.uuid4().hex[:8]}"


async def _wait_until(condition: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout}s"
        await asyncio.sleep(0.002)


def test_every_public_name_of_the_sync_api_is_mirrored() -> None:
    with ms.connect(_url()) as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
        pairs: list[tuple[set[str], type]] = [
            (_public(ms.Client, client), aio.AsyncClient),
            (_public(ms.MsgStream, client.msg_stream()), aio.AsyncMsgStream),
            (_public(ms.TimeTickStream, client.tt_msg_stream()), aio.AsyncTimeTickStream),
            (_public(ms.Ticker, ms.Ticker(client.msg_stream())), aio.Ticker),
        ]
        del chans
    for names, async_cls in pairs:
        missing = names - set(dir(async_cls)) - {"clock", "error"}  # Ticker's instance attributes
        assert not missing, f"{async_cls.__name__} lacks {sorted(missing)}"
        for name in names:
            member = getattr(async_cls, name, None)
            if name in COROUTINES:
                assert inspect.iscoroutinefunction(member), f"{async_cls.__name__}.{name} is not a coroutine"
            elif callable(member) and not isinstance(member, property):
                assert not inspect.iscoroutinefunction(member), f"{async_cls.__name__}.{name} should stay plain"
    assert set(aio.__all__) == {"AsyncClient", "AsyncMsgStream", "AsyncTimeTickStream", "Ticker", "connect"}


def test_connect_errors_are_typed() -> None:
    with pytest.raises(InvalidURLError):
        aio.connect("not a url")

    async def unknown() -> None:
        async with aio.connect("nosuchbroker://x"):
            pass

    with pytest.raises(BackendNotFoundError):
        asyncio.run(unknown())


def test_round_trip_and_async_for_until_closed() -> None:
    async def main() -> None:
        async with aio.connect(_url()) as client:
            chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=2))
            assert len((await client.describe_channels(chans)).descriptions) == 2
            async with client.msg_stream() as out, client.tt_msg_stream() as tt:
                await out.create_producers(chans)
                await out.start()
                await tt.create_consumers("aio", chans)
                tt.start()
                got: list[int] = []
                ends: list[int] = []

                async def reader() -> None:
                    async for pack in tt:
                        got.extend(_rows(pack))
                        ends.append(pack.end_ts)

                task = asyncio.create_task(reader())
                ticker = aio.Ticker(out)
                for k in range(5):  # rows k*20 .. k*20+19 have timestamps k*20+1 .. k*20+20
                    await out.produce(ms.MsgPack.of([_row(i, i) for i in range(k * 20, k * 20 + 20)]))
                    await ticker.tick(k * 20 + 20)
                await _wait_until(lambda: len(ends) == 5 or task.done(), "five tick packs")
                assert got == list(range(100)) and ends == [20, 40, 60, 80, 100]
                latest = await tt.get_latest_positions()
                assert [p.channel for p in latest] == chans and all(p.msg_id for p in latest)
                await tt.close()
                await asyncio.wait_for(task, 5)  # the loop ends once the stream is closed
                with pytest.raises(StreamClosedError):
                    await tt.consume(0.1)
            await client.destroy_channels(chans)

    asyncio.run(main())


class _GatedDispatcher(ms.UnmarshalDispatcher):
    """Holds the worker inside consume once the broker delivered (to cancel at that exact moment)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def unmarshal(self, data: bytes) -> ms.TsMsg:
        self.entered.set()
        assert self.release.wait(10), "never released"
        return super().unmarshal(data)


@pytest.mark.parametrize("tt", [False, True])
def test_pack_of_a_cancelled_consume_is_returned_next_and_never_acknowledged_by_close(tt: bool) -> None:
    async def main() -> None:
        async with aio.connect(_url()) as client:
            chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
            async with client.msg_stream() as out:
                await out.create_producers(chans)
                await out.produce(ms.MsgPack.of([_row(i) for i in range(5)]))
                if tt:
                    await aio.Ticker(out).tick(100)
            for then in ("consume", "close"):
                gate = _GatedDispatcher()
                inp = client.tt_msg_stream() if tt else client.msg_stream()
                await inp.create_consumers("cancelled", chans, dispatcher=gate)
                task = asyncio.create_task(inp.consume(timeout=5))
                await _wait_until(gate.entered.is_set, "the worker received the messages")
                task.cancel()  # the broker has delivered, the pack is still being made
                with pytest.raises(asyncio.CancelledError):
                    await task
                gate.release.set()
                if then == "consume":  # the next consume returns the kept pack first
                    pack = await inp.consume(timeout=5)
                    assert _rows(pack) == [0, 1, 2, 3, 4]
                    await inp.close(acknowledge=False)  # handed over but not handled: delivered again
                else:  # closing with the kept pack: it was never handed over, so never acknowledged
                    await inp.close()
            async with client.msg_stream() as again:
                await again.create_consumers("cancelled", chans)
                pack = await again.consume(timeout=5)
                assert sorted(_rows(pack)) == [0, 1, 2, 3, 4]

    asyncio.run(main())


async def cancelled_consumes_lose_and_repeat_nothing(
    url: str, n_msgs: int = 3000, n_cancels: int = 400, **options: Any
) -> tuple[int, int]:
    """Produce ``n_msgs`` rows in small packs while one task consumes with random timeouts and another
    cancels its consumes at random moments; every row arrives exactly once. Returns (cancels that hit
    a consume in flight, packs received)."""
    rng = random.Random(20)
    async with aio.connect(url, **options) as client:
        chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=3))
        sub = f"cancel-{uuid.uuid4().hex[:6]}"
        async with client.msg_stream() as out, client.msg_stream(receive_batch=rng.choice([7, 50])) as inp:
            await out.create_producers(chans)
            await inp.create_consumers(sub, chans)

            async def produce() -> None:
                for k in range(0, n_msgs, 10):
                    await out.produce(ms.MsgPack.of([_row(i, i) for i in range(k, min(k + 10, n_msgs))]))
                    await asyncio.sleep(rng.random() * 0.002)

            producer = asyncio.create_task(produce())
            received: Counter[int] = Counter()
            cancels = packs = 0
            deadline = time.monotonic() + 120
            while sum(received.values()) < n_msgs:
                assert time.monotonic() < deadline, f"received {sum(received.values())} of {n_msgs}"
                task = asyncio.create_task(inp.consume(timeout=rng.random() * 0.05))
                if cancels < n_cancels:  # at once (the call is queued or just started), or a little later
                    await asyncio.sleep(0 if rng.random() < 0.5 else rng.random() * 0.003)
                    if not task.done():
                        task.cancel()
                        cancels += 1
                try:
                    pack = await task
                except asyncio.CancelledError:
                    continue
                packs += pack is not None
                received.update(_rows(pack))
            await producer
            assert await inp.consume(timeout=0.3) is None, "a row came twice"
        assert received == Counter(range(n_msgs)), "rows lost or repeated"
        async with client.msg_stream() as after:  # nothing left unacknowledged on the subscription
            await after.create_consumers(sub, chans)
            assert await after.consume(timeout=0.3) is None
        await client.destroy_channels(chans)
    return cancels, packs


def test_cancelled_consumes_lose_and_repeat_nothing() -> None:
    cancels, packs = asyncio.run(cancelled_consumes_lose_and_repeat_nothing(_url()))
    assert cancels == 400 and packs > 0


def test_the_loop_runs_while_a_consume_waits() -> None:
    async def main() -> None:
        async with aio.connect(_url()) as client:
            chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
            async with client.msg_stream() as inp:
                await inp.create_consumers("idle", chans)
                ticks: list[float] = []

                async def ticker() -> None:
                    while True:
                        ticks.append(time.monotonic())
                        await asyncio.sleep(0.01)

                beat = asyncio.create_task(ticker())
                start = time.monotonic()
                assert await inp.consume(timeout=1.0) is None
                waited = time.monotonic() - start
                beat.cancel()
                assert waited >= 0.9
                during = [t for t in ticks if start <= t <= start + waited]
                assert len(during) >= 20, f"the loop ran {len(during)} times in {waited:.2f}s"
                gaps = [b - a for a, b in itertools.pairwise(during)]
                assert max(gaps) < 0.5, f"the loop stalled for {max(gaps):.3f}s"

    asyncio.run(main())


def test_calls_after_close_raise_and_close_is_idempotent() -> None:
    async def main() -> None:
        client = await aio.connect(_url())
        chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
        s = client.msg_stream()
        await s.create_producers(chans)
        await s.create_consumers("x", chans)
        await client.close()  # closes the streams opened from it
        assert s.closed
        await s.close()
        for call in (s.produce(ms.MsgPack.of([_row(0)])), s.consume(0.1), s.seek([]), s.get_latest_positions()):
            with pytest.raises(StreamClosedError):
                await call
        with pytest.raises(StreamClosedError):
            client.msg_stream()

    asyncio.run(main())


def test_a_call_past_its_bound_raises_and_its_outcome_is_kept() -> None:
    async def main() -> None:
        async with aio.connect(_url(), call_timeout=0.3) as client:
            chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
            async with client.msg_stream() as out, client.msg_stream() as inp:
                await out.create_producers(chans)
                await out.produce(ms.MsgPack.of([_row(i) for i in range(3)]))
                gate = _GatedDispatcher()
                await inp.create_consumers("bounded", chans, dispatcher=gate)
                start = time.monotonic()
                with pytest.raises(OperationTimeoutError) as err:
                    await inp.consume(timeout=0.2)  # the worker is held: 0.2 s + call_timeout 0.3 s
                assert err.value.retriable and 0.4 < time.monotonic() - start < 3
                gate.release.set()
                assert _rows(await inp.consume(timeout=5)) == [0, 1, 2]

    asyncio.run(main())


def test_a_kept_error_nobody_takes_is_not_reported_by_asyncio() -> None:
    """A cancelled consume fails in the worker and the stream is then dropped: asyncio must not report
    an exception never retrieved (it prints a traceback on stderr)."""
    import gc

    reported: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reported.append(context))
        async with aio.connect(_url()) as client:
            chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
            inp = client.msg_stream()
            await inp.create_consumers("dropped", chans)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(inp.consume(timeout=0.5), 0.05)  # kept for the next consume
            await client.destroy_channels(chans)  # the kept consume now fails
            kept = inp._kept
            assert kept is not None
            await _wait_until(kept[1].done, "the kept consume to fail")
            del inp, kept
            gc.collect()
            await asyncio.sleep(0)

    asyncio.run(main())
    assert reported == []


def test_a_cancelled_produce_still_queued_is_dropped_and_a_running_one_completes(tmp_path: Path) -> None:
    # sqlite:///: a send that waits on the disk runs on the producing worker (memory:// sends on the loop)
    async def main() -> None:
        async with aio.connect(f"sqlite:///{tmp_path / 'cancel.db'}") as client:
            chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
            entered, release = threading.Event(), threading.Event()

            def held(msgs: list[ms.TsMsg], keys: list[list[int]]) -> dict[int, ms.MsgPack]:
                entered.set()
                assert release.wait(10)
                return ms.repack.default(msgs, keys)

            async with client.msg_stream() as out, client.msg_stream() as inp:
                await out.create_producers(chans)
                await inp.create_consumers("produced", chans)
                out.set_repack_func(held)
                running = asyncio.create_task(out.produce(ms.MsgPack.of([_row(1)])))
                await _wait_until(entered.is_set, "the first produce started")
                queued = asyncio.create_task(out.produce(ms.MsgPack.of([_row(2)])))
                await asyncio.sleep(0.05)  # the second produce waits behind the first
                running.cancel()
                queued.cancel()
                for task in (running, queued):  # both callers return at once, the worker still held
                    with pytest.raises(asyncio.CancelledError):
                        await task
                await asyncio.sleep(0.01)  # the cancellation reaches the executor's queue
                release.set()
                assert _rows(await inp.consume(timeout=5)) == [1]  # the running one completed
                assert await inp.consume(timeout=0.3) is None  # the queued one never ran

    asyncio.run(main())


async def _stream_keeping_a_pack(client: aio.AsyncClient, subscription: str, chans: list[str]) -> aio.AsyncMsgStream:
    """A stream of ``subscription`` whose consume was cancelled once the worker had received the
    messages: the pack is kept, never handed over."""
    gate = _GatedDispatcher()
    inp = client.msg_stream()
    await inp.create_consumers(subscription, chans, dispatcher=gate)
    task = asyncio.create_task(inp.consume(timeout=5))
    await _wait_until(gate.entered.is_set, "the worker received the messages")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.release.set()
    return inp


def test_seek_drops_the_pack_of_a_cancelled_consume_unacknowledged() -> None:
    async def main() -> None:
        async with aio.connect(_url()) as client:
            chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=2))
            async with client.msg_stream() as out:
                await out.create_producers(chans)
                await out.produce(ms.MsgPack.of([_row(i, i) for i in range(6)]))  # even rows: channel 0
            inp = await _stream_keeping_a_pack(client, "seek-kept", chans)
            await inp.seek([ms.Position(chans[0], b"", 0)])  # channel 0 from its start; channel 1 untouched
            again: list[int] = []
            while sorted(again) != [0, 2, 4]:
                pack = await inp.consume(timeout=5)
                assert pack is not None, f"channel 0 not replayed: {again}"
                again += _rows(pack)
            await inp.close()
            async with client.msg_stream() as nxt:  # channel 1's rows were never handed over: not acknowledged
                await nxt.create_consumers("seek-kept", chans)
                pack = await nxt.consume(timeout=5)
                assert sorted(_rows(pack)) == [1, 3, 5]

    asyncio.run(main())


class _HeldAck(Sequence[ms.TsMsg]):
    """An empty list of messages to ``ack`` whose iteration holds the consume worker until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getitem__(self, index: Any) -> Any:
        raise IndexError(index)

    def __len__(self) -> int:
        return 0

    def __iter__(self) -> Iterator[ms.TsMsg]:
        self.entered.set()
        assert self.release.wait(10), "never released"
        return iter(())


@pytest.mark.parametrize("call", ["seek", "close"])
def test_a_kept_pack_stays_unacknowledged_when_the_call_dropping_it_is_cancelled_while_queued(call: str) -> None:
    async def main() -> None:
        async with aio.connect(_url()) as client:
            chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
            async with client.msg_stream() as out:
                await out.create_producers(chans)
                await out.produce(ms.MsgPack.of([_row(i) for i in range(3)]))
            inp = await _stream_keeping_a_pack(client, "kept", chans)
            held = _HeldAck()
            ack = asyncio.create_task(inp.ack(held))
            await _wait_until(held.entered.is_set, "the ack holds the consume worker")
            dropping = inp.seek([ms.Position(chans[0], b"", 0)]) if call == "seek" else inp.close()
            with pytest.raises(asyncio.TimeoutError):  # cancelled while queued behind the ack
                await asyncio.wait_for(dropping, 0.2)
            held.release.set()
            await ack
            await inp.close()
            async with client.msg_stream() as nxt:  # the kept rows were never handed over: not acknowledged
                await nxt.create_consumers("kept", chans)
                assert _rows(await nxt.consume(timeout=5)) == [0, 1, 2]

    asyncio.run(main())


def _repack_on(seen: list[int]) -> ms.repack.RepackFunc:
    def noting(msgs: list[ms.TsMsg], keys: list[list[int]]) -> dict[int, ms.MsgPack]:
        seen.append(threading.get_ident())
        return ms.repack.default(msgs, keys)

    return noting


@pytest.mark.parametrize(("scheme", "on_loop"), [("memory", True), ("sqlite", False)])
def test_produce_runs_on_the_loop_only_for_a_broker_in_this_process(tmp_path: Path, scheme: str, on_loop: bool) -> None:
    # Features.nonblocking_send: memory:// stores the frames and returns, so the loop sends itself;
    # sqlite:/// waits on the disk, so its sends go to the producing worker
    url = _url() if scheme == "memory" else f"sqlite:///{tmp_path / 'where.db'}"

    async def main() -> None:
        async with aio.connect(url) as client:
            assert client.backend.features.nonblocking_send is on_loop
            chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
            seen: list[int] = []
            async with client.msg_stream() as out, client.msg_stream() as inp:
                await out.create_producers(chans)
                await inp.create_consumers("where", chans)
                out.set_repack_func(_repack_on(seen))
                await out.produce(ms.MsgPack.of([_row(1)]))
                await out.broadcast(ms.MsgPack.of([_row(2)]))
                if on_loop:
                    assert seen == [threading.get_ident()]
                else:
                    assert len(seen) == 1 and seen[0] != threading.get_ident()
                assert _rows(await inp.consume(timeout=5)) == [1, 2]

    asyncio.run(main())


def test_a_produce_on_the_loop_yields_first_and_a_cancel_there_sends_nothing() -> None:
    # memory:// is sent to on the loop; the send waits for one turn of the loop, so other tasks run
    # between two sends, and a produce cancelled at that turn has sent nothing
    async def main() -> None:
        async with aio.connect(_url()) as client:
            chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
            async with client.msg_stream() as out, client.msg_stream() as inp:
                await out.create_producers(chans)
                await inp.create_consumers("yielded", chans)
                task = asyncio.create_task(out.produce(ms.MsgPack.of([_row(1)])))
                await asyncio.sleep(0)  # the task starts and waits for its turn
                assert not task.done()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert await inp.consume(timeout=0.2) is None
                await out.produce(ms.MsgPack.of([_row(2)]))
                assert _rows(await inp.consume(timeout=5)) == [2]

    asyncio.run(main())


class _ThreadOfProduce:
    """Hooks that note the thread each produce runs on (and change nothing)."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def produce(self, stream: ms.MsgStream, pack: ms.MsgPack, send: Any) -> Any:
        self.threads.append(threading.get_ident())
        return send(pack)

    def broadcast(self, stream: ms.MsgStream, pack: ms.MsgPack, send: Any) -> Any:
        return send(pack)

    def consume(self, stream: ms.MsgStream, timeout: float, receive: Any) -> Any:
        return receive(timeout)


def test_with_hooks_installed_even_memory_produce_leaves_the_loop() -> None:
    # a hook (an instrumentation's span processor) may wait on the network: never on the loop
    hooks = _ThreadOfProduce()

    async def main() -> None:
        async with aio.connect(_url()) as client:
            chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
            async with client.msg_stream() as out:
                await out.create_producers(chans)
                await out.produce(ms.MsgPack.of([_row(1)]))
        assert len(hooks.threads) == 1 and hooks.threads[0] != threading.get_ident()

    stream_module.set_hooks(hooks)
    try:
        asyncio.run(main())
    finally:
        stream_module.set_hooks(None)


def test_closes_that_overlap_close_once() -> None:
    async def main() -> None:
        async with aio.connect(_url()) as client:
            chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
            s = client.msg_stream()
            await s.create_producers(chans)
            outcomes = await asyncio.gather(s.close(), s.close(), return_exceptions=True)
            assert outcomes == [None, None]
            assert s.closed
            assert await asyncio.gather(client.close(), client.close()) == [None, None]

    asyncio.run(main())


def test_a_cancelled_client_close_still_closes_the_backend_and_what_it_held_is_delivered_again() -> None:
    async def main() -> None:
        url = _url()
        client = await aio.connect(url)
        chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
        async with client.msg_stream() as out:
            await out.create_producers(chans)
            await out.produce(ms.MsgPack.of([_row(0)]))
        inp = client.msg_stream()
        await inp.create_consumers("sub", chans)
        assert _rows(ms.MsgPack.of(await inp.receive(5.0) or [])) == [0]  # held, never acknowledged
        closing = asyncio.create_task(client.close())
        await asyncio.sleep(0)  # inside close, waiting on the stream's close
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        await client.close()  # waits for the close begun above
        assert inp.closed
        with pytest.raises(StreamClosedError):
            client.msg_stream()
        async with aio.connect(url) as other, other.msg_stream() as again:
            await again.create_consumers("sub", chans)
            assert _rows(await again.consume(5.0)) == [0]

    asyncio.run(main())


def test_concurrent_first_calls_open_one_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[ms.Backend] = []
    load = aio.load_backend  # type: ignore[attr-defined]

    def counting(url: Any, options: Any) -> ms.Backend:
        backend: ms.Backend = load(url, options)
        opened.append(backend)
        return backend

    monkeypatch.setattr(aio, "load_backend", counting)

    async def main() -> None:
        client = aio.connect(_url())  # opened by its first call
        listed = await asyncio.gather(*(client.list_channels() for _ in range(3)))
        assert listed == [[], [], []]
        assert len(opened) == 1
        assert client.backend is opened[0]
        await client.close()

    asyncio.run(main())


def test_ticker_stop_lets_the_callers_cancel_through_and_a_bad_interval_is_refused() -> None:
    async def main() -> None:
        async with aio.connect(_url()) as client, client.msg_stream() as out:
            chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
            await out.create_producers(chans)
            for bad in ("1", None, [1], True, 0, float("nan"), float("inf"), 1e300):
                with pytest.raises(ms.errors.InvalidArgumentError):
                    aio.Ticker(out).start(bad)  # type: ignore[arg-type]
                with pytest.raises(ms.errors.InvalidArgumentError):
                    ms.Ticker(out.sync).start(bad)  # type: ignore[arg-type]
            ticker = aio.Ticker(out)
            ticker.start(0.05)
            after_stop = []

            async def shut_down() -> None:
                await ticker.stop()
                after_stop.append(True)

            task = asyncio.create_task(shut_down())
            await asyncio.sleep(0)  # inside stop(), waiting for the ticker's task
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert after_stop == []

    asyncio.run(main())


def test_a_wrapped_streams_own_produce_timeout_bounds_the_await() -> None:
    with ms.connect(_url()) as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=2))
        sync = client.msg_stream(produce_timeout=120.0)
        sync.create_producers(chans)
        wrapped = aio.AsyncMsgStream(sync, call_timeout=5.0)
        assert sync.produce_timeout == 120.0
        assert wrapped._produce_bound() == 120.0 * 2 + 5.0  # per channel, plus the hop
        sync.close()


def test_a_ticker_whose_broadcast_fails_with_any_error_raises_it_from_stop() -> None:
    class Broken:
        async def broadcast(self, pack: ms.MsgPack) -> dict[str, list[bytes]]:
            raise ConnectionResetError("peer went away")

    class BrokenSync:
        def broadcast(self, pack: ms.MsgPack) -> dict[str, list[bytes]]:
            raise ConnectionResetError("peer went away")

    async def main() -> None:
        ticker = aio.Ticker(Broken())
        ticker.start(0.01)
        await _wait_until(lambda: ticker.error is not None, "the ticker's failure")
        with pytest.raises(ConnectionResetError):
            await ticker.stop()

    asyncio.run(main())
    sync = ms.Ticker(BrokenSync())  # type: ignore[arg-type]
    sync.start(0.01)
    deadline = time.monotonic() + 10
    while sync.error is None:
        assert time.monotonic() < deadline, "the sync ticker's failure was not kept"
        time.sleep(0.01)
    with pytest.raises(ConnectionResetError):
        sync.stop()


def test_an_explicit_produce_timeout_still_bounds_the_await() -> None:
    with ms.connect(_url()) as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
        sync = client.msg_stream(produce_timeout=120.0)
        sync.create_producers(chans)
        wrapped = aio.AsyncMsgStream(sync, produce_timeout=7.0, call_timeout=5.0)
        assert wrapped.produce_timeout == 7.0 and wrapped._produce_bound() == 12.0
        sync.close()


def _slow_open(monkeypatch: pytest.MonkeyPatch, wait: Callable[[], object]) -> threading.Event:
    """Backends opened by msgstream.aio first ``wait()``; the event is set once one is closed."""
    closed = threading.Event()
    load = aio.load_backend  # type: ignore[attr-defined]

    def slow(url: Any, options: Any) -> ms.Backend:
        wait()
        backend: ms.Backend = load(url, options)
        close = backend.close

        def recording() -> None:
            close()
            closed.set()

        backend.close = recording  # type: ignore[method-assign]
        return backend

    monkeypatch.setattr(aio, "load_backend", slow)
    return closed


@pytest.mark.parametrize("how", ["await", "async with"])
def test_a_connect_cancelled_while_opening_closes_what_it_opens(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    closed = _slow_open(monkeypatch, lambda: release.wait(10))

    async def main() -> None:
        client = aio.connect(_url())
        opening = client.__aenter__() if how == "async with" else client
        with pytest.raises(asyncio.TimeoutError):  # the caller gives up: nobody can reach the client
            await asyncio.wait_for(opening, 0.05)
        release.set()
        assert await asyncio.to_thread(closed.wait, 10), "the backend opened after the cancel stays open"
        with pytest.raises(StreamClosedError):
            await client.list_channels()

    asyncio.run(main())


def test_a_stream_close_whose_caller_is_cancelled_leaves_no_worker_thread() -> None:
    def workers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("msgstream-aio-")}

    async def main() -> None:
        async with aio.connect(_url()) as client:
            chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
            before = workers()
            stream = client.msg_stream()
            await stream.create_producers(chans)
            await stream.produce(ms.MsgPack.of([_row(0)]))
            await stream.create_consumers("sub", chans)
            assert _rows(await stream.consume(5.0)) == [0]
            inside, release = threading.Event(), threading.Event()
            close = stream.sync.close

            def held_close(**kwargs: Any) -> None:
                inside.set()
                release.wait(10)
                close(**kwargs)

            stream.sync.close = held_close  # type: ignore[method-assign]
            closing = asyncio.create_task(stream.close())
            assert await asyncio.to_thread(inside.wait, 10)
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
            release.set()
            deadline = time.monotonic() + 10
            while workers() - before and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert not workers() - before, "the stream's worker threads outlive its close"
            assert stream.closed

    asyncio.run(main())


def test_a_connect_past_its_bound_closes_what_it_opens_later(monkeypatch: pytest.MonkeyPatch) -> None:
    closed = _slow_open(monkeypatch, lambda: time.sleep(0.6))  # a constructor checking its broker

    async def main() -> None:
        client = aio.connect(_url(), call_timeout=0.2)
        with pytest.raises(OperationTimeoutError):
            await client.open()
        assert await asyncio.to_thread(closed.wait, 10), "the backend opened after the timeout stays open"
        await client.close()

    asyncio.run(main())


def test_a_bad_frame_whose_report_was_cancelled_is_reported_again() -> None:
    """A consume cancelled while it met a corrupt frame: nobody saw the ``UnmarshalError``, so the frame
    is not acknowledged; the subscription delivers it, and it is reported, again."""

    async def main() -> None:
        url = _url()
        async with aio.connect(url) as client:
            [chan] = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
            client.backend.create_producer(chan).send([b"MS\x01\x00garbage"], 5.0)
            stream = client.msg_stream()
            await stream.create_consumers("sub", [chan])
            inside, release = threading.Event(), threading.Event()
            receive = stream.sync._consumer.receive  # type: ignore[union-attr]

            def held(n: int, timeout: float) -> list[ms.RawMessage]:
                got = receive(n, timeout)
                inside.set()
                release.wait(10)
                return got

            stream.sync._consumer.receive = held  # type: ignore[union-attr,method-assign]
            task = asyncio.create_task(stream.consume(5.0))
            assert await asyncio.to_thread(inside.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            release.set()
            await stream.close()
            again = client.msg_stream()
            await again.create_consumers("sub", [chan])
            with pytest.raises(ms.errors.UnmarshalError):
                await again.consume(5.0)
            await again.close()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_a_restarted_ticker_forgets_the_failure_its_last_stop_raised(kind: str) -> None:
    class Flaky:
        def __init__(self) -> None:
            self.calls = 0

        def broadcast(self, pack: ms.MsgPack) -> dict[str, list[bytes]]:
            self.calls += 1
            if self.calls == 1:
                raise ms.errors.ProduceError("broker blip", retriable=True)
            return {}

    flaky = Flaky()
    if kind == "sync":
        ticker = ms.Ticker(flaky)  # type: ignore[arg-type]
        ticker.start(0.01)
        deadline = time.monotonic() + 10
        while ticker.error is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(ms.errors.ProduceError):
            ticker.stop()
        ticker.start(0.01)
        while flaky.calls < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        ticker.stop()  # nothing failed in this run
        assert ticker.error is None
        return

    async def flaky_async() -> None:
        class Async:
            async def broadcast(self, pack: ms.MsgPack) -> dict[str, list[bytes]]:
                return flaky.broadcast(pack)

        ticker = aio.Ticker(Async())
        ticker.start(0.01)
        deadline = time.monotonic() + 10
        while ticker.error is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        with pytest.raises(ms.errors.ProduceError):
            await ticker.stop()
        ticker.start(0.01)
        while flaky.calls < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await ticker.stop()
        assert ticker.error is None

    asyncio.run(flaky_async())


def test_a_sync_ticker_that_cannot_stop_in_time_says_so_and_stays_started() -> None:
    inside, release = threading.Event(), threading.Event()

    class Stuck:
        def broadcast(self, pack: ms.MsgPack) -> dict[str, list[bytes]]:
            inside.set()
            release.wait(10)  # a broker that does not answer
            return {}

    ticker = ms.Ticker(Stuck())  # type: ignore[arg-type]
    ticker.start(0.01)
    assert inside.wait(10)
    with pytest.raises(OperationTimeoutError):
        ticker.stop(timeout=0.1)
    with pytest.raises(ms.errors.InvalidArgumentError):
        ticker.start(0.01)  # not two threads
    release.set()
    ticker.stop()


@pytest.mark.parametrize("after", ["close", "ack"])
def test_a_call_behind_a_long_consume_waits_for_its_bound_too(after: str) -> None:
    """A consume with a timeout longer than ``call_timeout`` holds the stream's one worker: a close
    after it was cancelled, or an ack made meanwhile (auto_ack=False), waits for it within the
    consume's own bound plus ``call_timeout``, instead of failing after ``call_timeout``."""

    async def main() -> None:
        async with aio.connect(_url(), call_timeout=0.3) as client:
            chans = await client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
            async with client.msg_stream() as out:
                await out.create_producers(chans)
                await out.produce(ms.MsgPack.of([_row(0)]))
            stream = client.msg_stream(auto_ack=False)
            await stream.create_consumers("sub", chans)
            msgs = await stream.receive(5.0)
            assert msgs is not None
            poll = asyncio.create_task(stream.receive(1.5))  # nothing more comes: it waits its 1.5 s
            await asyncio.sleep(0)
            if after == "close":
                poll.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await poll
                await stream.close()
                assert stream.closed
            else:
                await stream.ack(msgs)
                assert await poll is None
                await stream.close()

    asyncio.run(main())
