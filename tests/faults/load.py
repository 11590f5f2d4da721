"""The consuming side of the broker-kill tests: consume through the outages until the producer has
stopped and every confirmed row arrived."""

from __future__ import annotations

import threading
import time

import msgstream as ms
from msgstream.errors import MsgStreamError


def consume_confirmed(
    inp: ms.MsgStream,
    *,
    produced: threading.Event,
    confirmed: set[int],
    drain_deadline: list[float],
    output: list[tuple[str, int, bytes]],
    seen: set[int],
) -> None:
    """Consume into ``output`` ((channel, row, message id) per message) and ``seen`` (rows) until
    ``produced`` is set and every row of ``confirmed`` was seen, or nothing arrives after
    ``drain_deadline[0]``. Retriable errors (the broker away) are ridden out; others are raised."""
    while True:
        if produced.is_set() and confirmed <= seen:
            return
        try:
            pack = inp.consume(timeout=0.5)
        except MsgStreamError as exc:
            if not exc.retriable:
                raise
            if produced.is_set() and time.monotonic() > drain_deadline[0]:
                return
            time.sleep(0.05)
            continue
        if pack is None:
            if produced.is_set() and time.monotonic() > drain_deadline[0]:
                return
            continue
        got = [
            (p.channel, m.row_ids[0], p.msg_id) for m in pack.msgs if isinstance(m, ms.InsertMsg) and (p := m.position)
        ]
        output.extend(got)
        seen.update(r for _, r, _ in got)
