"""``connect(url)`` and :class:`Client`: channels with owner records, and the streams over them."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import uuid
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from .backend import URL, Backend, load_backend
from .errors import (
    InvalidArgumentError,
    MsgStreamError,
    StreamClosedError,
    SubscriptionInUseError,
    UnmarshalError,
)
from .stream import MsgStream, check_timeout
from .timetick import TimeTickStream

__all__ = [
    "ChannelDescription",
    "ChannelDescriptions",
    "Client",
    "CreateChannelRequest",
    "OwnerDescription",
    "connect",
]

log = logging.getLogger("msgstream")

_OWNER_MAGIC = b"MSO\x01"


class OwnerDescription(msgspec.Struct, frozen=True, array_like=True):
    """Who owns a channel: a role (``"proxy"``), an address and free text."""

    role: str
    address: str = ""
    description_text: str = ""


class CreateChannelRequest(msgspec.Struct, frozen=True):
    owner: OwnerDescription
    num_channels: int = 1


class ChannelDescription(msgspec.Struct, frozen=True):
    owner: OwnerDescription


class ChannelDescriptions(msgspec.Struct, frozen=True):
    descriptions: list[ChannelDescription]


_OWNER_ENCODER = msgspec.msgpack.Encoder()
_OWNER_DECODER = msgspec.msgpack.Decoder(OwnerDescription)


def encode_owner(owner: OwnerDescription) -> bytes:
    """Owner record as stored in a channel's metadata (docs/wire-format.md)."""
    return _OWNER_MAGIC + _OWNER_ENCODER.encode(owner)


def decode_owner(channel: str, data: bytes) -> OwnerDescription:
    if data[:4] != _OWNER_MAGIC:
        raise UnmarshalError(f"channel {channel!r} carries no msgstream owner record", data=data)
    try:
        return _OWNER_DECODER.decode(memoryview(data)[4:])
    except Exception as exc:  # decoding is pure: any failure (incl. bad UTF-8) is bad input
        raise UnmarshalError(f"corrupt owner record on channel {channel!r}: {exc}", data=data) from exc


class Client:
    """Creates, describes and destroys channels, and opens streams, on one backend.

    ``connect(url)`` builds one; ``Client(backend)`` takes a backend you built yourself (tests, odd
    set-ups). A client is thread-safe and a context manager; closing it closes the backend.
    """

    def __init__(self, backend: Backend) -> None:
        if not isinstance(backend, Backend):
            raise InvalidArgumentError(f"Client needs a msgstream.backend.Backend, got {type(backend).__name__}")
        self.backend = backend
        self._closed = False
        self._streams: weakref.WeakSet[MsgStream | TimeTickStream] = weakref.WeakSet()

    @property
    def url(self) -> str:
        """The backend URL with credentials masked."""
        return self.backend.url.redacted()

    def create_channels(self, request: CreateChannelRequest) -> list[str]:
        """Create ``request.num_channels`` channels owned by ``request.owner``; returns their unique
        names (``<role>-<12 hex>-<i>``). Either all are created or, on error, none is left behind."""
        self._check_open()
        if not isinstance(request, CreateChannelRequest) or not isinstance(request.owner, OwnerDescription):
            raise InvalidArgumentError("create_channels takes a CreateChannelRequest(owner=OwnerDescription(...))")
        n = request.num_channels
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10_000:
            raise InvalidArgumentError(f"num_channels must be an int in 1..10000, got {n!r}")
        owner = request.owner
        if not all(isinstance(text, str) for text in (owner.role, owner.address, owner.description_text)):
            raise InvalidArgumentError(f"an OwnerDescription holds three str, got {owner!r}")
        role = re.sub(r"[^a-z0-9_-]+", "-", owner.role.lower()).strip("-")[:32] or "channel"
        stem = f"{role}-{uuid.uuid4().hex[:12]}"
        try:
            record = encode_owner(request.owner)
        except UnicodeEncodeError as exc:  # a lone surrogate: no UTF-8 for it
            raise InvalidArgumentError(f"an OwnerDescription must be valid UTF-8 text: {exc}") from None
        names: list[str] = []
        try:
            for i in range(n):
                name = f"{stem}-{i}"
                self.backend.create_channel(name, record)
                names.append(name)
        except BaseException:
            for name in names:
                try:
                    self.backend.delete_channel(name)
                except Exception:  # cleanup after a failure; the original error is what matters
                    log.warning("could not remove channel %s after a failed create", name, exc_info=True)
            raise
        return names

    def describe_channels(self, channel_ids: Sequence[str]) -> ChannelDescriptions:
        """Owner of each channel, in order; ``ChannelNotFoundError`` names the first unknown one."""
        self._check_open()
        ids = _channel_list(channel_ids)
        return ChannelDescriptions(
            descriptions=[ChannelDescription(owner=decode_owner(c, self.backend.channel_metadata(c))) for c in ids]
        )

    def destroy_channels(self, channel_ids: Sequence[str]) -> None:
        """Delete the channels with their messages, subscriptions and owner records. All ids are
        checked first: if one is unknown, ``ChannelNotFoundError`` and nothing is deleted."""
        self._check_open()
        ids = _channel_list(channel_ids, unique=True)
        for c in ids:
            self.backend.channel_metadata(c)
        for c in ids:
            self.backend.delete_channel(c)

    # -- operations ---------------------------------------------------------------------------
    def ping(self, timeout: float = 5.0) -> None:
        """Return ``None`` once the broker answered; raise ``BrokerUnavailableError`` within ``timeout``
        seconds when it does not (docs/operations.md, "Health")."""
        self._check_open()
        self.backend.ping(check_timeout(timeout, "timeout"))

    def list_channels(self) -> list[str]:
        """The channels created through msgstream on this broker (by any client) and not destroyed,
        sorted."""
        self._check_open()
        return sorted(self.backend.list_channels())

    def list_subscriptions(self, channel: str) -> list[str]:
        """The subscriptions the broker keeps a position for on ``channel``, sorted;
        ``ChannelNotFoundError`` for an unknown channel."""
        self._check_open()
        if not isinstance(channel, str):
            raise InvalidArgumentError(f"channel must be a str, got {type(channel).__name__}")
        self.backend.channel_metadata(channel)
        return sorted(self.backend.list_subscriptions(channel))

    def drop_subscription(self, subscription: str, channels: Sequence[str]) -> None:
        """Remove ``subscription``'s position and unacknowledged deliveries on ``channels``: joining it
        again starts afresh, at the position the new consumer asks for. Every channel is checked first
        (``ChannelNotFoundError``, nothing dropped). A subscription with live members (open consumers)
        is not dropped: ``SubscriptionInUseError``; close them first. Dropping a subscription a channel
        does not have does nothing."""
        self._check_open()
        if not isinstance(subscription, str) or not subscription:
            raise InvalidArgumentError(f"subscription must be a non-empty str, got {subscription!r}")
        ids = _channel_list(channels, unique=True)
        for c in ids:
            self.backend.channel_metadata(c)
        for stream in list(self._streams):  # members of this client, whether or not the broker sees them yet
            plain = stream.inner if isinstance(stream, TimeTickStream) else stream
            if not plain.closed and plain.subscription == subscription and set(plain.consumer_channels) & set(ids):
                raise SubscriptionInUseError(f"subscription {subscription!r} is consumed by {stream!r}: close it first")
        if ids:
            self.backend.drop_subscription(subscription, ids)

    def msg_stream(self, **options: Any) -> MsgStream:
        """A new :class:`~msgstream.MsgStream` on this client's backend (options: see MsgStream)."""
        self._check_open()
        _check_options(options, _STREAM_OPTIONS)
        stream = MsgStream(self.backend, **options)
        self._streams.add(stream)
        return stream

    def tt_msg_stream(self, **options: Any) -> TimeTickStream:
        """A :class:`~msgstream.TimeTickStream` over a new MsgStream; options go to the TimeTickStream
        (``max_buffered``, ``lag_warning_after``) or else to the MsgStream."""
        tt_opts = {k: options.pop(k) for k in _TT_OPTIONS & options.keys()}
        self._check_open()
        _check_options(options, _STREAM_OPTIONS)
        # the time-tick stream is what this client closes (acknowledging what its packs covered first)
        stream = TimeTickStream(MsgStream(self.backend, **options), **tt_opts)
        self._streams.add(stream)
        return stream

    def close(self) -> None:
        """Close the streams opened from this client that are still open, then the backend. A stream whose
        last acknowledgement fails is closed without it (its subscription delivers those messages
        again) and the failure logged. If the backend's own close fails, its error is raised and calling
        close again tries that again."""
        try:
            if not self._closed:
                self._closed = True
                for stream in list(self._streams):
                    try:
                        stream.close()
                    except MsgStreamError as exc:
                        log.warning("closing %r with its client: %s; closed without acknowledging", stream, exc)
                        with contextlib.suppress(MsgStreamError):
                            stream.close(acknowledge=False)
        finally:
            self.backend.close()  # idempotent (the SPI's contract)

    def _check_open(self) -> None:
        if self._closed:
            raise StreamClosedError("client is closed")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"


def _channel_list(channel_ids: Sequence[str], *, unique: bool = False) -> list[str]:
    """The ids as a list, checked: a sequence of str, each once where ``unique`` (an operation that
    changes the broker checks every id before it changes anything)."""
    if isinstance(channel_ids, (str, bytes)) or not isinstance(channel_ids, Sequence):
        raise InvalidArgumentError(f"channel ids must be a list of str, got {type(channel_ids).__name__}")
    ids = list(channel_ids)
    if not all(isinstance(c, str) for c in ids):
        raise InvalidArgumentError("channel ids must be a list of str")
    if unique and len(set(ids)) != len(ids):
        raise InvalidArgumentError(f"a channel is named twice: {ids}")
    return ids


def connect(url: str = "memory://", **options: Any) -> Client:
    """Open a :class:`Client` on the backend registered for the URL's scheme.

    ``options`` override the URL's query options and go to the backend. Raises ``InvalidURLError``
    for a malformed URL and ``BackendNotFoundError`` (listing the installed schemes) for an unknown
    scheme.
    """
    return Client(load_backend(URL(url), options))


_STREAM_OPTIONS = frozenset(inspect.signature(MsgStream).parameters) - {"backend"}
_TT_OPTIONS = frozenset(inspect.signature(TimeTickStream).parameters) - {"stream"}


def _check_options(options: Mapping[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidArgumentError(f"unknown stream options {unknown}")
