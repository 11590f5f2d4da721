"""msgstream.aio against the real brokers beyond the conformance suite (which runs through it in
test_redis/test_kafka/test_pulsar): consumes cancelled at random moments lose and repeat nothing."""

from __future__ import annotations

import asyncio

import pytest

from ..test_aio import cancelled_consumes_lose_and_repeat_nothing


@pytest.mark.parametrize("broker", ["redis_url", "kafka_url", "pulsar_url"])
def test_cancelled_consumes_lose_and_repeat_nothing(broker: str, request: pytest.FixtureRequest) -> None:
    url: str = request.getfixturevalue(broker)
    cancels, packs = asyncio.run(cancelled_consumes_lose_and_repeat_nothing(url, n_msgs=1500, n_cancels=200))
    assert cancels == 200 and packs > 0
