"""The conformance suite on the in-process memory backend (a fresh broker per test)."""

from __future__ import annotations

import gc
import time
import uuid

import pytest

from msgstream.backend import URL, SubscriptionPosition
from msgstream.errors import ChannelNotFoundError
from msgstream.memory import MemoryBackend
from msgstream.testing import ConformanceSuite

from .aio_sync import AsyncConformanceSuite


class TestMemoryConformance(ConformanceSuite):
    quiet_period = 0.2

    @pytest.fixture
    def url(self) -> str:
        return f"memory://conformance-{uuid.uuid4().hex[:8]}"


class TestMemoryConformanceAio(AsyncConformanceSuite):
    """The same suite through msgstream.aio."""

    quiet_period = 0.2

    @pytest.fixture
    def url(self) -> str:
        return f"memory://conformance-aio-{uuid.uuid4().hex[:8]}"


def test_close_from_another_thread_loses_nothing() -> None:
    import threading

    import msgstream as ms

    with ms.connect(f"memory://race-{uuid.uuid4().hex[:8]}") as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="r"), num_channels=1))
        blocked = client.msg_stream()
        blocked.create_consumers("s", chans)
        outcome: list[object] = []
        waiter = threading.Thread(target=lambda: outcome.append(_consume_or_error(blocked)))
        waiter.start()
        deadline = time.monotonic() + 5
        while not _is_waiting(blocked):
            assert time.monotonic() < deadline, "the consumer never started waiting"
            time.sleep(0.005)
        blocked._consumer.close()  # type: ignore[union-attr]  # close under the waiting receive
        with client.msg_stream() as out:
            out.create_producers(chans)
            out.produce(ms.MsgPack.of([ms.InsertMsg(hash_values=[0], row_ids=[1])]))
        waiter.join(5)
        assert outcome and not isinstance(outcome[0], ms.MsgPack), "a closed consumer took a message"
        with client.msg_stream() as nxt:
            nxt.create_consumers("s", chans)
            pack = nxt.consume(timeout=2)
            assert pack is not None and pack.msgs[0].row_ids == [1]  # type: ignore[attr-defined]


def _consume_or_error(stream: object) -> object:
    try:
        return stream.consume(timeout=3)  # type: ignore[attr-defined]
    except Exception as exc:
        return exc


def _is_waiting(stream: object) -> bool:
    """True once a receive is blocked on the broker's condition variable (CPython's Condition)."""
    return bool(stream._consumer._broker.changed._waiters)  # type: ignore[attr-defined]


def test_a_batch_takes_a_share_of_every_channel_that_has_messages() -> None:
    import msgstream as ms

    with ms.connect(f"memory://share-{uuid.uuid4().hex[:8]}") as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="r"), num_channels=3))
        with client.msg_stream() as out:
            out.create_producers(chans)
            for key, count in enumerate((400, 400, 10)):
                out.produce(ms.MsgPack.of([ms.InsertMsg(hash_values=[key], row_ids=[i]) for i in range(count)]))
        with client.msg_stream(receive_batch=300) as stream:
            stream.create_consumers("s", chans)
            pack = stream.consume(timeout=2)
            assert pack is not None
            per_channel = {c: sum(1 for m in pack.msgs if m.position.channel == c) for c in chans}  # type: ignore[union-attr]
            # an equal share of 100 from each, then the room left (90) from a channel that has more
            assert sorted(per_channel.values()) == [10, 100, 190], per_channel


def _backend() -> MemoryBackend:
    return MemoryBackend(URL(f"memory://spi-{uuid.uuid4().hex[:8]}"), {})


def test_an_ack_of_what_a_seek_handed_to_another_member_keeps_that_members_hold() -> None:
    """Y acknowledges what it held before X's seek, which X now holds again: X's hold stays, so when X
    closes without acknowledging, the messages go to the next member (as on sqlite:///)."""
    backend = _backend()
    backend.create_channel("c", b"")
    backend.create_producer("c").send([b"%d" % i for i in range(5)], 5)
    x = backend.create_consumer("s", ["c"], SubscriptionPosition.EARLIEST)
    y = backend.create_consumer("s", ["c"], SubscriptionPosition.EARLIEST)
    before_seek = y.receive(5, 1)
    assert len(before_seek) == 5
    x.seek({"c": None})
    assert len(x.receive(5, 1)) == 5
    y.ack(before_seek)
    x.close()
    z = backend.create_consumer("s", ["c"], SubscriptionPosition.EARLIEST)
    assert [int(m.payload) for m in z.receive(5, 1)] == [0, 1, 2, 3, 4]


def test_a_consumer_collected_without_close_is_handed_back_by_the_backends_close() -> None:
    backend = _backend()
    backend.create_channel("c", b"")
    backend.create_producer("c").send([b"x"] * 3, 5)
    leaked = backend.create_consumer("s", ["c"], SubscriptionPosition.EARLIEST)
    assert len(leaked.receive(3, 1)) == 3
    del leaked
    gc.collect()
    backend.close()
    again = MemoryBackend(backend.url, {})  # the same in-process broker
    assert len(again.create_consumer("s", ["c"], SubscriptionPosition.EARLIEST).receive(3, 1)) == 3


def test_a_join_refused_for_a_missing_channel_subscribes_to_none() -> None:
    backend = _backend()
    backend.create_channel("a", b"")
    with pytest.raises(ChannelNotFoundError):
        backend.create_consumer("s", ["a", "missing"], SubscriptionPosition.LATEST)
    assert backend.list_subscriptions("a") == []


def test_a_producer_closed_during_its_send_finishes_that_send() -> None:
    """A close() from another thread that lands while a send is storing its batch: the send returns the
    ids of what it stored (a caller told otherwise would send the batch twice)."""
    backend = MemoryBackend(URL(f"memory://close-send-{uuid.uuid4().hex[:8]}"), {})
    backend.create_channel("a", b"")
    producer = backend.create_producer("a")

    class _ClosesMidway(list[bytes]):
        def extend(self, items: object) -> None:
            super().extend(items)  # type: ignore[arg-type]
            producer.close()  # as another thread would, between storing and notifying

    channel = backend._broker.channels["a"]  # type: ignore[attr-defined]
    channel.log = _ClosesMidway()
    ids = producer.send([b"x", b"y"], 1.0)
    assert len(ids) == 2 and backend.latest_message_id("a") == ids[1]
    assert [backend.read_message("a", i) for i in ids] == [b"x", b"y"]
