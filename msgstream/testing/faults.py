"""Fault-injecting conformance mode: transient broker errors at seeded random SPI calls.

:class:`FaultyBackend` wraps any backend and, before delegating, raises the error the SPI documents for
the call, with ``retriable=True``, at a seeded random share of the calls it is told to fault (``send``,
``receive``, ``ack``, ``seek``). The failed call never reaches the broker, so a caller that retries as
documented must end up with every message exactly once:

* a retriable :class:`~msgstream.errors.MsgStreamError` from ``consume``, ``seek``, ``ack`` or
  ``close``: call again (:func:`retrying`); a failed acknowledgement is kept and retried, never dropped
  (docs/architecture.md), and a report (``TimeTickError``, ``UnmarshalError``) is not lost with it;
* a retriable :class:`~msgstream.errors.ProduceError`: its ``sent`` names, per channel, the message ids
  the broker accepted (a prefix of what was routed there); send again only the rest
  (:func:`produce_retrying`, :func:`broadcast_retrying`).

:class:`FaultInjectingSuite` runs the delivery, seek and time-tick workloads through it, several seeds
each. Subclass it with a ``url`` fixture, like :class:`~msgstream.testing.ConformanceSuite`::

    import pytest
    from msgstream.testing.faults import FaultInjectingSuite

    class TestMyBrokerUnderFaults(FaultInjectingSuite):
        @pytest.fixture
        def url(self) -> str:
            return "mybroker://127.0.0.1:1234"

See docs/plugins.md.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import ClassVar, TypeVar, cast

import msgspec
import pytest

import msgstream as ms
from msgstream.backend import Backend, Consumer, Producer, RawMessage, SubscriptionPosition, load_backend
from msgstream.errors import ConsumeError, InvalidArgumentError, MsgStreamError, ProduceError, SeekError

__all__ = [
    "FAULTABLE_CALLS",
    "FaultInjectingSuite",
    "FaultyBackend",
    "FaultyConsumer",
    "FaultyProducer",
    "InjectedConsumeError",
    "InjectedFault",
    "InjectedProduceError",
    "InjectedSeekError",
    "broadcast_retrying",
    "produce_retrying",
    "retrying",
]

#: the SPI calls a :class:`FaultyBackend` can fault
FAULTABLE_CALLS = ("send", "receive", "ack", "seek")

T = TypeVar("T")
E = TypeVar("E", bound=MsgStreamError)


class InjectedFault(MsgStreamError):
    """Marks an error raised by :class:`FaultyBackend` (each is also the SPI's own error class)."""

    retriable = True


class InjectedProduceError(ProduceError, InjectedFault):
    """``Producer.send`` failed before anything was sent."""


class InjectedConsumeError(ConsumeError, InjectedFault):
    """``Consumer.receive`` or ``Consumer.ack`` failed before reaching the broker."""

    retriable = True


class InjectedSeekError(SeekError, InjectedFault):
    """``Consumer.seek`` failed before anything moved."""

    retriable = True


class _Faults:
    """The seeded decisions, shared by a backend and every producer and consumer it made."""

    def __init__(self, seed: int, rate: float, calls: Sequence[str]) -> None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise InvalidArgumentError(f"rate must be a number in [0, 1], got {rate!r}")
        if isinstance(calls, str) or not set(calls) <= set(FAULTABLE_CALLS):
            raise InvalidArgumentError(f"calls must be a sequence of {FAULTABLE_CALLS}, got {calls!r}")
        self.seed = seed
        self.rate = float(rate)
        self.calls = frozenset(calls)
        self.enabled = True
        self.seen: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self.forced: Counter[str] = Counter()
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def check(self, call: str) -> bool:
        """Whether this call fails (counted)."""
        with self._lock:
            if not self.enabled:
                return False
            if self.forced[call] > 0:
                self.forced[call] -= 1
                hit = True
            elif call in self.calls:
                hit = self._random.random() < self.rate
            else:
                return False
            self.seen[call] += 1
            if hit:
                self.injected[call] += 1
            return hit


class FaultyProducer(Producer):
    """A producer that fails ``send`` at the backend's seeded random calls, before sending anything."""

    def __init__(self, inner: Producer, faults: _Faults) -> None:
        super().__init__(inner.channel)
        self.inner = inner
        self._faults = faults

    def send(self, payloads: Sequence[bytes], timeout: float) -> list[bytes]:
        if self._faults.check("send"):
            raise InjectedProduceError(
                f"injected fault: send of {len(payloads)} message(s) to {self.channel!r} failed before anything"
                " was sent",
                channel=self.channel,
                sent={},
                retriable=True,
            )
        return self.inner.send(payloads, timeout)

    def close(self) -> None:
        self.inner.close()


class FaultyConsumer(Consumer):
    """A consumer that fails ``receive``, ``ack`` and ``seek`` at the backend's seeded random calls,
    before reaching the broker."""

    def __init__(self, inner: Consumer, faults: _Faults) -> None:
        super().__init__(inner.subscription, inner.channels)
        self.inner = inner
        self._faults = faults

    def receive(self, max_messages: int, timeout: float) -> list[RawMessage]:
        if self._faults.check("receive"):
            raise InjectedConsumeError(f"injected fault: receive on {self.channels} failed")
        return self.inner.receive(max_messages, timeout)

    def ack(self, messages: Sequence[RawMessage]) -> None:
        if self._faults.check("ack"):
            raise InjectedConsumeError(f"injected fault: ack of {len(messages)} message(s) failed")
        self.inner.ack(messages)

    def seek(self, targets: Mapping[str, bytes | None], inclusive: Collection[str] = frozenset()) -> None:
        if self._faults.check("seek"):
            raise InjectedSeekError(f"injected fault: seek of {sorted(targets)} failed before anything moved")
        self.inner.seek(targets, inclusive)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


class FaultyBackend(Backend):
    """``inner`` with transient faults: at the ``calls`` named (of ``send``, ``receive``, ``ack``,
    ``seek``), with probability ``rate`` drawn from ``random.Random(seed)``, the call raises the SPI's
    error for it with ``retriable=True`` *before* delegating, so the broker never saw the failed call:
    ``ProduceError`` (``channel`` set, ``sent={}``) for send, ``ConsumeError`` for receive and ack,
    ``SeekError`` for seek (each an :class:`InjectedFault` too). Every other method delegates.

    ``features`` are the inner backend's (``type(backend).features`` as well: each inner backend class
    gets a subclass of FaultyBackend carrying them). ``injected`` and ``seen`` count the faults raised and
    the faultable calls made, per call; :meth:`fail_next` forces the next calls of a kind to fail;
    ``enabled = False`` turns faults off (for set-up and clean-up).
    """

    _subclasses: ClassVar[dict[tuple[type[FaultyBackend], type[Backend]], type[FaultyBackend]]] = {}
    _subclasses_lock: ClassVar[threading.Lock] = threading.Lock()

    def __new__(
        cls,
        inner: Backend,
        *,
        seed: int,
        rate: float = 0.2,
        calls: Sequence[str] = FAULTABLE_CALLS,
    ) -> FaultyBackend:
        if not isinstance(inner, Backend):
            raise InvalidArgumentError(f"FaultyBackend wraps a msgstream.backend.Backend, got {type(inner).__name__}")
        kind = type(inner)
        with cls._subclasses_lock:
            sub = cls._subclasses.get((cls, kind))
            if sub is None:
                sub = cast(
                    "type[FaultyBackend]", type(f"{cls.__name__}[{kind.__name__}]", (cls,), {"features": kind.features})
                )
                cls._subclasses[(cls, kind)] = sub
        return super().__new__(sub)

    def __init__(
        self,
        inner: Backend,
        *,
        seed: int,
        rate: float = 0.2,
        calls: Sequence[str] = FAULTABLE_CALLS,
    ) -> None:
        super().__init__(inner.url, inner.options)
        self.inner = inner
        self._faults = _Faults(seed, rate, calls)

    # -- fault control ------------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        return self._faults.seed

    @property
    def rate(self) -> float:
        return self._faults.rate

    @property
    def calls(self) -> frozenset[str]:
        return self._faults.calls

    @property
    def enabled(self) -> bool:
        return self._faults.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._faults.enabled = value

    @property
    def injected(self) -> Counter[str]:
        """Faults raised so far, per call name."""
        return self._faults.injected

    @property
    def seen(self) -> Counter[str]:
        """Faultable calls made so far (failed or not), per call name."""
        return self._faults.seen

    def forced_pending(self, call: str) -> int:
        """How many forced faults of ``call`` (:meth:`fail_next`) have not fired yet."""
        with self._faults._lock:
            return self._faults.forced[call]

    def fail_next(self, call: str, times: int = 1) -> None:
        """Make the next ``times`` calls of ``call`` fail, whatever the seed draws (also a call not in
        ``calls``)."""
        if call not in FAULTABLE_CALLS:
            raise InvalidArgumentError(f"call must be one of {FAULTABLE_CALLS}, got {call!r}")
        with self._faults._lock:
            self._faults.forced[call] += times

    # -- the SPI, by delegation -----------------------------------------------------------------
    def create_channel(self, name: str, metadata: bytes) -> None:
        self.inner.create_channel(name, metadata)

    def channel_metadata(self, name: str) -> bytes:
        return self.inner.channel_metadata(name)

    def delete_channel(self, name: str) -> None:
        self.inner.delete_channel(name)

    def create_producer(self, channel: str) -> Producer:
        return FaultyProducer(self.inner.create_producer(channel), self._faults)

    def create_consumer(self, subscription: str, channels: Sequence[str], initial: SubscriptionPosition) -> Consumer:
        return FaultyConsumer(self.inner.create_consumer(subscription, channels, initial), self._faults)

    def latest_message_id(self, channel: str) -> bytes | None:
        return self.inner.latest_message_id(channel)

    def ping(self, timeout: float) -> None:
        self.inner.ping(timeout)

    def list_channels(self) -> list[str]:
        return self.inner.list_channels()

    def list_subscriptions(self, channel: str) -> list[str]:
        return self.inner.list_subscriptions(channel)

    def drop_subscription(self, subscription: str, channels: Sequence[str]) -> None:
        self.inner.drop_subscription(subscription, channels)

    def read_message(self, channel: str, msg_id: bytes) -> bytes | None:
        return self.inner.read_message(channel, msg_id)

    def count_after(self, channel: str, msg_id: bytes | None) -> int | None:
        return self.inner.count_after(channel, msg_id)

    def unacknowledged(self, subscription: str, channel: str) -> tuple[int | None, bytes | None]:
        return self.inner.unacknowledged(subscription, channel)

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"FaultyBackend({self.inner!r}, seed={self.seed}, rate={self.rate}, calls={sorted(self.calls)})"


# -- the caller's side of the contract --------------------------------------------------------------
def retrying(call: Callable[[], T], deadline: float, what: str = "call") -> T:
    """``call()`` until it returns, calling again after each retriable ``MsgStreamError``; a non-retriable
    one propagates. ``AssertionError`` (with the last error) once ``deadline`` (``time.monotonic()``)
    passed. An injected fault is retried at once, a real one after a short pause."""
    while True:
        try:
            return call()
        except MsgStreamError as exc:
            if not exc.retriable:
                raise
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what} still failing at the deadline: {exc!r}") from exc
            if not isinstance(exc, InjectedFault):
                time.sleep(0.05)  # a real broker error: do not hammer it


def produce_retrying(stream: ms.MsgStream, msgs: Sequence[ms.TsMsg], deadline: float) -> None:
    """Produce ``msgs`` as the caller contract says: after a retriable ``ProduceError``, send again only
    what its ``sent`` does not list. ``sent[channel]`` holds the ids accepted on a channel, a prefix of
    the messages routed there, so the rest of each channel is sent again, in order. Assumes the stream
    routes with the default repack function (message ``i`` to ``hash_values[0] % len(channels)``)."""
    channels = stream.producer_channels
    pending = list(msgs)
    while pending:
        try:
            stream.produce(ms.MsgPack.of(pending))
            return
        except ProduceError as exc:
            if not exc.retriable:
                raise
            if time.monotonic() >= deadline:
                raise AssertionError(f"produce still failing at the deadline: {exc!r}") from exc
            accepted = {ch: len(ids) for ch, ids in exc.sent.items()}
            rest: list[ms.TsMsg] = []
            for m in pending:
                ch = channels[m.hash_values[0] % len(channels)]
                if accepted.get(ch, 0) > 0:
                    accepted[ch] -= 1
                else:
                    rest.append(m)
            pending = rest
            if not isinstance(exc, InjectedFault):
                time.sleep(0.05)


def broadcast_retrying(stream: ms.MsgStream, msgs: Sequence[ms.TsMsg], deadline: float) -> None:
    """Broadcast ``msgs`` to every producer channel; after a retriable ``ProduceError``, send to each
    channel only what ``sent`` does not list for it (as per-channel copies routed by ``hash_values``,
    through :func:`produce_retrying`)."""
    try:
        stream.broadcast(ms.MsgPack.of(list(msgs)))
        return
    except ProduceError as exc:
        if not exc.retriable:
            raise
        sent = exc.sent
    rest: list[ms.TsMsg] = []
    for idx, ch in enumerate(stream.producer_channels):
        rest += [msgspec.structs.replace(m, hash_values=[idx]) for m in msgs[len(sent.get(ch, [])) :]]
    produce_retrying(stream, rest, deadline)


def _seek_retrying(stream: ms.MsgStream | ms.TimeTickStream, saved: Sequence[bytes], deadline: float) -> None:
    """Seek a fresh stream to a checkpoint persisted as bytes, calling again after retriable errors."""
    positions = [ms.Position.from_bytes(b) for b in saved]
    retrying(lambda: stream.seek(positions), deadline, "seek")


def _close(stream: ms.MsgStream | ms.TimeTickStream, deadline: float) -> None:
    """Close, calling again after a retriable error (its final acknowledgement failed)."""
    retrying(stream.close, deadline, "close")
    assert stream.closed


def _row(i: int, channels: int, ts: int | None = None) -> ms.InsertMsg:
    t = i + 1 if ts is None else ts
    return ms.InsertMsg(
        begin_ts=t,
        end_ts=t,
        hash_values=[i % channels],
        row_ids=[i],
        timestamps=[t],
        row_data=[i.to_bytes(4, "big")],
    )


def _tick(ts: int) -> ms.TimeTickMsg:
    return ms.TimeTickMsg(begin_ts=ts, end_ts=ts)


def _rows_of(pack: ms.MsgPack) -> list[tuple[str, int]]:
    out = []
    for m in pack.msgs:
        assert isinstance(m, ms.InsertMsg) and m.position is not None, f"unexpected message {m!r}"
        out.append((m.position.channel, m.row_ids[0]))
    return out


def _exactly_once(rows: Sequence[int], n: int) -> str | None:
    """What is wrong with ``rows`` as exactly ``0..n-1`` once each, or ``None``."""
    counts = Counter(rows)
    repeated = sorted(r for r, k in counts.items() if k > 1)
    missing = sorted(set(range(n)) - set(counts))
    extra = sorted(set(counts) - set(range(n)))
    if not (repeated or missing or extra):
        return None
    return f"{len(missing)} lost {missing[:20]}, {len(repeated)} repeated {repeated[:20]}, unexpected {extra[:20]}"


#: (begin_ts, end_ts, row ids) of each time-tick pack a workload expects
_Expected = list[tuple[int, int, list[int]]]


class FaultInjectingSuite:
    """Delivery, seek and time-tick workloads through :class:`FaultyBackend` over the backend at the
    ``url`` fixture, once per seed in ``seeds``; the caller retries as documented (module doc) and every
    row must arrive exactly once, in channel order. Waits are bounded by ``timeout`` seconds per test.

    Besides the seeded random faults, each workload forces a fault (:meth:`FaultyBackend.fail_next`) at
    the call where one is most likely to lose or repeat something (the seek of a restart, the last
    acknowledgement before a close, the acknowledgement of a message that is reported), so every seed
    covers those points.
    """

    seeds: Sequence[int] = (1, 2, 3)
    rate: float = 0.2
    calls: Sequence[str] = FAULTABLE_CALLS
    rows: int = 400
    channels: int = 4
    receive_batch: int = 16
    timeout: float = 60.0
    quiet_period: float = 0.5
    #: consume calls after a forced fault within which the error it hit must be reported
    report_within: int = 4

    # -- fixtures -------------------------------------------------------------------------------
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "seed" in metafunc.fixturenames:
            metafunc.parametrize("seed", list(self.seeds), ids=[f"seed{s}" for s in self.seeds])

    @pytest.fixture
    def url(self) -> str:
        pytest.fail("a FaultInjectingSuite subclass must define a `url` fixture returning the backend URL")

    @pytest.fixture
    def faulty(self, url: str, seed: int) -> Iterator[FaultyBackend]:
        """The backend at ``url`` (loaded as ``connect`` does) wrapped with faults seeded ``seed``."""
        backend = FaultyBackend(load_backend(url), seed=seed, rate=self.rate, calls=self.calls)
        try:
            yield backend
        finally:
            backend.enabled = False
            backend.close()

    @pytest.fixture
    def client(self, faulty: FaultyBackend) -> Iterator[ms.Client]:
        client = ms.Client(faulty)
        try:
            yield client
        finally:
            faulty.enabled = False  # clean-up is not under test
            client.close()

    # -- helpers --------------------------------------------------------------------------------
    def _channels(self, client: ms.Client, n: int) -> list[str]:
        owner = ms.OwnerDescription(role="faults", address="127.0.0.1:19530", description_text="fault injection")
        return client.create_channels(ms.CreateChannelRequest(owner=owner, num_channels=n))

    @staticmethod
    def _sub() -> str:
        return f"faults-{uuid.uuid4().hex[:10]}"

    def _producer(self, client: ms.Client, chans: Sequence[str]) -> ms.MsgStream:
        out = client.msg_stream(produce_timeout=min(self.timeout, 30.0))
        out.create_producers(chans)
        out.start()
        return out

    def _produce(self, out: ms.MsgStream, rows: Sequence[ms.TsMsg], deadline: float, per_call: int = 20) -> None:
        for k in range(0, len(rows), per_call):
            produce_retrying(out, rows[k : k + per_call], deadline)

    def _produce_ticks(self, out: ms.MsgStream, deadline: float) -> _Expected:
        """``rows`` rows (row ``i`` at ``end_ts = 10 * (i + 1)``), a tick broadcast after every 25 and
        now and then a tick with no row before it; returns the packs a time-tick stream must return."""
        n = len(out.producer_channels)
        expected: _Expected = []
        prev = 0
        for k, start in enumerate(range(0, self.rows, 25)):
            ids = list(range(start, min(start + 25, self.rows)))
            self._produce(out, [_row(i, n, ts=10 * (i + 1)) for i in ids], deadline)
            tick = 10 * (ids[-1] + 1) + 5
            broadcast_retrying(out, [_tick(tick)], deadline)
            expected.append((prev, tick, ids))
            prev = tick
            if k % 4 == 1:  # a tick with no data: its pack is returned, empty
                broadcast_retrying(out, [_tick(tick + 2)], deadline)
                expected.append((prev, tick + 2, []))
                prev = tick + 2
        return expected

    @staticmethod
    def _consume(stream: ms.MsgStream | ms.TimeTickStream, timeout: float, deadline: float) -> ms.MsgPack | None:
        return retrying(lambda: stream.consume(timeout=timeout), deadline, "consume")

    def _expect_quiet(self, stream: ms.MsgStream | ms.TimeTickStream, deadline: float, what: str) -> None:
        pack = self._consume(stream, self.quiet_period, deadline)
        assert pack is None, f"{what}: more arrived after everything was consumed: {pack.msgs[:5]}"

    def _take(
        self,
        stream: ms.MsgStream,
        until: int,
        *,
        got: list[tuple[str, int]],
        checkpoint: dict[str, ms.Position],
        deadline: float,
        what: str,
    ) -> None:
        """Consume until ``got`` holds ``until`` distinct rows, checkpointing each pack's ``end_positions``."""
        while len({r for _, r in got}) < until:
            assert time.monotonic() < deadline, f"{what}: received {len(got)} rows, {until} expected, in time"
            pack = self._consume(stream, min(1.0, max(0.0, deadline - time.monotonic())), deadline)
            if pack is None:
                continue
            got += _rows_of(pack)
            checkpoint.update((p.channel, p) for p in pack.end_positions)

    def _take_packs(
        self,
        tt: ms.TimeTickStream,
        expected: _Expected,
        start: int,
        stop: int,
        *,
        rows: list[int],
        faulty: FaultyBackend,
        deadline: float,
        knows_previous_tick: bool = True,
    ) -> list[ms.Position]:
        """Consume ``expected[start:stop]``, checking each pack; returns the last pack's ``end_positions``.
        ``knows_previous_tick=False``: the first pack's ``begin_ts`` is not checked (a stream that resumed
        its subscription without a seek has not seen the tick before it)."""
        chans = tt.inner.consumer_channels
        end_positions: list[ms.Position] = []
        k = start
        while k < stop:
            assert time.monotonic() < deadline, f"{self._where(faulty)}: {k} of {len(expected)} tick packs in time"
            pack = self._consume(tt, min(1.0, max(0.0, deadline - time.monotonic())), deadline)
            if pack is None:
                continue
            what = f"pack {k}, {self._where(faulty)}"
            begin, end, want = expected[k]
            got = _rows_of(pack)
            if k == start and not knows_previous_tick:
                begin = pack.begin_ts
            assert (pack.begin_ts, pack.end_ts) == (begin, end), (
                f"{what}: expected the pack of tick {end} (after {begin}), got ({pack.begin_ts}, {pack.end_ts}]"
                f" with rows {[r for _, r in got][:10]}: a tick's pack was lost or repeated"
            )
            assert [r for _, r in got] == want, f"{what}: rows {[r for _, r in got]}, expected {want}"
            assert all(ch == chans[r % len(chans)] for ch, r in got), f"{what}: a row on the wrong channel"
            rows += [r for _, r in got]
            end_positions = list(pack.end_positions)
            k += 1
        return end_positions

    def _expect_error(
        self,
        stream: ms.MsgStream | ms.TimeTickStream,
        kind: type[E],
        faulty: FaultyBackend,
        deadline: float,
        what: str,
    ) -> tuple[E, list[ms.MsgPack]]:
        """Consume until ``kind`` is raised, retrying retriable errors; returns it with the packs returned
        before it. Once a fault forced before the call has fired, the error must come within
        ``report_within`` further calls: a fault must not make a stream forget to report."""
        packs: list[ms.MsgPack] = []
        after = 0
        while True:
            assert time.monotonic() < deadline, f"{what}: no {kind.__name__} within {self.timeout}s"
            fired = faulty.forced_pending("ack") == 0
            try:
                pack = stream.consume(timeout=self.quiet_period if fired else 1.0)
            except kind as exc:
                return exc, packs
            except MsgStreamError as exc:
                if not exc.retriable:
                    raise
                pack = None
            if pack is not None:
                packs.append(pack)
            if fired and "ack" in faulty.calls:
                after += 1
                assert after <= self.report_within, (
                    f"{what}: never reported as {kind.__name__} after its acknowledgement failed and consume was"
                    f" called again {self.report_within} times (packs returned meanwhile:"
                    f" {[(p.begin_ts, p.end_ts, len(p.msgs)) for p in packs]}; {self._where(faulty)})"
                )

    def _check_delivery(self, got: Sequence[tuple[str, int]], chans: Sequence[str], what: str) -> None:
        problem = _exactly_once([r for _, r in got], self.rows)
        assert problem is None, f"{what}: {problem}"
        for ch, r in got:
            assert ch == chans[r % len(chans)], f"{what}: row {r} came from {ch!r}, not {chans[r % len(chans)]!r}"
        for idx, ch in enumerate(chans):
            mine = [r for c, r in got if c == ch]
            back = next((i for i in range(1, len(mine)) if mine[i] < mine[i - 1]), None)
            assert back is None, (
                f"{what}: channel {idx} out of order, row {mine[back]} after {mine[back - 1]}:"
                f" ... {mine[max(0, back - 5) : back + 5]} ..."
            )

    @staticmethod
    def _force(faulty: FaultyBackend, call: str) -> None:
        """Make the next ``call`` fail if faults are injected there at all."""
        if call in faulty.calls:
            faulty.fail_next(call)

    @staticmethod
    def _where(faulty: FaultyBackend) -> str:
        return f"seed {faulty.seed}, faults injected {dict(faulty.injected)} of calls {dict(faulty.seen)}"

    # -- delivery -------------------------------------------------------------------------------
    def test_delivery_exactly_once_through_faults(self, client: ms.Client, faulty: FaultyBackend) -> None:
        """Rows produced into several channels through failing sends, consumed on one subscription
        through failing receives and acks: every row once, each channel in order."""
        deadline = time.monotonic() + self.timeout
        chans = self._channels(client, self.channels)
        out = self._producer(client, chans)
        inp = client.msg_stream(receive_batch=self.receive_batch)
        inp.create_consumers(self._sub(), chans)
        inp.start()
        for call in ("send", "receive", "ack"):  # each at least once, whatever the seed draws
            self._force(faulty, call)
        self._produce(out, [_row(i, len(chans)) for i in range(self.rows)], deadline)
        got: list[tuple[str, int]] = []
        self._take(inp, self.rows, got=got, checkpoint={}, deadline=deadline, what=self._where(faulty))
        self._expect_quiet(inp, deadline, self._where(faulty))
        self._check_delivery(got, chans, self._where(faulty))
        _close(inp, deadline)
        _close(out, deadline)
        for call in ("send", "receive", "ack"):
            assert faulty.injected[call] > 0 or call not in faulty.calls, f"no {call} fault: {self._where(faulty)}"

    def test_resume_subscription_after_close_through_faults(self, client: ms.Client, faulty: FaultyBackend) -> None:
        """A consumer takes part of the rows and closes, the acknowledgement made by that close failing
        (retried as documented: close again); a new member of the same subscription, without a seek,
        gets the rest: every row once. (An existing subscription resumes after what was acknowledged,
        and a failed acknowledgement is kept and retried, never dropped: docs/architecture.md.)"""
        deadline = time.monotonic() + self.timeout
        chans = self._channels(client, self.channels)
        sub = self._sub()
        out = self._producer(client, chans)
        self._produce(out, [_row(i, len(chans)) for i in range(self.rows)], deadline)
        got: list[tuple[str, int]] = []
        first = client.msg_stream(receive_batch=self.receive_batch)
        first.create_consumers(sub, chans)
        self._take(first, self.rows // 2, got=got, checkpoint={}, deadline=deadline, what=self._where(faulty))
        self._force(faulty, "ack")  # the acknowledgement of the pack in hand, made by close
        _close(first, deadline)
        second = client.msg_stream(receive_batch=self.receive_batch)
        second.create_consumers(sub, chans)
        what = f"after a close whose acknowledgement failed, {self._where(faulty)}"
        self._take(second, self.rows, got=got, checkpoint={}, deadline=deadline, what=what)
        self._expect_quiet(second, deadline, what)
        self._check_delivery(got, chans, what)
        _close(second, deadline)
        _close(out, deadline)

    # -- seek -----------------------------------------------------------------------------------
    def test_checkpoint_and_seek_through_faults(self, client: ms.Client, faulty: FaultyBackend) -> None:
        """Consume part, checkpoint ``end_positions``, close ("crash"), start a fresh stream on the same
        subscription and seek to the checkpoint (through a failing seek), twice, with more rows produced
        in between: every row once, each channel in order."""
        deadline = time.monotonic() + self.timeout
        chans = self._channels(client, self.channels)
        sub = self._sub()
        out = self._producer(client, chans)
        rows = [_row(i, len(chans)) for i in range(self.rows)]
        first_part = self.rows * 3 // 5
        self._produce(out, rows[:first_part], deadline)
        got: list[tuple[str, int]] = []
        checkpoint: dict[str, ms.Position] = {}  # what a consumer would persist: bytes, read back on restart
        stops = [self.rows // 3, self.rows * 2 // 3]
        for stage, stop in enumerate([*stops, self.rows]):
            inp = client.msg_stream(receive_batch=self.receive_batch)
            inp.create_consumers(sub, chans)
            if checkpoint:
                self._force(faulty, "seek")  # at least one failed seek per restart, whatever the seed draws
                _seek_retrying(inp, [p.to_bytes() for p in checkpoint.values()], deadline)
            inp.start()
            if stage == 1:
                self._produce(out, rows[first_part:], deadline)
            what = f"stage {stage}, {self._where(faulty)}"
            self._take(inp, stop, got=got, checkpoint=checkpoint, deadline=deadline, what=what)
            if stop == self.rows:
                self._expect_quiet(inp, deadline, self._where(faulty))
            _close(inp, deadline)  # whatever its acknowledgement left behind, the seek drops
        self._check_delivery(got, chans, self._where(faulty))
        _close(out, deadline)
        assert faulty.injected["seek"] >= 2 or "seek" not in faulty.calls, f"seek faults: {self._where(faulty)}"

    # -- time tick ------------------------------------------------------------------------------
    def _tick_setup(
        self, client: ms.Client
    ) -> tuple[float, list[str], str, ms.MsgStream, _Expected, ms.TimeTickStream]:
        """Channels, rows and ticks produced (through failing sends), and a time-tick stream subscribed:
        (deadline, channels, subscription, producing stream, expected packs, time-tick stream)."""
        deadline = time.monotonic() + self.timeout
        chans = self._channels(client, max(2, self.channels - 1))
        sub = self._sub()
        out = self._producer(client, chans)
        expected = self._produce_ticks(out, deadline)
        tt = client.tt_msg_stream(receive_batch=self.receive_batch)
        tt.create_consumers(sub, chans)
        return deadline, chans, sub, out, expected, tt

    def test_time_tick_packs_through_faults(self, client: ms.Client, faulty: FaultyBackend) -> None:
        """Rows and broadcast ticks (some ticks with no row) produced through failing sends; the time-tick
        stream consumed through failing receives and acks, restarted halfway from the last pack's
        ``end_positions`` (through a failing seek): one pack per tick, in tick order, each with exactly
        its tick's rows, every row once."""
        deadline, chans, sub, out, expected, tt = self._tick_setup(client)
        rows: list[int] = []
        half = len(expected) // 2
        tt.start()
        end_positions = self._take_packs(tt, expected, 0, half, rows=rows, faulty=faulty, deadline=deadline)
        _close(tt, deadline)
        tt = client.tt_msg_stream(receive_batch=self.receive_batch)
        tt.create_consumers(sub, chans)
        self._force(faulty, "seek")
        _seek_retrying(tt, [p.to_bytes() for p in end_positions], deadline)
        tt.start()
        self._take_packs(tt, expected, half, len(expected), rows=rows, faulty=faulty, deadline=deadline)
        self._expect_quiet(tt, deadline, self._where(faulty))
        _close(tt, deadline)
        problem = _exactly_once(rows, self.rows)
        assert problem is None, f"{self._where(faulty)}: {problem}"
        _close(out, deadline)
        for call in ("send", "ack", "seek"):
            assert faulty.injected[call] > 0 or call not in faulty.calls, f"no {call} fault: {self._where(faulty)}"

    def test_time_tick_resume_subscription_after_close_through_faults(
        self, client: ms.Client, faulty: FaultyBackend
    ) -> None:
        """A time-tick stream returns half the tick packs and closes, the acknowledgement of what the last
        pack covered failing (close retried as documented); a new time-tick stream on the same
        subscription, without a seek, returns the following ticks' packs: no pack, no row twice."""
        deadline, chans, sub, out, expected, tt = self._tick_setup(client)
        rows: list[int] = []
        half = len(expected) // 2
        self._take_packs(tt, expected, 0, half, rows=rows, faulty=faulty, deadline=deadline)
        self._force(faulty, "ack")  # close acknowledges what the last pack covered: that fails
        _close(tt, deadline)
        tt = client.tt_msg_stream(receive_batch=self.receive_batch)
        tt.create_consumers(sub, chans)
        self._take_packs(
            tt, expected, half, len(expected), rows=rows, faulty=faulty, deadline=deadline, knows_previous_tick=False
        )
        self._expect_quiet(tt, deadline, self._where(faulty))
        _close(tt, deadline)
        problem = _exactly_once(rows, self.rows)
        assert problem is None, f"{self._where(faulty)}: {problem}"
        _close(out, deadline)

    def test_time_tick_errors_reported_through_faults(self, client: ms.Client, faulty: FaultyBackend) -> None:
        """A tick that goes backwards on a channel, then data at or below a passed tick there: each raises
        ``TimeTickError`` from a time-tick stream whose acknowledgement of the offending message fails
        (consume retried as documented), and the stream goes on with the next tick."""
        deadline = time.monotonic() + self.timeout
        chans = self._channels(client, 2)
        out = self._producer(client, chans)
        first_only = self._producer(client, chans[:1])  # the offending messages go to one channel
        tt = client.tt_msg_stream(receive_batch=self.receive_batch)
        tt.create_consumers(self._sub(), chans)
        broadcast_retrying(out, [_tick(10)], deadline)
        first = None
        while first is None:
            assert time.monotonic() < deadline, f"{self._where(faulty)}: no pack for tick 10"
            first = self._consume(tt, 1.0, deadline)
        assert first.end_ts == 10, f"{self._where(faulty)}: {first}"
        self._consume(tt, 0, deadline)  # acknowledges what the first pack covered
        broadcast_retrying(first_only, [_tick(5)], deadline)
        self._force(faulty, "ack")  # the offending tick's acknowledgement
        err, _ = self._expect_error(tt, ms.errors.TimeTickError, faulty, deadline, "a tick going backwards")
        assert "went backwards" in str(err), err
        produce_retrying(first_only, [_row(0, 1, ts=8)], deadline)
        self._force(faulty, "ack")
        err, _ = self._expect_error(tt, ms.errors.TimeTickError, faulty, deadline, "data below a passed tick")
        assert "at or below the tick 10" in str(err), err
        produce_retrying(out, [_row(1, len(chans), ts=15)], deadline)
        broadcast_retrying(out, [_tick(20)], deadline)
        pack = None
        while pack is None:
            assert time.monotonic() < deadline, f"{self._where(faulty)}: no pack for tick 20"
            pack = self._consume(tt, 1.0, deadline)
        assert (pack.begin_ts, pack.end_ts, [r for _, r in _rows_of(pack)]) == (10, 20, [1]), self._where(faulty)
        _close(tt, deadline)
        _close(first_only, deadline)
        _close(out, deadline)

    def test_corrupt_frame_reported_through_faults(self, client: ms.Client, faulty: FaultyBackend) -> None:
        """A frame that does not decode, at the head of a channel, is reported as ``UnmarshalError`` with
        its position even when acknowledging it fails (consume retried as documented), and the messages
        after it still come: through a time-tick stream and a stream with ``auto_ack=False``."""
        deadline = time.monotonic() + self.timeout
        failures: list[str] = []
        for kind in ("time-tick stream", "auto_ack=False stream"):
            chans = self._channels(client, 2)
            out = self._producer(client, chans)
            raw = faulty.inner.create_producer(chans[0])  # a foreign writer, not under test
            try:
                (bad_id,) = raw.send([b"not a frame"], self.timeout)
            finally:
                raw.close()
            stream: ms.MsgStream | ms.TimeTickStream
            if kind == "time-tick stream":
                stream = client.tt_msg_stream(receive_batch=self.receive_batch)
            else:
                stream = client.msg_stream(receive_batch=self.receive_batch, auto_ack=False)
            stream.create_consumers(self._sub(), chans)
            broadcast_retrying(out, [_tick(10)], deadline)
            self._force(faulty, "ack")  # the bad frame's acknowledgement
            try:
                err, before = self._expect_error(
                    stream, ms.errors.UnmarshalError, faulty, deadline, f"{kind}: a bad frame"
                )
            except AssertionError as exc:
                failures.append(str(exc))
            else:
                assert err.position is not None and (err.position.channel, err.position.msg_id) == (chans[0], bad_id)
                # then the rest: the tick pack (time-tick stream), or the two ticks (plain stream)
                got = [m for p in before for m in p.msgs or [_tick(p.end_ts)]]
                while len(got) < (1 if kind == "time-tick stream" else 2):
                    assert time.monotonic() < deadline, f"{kind}: the messages after a bad frame did not come"
                    pack = self._consume(stream, 1.0, deadline)
                    if pack is not None:
                        got += pack.msgs or [_tick(pack.end_ts)]
                # exactly the tick: one (empty) pack ending at it, or once on each channel, nothing else
                want = 1 if kind == "time-tick stream" else 2
                assert [(m.end_ts, m._is_tick) for m in got] == [(10, True)] * want, f"{kind}: {got}"
            _close(stream, deadline)
            _close(out, deadline)
        assert not failures, "; ".join(failures)
