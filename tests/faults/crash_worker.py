"""A consumer that checkpoints, for the consumer-crash test: run as a separate process and SIGKILLed at
random points.

``python crash_worker.py URL CHANNELS STATE MODE TOTAL [SUBSCRIPTION]``

MODE ``plain`` / ``tt``: each start reads STATE (JSON: the rows output so far and the positions after
them), subscribes under a new subscription name, seeks to the saved positions, and consumes. After
every pack it writes the pack's rows and the new positions to STATE in one atomic replace (a temp
file, fsync, rename): output and checkpoint never disagree, which makes the output exactly-once
although the broker delivers at least once. ``plain`` uses a MsgStream, ``tt`` a TimeTickStream (the
rows of one tick per pack). It stops when TOTAL rows are out, printing ``done``.

MODE ``resume``: no checkpoint of positions; every start joins SUBSCRIPTION again and relies on the
broker to resume after what was acknowledged (acks are deferred to the next consume, so a pack is
acknowledged only once it is in STATE). The output is then at-least-once: no loss, and at most the
packs in flight at a kill repeated. It stops when every row of 0..TOTAL-1 is out.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import msgstream as ms


def load(state: Path) -> tuple[list[int], dict[str, str]]:
    if not state.exists():
        return [], {}
    saved = json.loads(state.read_text())
    return saved["rows"], saved["positions"]


def save(state: Path, rows: list[int], positions: dict[str, str]) -> None:
    tmp = state.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump({"rows": rows, "positions": positions}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, state)


def main() -> int:
    url, channels, state_path, mode, total = sys.argv[1:6]
    if mode == "resume":
        return resume(url, channels.split(","), Path(state_path), int(total), sys.argv[6])
    chans = channels.split(",")
    state = Path(state_path)
    rows, positions = load(state)
    with ms.connect(url) as client:
        stream: ms.MsgStream | ms.TimeTickStream = (
            client.tt_msg_stream() if mode == "tt" else client.msg_stream(receive_batch=50)
        )
        # a new subscription each start: where to resume is in the checkpoint, not in the broker
        stream.create_consumers(f"crash-{uuid.uuid4().hex[:10]}", chans)
        if positions:
            stream.seek([ms.Position.from_bytes(bytes.fromhex(p)) for p in positions.values()])
        stream.start()
        while len(rows) < int(total):
            pack = stream.consume(timeout=30)
            if pack is None:
                print(f"stuck at {len(rows)} rows", flush=True)
                return 1
            rows += [m.row_ids[0] for m in pack.msgs if isinstance(m, ms.InsertMsg)]
            if mode == "tt":  # a time-tick pack's end positions cover every channel
                positions = {p.channel: p.to_bytes().hex() for p in pack.end_positions}
            else:
                positions.update({p.channel: p.to_bytes().hex() for p in pack.end_positions})
            save(state, rows, positions)
        stream.close()
    print("done", flush=True)
    return 0


def resume(url: str, chans: list[str], state: Path, total: int, subscription: str) -> int:
    rows, _ = load(state)
    with ms.connect(url) as client:
        stream = client.msg_stream(receive_batch=50)
        stream.create_consumers(subscription, chans)
        stream.start()
        while len(set(rows)) < total:
            pack = stream.consume(timeout=30)
            if pack is None:
                print(f"stuck at {len(set(rows))} distinct rows", flush=True)
                return 1
            rows += [m.row_ids[0] for m in pack.msgs if isinstance(m, ms.InsertMsg)]
            save(state, rows, {})
        stream.consume(timeout=0)  # acknowledges the last pack
        stream.close()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
