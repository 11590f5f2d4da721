"""Helpers the broker-specific tests share: rows to send, consuming through a broker restart, the
exactly-once-in-order check, a send the client refuses part of, and a consumer process that is
killed while holding messages."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

import msgstream as ms
from msgstream.errors import BrokerUnavailableError, MsgStreamError, ProduceError
from scripts.broker import Broker


def owner() -> ms.OwnerDescription:
    return ms.OwnerDescription(role="backend-test")


def row(i: int, size: int = 100) -> ms.InsertMsg:
    """An insert of ``size`` bytes whose row id and first hash value are ``i`` (default repack: channel i % n)."""
    return ms.InsertMsg(begin_ts=i, end_ts=i, hash_values=[i], row_ids=[i], row_data=[b"x" * size])


def refused_send(client: ms.Client, big: int) -> tuple[Any, str, ProduceError]:
    """A new channel and a backend send of ``[b"first", <big bytes>, b"third"]`` that fails because the
    client refuses the big one: (the backend, the channel, the error)."""
    backend: Any = client.backend
    name = f"big-{uuid.uuid4().hex[:8]}"
    backend.create_channel(name, b"")
    producer = backend.create_producer(name)
    with pytest.raises(ProduceError) as err:
        producer.send([b"first", b"x" * big, b"third"], 10)
    return backend, name, err.value


def consume_rows(stream: ms.MsgStream, want: int, into: list[tuple[str, int]], timeout: float) -> None:
    """Consume until ``into`` holds ``want`` (channel, row) pairs, riding out retriable errors while a
    broker restarts."""
    deadline = time.monotonic() + timeout
    while len(into) < want:
        assert time.monotonic() < deadline, f"received {len(into)} of {want}"
        try:
            pack = stream.consume(timeout=1.0)
        except MsgStreamError as exc:
            assert exc.retriable, exc
            time.sleep(0.1)
            continue
        if pack is not None:
            into.extend(
                (m.position.channel, m.row_ids[0]) for m in pack.msgs if isinstance(m, ms.InsertMsg) and m.position
            )


def assert_exactly_once_in_order(got: list[tuple[str, int]], n: int, chans: list[str]) -> None:
    rows = [r for _, r in got]
    assert len(rows) == len(set(rows)), f"{len(rows) - len(set(rows))} duplicates"
    assert set(rows) == set(range(n)), f"{n - len(set(rows))} lost"
    for idx, ch in enumerate(chans):
        mine = [r for c, r in got if c == ch]
        assert mine == sorted(mine) and all(r % len(chans) == idx for r in mine)


def restart_loses_and_repeats_nothing(client: ms.Client, restart: Callable[[], None], *, retries: int = 0) -> None:
    """10,000 rows into 4 channels, 5,000 before and 5,000 after ``restart()`` (a SIGKILL and a start on
    the same data) while a consumer holds a pack unacknowledged: each row is consumed exactly once, in
    per-channel order, by that consumer. ``retries``: how often a produce after the restart may be
    repeated on a retriable ``ProduceError`` (0: it must ride the restart out by itself)."""
    chans = client.create_channels(ms.CreateChannelRequest(owner=owner(), num_channels=4))
    out = client.msg_stream(produce_timeout=20)
    out.create_producers(chans)
    inp = client.msg_stream(receive_batch=500)
    inp.create_consumers("restart", chans)
    for k in range(0, 5000, 500):
        out.produce(ms.MsgPack.of([row(i) for i in range(k, k + 500)]))
    got: list[tuple[str, int]] = []
    consume_rows(inp, 2000, got, 30)  # the last pack is held, not yet acknowledged
    restart()
    for k in range(5000, 10000, 500):
        for attempt in range(retries + 1):
            try:
                out.produce(ms.MsgPack.of([row(i) for i in range(k, k + 500)]))
                break
            except ProduceError as exc:
                if not exc.retriable or attempt == retries:
                    raise
                time.sleep(0.1)
    consume_rows(inp, 10000, got, 60)
    assert inp.consume(timeout=0.5) is None
    assert_exactly_once_in_order(got, 10000, chans)
    inp.close()
    out.close()


_CRASHER = textwrap.dedent("""
    import sys, time, msgstream as ms
    url, sub, chans, n = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])
    client = ms.connect(url)
    inp = client.msg_stream(receive_batch=50, auto_ack=False)  # everything it receives stays pending
    inp.create_consumers(sub, chans)
    got = 0
    deadline = time.monotonic() + 120
    while got < n:
        if time.monotonic() > deadline:
            sys.exit(f"received {got} of {n} messages in 120 s")  # the parent reads no count: it fails
        pack = inp.consume(timeout=5)
        got += len(pack.msgs) if pack else 0
    print(got, flush=True)
    sys.stdin.read()  # hold the delivered messages, unacknowledged, until killed
""")


def kill_consumer_holding(url: str, sub: str, chans: list[str], at_least: int) -> int:
    """Run a consumer of ``sub`` in another process until it holds ``at_least`` messages unacknowledged,
    SIGKILL it, and return how many it held."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHER, url, sub, ",".join(chans), str(at_least)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        held = int(proc.stdout.readline())
        assert held >= at_least
        return held
    finally:
        proc.kill()
        proc.wait(10)


def ping_of_a_dead_broker_fails_in_time(broker: Broker, url: str, live: float, dead: float, **options: Any) -> None:
    """``client.ping`` answers while ``broker`` runs, then raises a retriable ``BrokerUnavailableError``
    within ``dead`` seconds (plus one for the call's own overhead) once it was SIGKILLed; stops it."""
    try:
        with ms.connect(url, **options) as client:
            client.ping(timeout=live)
            broker.kill()
            started = time.monotonic()
            with pytest.raises(BrokerUnavailableError) as err:
                client.ping(timeout=dead)
            assert time.monotonic() - started < dead + 1.0 and err.value.retriable
    finally:
        broker.stop()
