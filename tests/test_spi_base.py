"""The pieces of the backend SPI base every backend uses: the delivered-but-unacknowledged tracker and the
translation of a client library's exceptions."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from msgstream.backend import URL, Backend, Unacked
from msgstream.errors import ChannelNotFoundError, ConsumeError, MsgStreamError, ProduceError


def test_unacked_prefix_grows_only_when_the_oldest_are_acknowledged() -> None:
    held: Unacked[str] = Unacked()
    held.deliver("a", [b"1", b"2", b"3", b"4"], ["h1", "h2", "h3", "h4"])
    assert held.held("a") == {b"1", b"2", b"3", b"4"} and held.handle("a", b"3") == "h3"
    assert held.settle("a", [b"3", b"2"]) is None  # out of order: message 1 is still held
    assert held.held("a") == {b"1", b"4"} and held.handle("a", b"3") is None
    assert held.settle("a", [b"1"]) == b"3"  # 1, 2, 3 acknowledged: the prefix ends at 3
    assert held.handle("a", b"3") is None and held.handle("a", b"4") == "h4"
    assert held.settle("a", [b"9", b"1"]) is None  # never delivered or acknowledged already: ignored
    assert held.settle("a", [b"4"]) == b"4"
    assert held.settle("b", [b"1"]) is None and held.handle("b", b"1") is None


def test_unacked_in_order_acknowledgements() -> None:
    held: Unacked[None] = Unacked()
    held.deliver("a", [b"1", b"2", b"3"])
    held.deliver("a", [b"4", b"5"])
    assert held.settle("a", [b"1", b"2", b"3"]) == b"3"  # the oldest batch, in order
    assert held.settle("a", [b"4"]) == b"4" and held.held("a") == {b"5"}
    assert held.settle("a", []) is None and held.held("a") == {b"5"}
    held.deliver("a", [b"6", b"7"])
    assert held.settle("a", [b"7"]) is None  # early: it waits for 5 and 6
    assert held.settle("a", [b"5", b"6"]) == b"7"  # in order, but 7 was acknowledged before: it counts
    assert held.held("a") == set() and held.settle("a", [b"7"]) is None


def test_unacked_forget_drops_one_channel() -> None:
    held: Unacked[None] = Unacked()
    held.deliver("a", [b"1", b"2"])
    held.deliver("b", [b"1"])
    held.forget("a")
    assert held.held("a") == set() and held.held("b") == {b"1"}
    assert held.settle("a", [b"1"]) is None
    held.deliver("a", [b"5"])  # delivered again after a seek
    assert held.settle("a", [b"5"]) == b"5"


def test_unacked_add_is_deliver_of_one_message() -> None:
    held: Unacked[str] = Unacked()
    held.add("a", b"1", "h1")
    held.add("a", b"2")  # without a handle
    held.add("a", b"3", "h3")
    assert held.held("a") == {b"1", b"2", b"3"}
    assert held.handle("a", b"1") == "h1" and held.handle("a", b"2") is None and held.handle("a", b"3") == "h3"
    assert held.settle("a", [b"2"]) is None and held.settle("a", [b"1"]) == b"2"
    assert held.handle("a", b"1") is None and held.settle("a", [b"3"]) == b"3"


class _NativeError(Exception):
    pass


class _Gone(_NativeError):
    pass


class _Backend(Backend):
    native_errors: ClassVar[tuple[tuple[type[BaseException], bool], ...]] = (
        (TimeoutError, True),
        (_NativeError, False),
    )

    def classify(self, exc: BaseException) -> tuple[type[MsgStreamError] | None, bool] | None:
        if isinstance(exc, _Gone):
            return ChannelNotFoundError, False
        return super().classify(exc)

    def create_channel(self, name: str, metadata: bytes) -> None: ...
    def channel_metadata(self, name: str) -> bytes:
        return b""

    def delete_channel(self, name: str) -> None: ...
    def create_producer(self, channel: str) -> Any: ...
    def create_consumer(self, subscription: str, channels: Any, initial: Any) -> Any: ...
    def latest_message_id(self, channel: str) -> bytes | None:
        return None


def test_errors_translates_native_exceptions_and_scrubs_credentials() -> None:
    backend = _Backend(URL("x://user:s3cret@host:1/?token=t0kv"), {"api_secret": "zzz"})
    with pytest.raises(ProduceError) as produce, backend.errors("send to 'c'", ProduceError, "c"):
        raise TimeoutError("timed out talking to user:s3cret@host with t0kv and zzz")
    assert produce.value.retriable and produce.value.channel == "c"
    assert "s3cret" not in str(produce.value) and "t0kv" not in str(produce.value) and "zzz" not in str(produce.value)
    assert produce.value.__cause__ is None and produce.value.__suppress_context__
    with pytest.raises(ConsumeError) as consume, backend.errors("receive"):
        raise _NativeError("refused")
    assert not consume.value.retriable and "refused" in str(consume.value)
    with pytest.raises(ChannelNotFoundError) as gone, backend.errors("receive", ConsumeError, "c"):
        raise _Gone("no such topic")
    assert gone.value.args and "c" in str(gone.value)
    with pytest.raises(KeyError), backend.errors("receive"):  # not the client library's: left alone
        raise KeyError("mine")
