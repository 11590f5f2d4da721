"""Session brokers for the backend and fault suites: an existing one named by an environment variable,
else one started here (free loopback port, temp dir) and stopped at the end. And the ``--long`` option
of the fault suite."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.backends.brokers import Broker, start_pulsar_lite, start_redis, start_tansu


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="fault suite (tests/faults): the full runs (20 consumer kills, 100,000 corrupt frames, ...)",
    )
    parser.addoption("--fault-report", metavar="PATH", help="fault suite: write the figures it measured to PATH")


def _broker_url(
    env: str, factory: pytest.TempPathFactory, start: Callable[[Path], Broker], url: Callable[[int], str]
) -> Iterator[str]:
    if os.environ.get(env):
        yield os.environ[env]
        return
    broker = start(Path(factory.mktemp(env.lower())))
    try:
        yield url(broker.port)
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MSGSTREAM_REDIS_URL, else a redis-server started for this session."""
    yield from _broker_url("MSGSTREAM_REDIS_URL", tmp_path_factory, start_redis, lambda p: f"redis://127.0.0.1:{p}/0")


@pytest.fixture(scope="session")
def kafka_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MSGSTREAM_KAFKA_URL, else a Tansu broker started for this session. delete_topics=false: on Tansu,
    deleting a topic a consumer still subscribes to crashes librdkafka 2.16 (docs/backends.md)."""
    yield from _broker_url(
        "MSGSTREAM_KAFKA_URL", tmp_path_factory, start_tansu, lambda p: f"kafka://127.0.0.1:{p}/?delete_topics=false"
    )


@pytest.fixture(scope="session")
def pulsar_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MSGSTREAM_PULSAR_URL, else a pulsar-lite broker started for this session."""
    yield from _broker_url(
        "MSGSTREAM_PULSAR_URL", tmp_path_factory, start_pulsar_lite, lambda p: f"pulsar://127.0.0.1:{p}"
    )
