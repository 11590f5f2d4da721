"""A sync facade over ``msgstream.aio``, so that the whole ConformanceSuite runs through the async API.

Each facade client runs an event loop in a thread of its own; every call of the async API it stands for
is ``run_coroutine_threadsafe(call, loop).result()``. Nothing here calls the sync streams: a test that
passes through the facade exercises msgstream.aio's workers, cancellation-safe consume, close and
``async with`` paths.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import msgstream as ms
from msgstream import aio
from msgstream.testing import ConformanceSuite

CALL_BOUND = 300.0  # seconds a facade call may take: more than any call the suite makes, plus its bound


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="aio-facade-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:  # every aio call is bounded by its own timeout plus call_timeout (60 s): past this, it hangs
            return future.result(timeout=CALL_BOUND)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise AssertionError(f"{coro.__qualname__} did not return within {CALL_BOUND:g} s") from None

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def _wrap(loop: _Loop, target: Any) -> Callable[[str], Any]:
    def get(name: str) -> Any:
        attr = getattr(target, name)
        if inspect.iscoroutinefunction(attr):

            @functools.wraps(attr)
            def call(*args: Any, **kwargs: Any) -> Any:
                return loop.run(attr(*args, **kwargs))

            return call
        return attr

    return get


class SyncStream:
    """An AsyncMsgStream or AsyncTimeTickStream behind the sync stream's names."""

    def __init__(self, loop: _Loop, stream: aio.AsyncMsgStream | aio.AsyncTimeTickStream) -> None:
        self._loop = loop
        self.aio = stream
        self._get = _wrap(loop, stream)

    def __getattr__(self, name: str) -> Any:
        return self._get(name)

    def __enter__(self) -> SyncStream:
        self._loop.run(self.aio.__aenter__())
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._loop.run(self.aio.__aexit__(exc_type, exc, tb))


class SyncClient:
    """An AsyncClient behind the sync Client's names."""

    def __init__(self, url: str) -> None:
        self._loop = _Loop()
        try:
            self.aio: aio.AsyncClient = self._loop.run(aio.connect(url).open())
        except BaseException:
            self._loop.stop()
            raise
        self._get = _wrap(self._loop, self.aio)

    def __getattr__(self, name: str) -> Any:
        return self._get(name)

    def msg_stream(self, **options: Any) -> SyncStream:
        return SyncStream(self._loop, self.aio.msg_stream(**options))

    def tt_msg_stream(self, **options: Any) -> SyncStream:
        return SyncStream(self._loop, self.aio.tt_msg_stream(**options))

    def close(self) -> None:
        try:
            self._loop.run(self.aio.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncConformanceSuite(ConformanceSuite):
    """The ConformanceSuite with every client (and so every stream) opened through msgstream.aio."""

    def connect(self, url: str) -> ms.Client:
        return SyncClient(url)  # type: ignore[return-value]
