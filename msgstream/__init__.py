"""msgstream: one message-stream API (Milvus's msgstream) over Pulsar, Kafka, Redis Streams and memory.

    import msgstream as ms
    client = ms.connect("memory://")

See docs/architecture.md for the layers and README.md for a tour.
"""

from __future__ import annotations

import logging

from . import errors, repack, timestamp
from .backend import URL, Backend, Consumer, Features, Producer, RawMessage, SubscriptionPosition
from .client import (
    ChannelDescription,
    ChannelDescriptions,
    Client,
    CreateChannelRequest,
    OwnerDescription,
    connect,
)
from .codec import UnmarshalDispatcher
from .errors import MsgStreamError
from .frames import FramePack, frame_properties, frame_timestamps, frame_type
from .messages import (
    DeleteMsg,
    InsertMsg,
    MsgType,
    SearchMsg,
    SearchResultMsg,
    SegmentStats,
    SegStatisticsMsg,
    TimeSyncMsg,
    TimeTickMsg,
    TsMsg,
)
from .pack import MsgPack, Position
from .repack import RepackFunc
from .stream import MsgStream
from .timestamp import Ticker
from .timetick import TimeTickStream
from .values import ChannelLag

__version__ = "0.1.0"

# a library's loggers never print: without a handler configured by the application, records go nowhere
# (not to stderr through logging's last resort)
logging.getLogger("msgstream").addHandler(logging.NullHandler())

__all__ = [
    "URL",
    "Backend",
    "ChannelLag",
    "ChannelDescription",
    "ChannelDescriptions",
    "Client",
    "Consumer",
    "CreateChannelRequest",
    "DeleteMsg",
    "Features",
    "FramePack",
    "InsertMsg",
    "MsgPack",
    "MsgStream",
    "MsgStreamError",
    "MsgType",
    "OwnerDescription",
    "Position",
    "Producer",
    "RawMessage",
    "RepackFunc",
    "SearchMsg",
    "SearchResultMsg",
    "SegStatisticsMsg",
    "SegmentStats",
    "SubscriptionPosition",
    "Ticker",
    "TimeSyncMsg",
    "TimeTickMsg",
    "TimeTickStream",
    "TsMsg",
    "UnmarshalDispatcher",
    "__version__",
    "connect",
    "errors",
    "frame_properties",
    "frame_timestamps",
    "frame_type",
    "repack",
    "timestamp",
]
