"""Kafka backend: the whole conformance suite against Apache Kafka (started by the suite through
scripts/broker.py; MSGSTREAM_KAFKA_URL for your own), plus Kafka-specific tests."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import confluent_kafka as ck
import pytest
from msgstream_kafka import _BatchLimits, _KafkaProducer

import msgstream as ms
from msgstream.backend import SubscriptionPosition, installed_schemes
from msgstream.errors import BrokerUnavailableError, ChannelNotFoundError, ConsumeError, ProduceError
from msgstream.testing import ConformanceSuite, consume_n, expect_quiet
from scripts.broker import start_kafka

from ..aio_sync import AsyncConformanceSuite
from .common import ping_of_a_dead_broker_fails_in_time, refused_send, restart_loses_and_repeats_nothing, row


def test_registered() -> None:
    assert "kafka" in installed_schemes()


@pytest.mark.parametrize(
    ("code", "retriable"),
    [
        (ck.KafkaError._TRANSPORT, True),
        (ck.KafkaError._MSG_TIMED_OUT, True),
        (ck.KafkaError._PURGE_QUEUE, True),  # taken back before it left the client: sending again works
        (ck.KafkaError.INVALID_MSG_SIZE, False),
    ],
)
def test_a_failed_delivery_is_retriable_as_any_error_with_its_code(code: int, retriable: bool) -> None:
    err = ck.KafkaError(code)  # not flagged retriable by librdkafka: the code decides
    producer = _KafkaProducer.__new__(_KafkaProducer)
    producer.channel = "c"
    with pytest.raises(ProduceError) as info:
        producer._fail_unconfirmed(2, [5], [(1, err)], 1.0)
    assert info.value.retriable is retriable
    assert info.value.sent == {"c": [(5).to_bytes(8, "big")]}


class TestKafkaConformance(ConformanceSuite):
    @pytest.fixture
    def url(self, kafka_url: str) -> str:
        return kafka_url


class TestKafkaConformanceAio(AsyncConformanceSuite):
    """The same suite through msgstream.aio."""

    @pytest.fixture
    def url(self, kafka_url: str) -> str:
        return kafka_url


def _take(stream: ms.MsgStream, into: dict[int, str]) -> None:
    pack = stream.consume(timeout=0.3)
    for m in pack.msgs if pack else []:
        assert isinstance(m, ms.InsertMsg) and m.position
        assert m.row_ids[0] not in into, f"row {m.row_ids[0]} delivered twice"
        into[m.row_ids[0]] = m.position.channel


def _settle(a: ms.MsgStream, b: ms.MsgStream, chans: list[str]) -> None:
    """Drive both members' group protocol until each holds some channels and together all of them."""
    ka, kb = a._consumer, b._consumer
    deadline = time.monotonic() + 60
    while True:
        held_a, held_b = set(ka._assigned), set(kb._assigned)  # type: ignore[union-attr]
        if held_a and held_b and not held_a & held_b and held_a | held_b == set(chans):
            return
        assert time.monotonic() < deadline, f"group did not settle: {held_a} / {held_b}"
        assert a.consume(timeout=0.1) is None and b.consume(timeout=0.1) is None


def test_url_options_change_the_defaults_and_may_not_change_what_the_backend_needs(kafka_url: str) -> None:
    sep = "&" if "?" in kafka_url else "/?"
    url = f"{kafka_url}{sep}linger.ms=50&consumer.fetch.queue.backoff.ms=500&acks=-1&producer.enable.idempotence=true"
    with ms.connect(url) as client:
        backend: Any = client.backend
        assert backend.producer_conf["linger.ms"] == "50"  # un-prefixed: every client
        assert backend.consumer_conf["fetch.queue.backoff.ms"] == "500"  # prefixed: that client only
        assert backend.producer_conf["acks"] == "all" and backend.producer_conf["enable.idempotence"] is True
    for changed in ("acks=1", "request.required.acks=0", "producer.enable.idempotence=false", "enable.auto.commit=true",
                    "consumer.partition.assignment.strategy=cooperative-sticky"):  # fmt: skip
        with pytest.raises(ms.errors.InvalidURLError, match="msgstream needs"):
            ms.connect(f"{kafka_url}{sep}{changed}")


def test_two_members_split_channels_and_one_takes_over(kafka_url: str) -> None:
    with ms.connect(kafka_url) as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="k"), num_channels=4))
        with client.msg_stream() as out:
            out.create_producers(chans)
            a, b = client.msg_stream(), client.msg_stream()
            a.create_consumers("split", chans)
            b.create_consumers("split", chans)
            _settle(a, b, chans)
            out.produce(ms.MsgPack.of([row(i) for i in range(400)]))
            got_a: dict[int, str] = {}
            got_b: dict[int, str] = {}
            deadline = time.monotonic() + 60
            while len(got_a) + len(got_b) < 400:
                assert time.monotonic() < deadline, f"received {len(got_a) + len(got_b)} of 400"
                _take(a, got_a)
                _take(b, got_b)
            assert not set(got_a) & set(got_b) and set(got_a) | set(got_b) == set(range(400))
            assert not set(got_a.values()) & set(got_b.values()), "a channel went to both members"
            a.close()  # b must take over a's channels, from what a acknowledged
            out.produce(ms.MsgPack.of([row(i) for i in range(400, 800)]))
            after: dict[int, str] = {}
            deadline = time.monotonic() + 60
            while len(after) < 400:
                assert time.monotonic() < deadline, f"after the close: {len(after)} of 400"
                _take(b, after)
            assert set(after) == set(range(400, 800))
            assert set(after.values()) == set(chans)
            b.close()


def test_stopped_broker_fails_produce_within_the_timeout(tmp_path: Path) -> None:
    broker = start_kafka(tmp_path / "dies")
    try:
        url = f"{broker.url}/?producer.message.timeout.ms=3000"
        with ms.connect(url) as client:
            chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="k"), num_channels=1))
            out = client.msg_stream(produce_timeout=5)
            out.create_producers(chans)
            assert out.produce(ms.MsgPack.of([row(0)]))[chans[0]]
            broker.kill()
            start = time.monotonic()
            with pytest.raises(ProduceError) as err:
                out.produce(ms.MsgPack.of([row(i) for i in range(1, 50)]))
            assert time.monotonic() - start < 8
            assert err.value.retriable and err.value.sent.get(chans[0], []) == []  # nothing claimed as sent
    finally:
        broker.stop()


def test_restart_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """10,000 messages across a SIGKILL + restart of Apache Kafka (same data dir and ports), each consumed
    exactly once, in per-channel order."""
    broker = start_kafka(tmp_path / "kafka")
    try:
        with ms.connect(f"{broker.url}/?operation_timeout=5") as client:
            restart_loses_and_repeats_nothing(client, broker.restart, retries=20)
    finally:
        broker.stop()


def test_a_close_whose_commit_cannot_be_made_raises_in_time_and_closes_nothing(tmp_path: Path) -> None:
    """Kafka acknowledges by asynchronous commits, so close() makes the last one synchronously. With the
    broker down it raises a retriable ConsumeError within the backend's timeout (librdkafka's own commit
    waits out session.timeout.ms, 45 s) and closes nothing; once the broker is back, close() commits, and
    the next member gets none of the acknowledged messages again."""
    broker = start_kafka(tmp_path / "close")
    try:
        with ms.connect(f"{broker.url}/?operation_timeout=3") as client:
            ch = _channel_of_rows(client, 10)
            inp = client.msg_stream()
            inp.create_consumers("closing", [ch])
            assert _rows(consume_n(inp, 10, 30)) == list(range(10))
            broker.kill()
            started = time.monotonic()
            with pytest.raises(ConsumeError) as err:
                inp.close()
            assert time.monotonic() - started < 15, "close outlived the backend's timeout"
            assert err.value.retriable and not inp.closed
            broker.start()
            deadline = time.monotonic() + 60
            while not inp.closed:
                assert time.monotonic() < deadline, "close never succeeded with the broker back"
                with contextlib.suppress(ConsumeError):
                    inp.close()
            with client.msg_stream() as again:
                again.create_consumers("closing", [ch])
                expect_quiet(again, 3.0)
    finally:
        broker.stop()


def test_a_flush_never_moves_the_group_back(kafka_url: str) -> None:
    """The offset a member remembers as acknowledged can trail the group's (another member owned the
    channel meanwhile and committed further): the flush of its close commits only forward."""
    with ms.connect(kafka_url) as client:
        ch = _channel_of_rows(client, 20)
        inp = client.msg_stream()
        inp.create_consumers("forward", [ch])
        assert _rows(consume_n(inp, 20, 30)) == list(range(20))
        inp.consume(timeout=0.5)  # acknowledges 0..19: the group is at 20
        inp._consumer._floor[ch] = 5  # type: ignore[union-attr]  # what a member that was away remembers
        inp.close()
        assert client.backend._group_offsets("forward", [ch]) == {ch: 20}  # type: ignore[attr-defined]
        with client.msg_stream() as again:
            again.create_consumers("forward", [ch])
            expect_quiet(again, 2.0)


class _LosingCommits:
    """A librdkafka consumer whose commits are lost on the way to the broker, as in a broker restart:
    ``report=True`` reports each failure through the backend's commit callback, as librdkafka does for
    a failed asynchronous commit; ``report=False`` loses them silently (the broker acknowledged, then
    lost them). Everything else goes to the real consumer on the real broker."""

    def __init__(self, consumer: Any, real: Any, *, report: bool) -> None:
        self._consumer, self._real, self._report = consumer, real, report
        self.lost: list[list[ck.TopicPartition]] = []

    def commit(self, *, offsets: list[ck.TopicPartition], asynchronous: bool) -> None:
        self.lost.append(offsets)
        if self._report:
            self._consumer._on_commit(ck.KafkaError(ck.KafkaError._TRANSPORT), offsets)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _ErrorAfterRecords:
    """A librdkafka consumer whose next batch with records ends with an error event (a connection reset
    reported beside what was fetched before it)."""

    def __init__(self, real: Any) -> None:
        self._real, self.injected = real, False

    def consume(self, n: int, timeout: float) -> list[Any]:
        batch: list[Any] = self._real.consume(n, timeout)
        if batch and not self.injected:
            self.injected = True
            return [*batch, _ErrorEvent(batch[0].topic())]
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _ErrorEvent:
    def __init__(self, topic: str) -> None:
        self._topic = topic

    def error(self) -> ck.KafkaError:
        return ck.KafkaError(ck.KafkaError._TRANSPORT, "injected: connection reset", retriable=True)

    def topic(self) -> str:
        return self._topic


def test_records_fetched_beside_an_error_are_returned_before_it_is_raised(kafka_url: str) -> None:
    with ms.connect(kafka_url) as client:
        ch = _channel_of_rows(client, 100)
        got: list[int] = []
        errors: list[ms.errors.ConsumeError] = []
        with client.msg_stream(receive_batch=10) as inp:
            inp.create_consumers("beside-an-error", [ch])
            got += _rows(consume_n(inp, 10, 30))
            member = inp._consumer
            member._c = wrapped = _ErrorAfterRecords(member._c)  # type: ignore[union-attr]
            deadline = time.monotonic() + 30
            while len(got) < 100:
                assert time.monotonic() < deadline, f"received {len(got)} of 100"
                try:
                    pack = inp.consume(timeout=0.5)
                except ms.errors.ConsumeError as exc:  # retriable: go on, as documented
                    errors.append(exc)
                    continue
                got += _rows(pack.msgs) if pack else []
            member._c = wrapped._real  # type: ignore[union-attr]
        assert wrapped.injected and len(errors) == 1 and errors[0].retriable
        assert got == list(range(100))


def _channel_of_rows(client: ms.Client, n: int) -> str:
    """A new channel holding rows ``0..n-1``."""
    [ch] = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="k"), num_channels=1))
    with client.msg_stream() as out:
        out.create_producers([ch])
        out.produce(ms.MsgPack.of([row(i) for i in range(n)]))
    return ch


def _rows(packs: list[ms.TsMsg]) -> list[int]:
    return [m.row_ids[0] for m in packs if isinstance(m, ms.InsertMsg)]


def _ten_acked_with_the_commit_lost(client: ms.Client, group: str, *, report: bool) -> tuple[str, Any, Any, Any]:
    """A channel of 10 rows that a member of ``group`` consumed and acknowledged, its commit lost on the
    way (``report``: reported through the commit callback at once): (channel, stream, member, losing)."""
    ch = _channel_of_rows(client, 10)
    first = client.msg_stream(auto_ack=False)
    first.create_consumers(group, [ch])
    got = consume_n(first, 10, 30)
    member = first._consumer
    real = member._c  # type: ignore[union-attr]
    member._c = losing = _LosingCommits(member, real, report=report)  # type: ignore[union-attr]
    first.ack(got)
    member._c = real  # type: ignore[union-attr]
    assert [tp.offset for tp in losing.lost[0]] == [10]
    return ch, first, member, losing


def test_a_failed_commit_is_made_again(kafka_url: str) -> None:
    """An asynchronous commit that fails is sent again (here: on close), so the next member does not
    get acknowledged messages again."""
    with ms.connect(kafka_url) as client:
        ch, first, _, _ = _ten_acked_with_the_commit_lost(client, "retried", report=True)
        first.close()
        with client.msg_stream() as second:
            second.create_consumers("retried", [ch])
            expect_quiet(second, 3.0)


def test_a_failed_commit_reported_after_a_seek_does_not_undo_the_seek(kafka_url: str) -> None:
    """The failure of an asynchronous commit made before a seek, reported once the seek committed its own
    offset (librdkafka reports in a later poll), is not made again: the subscription keeps the seek's."""
    with ms.connect(kafka_url) as client:
        ch, first, member, losing = _ten_acked_with_the_commit_lost(client, "rewound", report=False)
        first.seek([ms.Position(ch, b"", 0)])  # replay from the start: commits offset 0
        member._on_commit(ck.KafkaError(ck.KafkaError._TRANSPORT), losing.lost[0])  # the late report
        first.close()
        with client.msg_stream() as second:
            second.create_consumers("rewound", [ch])
            assert sorted(_rows(consume_n(second, 10, 30))) == list(range(10))


def test_a_member_drops_what_it_acknowledged_when_a_lost_commit_rewinds_it(kafka_url: str) -> None:
    """A commit the broker lost (a restart) leaves the group's offset behind what this member
    acknowledged: after the next rebalance the member starts from that old offset, and drops what it
    had acknowledged itself instead of delivering it twice."""
    with ms.connect(kafka_url) as client:
        owner = ms.OwnerDescription(role="k")
        mine, other = client.create_channels(ms.CreateChannelRequest(owner=owner, num_channels=2))
        with client.msg_stream() as out:
            out.create_producers([mine])
            out.produce(ms.MsgPack.of([row(i) for i in range(10)]))
            first = client.msg_stream()
            first.create_consumers("rewound", [mine])
            assert _rows(consume_n(first, 10, 30)) == list(range(10))
            member = first._consumer
            real = member._c  # type: ignore[union-attr]
            member._c = losing = _LosingCommits(member, real, report=False)  # type: ignore[union-attr]
            expect_quiet(first, 0.5)  # acknowledges 0..9: that commit is lost
            assert [tp.offset for tp in losing.lost[0]] == [10]
            # another member joins the group (for another channel): every partition is revoked and
            # assigned again, and `mine` restarts from the group's offset, which never moved
            second = client.msg_stream()
            second.create_consumers("rewound", [other])
            again: list[int] = []
            deadline = time.monotonic() + 30
            while second._consumer._assigned != {other}:  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the group did not rebalance"
                pack = first.consume(timeout=0.1)
                again += _rows(pack.msgs) if pack else []
                second.consume(timeout=0.1)
            member._c = real  # type: ignore[union-attr]
            out.produce(ms.MsgPack.of([row(i) for i in range(10, 20)]))
            quiet_until = 0.0
            while len(again) < 10 or time.monotonic() < quiet_until:
                assert time.monotonic() < deadline, f"received {again}"
                pack = first.consume(timeout=0.2)
                second.consume(timeout=0.1)
                if pack is not None:
                    again += _rows(pack.msgs)
                    quiet_until = time.monotonic() + 2.0
            assert again == list(range(10, 20)), "acknowledged messages delivered again after a rebalance"
            assert member._assigned == {mine}  # type: ignore[union-attr]
            first.close()
            second.close()


def _read_all(backend: Any, channel: str, expected: int) -> list[Any]:
    """Every record of ``channel``, read by a new group until ``expected`` came and then 2 s of quiet."""
    consumer = backend.create_consumer(f"read-{uuid.uuid4().hex[:8]}", [channel], SubscriptionPosition.EARLIEST)
    try:
        got: list[Any] = []
        deadline = time.monotonic() + 30
        while len(got) < expected and time.monotonic() < deadline:
            got += consumer.receive(100, 1.0)
        got += consumer.receive(100, 2.0)  # and nothing more
        return got
    finally:
        consumer.close()


def test_a_refused_message_names_exactly_the_confirmed_prefix(kafka_url: str) -> None:
    """librdkafka refuses a message over ``message.max.bytes`` in ``produce()``: the send fails naming
    the messages confirmed before it, and nothing after it is sent, so the channel keeps the pack's order.
    (Too large for one ``produce_batch`` call too: that would skip it and queue the message after it.)"""
    with ms.connect(kafka_url) as client:
        backend, name, err = refused_send(client, 2 * 2**20)
        sent = err.sent[name]
        assert len(sent) == 1 and "too large" in str(err).lower() and not err.retriable
        got = _read_all(backend, name, 1)
        assert [(r.msg_id, r.payload) for r in got] == [(sent[0], b"first")]


def test_a_batch_call_that_refuses_a_tail_sends_it_after_in_order(kafka_url: str) -> None:
    """The local queue has room for 4: one ``produce_batch`` of 7 queues 4 and refuses the rest, which
    go one by one as room frees up. (The pack checks keep a lone send from getting there; another
    thread sharing the producer can fill the queue between the check and the call, which is what
    forcing the check open stands for here.)"""
    sep = "&" if "?" in kafka_url else "?"
    with ms.connect(f"{kafka_url}{sep}producer.queue.buffering.max.messages=4") as client:
        backend: Any = client.backend
        name = f"tail-{uuid.uuid4().hex[:8]}"
        backend.create_channel(name, b"")
        producer = backend.create_producer(name)
        backend.batch_limits = _BatchLimits(10**9, 10**9, 10**12)  # claims more room than librdkafka has
        payloads = [b"m%d" % i for i in range(7)]
        ids = producer.send(payloads, 10)
        assert ids == sorted(ids) and len(set(ids)) == 7
        got = _read_all(backend, name, 7)
        assert [(r.msg_id, r.payload) for r in got] == list(zip(ids, payloads, strict=True))


def test_batch_limits_admit_only_packs_nothing_in_can_be_refused() -> None:
    """The checks before one ``produce_batch``: no message over the size limit, and room in the local
    queue for the pack beside what is queued, every message counted at the pack's largest size."""

    class Queued:  # what ``len(producer)`` reports: messages in librdkafka's local queue
        def __init__(self, n: int) -> None:
            self.n = n

        def __len__(self) -> int:
            return self.n

    limits = _BatchLimits(max_bytes=100, queue_msgs=10, queue_bytes=900)
    assert limits.admit(Queued(0), [b"x" * 100] * 9)
    assert not limits.admit(Queued(0), [b"x" * 10, b"x" * 101])  # one too large
    assert not limits.admit(Queued(8), [b"x"] * 3)  # 11 messages: more than the queue holds
    assert not limits.admit(Queued(5), [b"x"] * 4 + [b"x" * 100])  # 10 counted at 100 bytes > 900
    assert limits.admit(Queued(4), [b"x"] * 4 + [b"x" * 100])  # 9 at 100 bytes fit


def test_a_batch_call_that_skips_a_message_fails_the_send(kafka_url: str) -> None:
    """If ``produce_batch`` refuses a message and queues the next (here: one too large, the check
    forced open), the pack would land out of order: the send fails, naming the confirmed prefix and
    saying that later messages may land."""
    with ms.connect(kafka_url) as client:
        backend: Any = client.backend
        name = f"hole-{uuid.uuid4().hex[:8]}"
        backend.create_channel(name, b"")
        producer = backend.create_producer(name)
        backend.batch_limits = _BatchLimits(10**9, 10**9, 10**12)  # claims more room than librdkafka has
        with pytest.raises(ProduceError, match="out of order") as err:
            producer.send([b"first", b"x" * (2 * 2**20), b"third"], 10)
        assert len(err.value.sent[name]) == 1 and not err.value.retriable
        got = _read_all(backend, name, 2)
        assert [r.payload for r in got] == [b"first", b"third"]
        assert got[0].msg_id == err.value.sent[name][0]


def test_a_send_to_a_channel_destroyed_elsewhere_does_not_hold_up_the_other_channels(kafka_url: str) -> None:
    """A send to a channel another client destroyed fails; what it left in librdkafka's queue (the topic
    is gone, so it would wait there for message.timeout.ms) must not make this client's next sends to
    live channels wait out their timeout."""
    with ms.connect(kafka_url) as a, ms.connect(kafka_url) as b:
        gone, live = a.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="k"), num_channels=2))
        with b.msg_stream(produce_timeout=5) as to_gone, b.msg_stream(produce_timeout=5) as to_live:
            to_gone.create_producers([gone])
            to_live.create_producers([live])
            to_gone.produce(ms.MsgPack.of([row(0)]))
            a.destroy_channels([gone])
            with pytest.raises((ProduceError, ChannelNotFoundError)):
                to_gone.produce(ms.MsgPack.of([row(1)]))
            start = time.monotonic()
            to_live.produce(ms.MsgPack.of([row(2)]))
            assert time.monotonic() - start < 2, "a live channel's send waited for the destroyed one's messages"


def test_ping_of_a_dead_broker_fails_within_the_timeout(tmp_path: Path) -> None:
    broker = start_kafka(tmp_path / "dead")
    ping_of_a_dead_broker_fails_in_time(broker, broker.url, 5.0, 2.0)


def test_a_registry_refresh_reads_records_only_when_there_are_new_ones(kafka_url: str, monkeypatch: Any) -> None:
    """A consumer refreshes the channel registry every ``registry_refresh`` seconds. With nothing new it
    asks for the registry's end offset (one request) instead of reading to the end of the partition,
    a fetch round trip and the wait for end-of-partition that stalled every consumer about 20 ms a
    second; a channel another client created is still seen on the next refresh."""
    with ms.connect(kafka_url) as a, ms.connect(kafka_url) as b:
        backend = a.backend
        reads: list[str] = []
        read = backend._read

        def counted(topic: str, *args: Any, **kw: Any) -> Any:
            reads.append(topic)
            return read(topic, *args, **kw)

        monkeypatch.setattr(backend, "_read", counted)
        backend.refresh_registry(force=True)  # what is new since the client opened
        reads.clear()
        for _ in range(3):
            backend.refresh_registry(force=True)
        assert reads == [], "a refresh with no new registry records read the registry"
        [made] = b.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="k"), num_channels=1))
        backend.refresh_registry(force=True)
        assert reads == [backend.registry_topic]
        assert backend.exists(made, refresh=False)


def test_a_registry_topic_the_broker_does_not_know_is_retriable_broker_unavailability(kafka_url: str) -> None:
    """Around a restart librdkafka reports for a moment that it does not know the registry's partition
    (or that it replaced a broker handle): the refresh asks again until its timeout, then reports the
    broker unavailable (retriable), never a missing channel. Here the registry topic is deleted under the
    client."""
    topic = f"registry-{uuid.uuid4().hex[:8]}"
    with ms.connect(f"{kafka_url}/?registry_topic={topic}") as client:
        backend = client.backend
        backend.admin.delete_topics([topic])[topic].result(timeout=30)
        start = time.monotonic()
        with pytest.raises(BrokerUnavailableError) as caught:
            backend.refresh_registry(force=True, timeout=2)
        assert caught.value.retriable, caught.value
        assert time.monotonic() - start < 10


def test_a_send_to_a_channel_known_to_be_gone_leaves_other_sends_alone(kafka_url: str) -> None:
    """The producer is shared by every channel of the backend: a send refused because the registry
    says its channel is gone has queued nothing, and must not take back what other sends queued."""
    with ms.connect(kafka_url) as client:
        request = ms.CreateChannelRequest(owner=ms.OwnerDescription(role="t"), num_channels=2)
        live, dead = client.create_channels(request)
        client.backend.create_producer(dead).send([b"x"], 10.0)  # the topic is known to the producer
        doomed = client.backend.create_producer(dead)
        client.destroy_channels([dead])
        producer = client.backend.create_producer(live)
        outcome: list[Any] = []

        def send_many() -> None:
            try:
                outcome.append(len(producer.send([b"y" * 1000] * 20000, 60.0)))
            except Exception as exc:
                outcome.append(exc)

        sender = threading.Thread(target=send_many)
        sender.start()
        deadline = time.monotonic() + 10
        while not len(client.backend._producer):  # messages queued by the other send
            assert time.monotonic() < deadline and sender.is_alive(), outcome
            time.sleep(0.001)
        with pytest.raises(ProduceError, match="does not exist"):
            doomed.send([b"z"], 5.0)
        sender.join(60)
        assert outcome == [20000]


def test_an_admin_call_without_an_answer_in_time_is_a_retriable_msgstream_error(kafka_url: str) -> None:
    with ms.connect(f"{kafka_url}/?operation_timeout=0.2") as client:
        backend = client.backend
        with pytest.raises(BrokerUnavailableError) as info, backend.errors("admin", BrokerUnavailableError):
            backend._wait(concurrent.futures.Future())  # an answer that never comes
        assert info.value.retriable
