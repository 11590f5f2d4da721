"""The public names of DESIGN.md's contract, backend discovery, URLs and secrets."""

from __future__ import annotations

import builtins
import dataclasses
import gc
import inspect
import logging
import pickle
import subprocess
import sys
import uuid
from typing import Annotated, Any

import msgspec
import pytest

import msgstream as ms
from msgstream import errors
from msgstream.backend import URL, Features, installed_schemes, load_backend, redact_options, scrub

CONTRACT = {
    "connect",
    "CreateChannelRequest",
    "OwnerDescription",
    "ChannelDescriptions",
    "ChannelDescription",
    "MsgStream",
    "MsgPack",
    "InsertMsg",
    "DeleteMsg",
    "SearchMsg",
    "SearchResultMsg",
    "SegStatisticsMsg",
    "TimeTickMsg",
    "TimeSyncMsg",
    "TsMsg",
    "MsgType",
    "SubscriptionPosition",
    "Position",
    "UnmarshalDispatcher",
    "TimeTickStream",
    "ChannelLag",
    "repack",
    "errors",
}
ERRORS = {
    "MsgStreamError",
    "InvalidURLError",
    "BackendNotFoundError",
    "ChannelNotFoundError",
    "ProduceError",
    "UnmarshalError",
    "UnknownMsgTypeError",
    "StreamClosedError",
    "TimeTickError",
    "BrokerUnavailableError",
    "SubscriptionInUseError",
    "UnsupportedOperationError",
}


def test_public_names_match_the_contract() -> None:
    assert set(ms.__all__) >= CONTRACT
    assert all(hasattr(ms, name) for name in ms.__all__)
    assert {"default", "insert_delete", "all_keys"} <= set(ms.repack.__all__)
    client_methods = {"create_channels", "describe_channels", "destroy_channels", "msg_stream", "tt_msg_stream"}
    assert client_methods <= set(dir(ms.Client))
    stream_methods = {
        "create_producers",
        "create_consumers",
        "set_repack_func",
        "start",
        "produce",
        "broadcast",
        "consume",
        "seek",
        "get_latest_positions",
        "close",
        "__enter__",
        "__exit__",
    }
    assert stream_methods <= set(dir(ms.MsgStream))
    assert stream_methods - {"set_repack_func", "produce", "broadcast"} <= set(dir(ms.TimeTickStream))
    assert list(inspect.signature(ms.MsgStream.create_consumers).parameters) == [
        "self",
        "subscription",
        "channels",
        "dispatcher",
        "position",
    ]
    assert [m.name for m in ms.SubscriptionPosition] == ["EARLIEST", "LATEST"]
    assert ms.MsgType.INSERT == 400 and ms.MsgType.TIME_TICK == 1200


def test_error_tree() -> None:
    assert set(errors.__all__) >= ERRORS
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.MsgStreamError)
    assert issubclass(errors.UnknownMsgTypeError, errors.UnmarshalError)
    assert issubclass(errors.StreamClosedError, errors.StreamStateError)
    # vars(builtins), not __builtins__: in an imported module that is a dict, whose dir() lists dict methods
    assert not set(errors.__all__) & set(vars(builtins)), "an error shadows a builtin"


def test_value_classes() -> None:
    owner = ms.OwnerDescription(role="proxy", address="a:1", description_text="dml")
    assert owner == ms.OwnerDescription("proxy", "a:1", "dml")
    req = ms.CreateChannelRequest(owner=owner, num_channels=4)
    assert req.num_channels == 4
    assert ms.ChannelDescriptions(descriptions=[ms.ChannelDescription(owner=owner)]).descriptions[0].owner == owner
    pack = ms.MsgPack(begin_ts=1, end_ts=2, msgs=[])
    assert pack.start_positions == [] and pack.end_positions == []
    with ms.connect() as client:
        inner = client.msg_stream()
        assert ms.TimeTickStream(inner).inner is inner


def test_raw_message_is_a_record_that_unpacks_like_its_tuple() -> None:
    raw = ms.RawMessage("ch", b"\x00\x01", b"payload")
    channel, msg_id, payload = raw
    assert (channel, msg_id, payload) == ("ch", b"\x00\x01", b"payload")
    assert (raw[0], raw[1], raw[2], raw[-1], len(raw)) == ("ch", b"\x00\x01", b"payload", b"payload", 3)
    assert list(raw) == ["ch", b"\x00\x01", b"payload"]
    assert raw == ms.RawMessage(channel="ch", msg_id=b"\x00\x01", payload=b"payload")
    assert raw != ms.RawMessage("ch", b"\x00\x02", b"payload")
    assert len({raw, ms.RawMessage("ch", b"\x00\x01", b"payload")}) == 1
    assert pickle.loads(pickle.dumps(raw)) == raw
    with pytest.raises(AttributeError):
        raw.channel = "other"  # type: ignore[misc]
    # built per message on every consume: not tracked by the garbage collector (docs/performance.md)
    assert not gc.is_tracked(raw)


def test_stream_and_client_are_context_managers() -> None:
    with ms.connect("memory://ctx") as client:
        with client.msg_stream() as s:
            assert not s.closed
        assert s.closed
        with client.tt_msg_stream() as tt:
            assert isinstance(tt, ms.TimeTickStream)
        assert tt.closed
    with pytest.raises(errors.StreamClosedError):
        client.msg_stream()


def test_closing_a_client_closes_its_open_streams() -> None:
    client = ms.connect("memory://close-streams")
    chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="p"), num_channels=1))
    out, tt = client.msg_stream(), client.tt_msg_stream()
    out.create_producers(chans)
    client.close()
    assert out.closed and tt.closed
    with pytest.raises(errors.StreamClosedError):
        out.produce(ms.MsgPack.of([ms.InsertMsg(hash_values=[0])]))


def test_validate_false_skips_the_produce_check() -> None:
    with ms.connect("memory://no-validate") as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="p"), num_channels=1))
        bad = ms.InsertMsg(hash_values=[0], row_ids=[1.5])  # type: ignore[list-item]
        checked = client.msg_stream()
        checked.create_producers(chans)
        with pytest.raises(errors.InvalidArgumentError):
            checked.produce(ms.MsgPack.of([bad]))
        fast = client.msg_stream(validate=False)
        fast.create_producers(chans)
        fast.produce(ms.MsgPack.of([bad]))  # accepted unchecked; consumers then report it
        inp = client.msg_stream()
        inp.create_consumers("s", chans)
        with pytest.raises(errors.UnmarshalError):
            inp.consume(timeout=1)


class _SelfFramed(ms.TsMsg, kw_only=True):
    """A user type that writes its own frames (and is decoded by a registered function)."""

    msg_type = 2042
    note: str = ""

    def marshal(self) -> bytes:
        return self.prepare() + msgspec.msgpack.encode(self)


@pytest.mark.parametrize(
    ("msgs", "error", "text"),
    [
        ([ms.InsertMsg(hash_values=[0]), ms.InsertMsg(hash_values=[1.5])], errors.InvalidArgumentError, "list of int"),  # type: ignore[list-item]
        ([ms.InsertMsg(hash_values=[0]), ms.InsertMsg(hash_values=None)], errors.InvalidArgumentError, "list of int"),  # type: ignore[arg-type]
        ([ms.InsertMsg(hash_values=["a"])], errors.InvalidArgumentError, "list of int"),  # type: ignore[list-item]
        (
            [ms.InsertMsg(hash_values=[0]), ms.InsertMsg(hash_values=[])],
            errors.RepackError,
            "message 1 .* no hash_values",
        ),
        (
            [ms.InsertMsg(hash_values=[0]), ms.DeleteMsg(hash_values=[2], timestamps=["x"])],  # type: ignore[list-item]
            errors.InvalidArgumentError,
            r"message 1 \(DeleteMsg\) has a field of the wrong type",
        ),
        (
            [ms.InsertMsg(hash_values=[0]), _SelfFramed(hash_values=[0], note=5)],
            errors.InvalidArgumentError,
            "_SelfFramed",
        ),  # type: ignore[arg-type]
        ([ms.InsertMsg(hash_values=[2**70])], errors.InvalidArgumentError, "cannot be encoded"),
    ],
)
def test_produce_refuses_a_bad_pack_whole(msgs: list[ms.TsMsg], error: type[Exception], text: str) -> None:
    """Bad routing keys and mistyped fields raise typed errors before anything is sent, whichever
    message of the pack (and of which type) is the bad one."""
    with ms.connect("memory://bad-packs") as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="p"), num_channels=2))
        out = client.msg_stream()
        out.create_producers(chans)
        with pytest.raises(error, match=text):
            out.produce(ms.MsgPack.of(msgs))
        assert all(p.msg_id == b"" for p in out.get_latest_positions())
        good = _SelfFramed(hash_values=[3], note="fine")  # a type with its own marshal, validated by its body
        assert list(out.produce(ms.MsgPack.of([good]))) == [chans[1]]


class _Constrained(ms.TsMsg, kw_only=True):
    msg_type = 3100
    count: Annotated[int, msgspec.Meta(ge=0)] = 0
    weights: dict[str, float] = {}
    stats: list[ms.SegmentStats] = []


class _SelfChecked(ms.TsMsg, kw_only=True):
    msg_type = 3101
    count: int = 0

    def __post_init__(self) -> None:  # runs on every decode: consumers would refuse count < 0
        if self.count < 0:
            raise ValueError("count must not be negative")


class _Trimmed(ms.TsMsg, kw_only=True, omit_defaults=True):  # must still put every field on the wire
    msg_type = 3102
    note: str = ""


class _Tagged(ms.TsMsg, kw_only=True, tag=True):  # its class name leads the array on the wire
    msg_type = 3103
    count: int = 0


class _Mapped(ms.TsMsg, kw_only=True, array_like=False):  # a map on the wire, fields by name
    msg_type = 3104
    count: int = 0


class _Frozen(ms.TsMsg, kw_only=True, frozen=True):
    msg_type = 3105
    count: int = 0


def _set_negative() -> _SelfChecked:
    msg = _SelfChecked(count=3)
    msg.count = -3  # after construction: only a decode runs __post_init__ again
    return msg


@pytest.mark.parametrize(
    "msg",
    [
        _Constrained(count=1, weights={"a": 1.5, "b": 2}, stats=[ms.SegmentStats(segment_id=1)]),
        _Constrained(count=-1),
        _Constrained(weights={"a": "heavy"}),  # type: ignore[dict-item]
        _Constrained(weights={1: 1.0}),  # type: ignore[dict-item]
        _Constrained(stats=[ms.SegmentStats(num_rows="3")]),  # type: ignore[arg-type]
        _Constrained(stats=[{"segment_id": 1}]),  # type: ignore[list-item]
        _Constrained(count=True),
        _Constrained(count=2.0),  # type: ignore[arg-type]
        _SelfChecked(count=3),
        _set_negative(),
        _Trimmed(),
        _Tagged(count=1),
        _Mapped(count=1),
        _Mapped(count="1"),  # type: ignore[arg-type]
        _Tagged(count="1"),  # type: ignore[arg-type]
        _Trimmed(note=b"x"),  # type: ignore[arg-type]
        ms.InsertMsg(row_data=[bytearray(b"ok")]),  # type: ignore[list-item]
        ms.InsertMsg(row_data=["text"]),  # type: ignore[list-item]
        ms.InsertMsg(row_ids=(1, 2)),  # type: ignore[arg-type]
        ms.InsertMsg(collection_name=b"c"),  # type: ignore[arg-type]
        ms.DeleteMsg(primary_keys=[1, "a", 2.5]),  # type: ignore[list-item]
    ],
)
def test_produce_refuses_exactly_what_consumers_cannot_decode(msg: ms.TsMsg) -> None:
    """Produce checks a body with a cheaper decoder than the type's own (the fields as one tuple
    type); it must refuse exactly the messages a consumer's decode of the frame would refuse,
    constraints, nested types and ``__post_init__`` included."""
    msg.hash_values = [0]
    dispatcher = ms.UnmarshalDispatcher()
    dispatcher.add_msg_template(type(msg).msg_type, type(msg))
    try:
        consumers_read = isinstance(dispatcher.unmarshal(msg.marshal()), type(msg))
    except errors.UnmarshalError:
        consumers_read = False
    with ms.connect("memory://checked") as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="p"), num_channels=1))
        out = client.msg_stream()
        out.create_producers(chans)
        if consumers_read:
            assert out.produce(ms.MsgPack.of([msg]))
        else:
            with pytest.raises(errors.InvalidArgumentError, match="wrong type"):
                out.produce(ms.MsgPack.of([msg]))


def test_frozen_and_self_guarding_types_are_consumed_with_their_positions() -> None:
    """A consumed message's record goes into its slot past the type's ``__setattr__``: a frozen type,
    or one that allows only its fields, is consumed (typed and from frames) with its position."""

    class Guarded(ms.TsMsg, kw_only=True):
        msg_type = 3106
        count: int = 0

        def __setattr__(self, name: str, value: object) -> None:
            if name not in self.__struct_fields__:
                raise AttributeError(f"{name} is not a field")
            super().__setattr__(name, value)

    dispatcher = ms.UnmarshalDispatcher()
    for cls in (_Frozen, Guarded):
        dispatcher.add_msg_template(cls.msg_type, cls)
    with ms.connect("memory://frozen") as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="p"), num_channels=1))
        out, inp = client.msg_stream(), client.msg_stream()
        out.create_producers(chans)
        inp.create_consumers("s", chans, dispatcher)
        ids = out.produce(ms.MsgPack.of([_Frozen(hash_values=[0], count=1), Guarded(hash_values=[0], count=2)]))
        pack = inp.consume(timeout=5)
        assert pack is not None and [type(m) for m in pack.msgs] == [_Frozen, Guarded]
        assert [m.position.msg_id for m in pack.msgs if m.position] == ids[chans[0]]
        inp.seek([ms.Position(chans[0], b"", 0)])
        frames = inp.consume_frames(timeout=5)
        assert frames is not None
        assert [m.position.msg_id for m in frames.unmarshal().msgs if m.position] == ids[chans[0]]


def test_a_field_named_like_the_record_slot_is_refused() -> None:
    class Clash(ms.TsMsg, kw_only=True):
        msg_type = 3107
        _raw: str = ""

    with pytest.raises(TypeError, match="_raw is taken"):
        Clash(hash_values=[0]).marshal()


def test_memory_is_found_through_its_entry_point() -> None:
    assert "memory" in installed_schemes()
    assert type(load_backend("memory://")).__name__ == "MemoryBackend"


def test_unknown_scheme_lists_installed_ones() -> None:
    with pytest.raises(errors.BackendNotFoundError, match=r"'nosuch'.*installed: .*memory"):
        ms.connect("nosuch://u:hunter2@host/")
    try:
        ms.connect("nosuch://u:hunter2@host/")
    except errors.BackendNotFoundError as exc:
        assert "hunter2" not in str(exc)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "no-scheme",
        "://x",
        "HTTP://x",
        "redis://h:99999/",
        "redis://h:port/",
        "kafka://h:1,:2/",
        42,
        "memory://a?x=1&&y",
    ],
)
def test_malformed_urls(url: object) -> None:
    with pytest.raises(errors.InvalidURLError):
        ms.connect(url)  # type: ignore[arg-type]


def test_url_parts_and_masking() -> None:
    u = URL("kafka://user:p%40ss@h1:9092,[::1]:9093/tenant?linger.ms=5&sasl.password=s3&ssl.key.password=k")
    assert u.hosts == [("h1", 9092), ("::1", 9093)] and u.username == "user" and u.password == "p@ss"
    assert u.options == {"linger.ms": "5", "sasl.password": "s3", "ssl.key.password": "k"}
    for text in (str(u), repr(u), u.redacted()):
        assert "p%40ss" not in text and "s3" not in text and "=k" not in text and "linger.ms=5" in text
    assert URL("redis://:secret@h:1/0").redacted() == "redis://:***@h:1/0"
    assert "secret" not in repr(load_backend("memory://x?token=secret"))
    # an error text that quotes the URL as the broker client got it: the encoded forms are masked too
    text = scrub(f"cannot connect to {u.raw()} (p@ss, s3)", u)
    assert "p%40ss" not in text and "p@ss" not in text and "s3" not in text and "linger.ms=5" in text
    encoded = URL("redis://u:a%2Fb@h:1/0?token=t%26k&x=1")
    text = scrub(f"{encoded.raw()} a/b t&k", encoded)
    assert "a%2Fb" not in text and "a/b" not in text and "t%26k" not in text and "t&k" not in text, text


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("redis://:se/cr3t@127.0.0.1:1/0", "se/cr3t"),
        ("redis://:a?b=c@127.0.0.1:1/0", "a?b=c"),
        ("redis://:p@ss@h:1/0", "p@ss"),
        ("pulsar://h:6650/?auth_params=TOKEN123", "TOKEN123"),
        ("kafka://h:9092/?sasl.jaas.config=JAAS123", "JAAS123"),
        ("x://h/?api_key=KEY123", "KEY123"),
        ("redis:/user:S3CR3T@host", "S3CR3T"),  # malformed: no "://"
        ("user:S3CR3T@host:1", "S3CR3T"),
        ("pulsar://h:6650/?admin_url=http://admin:ADM1N@h:8080", "ADM1N"),  # a URL in an option
        ("pulsar://h:6650/?admin_url=http://a:b@h:8080&token=T0KEN", "T0KEN"),  # an option after it
        ("redis://app:S3CR3T@my_redis:6379/0", "S3CR3T"),  # a host name with an underscore
        ("kafka://app:S3CR3T@kafka_1:9092", "S3CR3T"),
        ("memory://u:S3CR3T@ho st", "S3CR3T"),  # a host name no URL allows
        ("kafka://h:9092/?sasl.password=pa@ssw0rd", "ssw0rd"),  # an @ in a secret option: none of it shows
        ("kafka://h:9092/?linger.ms=5&sasl.password=hunter2@Tr0ub4dor", "Tr0ub4dor"),
        ("pulsar://h:6650/?token=@eyJhbGciOiJ9", "eyJhbGciOiJ9"),
        ("memory://x?password=pa@ssw0rd", "ssw0rd"),
        ("redis://default:Hunter2Pw", "Hunter2Pw"),  # no @host: the password reads as a port
        ("kafka://app:Hunter2Pw/0", "Hunter2Pw"),
    ],
)
def test_odd_secrets_are_masked(url: str, secret: str) -> None:
    try:
        texts = [str(URL(url)), repr(URL(url))]
    except errors.InvalidURLError as exc:  # malformed, and the error text must not show it either
        texts = [str(exc)]
    assert all(secret not in text for text in texts)
    try:
        ms.connect(url)
    except errors.MsgStreamError as exc:
        assert secret not in str(exc)


def test_options_in_texts_mask_urls_with_a_password() -> None:
    shown = "redis://h:1/0?path=a%2Fb&name=x%26y&admin_url=http%3A%2F%2Fu%3AADM1N%40h"
    assert str(URL(shown)) == "redis://h:1/0?path=a%2Fb&name=x%26y&admin_url=http://u:***@h"  # the rest as written
    masked = redact_options({"admin_url": "http://admin:ADM1N@h:8080", "token": "T0KEN", "n": 1})
    assert masked == {"admin_url": "http://admin:***@h:8080", "token": "***", "n": 1}


def test_host_names_with_underscores_take_credentials() -> None:
    u = URL("redis://app:S3CR3T@my_redis:6379/0")
    assert u.hosts == [("my_redis", 6379)] and u.password == "S3CR3T"


def test_at_sign_in_an_option_is_not_userinfo() -> None:
    u = URL("redis://h:1/0?email=a@b")
    assert u.hosts == [("h", 1)] and u.password is None and u.options == {"email": "a@b"}
    assert u.redacted() == "redis://***"  # ambiguous text is masked, to the end of the value, rather than risked


def test_secrets_never_reach_logs_or_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for url in ("memory://a/b/c?password=hunter2", "nosuch://:hunter2@h/", "memory://:hunter2@x:0"):
        try:
            ms.connect(url)
        except errors.MsgStreamError as exc:
            assert "hunter2" not in str(exc) and "hunter2" not in repr(exc)
    assert "hunter2" not in caplog.text


def test_client_takes_a_backend_instance() -> None:
    backend = load_backend("memory://direct")
    client = ms.Client(backend)
    assert client.backend is backend and client.url == "memory://direct"
    with pytest.raises(errors.InvalidArgumentError):
        ms.Client("memory://")  # type: ignore[arg-type]


def test_a_reported_bad_frame_is_acknowledged_even_when_the_error_leaves_the_with_block() -> None:
    """A corrupt frame is reported once: the ``UnmarshalError`` that ends a ``with`` block does not leave
    it unacknowledged for the next member (the pack in hand would be; a reported frame is not)."""
    with ms.connect(f"memory://bad-{uuid.uuid4().hex[:8]}") as client:
        [ch] = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="r"), num_channels=1))
        client.backend.create_producer(ch).send([b"not a frame"], 5)
        with pytest.raises(errors.UnmarshalError), client.msg_stream(auto_ack=False) as inp:
            inp.create_consumers("s", [ch])
            inp.consume(timeout=5)
        with client.msg_stream(auto_ack=False) as again:
            again.create_consumers("s", [ch])
            assert again.consume(timeout=0.3) is None


def test_the_library_never_prints_its_log_records() -> None:
    """In a program that configures no logging, msgstream's warnings go nowhere (a NullHandler), not to
    stderr through logging's last resort."""
    code = "import logging, msgstream; logging.getLogger('msgstream.kafka').warning('a warning')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr


def test_operations_of_the_client_and_streams() -> None:
    client = ms.Client
    assert list(inspect.signature(client.ping).parameters) == ["self", "timeout"]
    assert inspect.signature(client.ping).parameters["timeout"].default == 5.0
    assert list(inspect.signature(client.list_subscriptions).parameters) == ["self", "channel"]
    assert list(inspect.signature(client.drop_subscription).parameters) == ["self", "subscription", "channels"]
    assert callable(client.list_channels) and callable(ms.MsgStream.lag) and callable(ms.TimeTickStream.lag)
    lag = ms.ChannelLag("ch", 3, 1.5)
    assert (lag.channel, lag.messages, lag.seconds) == ("ch", 3, 1.5)
    assert ms.ChannelLag(channel="ch", messages=None, seconds=None) == ms.ChannelLag("ch", None, None)
    with pytest.raises(AttributeError):
        lag.messages = 4  # type: ignore[misc]


class _OldPlugin(ms.Backend):
    """A plugin that implements only the abstract methods, none of the operations."""

    def create_channel(self, name: str, metadata: bytes) -> None:
        raise NotImplementedError

    def channel_metadata(self, name: str) -> bytes:
        return b""

    def delete_channel(self, name: str) -> None:
        raise NotImplementedError

    def create_producer(self, channel: str) -> ms.Producer:
        raise NotImplementedError

    def create_consumer(self, subscription: str, channels: Any, initial: ms.SubscriptionPosition) -> ms.Consumer:
        inner = ms.connect("memory://old-plugin").backend
        inner.create_channel(channels[0], b"")
        return inner.create_consumer(subscription, channels, initial)

    def latest_message_id(self, channel: str) -> bytes | None:
        return None


def test_plugin_without_the_operations_raises_a_typed_error() -> None:
    client = ms.Client(_OldPlugin(URL("old://"), {}))
    for call in (
        client.ping,
        client.list_channels,
        lambda: client.list_subscriptions("ch"),
        lambda: client.drop_subscription("s", ["ch"]),
    ):
        with pytest.raises(errors.UnsupportedOperationError, match="_OldPlugin backend does not implement"):
            call()
    stream = client.msg_stream()
    stream.create_consumers("s", [f"ch-{uuid.uuid4().hex[:8]}"])
    assert [(lag.messages, lag.seconds) for lag in stream.lag()] == [(None, 0.0)]  # cannot count; nothing newer


def test_client_refuses_bad_arguments_with_a_typed_error_and_changes_nothing() -> None:
    with ms.connect(f"memory://args-{uuid.uuid4().hex[:8]}") as client:
        for owner in (ms.OwnerDescription(role=None), ms.OwnerDescription(role="r", address=5)):  # type: ignore[arg-type]
            with pytest.raises(errors.InvalidArgumentError):
                client.create_channels(ms.CreateChannelRequest(owner=owner))
        assert client.list_channels() == []
        chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="r")))
        for bad in (None, 5, "abc", b"abc", [chans[0], 7]):
            with pytest.raises(errors.InvalidArgumentError):
                client.describe_channels(bad)  # type: ignore[arg-type]
            with pytest.raises(errors.InvalidArgumentError):
                client.destroy_channels(bad)  # type: ignore[arg-type]
            with pytest.raises(errors.InvalidArgumentError):
                client.drop_subscription("s", bad)  # type: ignore[arg-type]
        with pytest.raises(errors.InvalidArgumentError):  # checked before anything is deleted
            client.destroy_channels([chans[0], chans[0]])
        assert client.list_channels() == chans
        assert len(client.describe_channels([chans[0], chans[0]]).descriptions) == 2  # describing twice is fine


def test_bad_channel_lists_options_and_lag_references_are_typed_errors() -> None:
    with ms.connect(f"memory://bad-{uuid.uuid4().hex[:8]}") as client:
        [chan] = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="r"), num_channels=1))
        for bad in (1, 1.5, None, True):
            with pytest.raises(errors.InvalidArgumentError):
                client.msg_stream().create_producers(bad)  # type: ignore[arg-type]
            with pytest.raises(errors.InvalidArgumentError):
                client.msg_stream().create_consumers("s", bad)  # type: ignore[arg-type]
        with pytest.raises(errors.InvalidArgumentError, match="bogus"):
            client.msg_stream(bogus=1)
        with pytest.raises(errors.InvalidArgumentError, match="bogus"):
            client.tt_msg_stream(bogus=1)
        tt = client.tt_msg_stream(max_buffered=10, receive_batch=5)
        assert isinstance(tt, ms.TimeTickStream)
        stream = client.msg_stream()
        stream.create_consumers("s", [chan])
        for after in ("x", [ms.Position(chan, b"", 0)], {chan: "00"}):
            with pytest.raises(errors.InvalidArgumentError):
                stream.lag(after=after)  # type: ignore[arg-type]
        assert stream.lag(after={chan: b""})[0].channel == chan


def test_features_keep_their_positions() -> None:
    """Plugins may build Features positionally: flags added later come after the first ones."""
    names = [f.name for f in dataclasses.fields(Features)]
    first = ["shared_subscription", "durable", "cross_process", "member_kill_recovery", "idempotent_produce"]
    assert names[: len(first) + 1] == [*first, "nonblocking_send"]
    assert Features(True, False).durable is False


def test_more_bad_input_gets_typed_errors() -> None:
    with pytest.raises(errors.RepackError):
        ms.repack.hash_primary_key(2**64)
    with pytest.raises(errors.RepackError):
        ms.repack.hash_primary_key("\udc80")
    with ms.connect(f"memory://typed-{uuid.uuid4().hex[:6]}") as client:
        with pytest.raises(errors.InvalidArgumentError):
            client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="\udc80"), num_channels=1))
        assert client.list_channels() == []
        with pytest.raises(errors.InvalidArgumentError):
            client.msg_stream(on_error="log")
        chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="r"), num_channels=1))
        out = client.msg_stream()
        out.create_producers(chans)
        out.set_repack_func(lambda pack, keys: {0: ms.MsgPack(0, 0, None)})  # type: ignore[arg-type]
        with pytest.raises(errors.RepackError):
            out.produce(ms.MsgPack.of([ms.InsertMsg(hash_values=[0], row_ids=[1])]))
