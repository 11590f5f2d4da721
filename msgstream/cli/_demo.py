"""``msgstream demo``: a small Milvus-like pipeline on any backend."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter

from .. import connect, repack
from ..client import Client, CreateChannelRequest, OwnerDescription
from ..errors import MsgStreamError
from ..messages import DeleteMsg, InsertMsg, TsMsg
from ..pack import MsgPack, Position
from ..timestamp import HybridClock, Ticker


def demo(url: str, num_channels: int, ticks: int, rows_per_tick: int) -> int:
    """A small Milvus-like pipeline: a proxy writes inserts and deletes routed row by row across DML
    channels and broadcasts a time tick after each batch; a query node reads through the time-tick
    stream and prints one line per tick; then it checkpoints, "restarts" and resumes."""
    out = sys.stdout.write
    with connect(url) as client:
        owner = OwnerDescription(role="proxy", address="127.0.0.1:19530", description_text="dml")
        channels = client.create_channels(CreateChannelRequest(owner=owner, num_channels=num_channels))
        try:
            status = _run(client, channels, ticks, rows_per_tick)
        except BaseException:  # also after an error or an interrupt the demo leaves nothing behind,
            with contextlib.suppress(MsgStreamError):  # and the error is the one raised, not the clean-up's
                client.destroy_channels(channels)
            raise
        client.destroy_channels(channels)
        out(f"destroyed {len(channels)} channels\n")
        return status


def _run(client: Client, channels: list[str], ticks: int, rows_per_tick: int) -> int:
    out = sys.stdout.write
    desc = client.describe_channels(channels).descriptions[0].owner
    out(f"created {len(channels)} channels on {client.url}, owner {desc.role}@{desc.address}")
    out(f" ({desc.description_text})\n")
    clock = HybridClock()
    with client.msg_stream() as producer, client.tt_msg_stream() as query_node:
        producer.create_producers(channels)
        producer.set_repack_func(repack.insert_delete)
        producer.start()
        query_node.create_consumers("query-node-1", channels)
        query_node.start()
        ticker = Ticker(producer, clock=clock, source_id=1)
        next_pk = 0
        for batch in range(ticks):
            pks = list(range(next_pk, next_pk + rows_per_tick))
            next_pk += rows_per_tick
            stamps = [clock.next() for _ in pks]
            msgs: list[TsMsg] = [
                InsertMsg(
                    begin_ts=stamps[0],
                    end_ts=stamps[-1],
                    collection_name="books",
                    hash_values=[repack.hash_primary_key(pk) for pk in pks],
                    row_ids=pks,
                    timestamps=stamps,
                    row_data=[f"book {pk}".encode() for pk in pks],
                )
            ]
            if batch % 2 == 1:  # delete the first row of the previous batch
                pk = pks[0] - rows_per_tick
                ts = clock.next()
                msgs.append(
                    DeleteMsg(
                        begin_ts=ts,
                        end_ts=ts,
                        collection_name="books",
                        hash_values=[repack.hash_primary_key(pk)],
                        primary_keys=[pk],
                        timestamps=[ts],
                    )
                )
            producer.produce(MsgPack.of(msgs))
            ticker.tick()
        checkpoint: list[Position] = []
        for _ in range(ticks // 2):
            pack = query_node.consume(timeout=5.0)
            if pack is None:
                out("no tick arrived in 5 s\n")
                return 1
            out(_describe(pack))
            checkpoint = pack.end_positions
    blobs = [p.to_bytes() for p in checkpoint]
    out(f"checkpointed {len(blobs)} positions ({sum(map(len, blobs))} bytes); query node restarts\n")
    with client.tt_msg_stream() as query_node:
        query_node.create_consumers("query-node-1", channels)
        query_node.seek([Position.from_bytes(b) for b in blobs])
        query_node.start()
        while (pack := query_node.consume(timeout=0.5)) is not None:
            out(_describe(pack))
    return 0


def _describe(pack: MsgPack) -> str:
    kinds = Counter(type(m).__name__ for m in pack.msgs)
    rows = sum(len(m.row_ids) for m in pack.msgs if isinstance(m, InsertMsg))
    channels = len({m.position.channel for m in pack.msgs if m.position})
    what = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no data"
    return f"tick {pack.end_ts} (after {pack.begin_ts}): {what}; {rows} rows over {channels} channels\n"
