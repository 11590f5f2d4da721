"""Milvus-style hybrid timestamps and a :class:`Ticker` that broadcasts time ticks.

A hybrid timestamp is ``physical_ms << 18 | logical``: milliseconds since the Unix epoch in the high
bits, an 18-bit counter that orders events within one millisecond in the low bits.
"""

from __future__ import annotations

import numbers
import threading
import time
from collections.abc import Callable
from typing import Protocol

from .errors import InvalidArgumentError, OperationTimeoutError
from .messages import TimeTickMsg
from .pack import MsgPack

__all__ = ["LOGICAL_BITS", "HybridClock", "Ticker", "compose", "now", "parse"]

LOGICAL_BITS = 18
LOGICAL_MASK = (1 << LOGICAL_BITS) - 1


def compose(physical_ms: int, logical: int = 0) -> int:
    """The hybrid timestamp of ``physical_ms`` (ms since the epoch) and a logical counter."""
    if physical_ms < 0 or not 0 <= logical <= LOGICAL_MASK:
        raise InvalidArgumentError(f"bad hybrid timestamp parts: physical={physical_ms}, logical={logical}")
    return (physical_ms << LOGICAL_BITS) | logical


def parse(ts: int) -> tuple[int, int]:
    """``(physical_ms, logical)`` of a hybrid timestamp."""
    return ts >> LOGICAL_BITS, ts & LOGICAL_MASK


def now() -> int:
    """The hybrid timestamp of the wall clock now, logical part 0."""
    return compose(time.time_ns() // 1_000_000)


class HybridClock:
    """Hands out strictly increasing hybrid timestamps (thread-safe), even if the wall clock stalls or
    steps back: the logical counter then advances instead."""

    def __init__(self, clock_ms: Callable[[], int] | None = None) -> None:
        self._clock = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._last = max(compose(self._clock()), self._last + 1)
            return self._last


class _Broadcaster(Protocol):
    def broadcast(self, pack: MsgPack) -> dict[str, list[bytes]]: ...


_MAX_WAIT = threading.TIMEOUT_MAX


def check_interval(interval: object) -> float:
    """A ticker interval as float seconds; one that is not a positive number of seconds a thread can wait
    raises ``InvalidArgumentError``."""
    if isinstance(interval, bool) or not isinstance(interval, numbers.Real) or not 0 < float(interval) <= _MAX_WAIT:
        raise InvalidArgumentError(f"interval must be a positive number of seconds, got {interval!r}")
    return float(interval)


class Ticker:
    """Broadcasts a ``TimeTickMsg`` into every producer channel of ``stream``.

    ``tick(ts)`` sends one now (``ts`` defaults to the clock's next timestamp) and returns it.
    ``start(interval)`` sends one every ``interval`` seconds from a daemon thread until ``stop()``;
    a failed broadcast stops the thread and is re-raised by ``stop()`` (and kept in ``error``).
    Use the same ``clock`` for data timestamps so ticks and data agree. ``source_id`` goes into each tick.
    """

    def __init__(self, stream: _Broadcaster, *, clock: HybridClock | None = None, source_id: int = 0) -> None:
        self._stream = stream
        self.clock = clock or HybridClock()
        self._source_id = source_id
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None

    def tick(self, ts: int | None = None) -> int:
        ts = self.clock.next() if ts is None else ts
        self._stream.broadcast(MsgPack(ts, ts, [TimeTickMsg(begin_ts=ts, end_ts=ts, source_id=self._source_id)]))
        return ts

    def start(self, interval: float) -> None:
        interval = check_interval(interval)
        if self._thread is not None:
            raise InvalidArgumentError("ticker already started")
        self.error = None  # a failure of an earlier run was raised by its stop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(interval,), name="msgstream-ticker", daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.tick()
            except Exception as exc:  # kept for stop(), never printed by the thread
                self.error = exc
                return

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, within ``timeout`` (a broadcast in flight waits on the broker; past it
        ``OperationTimeoutError``, and the ticker still counts as started); raise the failure that
        ended it, if one did."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise OperationTimeoutError(f"the ticker's thread did not end within {timeout:g}s")
            self._thread = None
        if self.error is not None:
            raise self.error
