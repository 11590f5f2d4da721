"""The fault-injecting conformance mode on the in-process memory backend (a fresh broker per test), and
the wrapper's own behaviour: faults raised before the broker sees the call, typed as the SPI says,
reproducible from the seed."""

from __future__ import annotations

import uuid

import pytest

import msgstream as ms
from msgstream.backend import SubscriptionPosition, load_backend
from msgstream.errors import ConsumeError, InvalidArgumentError, MsgStreamError, ProduceError, SeekError
from msgstream.memory import MemoryBackend
from msgstream.testing.faults import FaultInjectingSuite, FaultyBackend, InjectedFault


class TestMemoryUnderFaults(FaultInjectingSuite):
    quiet_period = 0.2

    @pytest.fixture
    def url(self) -> str:
        return f"memory://faults-{uuid.uuid4().hex[:8]}"


def _memory() -> MemoryBackend:
    backend = load_backend(f"memory://faulty-{uuid.uuid4().hex[:8]}")
    assert isinstance(backend, MemoryBackend)
    return backend


def test_wrapper_keeps_the_inner_features_and_delegates() -> None:
    inner = _memory()
    faulty = FaultyBackend(inner, seed=1)
    assert isinstance(faulty, FaultyBackend) and isinstance(faulty, ms.Backend)
    assert type(faulty).features == MemoryBackend.features == faulty.features
    assert type(FaultyBackend(_memory(), seed=2)) is type(faulty)  # one subclass per inner backend class
    faulty.create_channel("ch", b"meta")
    assert inner.channel_metadata("ch") == faulty.channel_metadata("ch") == b"meta"
    assert faulty.latest_message_id("ch") is None
    with ms.Client(faulty) as client:
        assert client.backend is faulty
    for bad in ({"rate": 1.5}, {"rate": -0.1}, {"calls": ("send", "close")}, {"calls": "send"}):
        with pytest.raises(InvalidArgumentError):
            FaultyBackend(_memory(), seed=1, **bad)  # type: ignore[arg-type]


def test_every_fault_is_the_spi_error_raised_before_the_broker_sees_the_call() -> None:
    inner = _memory()
    faulty = FaultyBackend(inner, seed=7, rate=1.0)
    faulty.create_channel("ch", b"")
    producer = faulty.create_producer("ch")
    consumer = faulty.create_consumer("s", ["ch"], SubscriptionPosition.EARLIEST)
    with pytest.raises(ProduceError) as sent:
        producer.send([b"x"], 1.0)
    assert isinstance(sent.value, InjectedFault) and sent.value.retriable
    assert sent.value.channel == "ch" and sent.value.sent == {}
    assert inner.latest_message_id("ch") is None  # nothing reached the broker
    faulty.enabled = False
    (msg_id,) = producer.send([b"x"], 1.0)
    (raw,) = consumer.receive(10, 1.0)
    faulty.enabled = True
    with pytest.raises(ConsumeError) as received:
        consumer.receive(10, 0.0)
    with pytest.raises(ConsumeError) as acked:
        consumer.ack([raw])
    with pytest.raises(SeekError) as sought:
        consumer.seek({"ch": None})
    for err in (received.value, acked.value, sought.value):
        assert isinstance(err, InjectedFault) and err.retriable
    faulty.enabled = False
    assert consumer.receive(10, 0.0) == []  # the failed seek moved nothing
    consumer.close()  # not acknowledged (the ack failed): the next member gets it again
    again = faulty.create_consumer("s", ["ch"], SubscriptionPosition.EARLIEST)
    assert [r.msg_id for r in again.receive(10, 1.0)] == [msg_id]
    assert faulty.injected == {"send": 1, "receive": 1, "ack": 1, "seek": 1}


def test_only_the_named_calls_fail_and_the_seed_reproduces_the_faults() -> None:
    def run(seed: int, calls: tuple[str, ...]) -> list[bool]:
        faulty = FaultyBackend(_memory(), seed=seed, rate=0.3, calls=calls)
        faulty.create_channel("ch", b"")
        producer = faulty.create_producer("ch")
        consumer = faulty.create_consumer("s", ["ch"], SubscriptionPosition.EARLIEST)
        outcome = []
        for _ in range(50):
            try:
                producer.send([b"x"], 1.0)
                consumer.receive(10, 0.0)
                outcome.append(True)
            except MsgStreamError:
                outcome.append(False)
        return outcome

    assert run(3, ("send", "receive")) == run(3, ("send", "receive"))
    assert run(3, ("send", "receive")) != run(4, ("send", "receive"))
    assert all(run(3, ("ack", "seek")))


def test_fail_next_forces_a_fault() -> None:
    faulty = FaultyBackend(_memory(), seed=1, rate=0.0)
    faulty.create_channel("ch", b"")
    consumer = faulty.create_consumer("s", ["ch"], SubscriptionPosition.EARLIEST)
    faulty.fail_next("seek", times=2)
    for _ in range(2):
        with pytest.raises(SeekError):
            consumer.seek({"ch": None})
    consumer.seek({"ch": None})
    assert faulty.injected["seek"] == 2 and faulty.seen["seek"] == 3


def _three_rows_and_a_tick() -> tuple[FaultyBackend, ms.Client, list[str]]:
    """A client over a fault-free FaultyBackend (faults come from ``fail_next``), one channel holding rows
    0-2 at timestamp 5 and a tick at 10."""
    faulty = FaultyBackend(load_backend(f"memory://with-{uuid.uuid4().hex[:6]}"), seed=1, rate=0.0)
    client = ms.Client(faulty)
    chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="p"), num_channels=1))
    out = client.msg_stream()
    out.create_producers(chans)
    out.produce(ms.MsgPack.of([ms.InsertMsg(begin_ts=5, end_ts=5, hash_values=[0], row_ids=[i]) for i in range(3)]))
    out.broadcast(ms.MsgPack(10, 10, [ms.TimeTickMsg(begin_ts=10, end_ts=10)]))
    return faulty, client, chans


@pytest.mark.parametrize("tt", [False, True], ids=["plain", "time-tick"])
def test_a_with_block_left_on_a_failed_acknowledgement_still_makes_it(tt: bool) -> None:
    """The failed ack is of a pack the caller handled (it asked for the next one): the block's exit
    leaves only a pack in hand unacknowledged, so the close makes that ack again and the subscription
    does not deliver the handled pack a second time."""
    faulty, client, chans = _three_rows_and_a_tick()
    with pytest.raises(ConsumeError), client.tt_msg_stream() if tt else client.msg_stream() as stream:
        stream.create_consumers("sub", chans)
        pack = stream.consume(timeout=5.0)
        assert pack is not None and [m.row_ids[0] for m in pack.msgs if isinstance(m, ms.InsertMsg)] == [0, 1, 2]
        faulty.fail_next("ack")
        stream.consume(timeout=0.1)  # the handled pack's ack fails: raised, kept for a retry
    again = client.msg_stream()
    again.create_consumers("sub", chans)
    assert again.consume(timeout=0.2) is None
    client.close()


def test_a_with_block_left_on_a_time_tick_error_acknowledges_the_late_message() -> None:
    """A message at or below a tick already passed is dropped with ``TimeTickError`` and acknowledged: the
    block's exit must not turn it back into data for the next member."""
    with ms.connect(f"memory://late-{uuid.uuid4().hex[:6]}") as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="p"), num_channels=1))
        out = client.msg_stream()
        out.create_producers(chans)

        def tick(ts: int) -> None:
            out.broadcast(ms.MsgPack(ts, ts, [ms.TimeTickMsg(begin_ts=ts, end_ts=ts)]))

        tick(10)
        first = client.tt_msg_stream()
        first.create_consumers("sub", chans)
        assert first.consume(timeout=5.0) is not None
        out.produce(ms.MsgPack.of([ms.InsertMsg(begin_ts=7, end_ts=7, hash_values=[0], row_ids=[99])]))  # late
        tick(20)
        with pytest.raises(ms.errors.TimeTickError), first:
            first.consume(timeout=5.0)
        nxt = client.tt_msg_stream()
        nxt.create_consumers("sub", chans)
        pack = nxt.consume(timeout=1.0)
        assert pack is not None and pack.end_ts == 20 and pack.msgs == []


@pytest.mark.parametrize("tt", [False, True], ids=["plain", "time-tick"])
def test_a_with_block_whose_close_cannot_acknowledge_either_still_closes_the_stream(tt: bool) -> None:
    """The broker is still down when the block's close makes the failed acknowledgement again: the stream
    is closed without it (the handled pack comes again: at least once) rather than left open holding it,
    and the block's own exception goes on."""
    faulty, client, chans = _three_rows_and_a_tick()
    stream = client.tt_msg_stream() if tt else client.msg_stream()
    with pytest.raises(ConsumeError) as raised, stream:
        stream.create_consumers("sub", chans)
        assert stream.consume(timeout=5.0) is not None
        faulty.fail_next("ack", 2)  # the next consume's ack, and the close's
        stream.consume(timeout=0.1)
    assert stream.closed
    assert isinstance(raised.value, ConsumeError) and raised.value.__context__ is None  # the block's own error
    again = client.msg_stream()
    again.create_consumers("sub", chans)
    pack = again.consume(timeout=5.0)
    assert pack is not None and [m.row_ids[0] for m in pack.msgs if isinstance(m, ms.InsertMsg)] == [0, 1, 2]
    again.close(acknowledge=False)
    client.drop_subscription("sub", chans)  # no member left open
    client.close()
