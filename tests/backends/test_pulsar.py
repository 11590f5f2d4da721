"""Pulsar backend: the whole conformance suite against Apache Pulsar standalone (started by the suite
through scripts/broker.py; MSGSTREAM_PULSAR_URL for your own), plus Pulsar-specific tests."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pulsar  # type: ignore[import-untyped]
import pytest

import msgstream as ms
from msgstream.backend import SubscriptionPosition, installed_schemes
from msgstream.errors import (
    BrokerUnavailableError,
    ChannelExistsError,
    ChannelNotFoundError,
    MsgStreamError,
    ProduceError,
    SubscriptionInUseError,
    UnsupportedOperationError,
)
from msgstream.testing import ConformanceSuite, consume_n
from scripts.broker import free_port, start_pulsar

from ..aio_sync import AsyncConformanceSuite
from .common import owner, ping_of_a_dead_broker_fails_in_time, refused_send, restart_loses_and_repeats_nothing, row


def test_registered() -> None:
    assert {"pulsar", "pulsar+ssl"} <= set(installed_schemes())


class TestPulsarConformance(ConformanceSuite):
    """With ``admin_url``, the configuration docs/backends.md recommends: listing subscriptions and the
    subscription's backlog need the admin REST API (test_operations_without_admin_url covers the rest)."""

    @pytest.fixture
    def url(self, pulsar_url: str, pulsar_admin_url: str) -> str:
        return f"{pulsar_url}?admin_url={pulsar_admin_url}"


def test_admin_operations_on_a_channel_whose_topic_is_not_made_yet(pulsar_url: str, pulsar_admin_url: str) -> None:
    """A client without ``admin_url`` makes a channel's topic only when it is first used; one with it
    answers for that channel as for an empty one, rather than failing on the admin API's 404."""
    with ms.connect(pulsar_url) as plain, ms.connect(f"{pulsar_url}?admin_url={pulsar_admin_url}") as admin:
        [chan] = plain.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=1))
        assert admin.list_subscriptions(chan) == []
        admin.drop_subscription("never", [chan])
        assert admin.backend.unacknowledged("never", chan) == (0, None)


def test_operations_without_admin_url(pulsar_url: str) -> None:
    """Without ``admin_url``: ping, channel listing, dropping and counting after a returned message work;
    listing subscriptions raises UnsupportedOperationError and the backlog before any message is unknown."""
    with ms.connect(pulsar_url) as client:
        client.ping(timeout=5.0)
        chans = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=1))
        assert chans[0] in client.list_channels()
        with pytest.raises(UnsupportedOperationError, match="admin_url"):
            client.list_subscriptions(chans[0])
        with client.msg_stream() as out:
            out.create_producers(chans)
            out.produce(ms.MsgPack.of([row(i) for i in range(5)]))
        sub = f"ops-{uuid.uuid4().hex[:6]}"
        inp = client.msg_stream(receive_batch=2)
        inp.create_consumers(sub, chans)
        assert [(lag.messages, lag.seconds) for lag in inp.lag()] == [(None, None)]
        got: list[ms.TsMsg] = []
        deadline = time.monotonic() + 30
        while not got:
            assert time.monotonic() < deadline
            pack = inp.consume(timeout=1.0)
            got = pack.msgs if pack else []
        assert inp.lag()[0].messages == 5 - len(got)
        with pytest.raises(SubscriptionInUseError):
            client.drop_subscription(sub, chans)
        inp.close()
        client.drop_subscription(sub, chans)
        again = client.msg_stream()
        again.create_consumers(sub, chans)
        assert len(consume_n(again, 5, 30)) == 5  # dropped: it started afresh
        again.close()


def test_ping_of_a_dead_broker_fails_within_the_timeout(tmp_path: Path) -> None:
    broker = start_pulsar(tmp_path / "dead")
    ping_of_a_dead_broker_fails_in_time(broker, broker.url, 10.0, 2.0, operation_timeout=30)


class TestPulsarConformanceAio(AsyncConformanceSuite):
    """The same suite through msgstream.aio, with ``admin_url`` as above."""

    @pytest.fixture
    def url(self, pulsar_url: str, pulsar_admin_url: str) -> str:
        return f"{pulsar_url}?admin_url={pulsar_admin_url}"


def test_restart_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """10,000 messages across a SIGKILL + restart of Apache Pulsar standalone (same data dirs and ports):
    every one consumed exactly once, in per-channel order, by a consumer that resumes after the restart."""
    broker = start_pulsar(tmp_path / "durable")
    try:
        with ms.connect(broker.url) as client:  # the producers reconnect and resend what was pending
            restart_loses_and_repeats_nothing(client, broker.restart, retries=20)
    finally:
        broker.stop()


def test_stopped_broker_fails_fast_and_typed(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    start = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as err:
        ms.connect(f"pulsar://127.0.0.1:{port}/?token=tok-SECRET-1&operation_timeout=2")
    assert time.monotonic() - start < 8 and err.value.retriable and "tok-SECRET-1" not in str(err.value)

    broker = start_pulsar(tmp_path / "dies")
    try:
        with ms.connect(f"{broker.url}/?operation_timeout=2") as client:
            chans = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=1))
            out = client.msg_stream(produce_timeout=3)
            out.create_producers(chans)
            inp = client.msg_stream()
            inp.create_consumers("s", chans)
            assert out.produce(ms.MsgPack.of([row(0)]))[chans[0]]
            assert [m.row_ids for m in consume_n(inp, 1, 10) if isinstance(m, ms.InsertMsg)] == [[0]]
            broker.kill()
            start = time.monotonic()
            with pytest.raises(ProduceError) as perr:
                out.produce(ms.MsgPack.of([row(i) for i in range(1, 50)]))
            assert time.monotonic() - start < 6, "produce outlived its timeout"
            assert perr.value.retriable and perr.value.sent.get(chans[0], []) == []  # nothing claimed as sent
            start = time.monotonic()
            try:
                assert inp.consume(timeout=1) is None
            except MsgStreamError as exc:  # a typed error is fine too; a hang or a silent loss is not
                assert exc.retriable, exc
            assert time.monotonic() - start < 6
    finally:
        broker.stop()


def test_token_never_shows(pulsar_url: str) -> None:
    """The test broker runs without authentication, so this checks msgstream's side: the token is passed to the
    client and masked in every repr and error text."""
    url = f"{pulsar_url}/?token=tok-SECRET-2&namespace=default"
    with ms.connect(url) as client:
        texts = [repr(client), repr(client.backend), str(client.backend.url)]
        for call in (
            lambda: client.describe_channels(["no-such-channel"]),
            lambda: client.msg_stream().create_producers(["no-such-channel"]),
        ):
            with pytest.raises(MsgStreamError) as err:
                call()
            texts.append(str(err.value))
        assert not [t for t in texts if "tok-SECRET-2" in t]


def test_destroyed_name_comes_back_empty(pulsar_url: str) -> None:
    """Without ``admin_url`` a destroyed channel's topic stays: a re-created channel gets a fresh topic,
    without the old messages or the old subscriptions' cursors."""
    with ms.connect(pulsar_url) as client:
        backend = client.backend
        name = f"again-{uuid.uuid4().hex[:8]}"
        backend.create_channel(name, b"first")
        backend.create_producer(name).send([b"old-1", b"old-2"], 5)
        backend.delete_channel(name)
        with pytest.raises(ChannelNotFoundError):
            backend.channel_metadata(name)
        backend.create_channel(name, b"second")
        assert backend.channel_metadata(name) == b"second"
        assert backend.latest_message_id(name) is None
        consumer = backend.create_consumer("s", [name], SubscriptionPosition.EARLIEST)
        ids = backend.create_producer(name).send([b"new"], 5)
        got = consumer.receive(10, 5)
        assert [(m.msg_id, m.payload) for m in got] == [(ids[0], b"new")]
        consumer.close()


def test_concurrent_creates_of_one_name_have_one_winner(pulsar_url: str) -> None:
    name = f"race-{uuid.uuid4().hex[:8]}"
    backends = [ms.connect(pulsar_url).backend for _ in range(4)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(backends))

    def create(backend: Any, i: int) -> None:
        barrier.wait()
        try:
            backend.create_channel(name, b"by-%d" % i)
            outcomes.append("ok")
        except ChannelExistsError:
            outcomes.append("exists")

    threads = [threading.Thread(target=create, args=(b, i)) for i, b in enumerate(backends)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert sorted(outcomes) == ["exists", "exists", "exists", "ok"]
        metadata = {b.channel_metadata(name) for b in backends}
        assert len(metadata) == 1, "clients disagree on which create won"
    finally:
        for b in backends:
            b.close()


def test_with_batching_a_seek_inside_a_batch_starts_at_its_target(pulsar_url: str) -> None:
    """The cursor goes back to the start of the target's entry, a whole batch: what comes before the
    target (and the target itself, unless the seek is inclusive) is dropped on arrival."""
    with ms.connect(pulsar_url, batching="true", batching_max_publish_delay_ms="50") as client:
        [chan] = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=1))
        backend = client.backend
        ids = backend.create_producer(chan).send([b"m%d" % i for i in range(10)], 10.0)
        assert len({pulsar.MessageId.deserialize(i).entry_id() for i in ids}) < 10, "no batch was made"
        consumer = backend.create_consumer("s", [chan], ms.SubscriptionPosition.EARLIEST)

        def take(n: int) -> list[bytes]:
            got: list[bytes] = []
            deadline = time.monotonic() + 10
            while len(got) < n:
                assert time.monotonic() < deadline, got
                got += [m.payload for m in consumer.receive(n - len(got), 0.5)]
            return got

        assert take(10) == [b"m%d" % i for i in range(10)]
        consumer.seek({chan: ids[3]}, inclusive={chan})  # a pack's start position
        assert take(7) == [b"m%d" % i for i in range(3, 10)]
        consumer.seek({chan: ids[3]})  # a pack's end position: resume after it
        assert take(6) == [b"m%d" % i for i in range(4, 10)]
        consumer.close()


def test_batching_option_round_trips(pulsar_url: str) -> None:
    with ms.connect(pulsar_url, batching="true") as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=2))
        with client.msg_stream() as out, client.msg_stream() as inp:
            out.create_producers(chans)
            inp.create_consumers("b", chans)
            sent = out.produce(ms.MsgPack.of([row(i) for i in range(300)]))
            got = consume_n(inp, 300, 30)
            assert sorted(m.row_ids[0] for m in got if isinstance(m, ms.InsertMsg)) == list(range(300))
            assert {m.position.msg_id for m in got if m.position} == {i for ids in sent.values() for i in ids}
            # the newest message sits inside a batch: its id, not the entry's, is the latest position
            latest = {p.channel: p.msg_id for p in inp.get_latest_positions()}
            assert latest == {ch: ids[-1] for ch, ids in sent.items()}


def _topics(admin_url: str) -> set[str]:
    with urllib.request.urlopen(f"{admin_url}/admin/v2/persistent/public/default", timeout=10) as response:
        return {t.rsplit("/", 1)[1] for t in json.loads(response.read())}


def test_admin_url_creates_and_deletes_topics(pulsar_url: str, pulsar_admin_url: str) -> None:
    """With ``admin_url`` a channel's topic exists once the channel does, and is gone once it is destroyed."""
    with ms.connect(pulsar_url, admin_url=pulsar_admin_url) as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=2))
        assert set(chans) <= _topics(pulsar_admin_url)
        client.destroy_channels(chans)
        assert not set(chans) & _topics(pulsar_admin_url)


def test_admin_url_destroy_refuses_a_late_produce(pulsar_url: str, pulsar_admin_url: str) -> None:
    """The conformance suite's two-client destroy test with ``admin_url``: the topic is deleted, and a
    producer of another client that still holds it neither lands a message nor brings the channel back."""
    url = f"{pulsar_url}/?admin_url={pulsar_admin_url}"
    with ms.connect(url) as client:
        ConformanceSuite().test_channel_destroyed_by_another_client(client, url)


def test_a_refused_message_names_exactly_the_confirmed_prefix(pulsar_url: str) -> None:
    """The client refuses an oversized message inside send_async, before the messages ahead of it are
    confirmed: the error must still name those as sent, and nothing after the refused one."""
    with ms.connect(pulsar_url) as client:
        backend, name, err = refused_send(client, 6 * 2**20)
        sent = err.sent[name]
        assert len(sent) == 1 and "MessageTooBig" in str(err)
        consumer = backend.create_consumer("s", [name], SubscriptionPosition.EARLIEST)
        got = consumer.receive(10, 5)
        got += consumer.receive(10, 1.0)  # anything stored after it would come by now
        assert [(m.msg_id, m.payload) for m in got] == [(sent[0], b"first")]
        consumer.close()
