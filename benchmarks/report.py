"""Shared by the broker benchmarks: the target-carrying row, the Markdown table, small helpers."""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import msgstream as ms
from benchmarks.bench_core import Figure, insert_msg

Round = Callable[[], tuple[int, float]]  # one round of one side: (messages, timed seconds)
PackFrames = Callable[[], Iterable[bytes]]  # a raw produce side's source of one pack's frames
SendPack = Callable[[], object]  # sends one pack (and waits until the broker has it)
#: one side of a produce comparison: opened once per run segment (untimed), its send timed pack by pack,
#: and on closing it checks that what it sent landed
ProduceSide = Callable[[], "AbstractContextManager[SendPack]"]


@dataclass
class Row(Figure):
    """A figure with the project's target for its ratio (if it has one)."""

    target: float | None = None

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        return None if self.target is None or ratio is None else ratio >= self.target

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "target": self.target, "target_met": self.met}


#: how every broker benchmark's footer says which comparisons carry the targets
TARGET_RULE = (
    "msgstream/raw: median over runs of msgstream's rate divided by the named raw row's, measured in the same"
    " run. The targets apply to the comparisons of equal work: consume_frames against the raw client"
    " decoding nothing, typed consume against raw + unmarshal, typed produce against raw + marshal."
)


def size_text(n: float) -> str:
    return f"{n / 1024:g} KiB" if n >= 1024 and n % 1024 == 0 else f"{n:.0f} B"


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def target_text(row: Row) -> str:
    if row.target is None:
        return ""
    return f">= {row.target:.2f}x: {'met' if row.met else 'MISSED'}"


def verdicts(rows: list[Row]) -> str:
    """One line per row that carries a target: what it compares, the median ratio with each run's (the
    table's Spread is of the rates, which move with the broker from run to run; the ratios compare
    sides of the same run), and whether the target is met."""
    return "\n".join(
        f"- {r.section} {size_text(r.row_bytes)}, {r.name}: {r.ratio:.2f}x {r.ratio_to}"
        f" (runs: {', '.join(f'{x:.2f}' for x in r.ratios)}), target {target_text(r)}"
        for r in rows
        if r.target is not None and r.ratio is not None
    )


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| Operation | Measurement | Row data | Bytes/msg | msgs/s | MB/s | msgstream/raw | Target | Spread |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x {r.ratio_to}"
        lines.append(
            f"| {r.section} | {r.name} | {size_text(r.row_bytes)} | {r.msg_bytes:,.0f} | {r.msgs_per_s:,.0f} |"
            f" {r.mb_per_s:,.1f} | {ratio} | {target_text(r)} | {r.spread:.1%} |"
        )
    return "\n".join(lines)


def consume_sides(
    msgstream: Callable[[bool], tuple[int, float]],
    raw: Callable[[Callable[[bytes], ms.TsMsg] | None], tuple[int, float]],
) -> dict[str, Round]:
    """The four consume sides every broker benchmark compares (see :func:`consume_rows`), from its
    rounds ``msgstream(as_frames)`` and ``raw(unmarshal or None)``."""
    unmarshal = ms.UnmarshalDispatcher().unmarshal
    return {
        "msgstream frames": lambda: msgstream(True),
        "msgstream": lambda: msgstream(False),
        "raw": lambda: raw(None),
        "raw + unmarshal": lambda: raw(unmarshal),
    }


def consume_rows(raw_name: str, row_bytes: int, size: float, target: float, rates: dict[str, list[float]]) -> list[Row]:
    """The consume rows every broker benchmark reports. ``rates`` holds the per-run rates of the sides
    "msgstream frames" (``consume_frames``: payload bytes out, like the raw client), "msgstream"
    (``consume``: typed messages), "raw" (the raw client decoding nothing) and "raw + unmarshal" (the raw
    client decoding every payload). The target applies to the two comparisons of equal work: frames
    against raw, typed messages against raw + unmarshal."""
    frames = Row(
        "consume", "msgstream MsgStream.consume_frames (batch 1000)", row_bytes, size, ratio_to="raw", target=target
    )
    typed_name = "msgstream MsgStream.consume (batch 1000, typed messages)"
    typed = Row("consume", typed_name, row_bytes, size, ratio_to="raw")
    raw = Row("consume", raw_name, row_bytes, size)
    typed_codec = Row("consume", typed_name, row_bytes, size, ratio_to="raw + unmarshal", target=target)
    raw_codec = Row("consume", f"{raw_name} + unmarshal", row_bytes, size)
    frames.rates = rates["msgstream frames"]
    typed.rates = typed_codec.rates = rates["msgstream"]
    raw.rates, raw_codec.rates = rates["raw"], rates["raw + unmarshal"]
    frames.ratios = [m / r for m, r in zip(frames.rates, raw.rates, strict=True)]
    typed.ratios = [m / r for m, r in zip(typed.rates, raw.rates, strict=True)]
    typed_codec.ratios = [m / r for m, r in zip(typed.rates, raw_codec.rates, strict=True)]
    return [frames, typed, raw, typed_codec, raw_codec]


def receiver(stream: ms.MsgStream, frames: bool) -> Callable[[float], int | None]:
    """``stream.consume`` (typed messages) or ``stream.consume_frames``, as a function of the timeout
    returning how many messages came (``None``: nothing)."""
    if frames:

        def take_frames(timeout: float) -> int | None:
            pack = stream.consume_frames(timeout)
            return None if pack is None else len(pack)

        return take_frames

    def take(timeout: float) -> int | None:
        pack = stream.consume(timeout)
        return None if pack is None else len(pack.msgs)

    return take


@contextmanager
def subscribed(
    client: ms.Client, subscription: str, channel: str, frames: bool, batch: int
) -> Iterator[tuple[ms.MsgStream, Callable[[float], int | None]]]:
    """A started stream consuming ``channel`` as a member of ``subscription`` (``receive_batch=batch``)
    for the ``with`` block, with its :func:`receiver`; garbage collected before the round starts."""
    with client.msg_stream(receive_batch=batch) as stream:
        stream.create_consumers(subscription, [channel])
        stream.start()
        take = receiver(stream, frames)
        gc.collect()
        yield stream, take


def runs(sides: dict[str, Round], seconds: float, repeats: int, min_rounds: int = 1) -> dict[str, list[float]]:
    """Msgs/s of each side in each of ``repeats`` runs: the sides take turns, the order alternating, until
    the run's timed seconds reach ``seconds`` and each side had ``min_rounds`` rounds."""
    rates: dict[str, list[float]] = {name: [] for name in sides}
    turn = 0
    for _ in range(repeats):
        msgs = dict.fromkeys(sides, 0)
        spent = dict.fromkeys(sides, 0.0)
        rounds = 0
        while True:
            names = list(sides) if turn % 2 == 0 else list(reversed(sides))
            turn += 1
            for name in names:
                n, t = sides[name]()
                msgs[name] += n
                spent[name] += t
            rounds += 1
            if rounds >= min_rounds and sum(spent.values()) >= seconds:
                break
        for name in sides:
            rates[name].append(msgs[name] / spent[name])
    return rates


def workload(row_bytes: int, pack_size: int) -> tuple[ms.MsgPack, list[bytes], float]:
    """A pack of ``pack_size`` one-row inserts of ``row_bytes`` random row data, its frames, and the mean
    frame size."""
    row = os.urandom(row_bytes)
    ts = ms.timestamp.now()
    pack = ms.MsgPack.of([insert_msg(i, ts + i, row) for i in range(pack_size)])
    frames = [m.marshal() for m in pack.msgs]
    return pack, frames, sum(map(len, frames)) / len(frames)


class Sent:
    """A produce side's send of one pack that counts the messages sent, for the side's check of what
    landed when it closes: ``sent = Sent(lambda: stream.produce(pack), 1000)``, then ``sent.msgs``."""

    def __init__(self, send: Callable[[], object], pack_size: int) -> None:
        self._send = send
        self._pack_size = pack_size
        self.msgs = 0

    def __call__(self) -> None:
        self._send()
        self.msgs += self._pack_size


def produce_sides(
    msgstream: ProduceSide,
    raw: Callable[[PackFrames], AbstractContextManager[SendPack]],
    pack: ms.MsgPack,
    frames: list[bytes],
) -> dict[str, ProduceSide]:
    """The three produce sides every broker benchmark compares (see :func:`produce_rows`): msgstream's
    side, and the raw client's side ``raw(pack_frames)`` fed the ready-made ``frames`` of ``pack``
    ("raw") or marshalling the pack's messages as it sends them ("raw + marshal"), the way a user of the
    raw client who has the same messages must."""
    msgs = pack.msgs
    return {
        "msgstream": msgstream,
        "raw": lambda: raw(lambda: frames),
        "raw + marshal": lambda: raw(lambda: (m.marshal() for m in msgs)),
    }


def interleaved(
    sides: dict[str, ProduceSide], seconds: float, repeats: int, pack_size: int, max_packs: int
) -> dict[str, list[float]]:
    """Msgs/s of each side in each of ``repeats`` runs, the sides taking turns pack by pack.

    A run opens every side (untimed), then each side sends one pack of ``pack_size`` messages in turn, who goes
    first rotating and the order reversing every full rotation, and only the sends are timed; after ``max_packs``
    turns the sides are closed (each checks what landed) and opened afresh, until the run's timed seconds reach
    ``seconds``. Turns of one pack keep the sides a few milliseconds apart, so a broker whose speed drifts (log
    segments rolling, a garbage collection, the JIT compiler, another process) does so for every side alike;
    turns of whole rounds (~0.2 s each) would leave a side's figure to the moment of its turn."""
    if max_packs < 1:
        raise ValueError(f"max_packs must be at least 1, got {max_packs}")
    rates: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    n = len(names)
    turn = 0  # across segments and runs: who goes first rotates, and the order reverses every n turns,
    # so every side goes first, and follows each other side, equally often
    for _ in range(repeats):
        spent = dict.fromkeys(names, 0.0)
        packs = 0
        while True:
            with ExitStack() as opened:
                send = {name: opened.enter_context(sides[name]()) for name in names}
                gc.collect()
                for _ in range(max_packs):
                    first = turn % n
                    order = names[first:] + names[:first]
                    if turn // n % 2:
                        order.reverse()
                    turn += 1
                    for name in order:
                        t0 = time.perf_counter()
                        send[name]()
                        spent[name] += time.perf_counter() - t0
                    packs += 1
                    if sum(spent.values()) >= seconds:
                        break
            if sum(spent.values()) >= seconds:
                break
        for name in names:
            rates[name].append(packs * pack_size / spent[name])
    return rates


def produce_rows(raw_name: str, row_bytes: int, size: float, target: float, rates: dict[str, list[float]]) -> list[Row]:
    """The produce rows every broker benchmark reports, from the per-run ``rates`` (:func:`interleaved`) of
    the :func:`produce_sides` "msgstream" (``produce`` of typed messages), "raw" (ready-made frames) and
    "raw + marshal" (the raw client marshalling every message it sends). As for consume, the target
    applies to the comparison of equal work: typed messages in, against raw + marshal. msgstream against
    ready-made frames is reported too; it charges msgstream for the encoding that the raw side skips."""
    typed_name = "msgstream MsgStream.produce (packs of 1000, typed messages)"
    typed = Row("produce", typed_name, row_bytes, size, ratio_to="raw")
    raw = Row("produce", raw_name, row_bytes, size)
    typed_codec = Row("produce", typed_name, row_bytes, size, ratio_to="raw + marshal", target=target)
    raw_codec = Row("produce", f"{raw_name}, marshalling each message", row_bytes, size)
    typed.rates = typed_codec.rates = rates["msgstream"]
    raw.rates, raw_codec.rates = rates["raw"], rates["raw + marshal"]
    typed.ratios = [m / r for m, r in zip(typed.rates, raw.rates, strict=True)]
    typed_codec.ratios = [m / r for m, r in zip(typed.rates, raw_codec.rates, strict=True)]
    return [typed, raw, typed_codec, raw_codec]
