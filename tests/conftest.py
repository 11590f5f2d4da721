"""Session brokers for the backend and fault suites: an existing one named by an environment variable,
else one started here through scripts/broker.py (Apache Kafka, Apache Pulsar, redis-server on free
loopback ports) and stopped at the end. And the ``--long`` option of the fault suite."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scripts.broker import Broker, start_kafka, start_pulsar, start_redis


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="fault suite (tests/faults): the full runs (20 consumer kills, 100,000 corrupt frames, ...)",
    )
    parser.addoption("--fault-report", metavar="PATH", help="fault suite: write the figures it measured to PATH")


def _broker_url(env: str, factory: pytest.TempPathFactory, start: Callable[[Path], Broker]) -> Iterator[str]:
    if os.environ.get(env):
        yield os.environ[env]
        return
    broker = start(Path(factory.mktemp(env.lower())))
    try:
        yield broker.url
    finally:
        broker.stop()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A new sqlite:/// broker file for the test."""
    return f"sqlite:///{tmp_path}/broker.db"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MSGSTREAM_REDIS_URL, else a redis-server started for this session."""
    yield from _broker_url("MSGSTREAM_REDIS_URL", tmp_path_factory, start_redis)


@pytest.fixture(scope="session")
def kafka_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MSGSTREAM_KAFKA_URL, else Apache Kafka (one KRaft node) started for this session; a bare URL."""
    yield from _broker_url("MSGSTREAM_KAFKA_URL", tmp_path_factory, start_kafka)


@pytest.fixture(scope="session")
def _pulsar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str | None]]:
    if os.environ.get("MSGSTREAM_PULSAR_URL"):
        yield os.environ["MSGSTREAM_PULSAR_URL"], os.environ.get("MSGSTREAM_PULSAR_ADMIN_URL")
        return
    broker = start_pulsar(Path(tmp_path_factory.mktemp("pulsar")))
    try:
        yield broker.url, broker.admin_url
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def pulsar_url(_pulsar: tuple[str, str | None]) -> str:
    """MSGSTREAM_PULSAR_URL, else Apache Pulsar standalone started for this session; a bare URL."""
    return _pulsar[0]


@pytest.fixture(scope="session")
def pulsar_admin_url(_pulsar: tuple[str, str | None]) -> str:
    """The admin REST API of that broker (MSGSTREAM_PULSAR_ADMIN_URL beside MSGSTREAM_PULSAR_URL)."""
    if _pulsar[1] is None:
        pytest.fail("MSGSTREAM_PULSAR_URL is set without MSGSTREAM_PULSAR_ADMIN_URL; the admin tests need both")
    return _pulsar[1]
