"""``python -m benchmarks NAME [options]``: run one benchmark suite by name.

Every suite takes ``--seconds`` (length of one timed run), ``--repeats`` (runs per figure; the median
is reported) and ``--json PATH`` (also write the numbers there). A suite is a module with
``run(args: argparse.Namespace) -> int``; it is imported only when chosen, so a suite's client
libraries are needed only to run that suite. Options of one suite alone are declared in ``OPTIONS``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

#: name -> (module, one-line description)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "core": ("benchmarks.bench_core", "codec, memory backend and time-tick stream (no broker needed)"),
    "otel": ("benchmarks.bench_otel", "cost of message properties and of OpenTelemetry instrumentation on memory://"),
    "sqlite": ("benchmarks.bench_sqlite", "sqlite:/// backend against raw sqlite3, cross-process latency, idle CPU"),
    "redis": ("benchmarks.bench_redis", "Redis Streams backend against raw redis-py (starts its own redis-server)"),
    "kafka": ("benchmarks.bench_kafka", "Kafka backend against raw confluent-kafka (starts its own Apache Kafka)"),
    "pulsar": ("benchmarks.bench_pulsar", "Pulsar backend against raw pulsar-client (starts its own Apache Pulsar)"),
    "latency": ("benchmarks.bench_latency", "produce -> consume latency at a fixed rate, msgstream beside raw clients"),
    "scaling": (
        "benchmarks.bench_scaling",
        "throughput vs size and channels, time-tick vs plain, every backend",
    ),
    "peer": ("benchmarks.bench_peer", "msgstream against FastStream on the same Redis and Kafka brokers"),
    "aio": ("benchmarks.bench_aio", "msgstream.aio against the sync API, produce and consume, every backend; loop lag"),
    "all": ("benchmarks.bench_all", "everything above in one run: docs/benchmark-report.md and its plot"),
}


def _url_option(env: str, what: str, started: str) -> Callable[[argparse.ArgumentParser], None]:
    """``--url``: an existing broker (default: $``env``), else one the suite starts for the run."""

    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--url",
            default=os.environ.get(env) or None,
            help=f"an existing {what} (default: ${env}, else {started} started for the run on a free loopback port)",
        )

    return add


_redis_options = _url_option(
    "MSGSTREAM_REDIS_URL", "Redis server, redis://[[user]:password@]host[:port][/db]", "a redis-server"
)
_kafka_options = _url_option(
    "MSGSTREAM_KAFKA_URL", "Kafka broker, kafka://host:port[,host:port...][/][?options]", "Apache Kafka (KRaft)"
)
_pulsar_url = _url_option(
    "MSGSTREAM_PULSAR_URL",
    "Pulsar broker, pulsar://host:port[/?options] (add admin_url=http://host:8080 to delete topics after use)",
    "Apache Pulsar standalone",
)


def _pulsar_options(parser: argparse.ArgumentParser) -> None:
    _pulsar_url(parser)
    parser.add_argument(
        "--unbatched-only", action="store_true", help="measure the default (unbatched) topic layout only"
    )


def _latency_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=500.0, help="messages per second (default 500)")


def _scaling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also draw throughput vs message size to PNG")


def _sqlite_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--path", type=Path, help="the database file (default: a new one in a temporary directory)")


def _aio_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backends",
        default="memory,sqlite,redis,kafka,pulsar",
        help="comma-separated backends (default: all five; brokers from $MSGSTREAM_*_URL, else started)",
    )


def _all_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the report and plot go (default: docs/)")


#: name -> adds the options only that suite takes
OPTIONS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "scaling": _scaling_options,
    "all": _all_options,
    "redis": _redis_options,
    "kafka": _kafka_options,
    "pulsar": _pulsar_options,
    "latency": _latency_options,
    "sqlite": _sqlite_options,
    "aio": _aio_options,
}


#: suites whose timed runs default to other than 2 s: one-second runs keep `all` near 13 minutes on 2 cores
DEFAULT_SECONDS: dict[str, float] = {"all": 1.0}


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0 or math.isinf(value):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--seconds",
        type=_positive(float),
        default=None,
        help="length of one timed run, in seconds (default 2; 1 for all)",
    )
    common.add_argument(
        "--repeats", type=_positive(int), default=3, help="timed runs per figure; the median is reported (default 3)"
    )
    common.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Run one msgstream benchmark suite by name."
    )
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (_module, description) in BENCHMARKS.items():
        suite = sub.add_parser(name, parents=[common], help=description, description=description)
        if name in OPTIONS:
            OPTIONS[name](suite)
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = DEFAULT_SECONDS.get(args.benchmark, 2.0)
    module = importlib.import_module(BENCHMARKS[args.benchmark][0])
    status: int = module.run(args)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
