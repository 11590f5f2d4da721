"""Redis Streams backend: the whole conformance suite against a real redis-server, plus restart,
crash, authentication and outage tests."""

from __future__ import annotations

import importlib.metadata
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from packaging.requirements import Requirement
from packaging.version import Version

import msgstream as ms
from msgstream.backend import installed_schemes
from msgstream.errors import (
    BrokerUnavailableError,
    ChannelNotFoundError,
    ConsumeError,
    InvalidURLError,
    MsgStreamError,
    ProduceError,
    SeekError,
    StreamClosedError,
)
from msgstream.testing import ConformanceSuite, consume_n
from scripts.broker import free_port, start_redis

from ..aio_sync import AsyncConformanceSuite
from .common import (
    consume_rows,
    kill_consumer_holding,
    owner,
    ping_of_a_dead_broker_fails_in_time,
    restart_loses_and_repeats_nothing,
    row,
)


def test_registered_under_both_schemes() -> None:
    assert {"redis", "rediss"} <= set(installed_schemes())


class TestRedisConformance(ConformanceSuite):
    @pytest.fixture
    def url(self, redis_url: str) -> str:
        return redis_url


class TestRedisConformanceAio(AsyncConformanceSuite):
    """The same suite through msgstream.aio."""

    @pytest.fixture
    def url(self, redis_url: str) -> str:
        return redis_url


def test_restart_with_aof_loses_and_repeats_nothing(tmp_path: Path) -> None:
    broker = start_redis(tmp_path / "durable", durable=True)
    try:
        url = f"redis://127.0.0.1:{broker.port}/0"
        with ms.connect(url, socket_timeout=2) as client:
            restart_loses_and_repeats_nothing(client, broker.restart, retries=20)
    finally:
        broker.stop()


def test_consumer_crash_loses_no_pending_entry(redis_url: str) -> None:
    with ms.connect(redis_url, claim_idle=1, claim_interval=0.2) as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=2))
        sub = f"crash-{uuid.uuid4().hex[:6]}"
        with client.msg_stream() as out:
            out.create_producers(chans)
            out.produce(ms.MsgPack.of([row(i) for i in range(400)]))
        kill_consumer_holding(redis_url, sub, chans, 100)
        survivor = client.msg_stream()
        survivor.create_consumers(sub, chans)
        got: list[tuple[str, int]] = []
        consume_rows(survivor, 400, got, 30)
        rows = sorted(r for _, r in got)
        assert rows == list(range(400)), "entries held by the crashed member were lost or duplicated"
        survivor.close()


def test_wrong_password_is_typed_and_masked(tmp_path: Path) -> None:
    broker = start_redis(tmp_path / "auth", password="right-one")
    try:
        with pytest.raises(BrokerUnavailableError) as err:
            ms.connect(f"redis://:Wr0ngPassw0rd@127.0.0.1:{broker.port}/0")
        assert "Wr0ngPassw0rd" not in str(err.value) and "authentication" in str(err.value).lower()
        with ms.connect(f"redis://:right-one@127.0.0.1:{broker.port}/0") as client:
            assert "right-one" not in repr(client) and "right-one" not in repr(client.backend)
            chans = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=1))
            assert client.describe_channels(chans).descriptions[0].owner == owner()
    finally:
        broker.stop()


def test_dead_server_fails_fast_with_a_typed_error(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    start = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as err:
        ms.connect(f"redis://:pw-secret@127.0.0.1:{port}/0", connect_timeout=1)
    assert time.monotonic() - start < 5 and err.value.retriable and "pw-secret" not in str(err.value)

    broker = start_redis(tmp_path / "dies")
    try:
        with ms.connect(f"redis://127.0.0.1:{broker.port}/0", socket_timeout=1, connect_timeout=1) as client:
            chans = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=1))
            out = client.msg_stream(produce_timeout=2)
            out.create_producers(chans)
            inp = client.msg_stream()
            inp.create_consumers("s", chans)
            broker.kill()
            start = time.monotonic()
            with pytest.raises(ProduceError) as perr:
                out.produce(ms.MsgPack.of([row(1)]))
            assert perr.value.retriable and time.monotonic() - start < 5
            start = time.monotonic()
            with pytest.raises(MsgStreamError) as cerr:
                inp.consume(timeout=1)
            assert cerr.value.retriable and time.monotonic() - start < 5
    finally:
        broker.stop()


def test_maxlen_trims_and_seek_to_a_trimmed_entry_fails(redis_url: str) -> None:
    with ms.connect(redis_url, maxlen=100) as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=1))
        with client.msg_stream() as out:
            out.create_producers(chans)
            ids = out.produce(ms.MsgPack.of([row(0) for _ in range(1000)]))[chans[0]]
        backend = client.backend
        assert backend.client.xlen(backend.key(chans[0])) < 300  # type: ignore[attr-defined]
        inp = client.msg_stream()
        inp.create_consumers("s", chans)
        with pytest.raises(SeekError, match="trimmed"):
            inp.seek([ms.Position(chans[0], ids[0], 0)])
        inp.seek([ms.Position(chans[0], ids[-2], 0)])
        assert [m.position.msg_id for m in consume_n(inp, 1, 10) if m.position] == [ids[-1]]
        inp.close()


def test_a_send_waits_for_replies_at_most_its_timeout(redis_url: str) -> None:
    """A server that takes writes but answers nothing for a while (CLIENT PAUSE WRITE): the send raises
    a retriable ProduceError within its timeout, not its connection's socket_timeout (5 s)."""
    with ms.connect(redis_url) as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=1))
        producer = client.backend.create_producer(chans[0])
        client.backend.client.client_pause(2000, all=False)  # type: ignore[attr-defined]  # writes wait 2 s
        try:
            started = time.monotonic()
            with pytest.raises(ProduceError) as err:
                producer.send([b"x", b"y"], 0.3)
            took = time.monotonic() - started
        finally:
            client.backend.client.client_unpause()  # type: ignore[attr-defined]
        assert took < 1.5, f"send(timeout=0.3) took {took:.2f} s"
        assert err.value.retriable and err.value.sent == {chans[0]: []}
        assert len(producer.send([b"z"], 5)) == 1  # the connection it dropped is replaced
        producer.close()


def test_a_closed_backend_refuses_instead_of_connecting_again(redis_url: str) -> None:
    client = ms.connect(redis_url)
    chans = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=1))
    backend = client.backend
    producer = backend.create_producer(chans[0])
    with ms.connect(redis_url) as other:
        client.close()
        for call in (lambda: producer.send([b"x"], 1), lambda: backend.latest_message_id(chans[0])):
            with pytest.raises(StreamClosedError):
                call()
        assert other.backend.latest_message_id(chans[0]) is None  # the send above stored nothing
        other.destroy_channels(chans)


def test_a_batch_takes_a_share_of_every_stream_and_keeps_each_in_order(redis_url: str) -> None:
    with ms.connect(redis_url) as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=3))
        with client.msg_stream() as out:
            out.create_producers(chans)
            sent = {
                c: out.produce(ms.MsgPack.of([row(k) for _ in range(n)]))[c]
                for k, (c, n) in enumerate(zip(chans, (400, 400, 10), strict=True))
            }
        with client.msg_stream(receive_batch=300) as inp:
            inp.create_consumers("s", chans)
            first = consume_n(inp, 300, 10)[:300]
            per_channel = [sum(1 for m in first if m.position and m.position.channel == c) for c in chans]
            # an equal share of 100 from each stream, then the room left (90) from one that has more
            assert sorted(per_channel) == [10, 100, 190], per_channel
            rest = consume_n(inp, 810 - 300, 10)
            got = {
                c: [m.position.msg_id for m in first + rest if m.position and m.position.channel == c] for c in chans
            }
            assert got == sent


@pytest.mark.parametrize("options", [{"socket_timeout": "soon"}, {"maxlen": "-1"}])
def test_bad_options_are_invalid_url_errors(redis_url: str, options: dict[str, str]) -> None:
    with pytest.raises(InvalidURLError):
        ms.connect(redis_url, **options)
    with pytest.raises(InvalidURLError):
        ms.connect(redis_url.replace("/0", "/zero"))


def test_time_tick_stream_is_not_handed_its_own_held_messages(redis_url: str) -> None:
    """The tt stream holds messages unacknowledged while a channel lags; recovery of idle entries
    (XAUTOCLAIM-style) must not give a member back what it holds itself: that would duplicate them."""
    with ms.connect(redis_url, claim_idle=0.2, claim_interval=0.05) as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=2))
        with client.msg_stream() as out, client.tt_msg_stream() as tt:
            out.create_producers(chans)
            tt.create_consumers("tt", chans)
            out.produce(ms.MsgPack.of([row(i) for i in range(1, 21)]))
            first = client.msg_stream()
            first.create_producers(chans[:1])
            first.broadcast(ms.MsgPack(100, 100, [ms.TimeTickMsg(begin_ts=100, end_ts=100)]))
            deadline = time.monotonic() + 1.0  # the second channel lags well past claim_idle
            while time.monotonic() < deadline:
                assert tt.consume(timeout=0.1) is None
            out.broadcast(ms.MsgPack(100, 100, [ms.TimeTickMsg(begin_ts=100, end_ts=100)]))
            pack = tt.consume(timeout=5)
            assert pack is not None
            rows = [m.row_ids[0] for m in pack.msgs if isinstance(m, ms.InsertMsg)]
            assert sorted(rows) == list(range(1, 21)), "held messages were delivered twice or lost"
            first.close()


def test_entries_whose_reply_was_lost_in_a_broken_connection_are_delivered(tmp_path: Path) -> None:
    """If a connection breaks during XREADGROUP, Redis may have assigned entries to this member whose
    reply never arrived. No claim of other members' entries finds them: after the error, the member
    reads its own pending entries again (found by the fault suite: rows lost across broker kills)."""
    broker = start_redis(tmp_path / "lost-reply", durable=True)
    try:
        url = f"redis://127.0.0.1:{broker.port}/0?socket_timeout=1&connect_timeout=1&claim_interval=0.5"
        with ms.connect(url) as client:
            [chan] = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=1))
            with client.msg_stream() as out:
                out.create_producers([chan])
                out.produce(ms.MsgPack.of([row(i) for i in range(10)]))
            inp = client.msg_stream(receive_batch=4)
            inp.create_consumers("lost", [chan])
            first = consume_n(inp, 4, 10)
            consumer = inp._consumer
            backend = client.backend
            # what a lost reply leaves behind: entries 4..9 assigned to this member, never seen by it
            backend.command(  # type: ignore[attr-defined]
                "XREADGROUP",
                "GROUP",
                "lost",
                consumer._name,
                "COUNT",
                6,
                "STREAMS",
                backend.key(chan),
                ">",  # type: ignore[union-attr,attr-defined]
            )
            broker.restart()
            got: list[tuple[str, int]] = []
            consume_rows(inp, 6, got, 20)  # redis-py reconnects by itself: the next claim round recovers
            assert [m.row_ids[0] for m in first if isinstance(m, ms.InsertMsg)] + [r for _, r in got] == list(range(10))
            inp.close()
    finally:
        broker.stop()


@pytest.mark.parametrize("operation", ["create", "delete"])
def test_a_create_or_delete_whose_reply_is_lost_reports_its_own_success(
    redis_url: str, operation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection breaks after Redis ran the command, before its reply arrived (fault injected on
    the real broker: the reply is read, then the connection dropped). The call succeeds: sent again, the
    command would find its own work done and report ChannelExistsError or ChannelNotFoundError."""
    with ms.connect(redis_url) as client:
        backend = client.backend
        name = f"lost-reply-{uuid.uuid4().hex[:8]}"
        backend.create_channel(name + "-warm", b"")  # anything a first call sets up (a script) is done
        backend.delete_channel(name + "-warm")
        if operation == "delete":
            backend.create_channel(name, b"meta")
        real = redis.connection.Connection.read_response
        lost: list[Any] = []

        def read_then_drop(self: Any, *args: Any, **kwargs: Any) -> Any:
            if lost:
                return real(self, *args, **kwargs)
            lost.append(real(self, *args, **kwargs))
            self.disconnect()
            raise redis.ConnectionError("injected: the connection broke before the reply arrived")

        monkeypatch.setattr(redis.connection.Connection, "read_response", read_then_drop)
        if operation == "create":
            backend.create_channel(name, b"meta")
        else:
            backend.delete_channel(name)
        monkeypatch.undo()
        assert lost, "no reply was lost"
        assert (name in backend.list_channels()) == (operation == "create")
        if operation == "create":
            backend.delete_channel(name)


def test_declared_redis_py_has_the_calls_the_backend_makes() -> None:
    """The backend takes a connection with ``ConnectionPool.get_connection()`` and no command name,
    which redis-py accepts from 5.3 on (before, the name was required: a TypeError on the first
    produce). The distribution must not claim to work with an older redis-py."""
    requires = importlib.metadata.requires("msgstream-redis") or []
    [spec] = [Requirement(r) for r in requires if Requirement(r).name == "redis"]
    floor = min(Version(s.version) for s in spec.specifier if s.operator in (">=", "==", "~="))
    assert floor >= Version("5.3"), f"msgstream-redis declares {spec}"


def test_entries_of_a_lost_reply_come_even_after_newer_ones_arrived(redis_url: str) -> None:
    """A reply lost while redis-py reconnected and read again by itself: Redis assigned entries to this
    member that it never saw, and the next read brought newer ones. The lost ones sit in the member's
    own pending list *before* the newest it has seen; they must still be delivered, once, and the
    entries the caller holds unacknowledged must not be delivered again."""
    sep = "&" if "?" in redis_url else "?"
    with ms.connect(f"{redis_url}{sep}claim_interval=0.2") as client:
        [chan] = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=1))
        with client.msg_stream() as out:
            out.create_producers([chan])
            out.produce(ms.MsgPack.of([row(i) for i in range(4)]))
            inp = client.msg_stream(auto_ack=False)
            inp.create_consumers("lost-then-newer", [chan])
            held = consume_n(inp, 4, 10)  # delivered, held by the caller, not acknowledged
            out.produce(ms.MsgPack.of([row(i) for i in range(4, 10)]))
            backend: Any = client.backend
            # the lost reply: entries 4..6 assigned to this member, never seen by it
            backend.command(
                "XREADGROUP",
                "GROUP",
                "lost-then-newer",
                inp._consumer._name,
                "COUNT",
                3,  # type: ignore[union-attr]
                "STREAMS",
                backend.key(chan),
                ">",
            )
            got: list[int] = []
            deadline = time.monotonic() + 20
            while sorted(got) != list(range(4, 10)):
                assert time.monotonic() < deadline, f"received {got}"
                pack = inp.consume(timeout=0.5)
                got += [m.row_ids[0] for m in pack.msgs if isinstance(m, ms.InsertMsg)] if pack else []
                assert len(got) == len(set(got)) and not set(got) & {0, 1, 2, 3}, f"delivered twice: {got}"
            inp.ack(held)
            inp.close()


def test_ping_of_a_dead_broker_fails_within_the_timeout(tmp_path: Path) -> None:
    broker = start_redis(tmp_path / "dead")
    ping_of_a_dead_broker_fails_in_time(broker, f"redis://127.0.0.1:{broker.port}/0", 2.0, 1.0)


def test_a_refusal_at_maxmemory_is_retriable_and_clears_with_room(tmp_path: Path) -> None:
    """At ``maxmemory`` (noeviction) Redis refuses writes until consumers acknowledge and streams are
    trimmed: a send or a join refused then is worth trying again, and goes through once there is room."""
    broker = start_redis(tmp_path / "oom")
    try:
        url = f"redis://127.0.0.1:{broker.port}/0"
        admin = redis.Redis(port=broker.port)
        with ms.connect(url) as client:
            [chan] = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=1))
            backend = client.backend
            producer = backend.create_producer(chan)
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)
            with pytest.raises(ProduceError) as refused:
                producer.send([b"x"], 2.0)
            assert refused.value.retriable and refused.value.sent == {chan: []}
            with pytest.raises(MsgStreamError) as join:
                backend.create_consumer("s", [chan], ms.SubscriptionPosition.EARLIEST)
            assert join.value.retriable
            admin.config_set("maxmemory", 0)
            assert len(producer.send([b"x"], 2.0)) == 1
    finally:
        broker.stop()


def test_a_consumer_of_a_deleted_channel_is_told_the_channel_is_gone(redis_url: str) -> None:
    """Whether it waits in XREADGROUP when the stream is deleted (Redis ends the wait with UNBLOCKED) or
    seeks afterwards (XGROUP SETID needs the stream)."""
    with ms.connect(redis_url) as client, ms.connect(redis_url) as other:
        chans = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=2))
        consumer = client.backend.create_consumer("s", chans[:1], ms.SubscriptionPosition.EARLIEST)
        seeker = client.backend.create_consumer("s", chans[1:], ms.SubscriptionPosition.EARLIEST)
        outcome: list[BaseException] = []

        def wait() -> None:
            try:
                consumer.receive(10, 10.0)
            except BaseException as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        deadline = time.monotonic() + 10
        while not any(c.get("cmd") == "xreadgroup" for c in redis.Redis.from_url(redis_url).client_list()):
            assert time.monotonic() < deadline, "the receive never blocked"
            time.sleep(0.01)
        other.destroy_channels(chans)
        waiter.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], ChannelNotFoundError), outcome
        with pytest.raises(ChannelNotFoundError):
            seeker.seek({chans[1]: None})


def test_a_join_refused_on_one_channel_leaves_no_member_on_the_others(redis_url: str) -> None:
    """XGROUP CREATECONSUMER refused on the second channel of a join (an ACL allows it on the first
    channel's stream only): the join raises a typed error, and the member it had made on the first channel
    is removed again, so that it does not count as a live member for ``claim_idle`` seconds."""
    admin = redis.Redis.from_url(redis_url)
    if int(str(admin.info("server")["redis_version"]).split(".")[0]) < 7:  # the backend supports 6.2
        admin.close()
        pytest.skip("the test refuses one channel only through an ACL selector, which needs Redis 7")
    user = f"msgstream-test-{uuid.uuid4().hex[:8]}"
    with ms.connect(redis_url) as client:
        first, second = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=2))
        key = client.backend.key(first)  # type: ignore[attr-defined]
        admin.execute_command(
            "ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-xgroup|createconsumer",
            f"(+xgroup|createconsumer ~{key})",
        )  # fmt: skip
        try:
            at = urllib.parse.urlsplit(redis_url)
            as_user = f"{at.scheme}://{user}:pw@{at.hostname}:{at.port}{at.path}"
            with (
                ms.connect(as_user) as limited,
                limited.msg_stream() as stream,
                pytest.raises(ConsumeError, match="no permissions"),
            ):
                stream.create_consumers("s", [first, second])
        finally:
            admin.execute_command("ACL", "DELUSER", user)
        assert admin.xinfo_consumers(key, "s") == []
    admin.close()
