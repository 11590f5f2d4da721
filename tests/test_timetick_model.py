"""TimeTickStream against a simple reference model, over random interleavings, batch sizes and crashes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import msgstream as ms


@dataclass(frozen=True)
class Event:
    channel: int
    ts: int
    tick: bool
    seq: int  # unique id of a data message


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, list[Event]]:
    """Per channel: data and ticks obeying the invariants (ticks rise; data after a tick is above it);
    then a random merge of the channels that keeps each channel's order."""
    n = draw(st.integers(1, 8))
    per_channel: list[list[Event]] = []
    seq = 0
    for c in range(n):
        events: list[Event] = []
        last_tick = 0
        for _ in range(draw(st.integers(0, 6))):
            for _ in range(draw(st.integers(0, 4))):
                events.append(Event(c, last_tick + draw(st.integers(1, 25)), False, seq))
                seq += 1
            last_tick += draw(st.integers(1, 12))  # small steps: ticks collide across channels
            events.append(Event(c, last_tick, True, -1))
        for _ in range(draw(st.integers(0, 3))):  # trailing data with no tick yet
            events.append(Event(c, last_tick + draw(st.integers(1, 25)), False, seq))
            seq += 1
        per_channel.append(events)
    merged: list[Event] = []
    cursors = [0] * n
    while any(cursors[c] < len(per_channel[c]) for c in range(n)):
        live = [c for c in range(n) if cursors[c] < len(per_channel[c])]
        c = draw(st.sampled_from(live))
        merged.append(per_channel[c][cursors[c]])
        cursors[c] += 1
    return n, merged


def reference(n: int, events: list[Event]) -> list[tuple[int, int, list[int]]]:
    """The packs a time-tick consumer must return: (begin_ts, end_ts, data seqs in order)."""
    ticks = [sorted({e.ts for e in events if e.tick and e.channel == c}) for c in range(n)]
    data = [e for e in events if not e.tick]
    packs = []
    prev = 0
    while True:
        nxt = [next((t for t in ts if t > prev), None) for ts in ticks]
        if any(t is None for t in nxt):
            return packs
        tick = min(t for t in nxt if t is not None)
        chosen = [e for e in data if prev < e.ts <= tick]  # arrival order is per-channel order...
        chosen.sort(key=lambda e: (e.ts, e.channel))  # ...then by ts, ties by channel, then arrival
        packs.append((prev, tick, [e.seq for e in chosen]))
        prev = tick


def _msg(e: Event) -> ms.TsMsg:
    if e.tick:
        return ms.TimeTickMsg(begin_ts=e.ts, end_ts=e.ts, hash_values=[e.channel])
    return ms.InsertMsg(begin_ts=e.ts, end_ts=e.ts, hash_values=[e.channel], row_ids=[e.seq])


def _summary(pack: ms.MsgPack) -> tuple[int, int, list[int]]:
    return pack.begin_ts, pack.end_ts, [m.row_ids[0] for m in pack.msgs if isinstance(m, ms.InsertMsg)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(1, 40), st.lists(st.integers(0, 12), max_size=3), st.booleans())
def test_packs_match_reference_across_crashes(
    scenario: tuple[int, list[Event]], batch: int, crash_after: list[int], same_subscription: bool
) -> None:
    n, events = scenario
    want = reference(n, events)
    with ms.connect(f"memory://tt-model-{uuid.uuid4().hex[:8]}") as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=ms.OwnerDescription(role="model"), num_channels=n))
        with client.msg_stream() as out:
            out.create_producers(chans)
            for k in range(0, len(events), 7):  # packs of 7 events, routed by hash value = channel
                out.produce(ms.MsgPack.of([_msg(e) for e in events[k : k + 7]]))
        got: list[tuple[int, int, list[int]]] = []
        checkpoint: list[bytes] | None = None
        crashes = sorted(crash_after)
        sub = "qn"
        while True:
            tt = client.tt_msg_stream(receive_batch=batch)
            tt.create_consumers(sub if same_subscription else f"qn-{len(got)}-{uuid.uuid4().hex[:6]}", chans)
            if checkpoint is not None:
                tt.seek([ms.Position.from_bytes(b) for b in checkpoint])
            tt.start()
            crashed = False
            while True:
                if crashes and len(got) >= crashes[0]:
                    crashes.pop(0)
                    crashed = True
                    break  # "crash": drop the stream without closing it, restart from the checkpoint
                pack = tt.consume(timeout=0.05)
                held = -1
                while pack is None and tt.buffered != held:  # None within the timeout, still reading
                    held = tt.buffered
                    pack = tt.consume(timeout=0.05)
                if pack is None:  # nothing more came: every complete tick was returned
                    break
                assert [p.channel for p in pack.end_positions] == chans
                assert all(p.timestamp == pack.end_ts for p in pack.end_positions)
                got.append(_summary(pack))
                checkpoint = [p.to_bytes() for p in pack.end_positions]
            if not crashed:
                tt.close()
                break
    assert got == want
