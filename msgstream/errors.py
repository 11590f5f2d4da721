"""Every error msgstream raises, under one root.

The tree (a builtin is mixed in where it helps callers who already catch it)::

    MsgStreamError
     ├── InvalidURLError            (ValueError)  malformed URL or option
     ├── InvalidArgumentError       (ValueError)  wrong type or value at the API
     ├── BackendNotFoundError                     no backend for a URL scheme
     ├── BrokerUnavailableError                   broker unreachable / auth refused (retriable)
     ├── ChannelNotFoundError       (LookupError)
     ├── ChannelExistsError
     ├── ProduceError                             a message was not accepted by the broker
     │    └── RepackError           (ValueError)  repack result is invalid; nothing was sent
     ├── ConsumeError                             receiving from the broker failed
     ├── UnmarshalError             (ValueError)  bytes are not a valid frame
     │    └── UnknownMsgTypeError                 valid frame, unregistered MsgType
     ├── SeekError                                a position cannot be resumed from
     ├── SubscriptionInUseError                   a subscription with live members cannot be dropped
     ├── UnsupportedOperationError                the backend cannot do this operation
     ├── OperationTimeoutError      (TimeoutError) msgstream.aio: a call outlived its bound (retriable)
     ├── StreamStateError                         call out of order (e.g. consume without consumers)
     │    └── StreamClosedError                   the stream was closed
     └── TimeTickError                            time-tick invariant broken or buffer limit hit

``retriable`` says whether trying the same call again may succeed (a broker that was down, a timeout);
it is ``False`` for errors that repeat until the input changes. Texts never contain credentials: URLs
are rendered with :meth:`msgstream.backend.URL.redacted`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .values import Position

__all__ = [
    "BackendNotFoundError",
    "BrokerUnavailableError",
    "ChannelExistsError",
    "ChannelNotFoundError",
    "ConsumeError",
    "InvalidArgumentError",
    "InvalidURLError",
    "MsgStreamError",
    "OperationTimeoutError",
    "ProduceError",
    "RepackError",
    "SeekError",
    "StreamClosedError",
    "StreamStateError",
    "SubscriptionInUseError",
    "TimeTickError",
    "UnknownMsgTypeError",
    "UnmarshalError",
    "UnsupportedOperationError",
]


class MsgStreamError(Exception):
    """Root of every msgstream error."""

    retriable: bool = False


class InvalidURLError(MsgStreamError, ValueError):
    """The URL (or an option) cannot be parsed or is not valid for its backend."""


class InvalidArgumentError(MsgStreamError, ValueError):
    """A value passed to the API has the wrong type or is out of range."""


class BackendNotFoundError(MsgStreamError):
    """No backend is installed for the URL's scheme (or it failed to import)."""


class BrokerUnavailableError(MsgStreamError):
    """The broker could not be reached or refused the connection (bad credentials included)."""

    retriable = True


class ChannelNotFoundError(MsgStreamError, LookupError):
    """The channel does not exist (never created, or destroyed)."""

    def __init__(self, channel: str, detail: str = "") -> None:
        self.channel = channel
        super().__init__(f"channel not found: {channel!r}" + (f" ({detail})" if detail else ""))


class ChannelExistsError(MsgStreamError):
    """A channel of that name exists already."""


class ProduceError(MsgStreamError):
    """Some message was not accepted by the broker.

    ``channel`` names the channel whose send failed (``None`` if not channel-specific), ``sent`` maps
    the channels that were fully accepted before the failure to their message ids, so a caller can
    retry exactly what is missing.
    """

    def __init__(
        self,
        message: str,
        *,
        channel: str | None = None,
        sent: dict[str, list[bytes]] | None = None,
        retriable: bool = False,
    ) -> None:
        super().__init__(message)
        self.channel = channel
        self.sent: dict[str, list[bytes]] = sent if sent is not None else {}
        self.retriable = retriable


class RepackError(ProduceError, ValueError):
    """The repack function's input or result is invalid; raised before anything is sent."""


class ConsumeError(MsgStreamError):
    """Receiving from the broker failed."""


class UnmarshalError(MsgStreamError, ValueError):
    """Bytes are not a valid msgstream frame.

    ``position`` is where the bad message sits on the broker when it came from a consumer (``None``
    when decoding bytes handed in directly); ``data`` keeps the raw bytes; ``__cause__`` the decoder's
    own error.
    """

    def __init__(self, message: str, *, data: bytes | None = None, position: Position | None = None) -> None:
        super().__init__(message)
        self.data = data
        self.position = position

    def with_position(self, position: Position) -> UnmarshalError:
        self.position = position
        self.args = (f"{self.args[0]} at {position.channel!r} msg_id={position.msg_id.hex()}",)
        return self


class UnknownMsgTypeError(UnmarshalError):
    """The frame is well formed but its MsgType has no registered decoder."""

    def __init__(self, msg_type: int, **kwargs: Any) -> None:
        super().__init__(f"unknown MsgType {msg_type}", **kwargs)
        self.msg_type = msg_type


class SeekError(MsgStreamError):
    """A seek target is not valid (unknown channel, message id not on the channel, bad position)."""


class SubscriptionInUseError(MsgStreamError):
    """A subscription still has live members (open consumers): close them before dropping it."""

    retriable = True


class OperationTimeoutError(MsgStreamError, TimeoutError):
    """A ``msgstream.aio`` call did not finish within its bound (its own timeout plus ``call_timeout``);
    the blocking call goes on in the stream's worker thread."""

    retriable = True


class UnsupportedOperationError(MsgStreamError):
    """The backend cannot do this operation (a broker gap, or a plugin that does not implement it); the
    text names the backend and the operation."""


class StreamStateError(MsgStreamError):
    """A stream method was called in a state where it cannot work."""


class StreamClosedError(StreamStateError):
    """The stream (or client) was closed."""


class TimeTickError(MsgStreamError):
    """A time-tick invariant was broken (tick or data behind a passed tick) or a buffer limit hit."""
