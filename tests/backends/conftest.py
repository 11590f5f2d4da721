from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .brokers import start_redis, start_tansu


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MSGSTREAM_REDIS_URL, else a redis-server started for this session."""
    if os.environ.get("MSGSTREAM_REDIS_URL"):
        yield os.environ["MSGSTREAM_REDIS_URL"]
        return
    broker = start_redis(Path(tmp_path_factory.mktemp("redis")))
    try:
        yield f"redis://127.0.0.1:{broker.port}/0"
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MSGSTREAM_KAFKA_URL, else a Tansu broker started for this session."""
    if os.environ.get("MSGSTREAM_KAFKA_URL"):
        yield os.environ["MSGSTREAM_KAFKA_URL"]
        return
    broker = start_tansu(Path(tmp_path_factory.mktemp("tansu")))
    try:  # delete_topics=false: Tansu + librdkafka 2.16 crash on deleting a subscribed topic (backends.md)
        yield f"kafka://127.0.0.1:{broker.port}/?delete_topics=false"
    finally:
        broker.stop()
