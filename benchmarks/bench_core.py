"""Core benchmark: the codec, the memory backend, and time-tick against plain consumption.

``python -m benchmarks core [--seconds S] [--repeats N] [--json PATH]``

Every figure is the median of ``--repeats`` timed runs of about ``--seconds`` each, after an untimed
warm-up. Throughput is in messages per second and in MB/s (10**6 bytes per second of encoded
messages: frames, header included, for msgstream; the bare msgpack body for the raw msgspec
baseline; data messages only for the time-tick comparison).

1. codec: ``msg.marshal()`` then ``dispatcher.unmarshal(frame)`` for an ``InsertMsg`` of one row,
   marshal alone, unmarshal alone, and the same three with a bare ``msgspec.msgpack`` Encoder/Decoder
   for the same Struct. The six loops of one row size share each timed run, interleaved in ~10 ms
   slices so that the msgstream/raw ratios compare like with like on a busy machine.
2. memory backend: ``produce()`` packs of 1000 ``InsertMsg`` over 4 channels, then ``consume()``
   until all arrived, one after the other in this thread; end-to-end is messages / (produce time +
   consume time). A run is made of rounds on fresh channels, each capped at ``ROUND_BYTES`` of frames.
3. time-tick: the same messages (packs of 1000 with a ``TimeTickMsg`` broadcast after each) read by a
   plain ``MsgStream`` and by a ``TimeTickStream``, each under its own subscription, in alternating
   order; both in data messages per second.

Ratios are the median of the per-run ratios (the two sides of a ratio are measured in the same run).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

import msgstream as ms

ROW_SIZES = (100, 10 * 1024)  # bytes of row_data in each InsertMsg
PACK_SIZE = 1000  # messages per produce() call
NUM_CHANNELS = 4
ROUND_BYTES = 64 * 2**20  # most frame bytes a round leaves in the memory broker before it is emptied
SLICE_SECONDS = 0.01  # codec: length of one interleaved slice
WARMUP_SECONDS = 0.1  # codec: untimed warm-up per loop
CONSUME_TIMEOUT = 10.0  # a consume() that returns nothing for this long means a bug, not a slow machine
MB = 1e6

clock = time.perf_counter


@dataclass
class Figure:
    """One reported throughput: a msgs/s sample per timed run, and optionally a ratio per run."""

    section: str
    name: str
    row_bytes: int
    msg_bytes: float  # encoded bytes per message, for MB/s
    rates: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    ratio_to: str = ""  # what the ratio divides by

    @property
    def msgs_per_s(self) -> float:
        return statistics.median(self.rates)

    @property
    def mb_per_s(self) -> float:
        return self.msgs_per_s * self.msg_bytes / MB

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def spread(self) -> float:
        """(max - min) / median of the runs."""
        return (max(self.rates) - min(self.rates)) / self.msgs_per_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "row_bytes": self.row_bytes,
            "msg_bytes": round(self.msg_bytes, 1),
            "msgs_per_s": round(self.msgs_per_s),
            "mb_per_s": round(self.mb_per_s, 2),
            "runs_msgs_per_s": [round(r) for r in self.rates],
            "spread": round(self.spread, 4),
            "ratio": None if self.ratio is None else round(self.ratio, 4),
            "runs_ratio": [round(r, 4) for r in self.ratios],
            "ratio_to": self.ratio_to or None,
        }


# -- environment ----------------------------------------------------------------------------------
# the CPUs this process may use, read once at import (before :func:`apart` narrows them)
_CPUS: list[int] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _split() -> tuple[list[int], list[int]] | None:
    """(the benchmark's CPUs, a started broker's CPUs): the lower and upper half; None where there is only
    one CPU, or no ``taskset`` to pin the broker with."""
    if len(_CPUS) < 2 or shutil.which("taskset") is None:
        return None
    half = len(_CPUS) // 2
    return _CPUS[:half], _CPUS[half:]


@contextmanager
def apart(pid: int) -> Iterator[bool]:
    """For a broker the benchmark started (process ``pid``): pins the broker, every thread of it
    (``taskset -a -p``; threads it starts later inherit), to the upper half of the CPUs, and this process
    to the lower half for the ``with`` block (restored afterwards). This process's main thread is moved at
    once; threads it starts from then on (librdkafka's, pulsar-client's) inherit its CPUs. The broker is
    started before it is pinned, so a JVM sizes its thread pools and garbage collector for the whole machine
    (as on a host of its own with this many cores) and then runs on its share.

    So the clients of both sides and the broker do not take each other's cores, as on separate hosts, and
    a comparison of two clients is not decided by which of them the scheduler happened to put beside the
    broker. Yields whether it pinned: False where :func:`_split` finds no split or ``taskset`` fails."""
    split = _split()
    if split is None:
        yield False
        return
    mine, broker = split
    done = subprocess.run(
        [str(shutil.which("taskset")), "-a", "-p", "-c", ",".join(map(str, broker)), str(pid)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        print(f"could not pin the broker (pid {pid}): {done.stderr.strip()}", file=sys.stderr, flush=True)
        yield False
        return
    os.sched_setaffinity(0, mine)
    try:
        yield True
    finally:
        os.sched_setaffinity(0, _CPUS)


def cpu_layout() -> str:
    """How :func:`apart` places a broker the benchmark starts and this process, for the report's environment."""
    split = _split()
    if split is None:
        return "not pinned (one CPU, or no taskset): brokers and the benchmark share the CPUs"
    mine, broker = split
    return (
        f"a broker the benchmark starts runs on CPU {','.join(map(str, broker))} (all its threads), the"
        f" benchmark (both sides' clients) on CPU {','.join(map(str, mine))}; a broker given by URL is not pinned"
    )


def environment() -> dict[str, Any]:
    """The machine and versions the figures were measured with."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(_CPUS) or os.cpu_count() or 0,
        "cpu_layout": cpu_layout(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "msgspec": msgspec.__version__,
        "msgstream": ms.__version__,
    }


def print_environment(env: dict[str, Any], settings: str) -> None:
    """The report's "Environment" section: each fact, then how the figures were taken."""
    print("## Environment\n")
    for key, value in env.items():
        print(f"- {key}: {value}")
    print(f"- settings: {settings}\n", flush=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# -- messages -------------------------------------------------------------------------------------
def insert_msg(i: int, ts: int, row: bytes) -> ms.InsertMsg:
    """A one-row insert, as the proxy would send it."""
    return ms.InsertMsg(
        begin_ts=ts,
        end_ts=ts,
        collection_name="bench",
        hash_values=[i],
        row_ids=[i],
        timestamps=[ts],
        row_data=[row],
    )


def _mean_frame_bytes(msgs: Sequence[ms.TsMsg]) -> float:
    return sum(len(m.marshal()) for m in msgs) / len(msgs)


@contextmanager
def _channels(client: ms.Client) -> Iterator[list[str]]:
    owner = ms.OwnerDescription(role="bench", description_text="benchmarks.bench_core")
    channels = client.create_channels(ms.CreateChannelRequest(owner=owner, num_channels=NUM_CHANNELS))
    try:
        yield channels
    finally:
        client.destroy_channels(channels)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- 1. codec ---------------------------------------------------------------------------------------
Loop = Callable[[int], None]  # runs the operation n times


def _warm_up(loop: Loop, seconds: float) -> int:
    """Run ``loop`` for ``seconds``; return how many operations take about ``SLICE_SECONDS``."""
    n, spent, done = 1, 0.0, 0
    while spent < seconds:
        t0 = clock()
        loop(n)
        dt = clock() - t0
        spent += dt
        done += n
        if dt < SLICE_SECONDS:
            n *= 2
    return max(1, round(done / spent * SLICE_SECONDS))


def _interleaved(loops: dict[str, Loop], slices: dict[str, int], seconds: float) -> dict[str, float]:
    """Operations per second of each loop, the loops taking turns in slices for ``seconds`` in all."""
    ops = dict.fromkeys(loops, 0)
    spent = dict.fromkeys(loops, 0.0)
    gc.collect()
    end = clock() + seconds
    while clock() < end:
        for name, loop in loops.items():
            n = slices[name]
            t0 = clock()
            loop(n)
            spent[name] += clock() - t0
            ops[name] += n
    return {name: ops[name] / spent[name] for name in loops}


def bench_codec(row_bytes: int, seconds: float, repeats: int) -> list[Figure]:
    ts = ms.timestamp.now()
    msg = insert_msg(1, ts, os.urandom(row_bytes))
    unmarshal = ms.UnmarshalDispatcher().unmarshal
    encode = msgspec.msgpack.Encoder().encode
    decode = msgspec.msgpack.Decoder(ms.InsertMsg).decode
    frame = msg.marshal()
    body = encode(msg)
    if unmarshal(frame) != msg or decode(body) != msg:
        raise AssertionError("codec round trip changed the message")

    def pair(n: int) -> None:
        for _ in range(n):
            unmarshal(msg.marshal())

    def marshal(n: int) -> None:
        for _ in range(n):
            msg.marshal()

    def unmarshal_only(n: int) -> None:
        for _ in range(n):
            unmarshal(frame)

    def raw_pair(n: int) -> None:
        for _ in range(n):
            decode(encode(msg))

    def raw_encode(n: int) -> None:
        for _ in range(n):
            encode(msg)

    def raw_decode(n: int) -> None:
        for _ in range(n):
            decode(body)

    # name -> (loop, bytes per message, name of its raw baseline)
    table: dict[str, tuple[Loop, int, str]] = {
        "marshal+unmarshal": (pair, len(frame), "raw msgspec encode+decode"),
        "marshal only": (marshal, len(frame), "raw msgspec encode"),
        "unmarshal only": (unmarshal_only, len(frame), "raw msgspec decode"),
        "raw msgspec encode+decode": (raw_pair, len(body), ""),
        "raw msgspec encode": (raw_encode, len(body), ""),
        "raw msgspec decode": (raw_decode, len(body), ""),
    }
    loops = {name: loop for name, (loop, _, _) in table.items()}
    slices = {name: _warm_up(loop, WARMUP_SECONDS) for name, loop in loops.items()}
    figures = {name: Figure("codec", name, row_bytes, size, ratio_to=base) for name, (_, size, base) in table.items()}
    for _ in range(repeats):
        rates = _interleaved(loops, slices, seconds)
        for name, (_, _, base) in table.items():
            figures[name].rates.append(rates[name])
            if base:
                figures[name].ratios.append(rates[name] / rates[base])
    return list(figures.values())


# -- 2. memory backend: produce, then consume -----------------------------------------------------
def _memory_round(client: ms.Client, pack: ms.MsgPack, budget: float, max_msgs: int) -> tuple[int, float, float]:
    """Produce ``pack`` again and again (for ``budget`` seconds or ``max_msgs`` messages), then consume
    everything; returns (messages, produce seconds, consume seconds)."""
    with _channels(client) as channels, client.msg_stream() as producer, client.msg_stream() as consumer:
        producer.create_producers(channels)
        producer.start()
        consumer.create_consumers("bench", channels)
        consumer.start()
        gc.collect()
        sent = 0
        t0 = clock()
        deadline = t0 + budget
        while sent < max_msgs:
            producer.produce(pack)
            sent += len(pack.msgs)
            if clock() >= deadline:
                break
        t1 = clock()
        received = 0
        while received < sent:
            got = consumer.consume(timeout=CONSUME_TIMEOUT)
            if got is None:
                raise RuntimeError(f"memory backend: consume returned nothing after {received} of {sent} messages")
            received += len(got.msgs)
        t2 = clock()
    if received != sent:
        raise RuntimeError(f"memory backend: consumed {received} messages, produced {sent}")
    return sent, t1 - t0, t2 - t1


def bench_memory(client: ms.Client, row_bytes: int, seconds: float, repeats: int) -> list[Figure]:
    row = os.urandom(row_bytes)
    ts = ms.timestamp.now()
    pack = ms.MsgPack.of([insert_msg(i, ts + i, row) for i in range(PACK_SIZE)])
    size = _mean_frame_bytes(pack.msgs)
    max_msgs = max(1, int(ROUND_BYTES / size / PACK_SIZE)) * PACK_SIZE
    produce = Figure("memory", "produce", row_bytes, size)
    consume = Figure("memory", "consume", row_bytes, size)
    e2e = Figure("memory", "end-to-end (produce, then consume)", row_bytes, size)
    _memory_round(client, pack, WARMUP_SECONDS, max_msgs)
    for _ in range(repeats):
        msgs, t_produce, t_consume = 0, 0.0, 0.0
        while t_produce + t_consume < seconds:
            n, tp, tc = _memory_round(client, pack, seconds / 2, max_msgs)
            msgs += n
            t_produce += tp
            t_consume += tc
        produce.rates.append(msgs / t_produce)
        consume.rates.append(msgs / t_consume)
        e2e.rates.append(msgs / (t_produce + t_consume))
    return [produce, consume, e2e]


# -- 3. time-tick consume against plain consume ---------------------------------------------------
def _timetick_side(client: ms.Client, row: bytes, budget: float, max_msgs: int, tt: bool) -> tuple[int, int, float]:
    """One side of a time-tick round, on channels of its own: (data messages sent, messages timed,
    seconds). The consuming stream (``tt``: a TimeTickStream, else a plain MsgStream) joins first, by
    reading a tick broadcast before any data (untimed: the group join or subscribe, and the start of
    every channel's fetching); then packs of ``PACK_SIZE`` inserts, each followed by a broadcast tick
    above its timestamps, are produced (untimed); then the clock runs while the stream reads all of them.

    Both sides so time the same thing. (Timing from each side's first *data* pack would not: a time-tick
    stream's first pack is a complete tick, and to return it the stream has read, untimed, up to a tick
    on every channel, on a backend that serves channel by channel most of the round; a plain stream's
    first pack is one batch.)"""
    label = "time-tick" if tt else "plain"
    with _channels(client) as channels, client.tt_msg_stream() if tt else client.msg_stream() as stream:
        stream.create_consumers(f"bench-{label}", channels)
        stream.start()
        with client.msg_stream() as producer:
            producer.create_producers(channels)
            producer.start()
            ticker = ms.Ticker(producer, source_id=1)
            ts = ms.timestamp.now()
            ticker.tick(ts)  # below every data message: joins the stream, untimed
            primer = 1 if tt else len(channels)  # one empty tick pack, or the tick message of each channel
            while primer > 0:
                pack = stream.consume(timeout=CONSUME_TIMEOUT)
                if pack is None:
                    raise RuntimeError(f"{label}: the first tick did not come within {CONSUME_TIMEOUT} s")
                primer -= 1 if tt else len(pack.msgs)
            sent = 0
            deadline = clock() + budget
            while sent < max_msgs:
                msgs: list[ms.TsMsg] = [insert_msg(sent + i, ts + 1 + i, row) for i in range(PACK_SIZE)]
                ts += PACK_SIZE + 1
                producer.produce(ms.MsgPack.of(msgs))
                ticker.tick(ts)  # above every end_ts of this pack, below every one of the next
                sent += PACK_SIZE
                if clock() >= deadline:
                    break
        expected = sent if tt else sent + sent // PACK_SIZE * len(channels)  # a plain stream returns the ticks
        gc.collect()
        t0 = clock()
        drain(stream, 0, expected, label)
        elapsed = clock() - t0
    return sent, expected, elapsed


def timed_drain(
    stream: ms.MsgStream | ms.TimeTickStream,
    expected: int,
    label: str,
    timeout: float = CONSUME_TIMEOUT,
    stalled: type[Exception] = RuntimeError,
) -> tuple[int, float]:
    """Consume exactly ``expected`` messages: (messages timed, seconds). The first pack is not timed (it
    carries a broker's group join or subscribe); a consume that returns nothing raises ``stalled``."""
    first = stream.consume(timeout=timeout)
    if first is None:
        raise RuntimeError(f"{label} consume returned nothing within {timeout} s")
    skipped = len(first.msgs)
    gc.collect()
    t0 = clock()
    drain(stream, skipped, expected, label, timeout=timeout, stalled=stalled)
    elapsed = clock() - t0
    return expected - skipped, elapsed


def drain(
    stream: ms.MsgStream | ms.TimeTickStream,
    received: int,
    expected: int,
    label: str,
    *,
    timeout: float = CONSUME_TIMEOUT,
    stalled: type[Exception] = RuntimeError,
) -> None:
    """Consume until ``expected`` messages came, ``received`` of them already (:func:`take_until`); one
    message too many raises ``RuntimeError``."""

    def take(wait: float) -> int | None:
        got = stream.consume(timeout=wait)
        return None if got is None else len(got.msgs)

    received = take_until(take, received, expected, timeout, stalled, label=label)
    if received != expected:
        raise RuntimeError(f"{label} consume: got {received} messages, expected {expected}")


def take_until(
    take: Callable[[float], int | None],
    received: int,
    n_msgs: int,
    timeout: float,
    stalled: type[Exception] = RuntimeError,
    *,
    label: str = "msgstream",
) -> int:
    """Call ``take`` (a consume as a function of its timeout, returning how many messages came, or
    ``None``) until ``n_msgs`` messages have come (``received`` so far); a call that returns nothing
    within ``timeout`` raises ``stalled``. Returns the count."""
    while received < n_msgs:
        got = take(timeout)
        if got is None:
            raise stalled(f"{label} consume returned nothing after {received} of {n_msgs} messages")
        received += got
    return received


def _timetick_round(
    client: ms.Client, row: bytes, budget: float, max_msgs: int, plain_first: bool
) -> tuple[int, float, int, float]:
    """(plain messages timed, plain seconds, time-tick messages timed, time-tick seconds)."""
    sides = [False, True] if plain_first else [True, False]
    timed = {tt: _timetick_side(client, row, budget, max_msgs, tt) for tt in sides}
    return timed[False][1], timed[False][2], timed[True][1], timed[True][2]


def bench_timetick(client: ms.Client, row_bytes: int, seconds: float, repeats: int) -> list[Figure]:
    row = os.urandom(row_bytes)
    ts = ms.timestamp.now()
    size = _mean_frame_bytes([insert_msg(i, ts + i, row) for i in range(PACK_SIZE)])
    max_msgs = max(1, int(ROUND_BYTES / size / PACK_SIZE)) * PACK_SIZE
    plain = Figure("timetick", "plain consume (MsgStream)", row_bytes, size)
    tt = Figure("timetick", "time-tick consume (TimeTickStream)", row_bytes, size, ratio_to=plain.name)
    _timetick_round(client, row, WARMUP_SECONDS, max_msgs, plain_first=True)
    rounds = 0
    for _ in range(repeats):
        n_plain, t_plain, n_tt, t_tt = 0, 0.0, 0, 0.0
        while t_plain + t_tt < seconds:
            n_p, t_p, n_t, t_t = _timetick_round(client, row, seconds / 2, max_msgs, plain_first=rounds % 2 == 0)
            rounds += 1
            n_plain, t_plain, n_tt, t_tt = n_plain + n_p, t_plain + t_p, n_tt + n_t, t_tt + t_t
        plain.rates.append(n_plain / t_plain)  # data rows and ticks: what a plain consumer reads
        tt.rates.append(n_tt / t_tt)  # data rows: the ticks are read but not returned
        tt.ratios.append(tt.rates[-1] / plain.rates[-1])
    return [plain, tt]


# -- report -----------------------------------------------------------------------------------------
SECTION_TITLES = {
    "codec": "codec",
    "memory": "memory backend",
    "timetick": "time-tick vs plain",
    "sqlite": "sqlite:///",
}


def _size(n: float) -> str:
    return f"{n / 1024:g} KiB" if n >= 1024 and n % 1024 == 0 else f"{n:.0f} B"


def markdown_table(figures: list[Figure]) -> str:
    lines = [
        "| Section | Measurement | Row data | Bytes/msg | msgs/s | MB/s | Ratio | Spread |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for f in figures:
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}x {f.ratio_to}"
        lines.append(
            f"| {SECTION_TITLES[f.section]} | {f.name} | {_size(f.row_bytes)} | {f.msg_bytes:,.0f} |"
            f" {f.msgs_per_s:,.0f} | {f.mb_per_s:,.1f} | {ratio} | {f.spread:.1%} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    seconds: float = args.seconds
    repeats: int = args.repeats
    env = environment()
    print_environment(env, f"median of {repeats} runs of ~{seconds:g} s each, after a warm-up")

    started = clock()
    figures: list[Figure] = []
    for row_bytes in ROW_SIZES:
        _progress(f"codec, {_size(row_bytes)} rows ...")
        figures += bench_codec(row_bytes, seconds, repeats)
    with ms.connect(f"memory://bench-{uuid.uuid4().hex[:12]}") as client:
        for row_bytes in ROW_SIZES:
            _progress(f"memory backend, {_size(row_bytes)} rows ...")
            figures += bench_memory(client, row_bytes, seconds, repeats)
        for row_bytes in ROW_SIZES:
            _progress(f"time-tick vs plain consume, {_size(row_bytes)} rows ...")
            figures += bench_timetick(client, row_bytes, seconds, repeats)
    elapsed = clock() - started

    print("## Results\n")
    print(markdown_table(figures))
    print(
        f"\nOne-row InsertMsg; {NUM_CHANNELS} channels and packs of {PACK_SIZE} for the memory backend and"
        " time-tick rows. MB = 10^6 bytes of encoded messages (Bytes/msg). Ratio: median over runs of"
        " this row's throughput divided by the named row's, measured in the same run. Spread: (max - min)"
        f" / median of the {repeats} runs. Total time {elapsed:.0f} s."
    )
    if args.json is not None:
        report = {
            "benchmark": "core",
            "environment": env,
            "settings": {
                "seconds": seconds,
                "repeats": repeats,
                "pack_size": PACK_SIZE,
                "channels": NUM_CHANNELS,
                "row_sizes": list(ROW_SIZES),
            },
            "elapsed_s": round(elapsed, 1),
            "results": [f.as_dict() for f in figures],
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _progress(f"wrote {args.json}")
    return 0
