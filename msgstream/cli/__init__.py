"""msgstream: operate message-stream channels on any backend (docs/cli.md)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO

from .. import __version__, connect
from ..backend import URL, installed_schemes, scrub
from ..client import Client
from ..errors import (
    BackendNotFoundError,
    BrokerUnavailableError,
    InvalidArgumentError,
    InvalidURLError,
    MsgStreamError,
)
from . import _commands
from ._bench import bench
from ._demo import demo

__all__ = ["console", "main"]

#: exit statuses (docs/cli.md)
OK, FAILED, USAGE = 0, 1, 2

Command = Callable[[Client, argparse.Namespace, IO[str]], int]


class UsageError(Exception):
    """Arguments or configuration the command cannot run with (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msgstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="backend URL (default: $MSGSTREAM_URL)")
    common.add_argument("--json", action="store_true", help="print JSON lines instead of tables")
    common.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker (default 5)")

    def add(name: str, command: Command, help: str) -> argparse.ArgumentParser:  # noqa: A002
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(run=command)
        return p

    def channels_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("channel", nargs="+", metavar="CH")

    add("channels", _commands.channels, "list the channels created through msgstream, with their owners")
    p = add("create", _commands.create, "create channels; prints their ids, one a line")
    p.add_argument("--channels", type=_positive, default=1, help="how many (default 1)")
    p.add_argument("--role", required=True)
    p.add_argument("--address", default="")
    p.add_argument("--description", default="")
    channels_arg(add("describe", _commands.describe, "show the owner of channels"))
    channels_arg(add("destroy", _commands.destroy, "delete channels with their messages and subscriptions"))
    p = add("tail", _commands.tail, "print messages as they arrive (until interrupted, or --count)")
    channels_arg(p)
    p.add_argument("--from", dest="start", choices=["earliest", "latest"], default="latest")
    p.add_argument("--count", type=_natural, help="stop after this many messages")
    p.add_argument("--subscription", help="consume as this subscription and keep it (default: a throwaway one)")
    p.add_argument("--dispatcher", metavar="MODULE:OBJECT", help="an UnmarshalDispatcher knowing user types")
    p = add("produce", _commands.produce, "produce messages read from stdin as tail --json lines")
    channels_arg(p)
    p.add_argument("--dispatcher", metavar="MODULE:OBJECT", help="module defining user message types")
    p = add("lag", _commands.lag, "how far a subscription is behind on channels")
    p.add_argument("--subscription", required=True)
    channels_arg(p)
    add("subscriptions", _commands.subscriptions, "list a channel's subscriptions").add_argument("channel")
    p = add("drop-subscription", _commands.drop_subscription, "remove a subscription's state from channels")
    p.add_argument("--subscription", required=True)
    channels_arg(p)
    channels_arg(add("positions", _commands.positions, "the latest position of channels (for seek)"))
    p = add("bench", bench, "measure produce/consume rates and latency on temporary channels")
    p.add_argument("--messages", type=_positive, default=10_000, help="default 10000")
    p.add_argument("--size", type=_natural, default=1024, help="payload bytes per message (default 1024)")
    p.add_argument("--channels", type=_positive, default=4, help="default 4")
    d = sub.add_parser("demo", help="run a small Milvus-like pipeline (default: in-process memory://)")
    d.add_argument("--url", default="memory://", help="backend URL (default memory://)")
    d.add_argument("--channels", type=_positive, default=4)
    d.add_argument("--ticks", type=_natural, default=6)
    d.add_argument("--rows", type=_positive, default=8, help="rows inserted per tick")
    sub.add_parser("version", help="print versions and installed backends")
    return parser


def console() -> int:
    """The ``msgstream`` console script: :func:`main`, ending the process itself where the command left one
    of its threads blocked in a call that nothing can interrupt, whose presence aborts the interpreter's
    shutdown (SIGABRT): a connect past ``--timeout`` (a native client inside it, pulsar-client's), or
    produce's stdin reader after a bad line (it holds stdin's lock, which the shutdown's close of stdin
    waits for). Only for a process of its own: it skips ``atexit`` handlers."""
    status = main()
    if any(t.name in _LEFT_BLOCKED and t.is_alive() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``msgstream`` command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"msgstream {__version__}; backends: {', '.join(installed_schemes())}")
        return OK
    url = args.url or os.environ.get("MSGSTREAM_URL", "")
    try:
        if args.command == "demo":
            return demo(url, args.channels, args.ticks, args.rows)
        with _client(url, args.timeout) as client:
            status: int = args.run(client, args, sys.stdout)
            return status
    except UsageError as exc:
        return _fail(str(exc), url, USAGE)
    except (InvalidURLError, MsgStreamError) as exc:
        configuration = isinstance(exc, (InvalidURLError, BackendNotFoundError, InvalidArgumentError))
        return _fail(f"{type(exc).__name__}: {exc}", url, USAGE if configuration else FAILED)
    except BrokenPipeError:  # the reader went away (tail | head): nothing left to say
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (so the interpreter's final flush is quiet)
        return OK
    except KeyboardInterrupt:
        return _fail("interrupted", url, 130)
    except Exception as exc:  # an application: one line, never a traceback
        return _fail(f"unexpected {type(exc).__name__}: {exc}", url, FAILED)


@contextlib.contextmanager
def _client(url: str, timeout: float) -> Iterator[Client]:
    if not url:
        raise UsageError("no broker URL: pass --url or set MSGSTREAM_URL")
    deadline = time.monotonic() + timeout
    client = _connect_within(url, timeout)
    try:
        client.ping(timeout=max(0.1, deadline - time.monotonic()))
        yield client
    finally:
        client.close()


_CONNECTING = "msgstream-cli-connect"
_LEFT_BLOCKED = (_CONNECTING, _commands.READING)


def _connect_within(url: str, timeout: float) -> Client:
    """``connect(url)`` within ``timeout`` seconds. A backend checks its broker when it is made, on its own
    timeouts (several seconds, with retries): past ``timeout`` the command reports the broker
    unreachable, and the attempt is left to a daemon thread that the command's exit ends (see console)."""
    outcome: list[Client | BaseException] = []

    def attempt() -> None:
        try:
            outcome.append(connect(url))
        except BaseException as exc:  # handed to the command's thread
            outcome.append(exc)

    thread = threading.Thread(target=attempt, name=_CONNECTING, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise BrokerUnavailableError(f"no answer from the broker within {timeout:g}s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _fail(text: str, url: str, status: int) -> int:
    with contextlib.suppress(MsgStreamError):
        text = scrub(text, URL(url))
    line = " ".join(text.split())  # one line
    sys.stderr.write(f"msgstream: error: {line}\n")
    return status


def _natural(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value
