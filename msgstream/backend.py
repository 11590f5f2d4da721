"""The backend SPI: what a broker plugin implements, and how plugins are found.

A backend moves bytes. It knows channels, subscriptions and broker message ids, nothing of messages,
packs, repack, positions or time ticks: those are written once in the core, over these three classes.

A plugin is a class registered under its URL scheme in the entry-point group ``msgstream.backends``::

    [project.entry-points."msgstream.backends"]
    mybroker = "msgstream_mybroker:MyBrokerBackend"

``connect("mybroker://host:1234/?opt=1")`` then loads it through stevedore and calls
``MyBrokerBackend(url, options)``. docs/plugins.md walks through writing and testing one.

Rules every implementation keeps (the conformance suite, :mod:`msgstream.testing`, checks them):

* Every blocking call takes or has a timeout and raises a ``msgstream.errors`` class, never a native
  client exception: translate at the boundary with ``with self.errors("what"):`` (:meth:`Backend.errors`),
  which scrubs the text and does not chain the native exception, whose text may hold credentials.
* Channel names are ``[A-Za-z0-9_.-]``, at most 200 characters (what every supported broker accepts).
* A message id is opaque bytes, canonical: the id a consumer receives for a message equals the id
  ``send`` returned for it and the one ``latest_message_id`` reports while it is the newest.
* Texts of errors, logs and reprs never contain credentials: render URLs with :meth:`URL.redacted`.
* Backend methods may be called from several threads; one Producer or Consumer is used by one thread
  at a time.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from typing import Any, ClassVar, Generic, NoReturn, TypeVar
from urllib.parse import parse_qsl, unquote, unquote_plus

from .errors import (
    BackendNotFoundError,
    ChannelNotFoundError,
    ConsumeError,
    InvalidURLError,
    MsgStreamError,
    ProduceError,
    StreamClosedError,
    UnsupportedOperationError,
)
from .values import RawMessage, SubscriptionPosition

__all__ = [
    "ENTRY_POINT_GROUP",
    "Backend",
    "CLOSED",
    "Consumer",
    "Features",
    "Producer",
    "RawMessage",
    "SubscriptionPosition",
    "URL",
    "Unacked",
    "installed_schemes",
    "load_backend",
]

ENTRY_POINT_GROUP = "msgstream.backends"
CHANNEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")
_SECRET_MARKERS = ("password", "passwd", "secret", "token", "credential", "auth", "jaas", "key")
#: what a host list may hold: RFC 3986 reg-names (unreserved, percent-encoded, sub-delims), IPv6
#: literals, ports and the commas between hosts
_HOSTLIST = re.compile(r"[A-Za-z0-9._~%!$&'()*+;=\-\[\]:,]*")
_MASK = "***"


class _ClosedHandle:
    """Put in place of a native client object on ``close()``: the native object, with its sockets, is
    freed at once rather than when the backend object is, and any later use raises StreamClosedError
    instead of an AttributeError."""

    def __getattr__(self, name: str) -> Any:
        raise StreamClosedError("closed: used after close()")

    def __repr__(self) -> str:
        return "<closed>"


#: see :class:`_ClosedHandle`: ``self._producer = CLOSED`` in a backend's ``close()``
CLOSED: Any = _ClosedHandle()


@dataclasses.dataclass(frozen=True)
class Features:
    """What a backend can honestly do. Only real broker gaps become ``False``; each one must be named
    in the backend's docs. The core and the conformance suite read the same flags."""

    #: Two consumers on one subscription split the messages (each message to one of them).
    shared_subscription: bool = True
    #: Messages, subscriptions and channels survive a broker restart (the fault suite's restart test
    #: requires it of the brokers it restarts).
    durable: bool = False
    #: Clients in other processes see the same channels and messages (false for in-process brokers; the
    #: conformance suite checks it with a second process).
    cross_process: bool = True
    #: A subscription whose member was killed (no close) takes a new member, and the messages the dead
    #: one held unacknowledged go to it (used by the fault suite).
    member_kill_recovery: bool = True
    #: A message is stored once even when the client library sent it again across a broker crash or
    #: reconnect (the broker drops producer resends; used by the fault suite). Without it, a row can be
    #: consumed twice, as two messages with different ids; the consumer never repeats one message.
    idempotent_produce: bool = True
    #: ``Producer.send`` never waits on I/O or on another process: the broker lives in this process and
    #: a send only stores the frames. ``msgstream.aio`` then produces on the event loop itself, as a
    #: worker thread would buy no concurrency (the work holds the GIL) and would cost a hop per pack.
    nonblocking_send: bool = False
    #: An acknowledgement covers exactly the messages given: one acknowledged ahead of an older one still
    #: unacknowledged is not handed to the next member. False for a broker that records a subscription's
    #: progress as one offset per channel (Kafka): the next member gets it again (at-least-once).
    exact_acks: bool = True
    #: While every member of a subscription lives, each gets a share of the messages. False where the
    #: broker keeps one member active on every channel and the others as standbys that take over only
    #: when it leaves (Pulsar's Failover subscriptions on msgstream's one-partition topics).
    balanced_members: bool = True
    #: A consumer is a member of its subscription from its creation, so ``drop_subscription`` from
    #: another client refuses it before it has received anything. False where a member joins on its
    #: first receive (Kafka's consumer groups): until then only its own client refuses the drop.
    members_before_receive: bool = True


class URL:
    """A parsed backend URL: ``scheme://[user[:password]@]host[:port][,host[:port]...][/path][?k=v&...]``.

    ``str()`` and ``repr()`` mask the password and every option whose name mentions a secret
    (password, passwd, secret, token, credential, auth, jaas, key); :meth:`raw` is the only way to get the
    original back.
    """

    __slots__ = ("_raw", "_raw_secrets", "hosts", "options", "password", "path", "scheme", "username")

    def __init__(self, raw: str) -> None:
        if not isinstance(raw, str):
            raise InvalidURLError(f"a URL must be a str, got {type(raw).__name__}")
        self._raw = raw
        scheme, sep, rest = raw.partition("://")
        if not sep or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
            raise InvalidURLError(f"malformed URL {self._redact(raw)!r}: expected scheme://...")
        self.scheme = scheme
        userinfo, rest = _split_userinfo(rest)
        rest, _, query = rest.partition("?")
        hostlist, slash, path = rest.partition("/")
        self.path = slash + path if slash else ""
        self.username: str | None = None
        self.password: str | None = None
        self._raw_secrets: list[str] = []  # as written (percent-encoded): what scrub masks beside the values
        if userinfo is not None:
            user, colon, password = userinfo.partition(":")
            self.username = unquote(user) or None
            self.password = unquote(password) if colon else None
            if colon and password:
                self._raw_secrets.append(password)
        self.hosts: list[tuple[str, int | None]] = [
            _split_host(part, self) for part in filter(None, hostlist.split(","))
        ]
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
        except ValueError:
            raise InvalidURLError(f"malformed query in URL {self.redacted()!r}") from None
        self.options: dict[str, str] = dict(pairs)
        for pair in query.split("&"):
            key, _, value = pair.partition("=")
            if value and is_secret_option(unquote_plus(key)):
                self._raw_secrets.append(value)

    @property
    def host(self) -> str | None:
        return self.hosts[0][0] if self.hosts else None

    @property
    def port(self) -> int | None:
        return self.hosts[0][1] if self.hosts else None

    def raw(self) -> str:
        """The URL exactly as given, credentials included: pass it only to the broker client."""
        return self._raw

    def redacted(self) -> str:
        """The URL with the password and secret options replaced by ``***``."""
        return self._redact(self._raw)

    @staticmethod
    def _redact(raw: str) -> str:
        scheme, sep, rest = raw.partition("://")
        if not sep:  # malformed: the whole text is masked as if it followed a scheme
            scheme, rest = "", raw
        userinfo, rest = _split_userinfo(rest)
        more = ""  # options after an @ that may sit in an option's value
        if userinfo is not None:
            user, colon, _ = userinfo.partition(":")
            rest = (user + ":" + _MASK if colon else userinfo) + "@" + rest
        elif "@" in rest:  # ambiguous: an unescaped password, or an @ in an option; mask, never leak
            at = rest.rfind("@")
            tail = rest[at:]
            if "?" in rest[:at]:  # in an option's value: masked to its end; the options after it by name
                more = tail.partition("&")[2]
                tail = ""
            rest = _MASK + tail
        head, q, query = rest.partition("?")
        out = scheme + sep + head
        if q:
            out += "?" + _masked_query(query)
        return out + ("&" + _masked_query(more) if more else "")

    def __str__(self) -> str:
        return self.redacted()

    def __repr__(self) -> str:
        return f"URL({self.redacted()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, URL) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)


def _split_userinfo(rest: str) -> tuple[str | None, str]:
    """Split ``user:password@hosts/...`` at the ``@`` that ends the userinfo: the last one followed by
    something shaped like a host list, so a password holding an unescaped ``/``, ``?`` or ``@`` is
    still recognised as a password (and masked) rather than read as a path or a query."""
    at = len(rest)
    while (at := rest.rfind("@", 0, at)) >= 0:
        after = rest[at + 1 :]
        hosts = re.split(r"[/?#]", after, maxsplit=1)[0]
        looks_like_query = re.search(r"\?.*=", rest[:at]) is not None  # an @ inside an option value
        if _HOSTLIST.fullmatch(hosts) and not looks_like_query:
            return rest[:at], after
    return None, rest


def scrub(text: str, url: URL, options: Mapping[str, Any] | None = None) -> str:
    """``text`` with the URL's password and every secret option value, decoded or as written in the URL
    (percent-encoded), replaced by ``***``."""
    secrets = [s for s in (url.password, *url._raw_secrets) if s]
    for source in (url.options, options or {}):
        secrets += [str(v) for k, v in source.items() if is_secret_option(k) and v]
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, _MASK)
    return text


def _split_host(part: str, url: URL) -> tuple[str, int | None]:
    if part.startswith("["):  # [ipv6]:port
        host, _, tail = part[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = part.partition(":")
    if not host:
        raise InvalidURLError(f"empty host in URL {url.redacted()!r}")
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        # neither the port's text nor the URL with it: ``user:password`` without ``@host`` reads as host:port
        shown = url.redacted() if port_text.isdigit() else url.redacted().replace(port_text, _MASK)
        raise InvalidURLError(f"bad port in URL {shown!r}")
    return host, int(port_text)


def is_secret_option(name: str) -> bool:
    """Whether an option's value must be masked in texts."""
    return any(m in name.lower() for m in _SECRET_MARKERS)


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``options`` fit for a log line or an error text."""
    return {k: _masked(k, v) for k, v in options.items()}


def _masked_query(query: str) -> str:
    """A URL's query with the values :func:`_masked` masks replaced; the others as written."""
    parts = []
    for item in query.split("&"):
        key, eq, value = item.partition("=")
        if eq and (shown := _masked(unquote(key), unquote(value))) != unquote(value):
            value = shown
        parts.append(key + eq + value)
    return "&".join(parts)


def _masked(name: str, value: Any) -> Any:
    """An option's value fit for a text: masked for a secret option, a URL's password masked (an
    ``admin_url=http://user:password@host``)."""
    if is_secret_option(name):
        return _MASK
    if isinstance(value, str) and "@" in value:
        return URL._redact(value)
    return value


class Producer(abc.ABC):
    """Sends to one channel."""

    def __init__(self, channel: str) -> None:
        self.channel = channel

    @abc.abstractmethod
    def send(self, payloads: Sequence[bytes], timeout: float) -> list[bytes]:
        """Send ``payloads`` in order and block until the broker has accepted every one of them, at
        most ``timeout`` seconds. Returns their message ids, in order.

        Raises ``ProduceError`` (``retriable`` when the broker was unreachable or slow) if any payload
        was not accepted; it may then have accepted a prefix, never silently lost one in the middle.
        A channel deleted meanwhile raises ``ProduceError`` too.
        """

    def close(self) -> None:  # noqa: B027  (optional hook: nothing to release by default)
        """Release the producer; sending afterwards is an error. Idempotent."""


class Consumer(abc.ABC):
    """Receives from a set of channels as one member of a subscription.

    Within a subscription each message is delivered to one member; another subscription on the same
    channels receives every message too. Per channel, a member receives messages in channel order.
    """

    def __init__(self, subscription: str, channels: Sequence[str]) -> None:
        self.subscription = subscription
        self.channels = list(channels)

    @abc.abstractmethod
    def receive(self, max_messages: int, timeout: float) -> list[RawMessage]:
        """Block until at least one message is available or ``timeout`` seconds passed; return up to
        ``max_messages`` (``[]`` on timeout), a share of each channel that has some rather than one
        channel's only, where the broker allows it. Raises ``ConsumeError`` (``ChannelNotFoundError`` for a
        deleted channel) rather than hanging on a broken connection."""

    @abc.abstractmethod
    def ack(self, messages: Sequence[RawMessage]) -> None:
        """Acknowledge messages this consumer received: the subscription will not deliver them again.
        Messages received and not acknowledged when the consumer closes or dies go to another member
        (at-least-once)."""

    @abc.abstractmethod
    def seek(self, targets: Mapping[str, bytes | None], inclusive: Collection[str] = frozenset()) -> None:
        """Make the subscription resume each channel of ``targets`` right after its message id (at it,
        delivering that message again, for the channels in ``inclusive``); ``None`` resumes from the
        channel's first message. The core passes ``inclusive`` only when it is not empty. Unacknowledged
        deliveries on those channels are forgotten. Check every target before moving any: an id that is
        not on its channel raises ``SeekError`` and changes nothing — never a silent move to the start or
        the end."""

    def flush(self) -> None:  # noqa: B027  (optional hook: nothing to do for a synchronous ack)
        """Make the acknowledgements made so far durable on the broker within the backend's operation
        timeout, or raise a retriable ``ConsumeError`` and keep them for the next call. ``MsgStream``
        calls it before an acknowledging close; a backend whose ``ack`` is synchronous has nothing to do."""

    def close(self) -> None:  # noqa: B027  (optional hook: nothing to release by default)
        """Leave the subscription (it keeps its place for the next member); what is not acknowledged, or
        acknowledged and not yet flushed, is delivered again. Idempotent."""


H = TypeVar("H")


class Unacked(Generic[H]):
    """What a consumer delivered and has not seen acknowledged: per channel, message ids in delivery
    order, each with an optional handle (what the broker needs to acknowledge it: a native message id).
    Backends keep this bookkeeping here rather than each their own.

    Acknowledgements come in any order. :meth:`settle` forgets the ids it is given and returns the
    newest id of the delivered prefix that is now wholly acknowledged (what an offset-committing broker
    commits); an id not held (never delivered, acknowledged already, forgotten by a seek) is ignored.
    The usual acknowledgement, the oldest ids in delivery order, costs one list comparison.
    """

    def __init__(self) -> None:
        self._order: dict[str, list[bytes]] = {}  # delivered and not settled, oldest first
        self._early: dict[str, set[bytes]] = {}  # acknowledged, waiting for an older one
        self._handles: dict[str, dict[bytes, H]] = {}  # of the messages delivered with one

    def deliver(self, channel: str, msg_ids: Sequence[bytes], handles: Iterable[H] | None = None) -> None:
        """Note ``msg_ids`` (with their ``handles``, in the same order) as delivered on ``channel``. An id
        is delivered once until it is settled or its channel forgotten: a backend whose broker may hand
        over a message it holds skips it (see :meth:`held`, :meth:`handle`) or forgets the channel first
        (a seek, a rebalance)."""
        self._order.setdefault(channel, []).extend(msg_ids)
        if handles is not None:
            self._handles.setdefault(channel, {}).update(zip(msg_ids, handles, strict=True))

    def add(self, channel: str, msg_id: bytes, handle: H | None = None) -> None:
        """:meth:`deliver` for one message."""
        self._order.setdefault(channel, []).append(msg_id)
        if handle is not None:
            self._handles.setdefault(channel, {})[msg_id] = handle

    def held(self, channel: str) -> set[bytes]:
        """The ids delivered on ``channel`` and not acknowledged."""
        return set(self._order.get(channel, ())) - self._early.get(channel, set())

    def handle(self, channel: str, msg_id: bytes) -> H | None:
        """The handle of a held message (``None`` if it has none or is not held: for messages delivered
        with handles, whether it is held)."""
        return self._handles.get(channel, {}).get(msg_id)

    def settle(self, channel: str, msg_ids: Iterable[bytes]) -> bytes | None:
        """Forget ``msg_ids`` as acknowledged; the newest id of the acknowledged delivered prefix if
        this made it longer, else ``None``."""
        order = self._order.get(channel)
        if not order:
            return None
        ids = list(msg_ids)
        handles = self._handles.get(channel)
        if handles:
            for msg_id in ids:
                handles.pop(msg_id, None)
        early = self._early.setdefault(channel, set())
        n = len(ids)
        if not (n and not early and order[:n] == ids):  # else: the oldest, in order
            delivered = set(order)
            early.update([i for i in ids if i in delivered])
            n = 0
            for msg_id in order:
                if msg_id not in early:
                    break
                n += 1
            if not n:
                return None
            ids = order[:n]
            early.difference_update(ids)
        del order[:n]
        return ids[-1]

    def forget(self, channel: str) -> None:
        """Drop what is held on ``channel`` (a seek moved it, a rebalance took it away)."""
        self._order.pop(channel, None)
        self._early.pop(channel, None)
        self._handles.pop(channel, None)


def ids_by_channel(records: Sequence[RawMessage], only: str | None = None) -> dict[str, list[bytes]]:
    """The message ids of ``records`` per channel, in order. ``only``: the one channel they all come from
    (a consumer of one channel), so no per-message look at all; a batch of one channel (the usual case)
    costs one comparison a message."""
    if not records:
        return {}
    first = only or records[0].channel
    if only is not None or all([raw.channel == first for raw in records]):
        return {first: [raw.msg_id for raw in records]}
    groups: dict[str, list[bytes]] = {}
    for raw in records:
        groups.setdefault(raw.channel, []).append(raw.msg_id)
    return groups


class Backend(abc.ABC):
    """One connection to a broker. Subclasses set ``features`` and implement the abstract methods.

    Channel metadata is a small opaque blob stored with the channel on the broker; the core keeps
    owner records in it, so any client on the same broker can describe a channel.
    """

    features: ClassVar[Features] = Features()
    #: The exceptions of the backend's client library, each with whether a call that raised it may
    #: succeed when tried again; the first match wins. :meth:`errors` translates these and lets
    #: everything else through. A backend whose client encodes more in one exception class (an error
    #: code) overrides :meth:`classify` instead.
    native_errors: ClassVar[tuple[tuple[type[BaseException], bool], ...]] = ()

    def __init__(self, url: URL, options: Mapping[str, Any]) -> None:
        self.url = url
        self.options = dict(options)

    def classify(self, exc: BaseException) -> tuple[type[MsgStreamError] | None, bool] | None:
        """For a native exception, ``(class, retriable)``: the msgstream class it always becomes
        (``None``: the one the caller names) and whether trying again may work; ``None`` for an
        exception that is not the client library's. By default, :attr:`native_errors`."""
        for kind, retriable in self.native_errors:
            if isinstance(exc, kind):
                return None, retriable
        return None

    @contextlib.contextmanager
    def errors(self, what: str, cls: type[MsgStreamError] = ConsumeError, channel: str | None = None) -> Iterator[None]:
        """Translate, at the boundary, a native exception raised in the block into ``cls`` (or the class
        :meth:`classify` names for it), ``from None``: the native exception's text, scrubbed of
        credentials, goes into the message, its traceback does not (it may hold them)."""
        try:
            yield
        except MsgStreamError:
            raise
        except Exception as exc:
            verdict = self.classify(exc)
            if verdict is None:
                raise
            kind, retriable = verdict
            raise self.error(kind or cls, f"{what}: {type(exc).__name__}: {exc}", retriable, channel) from None

    def error(
        self, cls: type[MsgStreamError], text: str, retriable: bool, channel: str | None = None
    ) -> MsgStreamError:
        """A ``cls`` error whose text has no credential and names the broker (its redacted URL)."""
        if issubclass(cls, ChannelNotFoundError):
            return cls(channel or "?", scrub(text, self.url, self.options))
        text = f"{scrub(text, self.url, self.options)} [{self.url.redacted()}]"
        err = cls(text, channel=channel) if issubclass(cls, ProduceError) else cls(text)
        err.retriable = retriable
        return err

    @abc.abstractmethod
    def create_channel(self, name: str, metadata: bytes) -> None:
        """Create channel ``name`` with its metadata; ``ChannelExistsError`` if it exists."""

    @abc.abstractmethod
    def channel_metadata(self, name: str) -> bytes:
        """The metadata the channel was created with; ``ChannelNotFoundError`` if it does not exist."""

    @abc.abstractmethod
    def delete_channel(self, name: str) -> None:
        """Delete the channel, its messages, subscriptions and metadata; ``ChannelNotFoundError`` if
        it does not exist. Producers and consumers still open on it fail on their next call."""

    @abc.abstractmethod
    def create_producer(self, channel: str) -> Producer:
        """A producer for an existing channel (``ChannelNotFoundError`` otherwise)."""

    @abc.abstractmethod
    def create_consumer(self, subscription: str, channels: Sequence[str], initial: SubscriptionPosition) -> Consumer:
        """Join ``subscription`` on existing ``channels``. A subscription new on a channel starts at
        ``initial`` (``LATEST``: after the channel's current last message); an existing one resumes
        after its last acknowledged message."""

    @abc.abstractmethod
    def latest_message_id(self, channel: str) -> bytes | None:
        """The id of the channel's newest message, ``None`` if it has none."""

    # -- operations: health, subscriptions, lag. Not abstract, so that a plugin that implements only the
    # abstract methods loads; each default raises UnsupportedOperationError naming the backend. -----
    def ping(self, timeout: float) -> None:
        """Return once the broker answered a request, within ``timeout`` seconds; otherwise raise
        ``BrokerUnavailableError`` (``retriable``) no later than ``timeout`` seconds after the call."""
        self._unsupported("ping")

    def list_channels(self) -> list[str]:
        """The names of the channels created through msgstream on this broker and not deleted, in any
        order. ``BrokerUnavailableError`` if the broker cannot be asked."""
        self._unsupported("list_channels")

    def list_subscriptions(self, channel: str) -> list[str]:
        """The subscriptions the broker keeps state for on ``channel`` (msgstream's internal ones left
        out), in any order; ``ChannelNotFoundError`` for an unknown channel."""
        self._unsupported("list_subscriptions")

    def drop_subscription(self, subscription: str, channels: Sequence[str]) -> None:
        """Remove ``subscription``'s state (position, unacknowledged deliveries) on each of ``channels``,
        which the core has checked exist: joining it again starts at the initial position. Dropping a
        subscription the broker does not know on a channel does nothing. ``SubscriptionInUseError`` when
        it has live members (open consumers) on one of them; then nothing is dropped where the broker
        checks all channels first (docs/backends.md says where it does not)."""
        self._unsupported("drop_subscription")

    def read_message(self, channel: str, msg_id: bytes) -> bytes | None:
        """The payload of the message ``msg_id`` on ``channel``, or ``None`` if it is no longer stored
        (trimmed). Does not change any subscription."""
        self._unsupported("read_message")

    def count_after(self, channel: str, msg_id: bytes | None) -> int | None:
        """How many messages the channel holds after ``msg_id`` (after none: all it holds); ``None``
        where the broker cannot count them."""
        self._unsupported("count_after")

    def unacknowledged(self, subscription: str, channel: str) -> tuple[int | None, bytes | None]:
        """``(count, since)``: how many of the channel's messages ``subscription`` has not acknowledged
        (delivered to a member and not acknowledged, or not delivered yet), and the id lag is measured
        from: the message right before the oldest unacknowledged one (the acknowledged position), or,
        when that one is the first message the channel stores, the oldest unacknowledged message itself.
        ``since`` is ``None`` when nothing is unacknowledged or it cannot be told; ``count`` is ``None``
        where the broker cannot count. A subscription the broker does not know on the channel counts as
        one that would start at the channel's first stored message."""
        self._unsupported("unacknowledged")

    def _unsupported(self, operation: str) -> NoReturn:
        raise UnsupportedOperationError(f"the {type(self).__name__} backend does not implement {operation}()")

    def close(self) -> None:  # noqa: B027  (optional hook: nothing to release by default)
        """Close the connection. Idempotent."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.redacted()!r})"


def installed_schemes() -> list[str]:
    """The URL schemes of every installed backend."""
    return sorted({ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)})


def load_backend(url: str | URL, options: Mapping[str, Any] | None = None) -> Backend:
    """Find the backend for the URL's scheme (the whole scheme, else the part before ``+``) through
    stevedore and open it. Merges ``options`` over the URL's query options."""
    from stevedore import driver
    from stevedore.exception import NoMatches

    parsed = url if isinstance(url, URL) else URL(url)
    merged: dict[str, Any] = {**parsed.options, **(options or {})}
    candidates = [parsed.scheme] + ([parsed.scheme.split("+", 1)[0]] if "+" in parsed.scheme else [])
    failures: list[str] = []

    def on_failure(_manager: Any, entrypoint: Any, exc: BaseException) -> None:
        failures.append(f"{entrypoint.name}: {type(exc).__name__}: {exc}")

    for name in candidates:
        try:
            manager = driver.DriverManager(
                ENTRY_POINT_GROUP, name, invoke_on_load=False, on_load_failure_callback=on_failure
            )
        except NoMatches:
            continue
        cls = manager.driver
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise BackendNotFoundError(f"entry point {name!r} in {ENTRY_POINT_GROUP} is not a Backend: {cls!r}")
        return cls(parsed, merged)
    detail = f"; failed to load: {'; '.join(failures)}" if failures else ""
    raise BackendNotFoundError(
        f"no msgstream backend for scheme {parsed.scheme!r} (URL {parsed.redacted()!r});"
        f" installed: {', '.join(installed_schemes()) or 'none'}{detail}"
    )
