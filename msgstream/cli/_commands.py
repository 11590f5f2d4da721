"""The operator subcommands: each takes a connected client and the parsed arguments, writes its
output to ``out`` and returns the exit status (docs/cli.md)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import queue
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import IO, Any

from ..client import Client, CreateChannelRequest, OwnerDescription
from ..codec import UnmarshalDispatcher
from ..errors import ChannelNotFoundError, InvalidArgumentError, MsgStreamError, UnmarshalError
from ..messages import TsMsg
from ..pack import MsgPack
from ..stream import channel_lags
from ..values import Position, SubscriptionPosition
from ._format import json_line, message_from_record, message_record, message_types, position_record, table

_PRODUCE_BATCH = 500  # most lines produced in one call
READING = "msgstream-produce-stdin"  # the thread that reads produce's stdin


def channels(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """Channels destroyed while listing are left out; one without a readable owner record shows
    ``?`` as its role."""
    names: list[str] = []
    owners: list[OwnerDescription] = []
    for name in client.list_channels():
        try:
            owners.append(client.describe_channels([name]).descriptions[0].owner)
        except ChannelNotFoundError:
            continue
        except UnmarshalError:
            owners.append(OwnerDescription(role="?"))
        names.append(name)
    _channel_rows(names, owners, args.json, out)
    return 0


def create(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    owner = OwnerDescription(role=args.role, address=args.address, description_text=args.description)
    names = client.create_channels(CreateChannelRequest(owner=owner, num_channels=args.channels))
    if args.json:
        _channel_rows(names, [owner] * len(names), True, out)
    else:
        out.write("".join(f"{name}\n" for name in names))
    return 0


def describe(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    owners = [d.owner for d in client.describe_channels(args.channel).descriptions]
    _channel_rows(args.channel, owners, args.json, out)
    return 0


def destroy(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    client.destroy_channels(args.channel)
    if not args.json:
        out.write(f"destroyed {_plural(len(args.channel), 'channel')}\n")
    return 0


def subscriptions(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    names = client.list_subscriptions(args.channel)
    if args.json:
        out.write("".join(json_line({"channel": args.channel, "subscription": s}) for s in names))
    else:
        out.write("".join(f"{s}\n" for s in names))
    return 0


def drop_subscription(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    client.drop_subscription(args.subscription, args.channel)
    if not args.json:
        out.write(f"dropped subscription {args.subscription} on {_plural(len(args.channel), 'channel')}\n")
    return 0


def positions(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    client.describe_channels(args.channel)  # ChannelNotFoundError before anything else
    found = [Position(c, client.backend.latest_message_id(c) or b"", 0) for c in args.channel]
    if args.json:
        out.write("".join(json_line(position_record(p)) for p in found))
    else:
        out.write(table(["channel", "msg_id"], [(p.channel, p.msg_id.hex() or "(empty)") for p in found]))
    return 0


def lag(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """Read without joining the subscription, so a running consumer is not disturbed (no rebalance)."""
    client.describe_channels(args.channel)
    rows = channel_lags(client.backend, args.subscription, args.channel, {})
    _rows(["channel", "messages", "seconds"], [(r.channel, r.messages, r.seconds) for r in rows], args.json, out)
    return 0


def tail(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """Print messages as they arrive; ``--count`` stops after that many, else SIGINT/SIGTERM/SIGHUP stops.
    Only printed messages are acknowledged, so a kept ``--subscription`` resumes right after them."""
    client.describe_channels(args.channel)
    dispatcher = load_dispatcher(args.dispatcher) if args.dispatcher else None
    subscription = args.subscription or f"msgstream-tail-{uuid.uuid4().hex[:12]}"
    position = SubscriptionPosition.LATEST if args.start == "latest" else SubscriptionPosition.EARLIEST
    stop = threading.Event()
    with _stop_on_signals(stop):
        try:
            with client.msg_stream(auto_ack=False, on_error=_skip_bad_frame) as stream:
                stream.create_consumers(subscription, args.channel, dispatcher, position)
                printed = 0
                while not stop.is_set() and (args.count is None or printed < args.count):
                    pack = stream.consume(timeout=0.2)
                    if pack is None:
                        continue
                    msgs = pack.msgs if args.count is None else pack.msgs[: args.count - printed]
                    out.write("".join(_message_text(m, args.json) for m in msgs))
                    out.flush()
                    stream.ack(msgs)
                    printed += len(msgs)
        finally:
            if not args.subscription:  # per channel: one destroyed meanwhile must not keep it on the others
                for channel in args.channel:
                    with contextlib.suppress(ChannelNotFoundError):
                        client.drop_subscription(subscription, [channel])
    return 0


def produce(client: Client, args: argparse.Namespace, out: IO[str]) -> int:
    """Read tail --json lines from stdin and produce them: a message goes to the channel its
    ``channel`` key names when that is one of the given channels, else to ``hash_values[0] % N`` (the
    first channel for one without hash values)."""
    client.describe_channels(args.channel)
    if args.dispatcher:
        load_dispatcher(args.dispatcher)  # defines the user types
    types = message_types()
    index = {c: i for i, c in enumerate(args.channel)}
    sent = 0
    with client.msg_stream() as stream:
        stream.create_producers(args.channel)
        stdin = getattr(sys.stdin, "buffer", sys.stdin)  # bytes, decoded line by line: JSON lines are UTF-8
        for batch, error in _batches(stdin, types, index, len(args.channel)):
            if batch:
                targets = [t for t, _ in batch]
                stream.set_repack_func(functools.partial(_by_target, targets=targets))
                stream.produce(MsgPack.of([m for _, m in batch]))
                sent += len(batch)
            if error is not None:
                raise error
    if not args.json:
        out.write(f"produced {_plural(sent, 'message')}\n")
    return 0


def load_dispatcher(spec: str) -> UnmarshalDispatcher:
    """``module:object``: an UnmarshalDispatcher, or a function returning one."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InvalidArgumentError(f"--dispatcher takes module:object, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgumentError(f"--dispatcher {spec}: {exc}") from None
    if callable(obj) and not isinstance(obj, UnmarshalDispatcher):
        obj = obj()
    if not isinstance(obj, UnmarshalDispatcher):
        raise InvalidArgumentError(f"--dispatcher {spec} is a {type(obj).__name__}, not an UnmarshalDispatcher")
    return obj


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _channel_rows(names: list[str], owners: list[OwnerDescription], as_json: bool, out: IO[str]) -> None:
    rows = [(n, o.role, o.address, o.description_text) for n, o in zip(names, owners, strict=True)]
    _rows(["channel", "role", "address", "description"], rows, as_json, out)


def _rows(headers: list[str], rows: list[tuple[Any, ...]], as_json: bool, out: IO[str]) -> None:
    """``rows`` as a table under ``headers``, or as JSON lines keyed by them."""
    if as_json:
        out.write("".join(json_line(dict(zip(headers, row, strict=True))) for row in rows))
    else:
        out.write(table(headers, rows))


def _message_text(msg: TsMsg, as_json: bool) -> str:
    record = message_record(msg)
    if as_json:
        return json_line(record)
    props = " " + json.dumps(record["properties"], separators=(",", ":")) if record["properties"] else ""
    body = json.dumps(record["body"], separators=(",", ":"))
    return (
        f"{record['channel']} {record['msg_id']} {record['type']} ts={record['begin_ts']}..{record['end_ts']}"
        f" hash={record['hash_values']}{props} {body}\n"
    )


def _skip_bad_frame(exc: UnmarshalError) -> None:
    """tail goes on past a frame it cannot decode, saying so on stderr."""
    sys.stderr.write(f"msgstream: warning: skipped a message: {exc}\n")


def _by_target(msgs: list[TsMsg], hash_keys: list[list[int]], *, targets: list[int]) -> dict[int, MsgPack]:
    """A repack function sending ``msgs[i]`` to channel ``targets[i]``."""
    routed: dict[int, list[TsMsg]] = {}
    for msg, target in zip(msgs, targets, strict=True):
        routed.setdefault(target, []).append(msg)
    return {k: MsgPack.of(v) for k, v in routed.items()}


def _batches(
    source: IO[Any], types: dict[int, type[TsMsg]], index: dict[str, int], n: int
) -> Iterator[tuple[list[tuple[int, TsMsg]], MsgStreamError | None]]:
    """Batches of ``(channel index, message)`` read from ``source``: whatever lines are ready, at most
    ``_PRODUCE_BATCH``, so a following ``tail`` is copied as it comes. A bad line ends the input with
    an error naming it, after the lines before it."""
    lines: queue.Queue[str | bytes | Exception | None] = queue.Queue(maxsize=4 * _PRODUCE_BATCH)

    def read() -> None:
        try:
            for line in source:
                lines.put(line)
        except Exception as exc:  # a read error (or text that does not decode): the input ends there
            lines.put(exc)
        finally:
            lines.put(None)

    threading.Thread(target=read, name=READING, daemon=True).start()
    number = 0
    while True:
        batch: list[tuple[int, TsMsg]] = []
        line = lines.get()
        while line is not None:
            number += 1
            if isinstance(line, Exception):
                yield batch, InvalidArgumentError(f"stdin line {number}: {line}")
                return
            if line.strip():
                try:
                    record = json.loads(line.decode() if isinstance(line, bytes) else line)
                    msg = message_from_record(record, types)
                    channel = record.get("channel")
                    if channel is not None and not isinstance(channel, str):
                        raise InvalidArgumentError(f"channel must be a string, got {channel!r}")
                except (ValueError, MsgStreamError) as exc:
                    yield batch, InvalidArgumentError(f"stdin line {number}: {exc}")
                    return
                target = index.get(channel) if channel is not None else None
                if target is None:  # by hash, as the default repack does; without hash values, the first
                    target = msg.hash_values[0] % n if msg.hash_values else 0
                batch.append((target, msg))
            if len(batch) >= _PRODUCE_BATCH:
                break
            try:
                line = lines.get_nowait()
            except queue.Empty:
                break
        yield batch, None
        if line is None:
            return


#: SIGHUP where the platform has it (not on Windows)
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []))


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP (the terminal or ssh session closed) set ``stop`` instead of interrupting a
    broker call half-way."""
    saved = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
